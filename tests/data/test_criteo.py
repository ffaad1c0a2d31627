import gzip
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dqrm_lightning.data.criteo import CriteoFormatError, ParseStats, iter_parsed, parse_file
from tests.helpers.criteo import raw_line, write_rows


def test_real_rows_match_hand_computation(criteo_sample):
    rows = parse_file(criteo_sample)
    assert len(rows) == 200
    # line 1: "0 | '' 3 260 '' 17668 '' '' 33 '' '' '' 0 '' | 05db9164 08d6d899 ..."
    assert rows.labels[0] == 0
    expected = [0, 3, 260, 0, 17668, 0, 0, 33, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(rows.dense[0], [math.log(x + 1) for x in expected], rtol=1e-6)
    assert rows.cat[0, 0] == 0x05DB9164
    assert rows.cat[0, 1] == 0x08D6D899
    # line 2: I2 = -1 becomes 0; I4 = 35; C26 and C25 empty -> 0
    assert rows.dense[1, 1] == 0.0
    assert rows.dense[1, 3] == pytest.approx(math.log(36))
    assert rows.cat[1, 0] == 0x68FD1E64
    assert rows.cat[1, 25] == 0
    assert rows.cat[1, 23] == 0xDED4AAC9
    # line 3: I1 = 0, I9 = 523, I10 = 0, C2 = 38a947a1
    assert rows.dense[2, 8] == pytest.approx(math.log(524))
    assert rows.dense[2, 9] == 0.0
    assert rows.cat[2, 1] == 0x38A947A1
    assert rows.labels.sum() == 49  # 24.5 % positives in this sample


def test_gzip_and_crlf_parse_like_plain(tmp_path, criteo_sample):
    data = Path(criteo_sample).read_bytes()
    gz = tmp_path / "s.tsv.gz"
    gz.write_bytes(gzip.compress(data))
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(data.replace(b"\n", b"\r\n"))
    plain = parse_file(criteo_sample)
    for other in (parse_file(gz), parse_file(crlf)):
        np.testing.assert_array_equal(plain.labels, other.labels)
        np.testing.assert_array_equal(plain.dense, other.dense)
        np.testing.assert_array_equal(plain.cat, other.cat)


def test_short_hex_and_uppercase(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text(raw_line(1, cat=["A"] + ["ff"] * 24 + ["DEADBEEF"]) + "\n")
    rows = parse_file(path)
    assert rows.cat[0, 0] == 10
    assert rows.cat[0, 1] == 255
    assert rows.cat[0, 25] == 0xDEADBEEF


BAD_LINES = [
    (raw_line()[: raw_line().rfind("\t")], 3, None, "expected 40 tab-separated fields, found 39"),
    (raw_line() + "\t", 3, None, "found 41"),
    (raw_line(cat=["zz000000"] + ["0"] * 25), 3, "C1", "hex digits"),
    (raw_line(cat=["0"] * 25 + ["123456789"]), 3, "C26", "hex digits"),
    (raw_line(dense=["1.5"] + ["0"] * 12), 3, "I1", "integer"),
    (raw_line(dense=["0"] * 12 + ["x"]), 3, "I13", "integer"),
    ("2" + raw_line()[1:], 3, "label", "label must be 0 or 1"),
    (raw_line()[1:], 3, "label", "label must be 0 or 1"),
    ("", 3, None, "found 1"),
]


@pytest.mark.parametrize(("line", "line_no", "column", "message"), BAD_LINES)
def test_malformed_line_names_file_line_and_field(tmp_path, line, line_no, column, message):
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join([raw_line(), raw_line(1), line, raw_line()]) + "\n")
    with pytest.raises(CriteoFormatError, match=message) as info:
        parse_file(path)
    assert info.value.path == str(path)
    assert info.value.line == line_no
    assert info.value.column == column
    assert f"{path}:{line_no}" in str(info.value)


def test_error_line_number_in_later_block(tmp_path):
    path = write_rows(tmp_path / "many.tsv", 3000)
    lines = path.read_text().splitlines()
    lines[2500] = lines[2500].replace("\t", "\tq", 1)  # label "0q"/"1q"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CriteoFormatError) as info:
        list(iter_parsed(path, block_bytes=4096))
    assert info.value.line == 2501


def test_skip_mode_counts_and_keeps_good_rows(tmp_path):
    path = tmp_path / "mixed.tsv"
    path.write_text("\n".join([raw_line(), "garbage", raw_line(1), raw_line(cat=["g"] * 26), raw_line(0)]) + "\n")
    stats = ParseStats()
    rows = [r for r, _, _ in iter_parsed(path, on_bad_line="skip", stats=stats)]
    assert sum(len(r) for r in rows) == 3
    assert stats.skipped == 2
    assert stats.examples is not None
    assert ":2" in stats.examples[0]
    assert ":4" in stats.examples[1]
    np.testing.assert_array_equal(np.concatenate([r.labels for r in rows]), [0, 1, 0])


def test_empty_and_truncated_gzip(tmp_path, criteo_sample):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(CriteoFormatError, match="file is empty"):
        parse_file(empty)
    gz = tmp_path / "cut.tsv.gz"
    gz.write_bytes(gzip.compress(Path(criteo_sample).read_bytes() * 20)[:3000])
    with pytest.raises(CriteoFormatError, match="truncated") as info:
        parse_file(gz)
    assert info.value.path == str(gz)


def test_a_truncated_gzip_names_where_the_readable_data_ends(tmp_path, criteo_sample):
    import zlib

    data = Path(criteo_sample).read_bytes() * 40  # 8,000 lines
    gz = tmp_path / "cut.tsv.gz"
    gz.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    readable = zlib.decompressobj(wbits=31).decompress(gz.read_bytes()).count(b"\n")  # what survives the cut
    with pytest.raises(CriteoFormatError, match=r"truncated compressed stream after line \d+") as info:
        parse_file(gz)
    assert readable - 600 <= info.value.line <= readable + 1  # within a 64 KiB read of the break, not line 1


def _unlabeled_copy(source: Path, target: Path) -> Path:
    """The file without its label column: 39 fields per line, as Kaggle's test.txt or logs to score."""
    lines = Path(source).read_bytes().splitlines(keepends=True)
    target.write_bytes(b"".join(line.split(b"\t", 1)[1] for line in lines))
    return target


def test_unlabeled_file_parses_on_the_fast_path_like_the_labeled_one(tmp_path, criteo_sample, monkeypatch):
    from dqrm_lightning.data import criteo

    unlabeled = _unlabeled_copy(criteo_sample, tmp_path / "logs.tsv")
    gz = tmp_path / "logs.tsv.gz"
    gz.write_bytes(gzip.compress(unlabeled.read_bytes().replace(b"\n", b"\r\n")))
    labeled = parse_file(criteo_sample)
    monkeypatch.setattr(criteo, "_slow_path", None)  # valid blocks never leave pyarrow's reader
    assert criteo.is_labeled(criteo_sample)
    assert not criteo.is_labeled(unlabeled)
    assert not criteo.is_labeled(gz)
    assert labeled.labeled
    for path in (unlabeled, gz):
        rows = parse_file(path)
        assert not rows.labeled
        np.testing.assert_array_equal(rows.labels, np.zeros(200, dtype=np.uint8))
        np.testing.assert_array_equal(rows.dense, labeled.dense)
        np.testing.assert_array_equal(rows.cat, labeled.cat)


UNLABELED_BAD_LINES = [
    (raw_line(), "expected 39 tab-separated fields (an unlabeled file: line 1 has 39), found 40", None),
    (raw_line()[2:] + "\t", "expected 39 tab-separated fields (an unlabeled file: line 1 has 39), found 40", None),
    (raw_line(cat=["0"] * 25 + ["zz"])[2:], "hex digits", "C26"),
    (raw_line(dense=["x"] + ["0"] * 12)[2:], "integer", "I1"),
    ("", "found 1", None),
]


@pytest.mark.parametrize(
    ("line", "message", "column"), UNLABELED_BAD_LINES, ids=["labeled", "41", "C26", "I1", "empty"]
)
def test_bad_line_of_an_unlabeled_file_names_file_line_and_field(tmp_path, line, message, column):
    path = tmp_path / "logs.tsv"
    good = raw_line()[2:]  # without "0\t": 39 fields
    path.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(CriteoFormatError, match=re.escape(message)) as info:
        parse_file(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 3, column)
    stats = ParseStats()
    rows = [r for r, _, _ in iter_parsed(path, on_bad_line="skip", stats=stats)]
    assert (sum(len(r) for r in rows), stats.skipped) == (3, 1)


def test_a_labeled_file_with_an_unlabeled_line_names_it(tmp_path):
    path = tmp_path / "mixed.tsv"
    path.write_text("\n".join([raw_line(), raw_line(1), raw_line()[2:], raw_line()]) + "\n")
    with pytest.raises(
        CriteoFormatError, match=r"expected 40 tab-separated fields, found 39 \(a line without label"
    ) as info:
        parse_file(path)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_a_resumed_parse_keeps_the_kind_of_the_files_first_line(tmp_path):
    path = tmp_path / "logs.tsv"
    good = raw_line()[2:]
    path.write_text("\n".join([good, good, raw_line(), good]) + "\n")
    offset = 2 * (len(good) + 1)  # resume at line 3, a labeled line: still a bad line of an unlabeled file
    stats = ParseStats()
    rows = [r for r, _, _ in iter_parsed(path, "skip", stats, start_offset=offset, first_line=3)]
    assert [r.labeled for r in rows] == [False]
    assert (sum(len(r) for r in rows), stats.skipped) == (1, 1)
    assert stats.examples is not None
    assert f"{path}:3" in stats.examples[0]
