"""Property-based tests of the raw Criteo parser against a plain reading of the format.

Every input either parses to exactly what :func:`reference` (a direct transcription of the format in
:mod:`dqrm_lightning.data.criteo`'s docstring) gives, or raises :class:`CriteoFormatError` naming the file, the first
bad line and its first bad field. Nothing else may escape: no pyarrow, numpy, gzip, zlib or Unicode errors.

The parser has two paths: pyarrow's reader for blocks it accepts, and a line-by-line check for blocks it rejects. A
valid block goes through the fast path; the same block handed to the line-by-line path (``on_bad_line="skip"``, which
then re-reads the good lines) must give the same values; inputs with bad lines reach both paths.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dqrm_lightning.data.criteo import (
    CAT_FEATURE_COUNT,
    COLUMN_NAMES,
    FIELD_COUNT,
    INT_FEATURE_COUNT,
    UNLABELED_FIELD_COUNT,
    CriteoFormatError,
    ParseStats,
    iter_parsed,
    parse_block,
)
from dqrm_lightning.data.prepare import PrepareOptions, explicit_jobs, kaggle_jobs, prepare, shard_paths

# DQRM_FUZZ_EXAMPLES=2000 runs a longer search; the default of 100 takes about 10 s for the whole file.
_EXAMPLES = int(os.environ.get("DQRM_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(
    max_examples=max(1, _EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ROW_1 = b"\t".join([b"1", *[b"7"] * INT_FEATURE_COUNT, *[b"0a"] * CAT_FEATURE_COUNT])
ROW_0 = b"\t".join([b"0", *[b""] * INT_FEATURE_COUNT, *[b"DEADBEEF"] * CAT_FEATURE_COUNT])
UNLABELED = b"\t".join([*[b"3"] * INT_FEATURE_COUNT, *[b"0b"] * CAT_FEATURE_COUNT])  # 39 fields


def _with(row: bytes, column: str, value: bytes) -> bytes:
    fields = row.split(b"\t")
    fields[COLUMN_NAMES.index(column)] = value
    return b"\t".join(fields)


# ---------------------------------------------------------------- the reference reading of the format

_INT = re.compile(rb"-?[0-9]+")
_HEX = re.compile(rb"[0-9a-fA-F]{1,8}")


@dataclass
class Expected:
    """What the format says about a file: the valid rows (with line numbers) and the bad lines (line, field)."""

    lines: list[int]
    labels: list[int]
    dense: list[list[float]]
    cat: list[list[int]]
    bad: list[tuple[int, str | None]]
    empty: bool = False


def _to_int(field: bytes) -> int:
    """``int()`` that also takes integers longer than Python's 4300-digit conversion limit."""
    digits = field.lstrip(b"-").lstrip(b"0") or b"0"
    if len(digits) > 19:
        return 2**64 if not field.startswith(b"-") else -(2**64)
    return -int(digits) if field.startswith(b"-") else int(digits)


def _bad_field(fields: list[bytes]) -> str | None:
    """The first bad field of a 40-field row (an unlabeled row is checked with a label "0" put in front)."""
    if fields[0] not in (b"0", b"1"):
        return "label"
    for j in range(1, 1 + INT_FEATURE_COUNT):
        f = fields[j]
        if f and not (_INT.fullmatch(f) and -(2**63) <= _to_int(f) < 2**63):
            return COLUMN_NAMES[j]
    for j in range(1 + INT_FEATURE_COUNT, FIELD_COUNT):
        if fields[j] and not _HEX.fullmatch(fields[j]):
            return COLUMN_NAMES[j]
    return None


def reference(data: bytes) -> Expected:
    """Lines end with ``\\n`` (the last may lack it), one ``\\r`` before it is dropped; 40 tab-separated fields, or 39
    (no label, read as 0) in every line when the first line has 39."""
    expected = Expected([], [], [], [], [], empty=not data)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    first = (lines[0][:-1] if lines[0].endswith(b"\r") else lines[0]).split(b"\t") if lines else []
    labeled = len(first) != UNLABELED_FIELD_COUNT
    for number, line in enumerate(lines, start=1):
        fields = (line[:-1] if line.endswith(b"\r") else line).split(b"\t")
        if len(fields) != (FIELD_COUNT if labeled else UNLABELED_FIELD_COUNT):
            expected.bad.append((number, None))
            continue
        if not labeled:
            fields = [b"0", *fields]
        column = _bad_field(fields)
        if column is not None:
            expected.bad.append((number, column))
            continue
        expected.lines.append(number)
        expected.labels.append(int(fields[0]))
        ints = [_to_int(f) if f else 0 for f in fields[1 : 1 + INT_FEATURE_COUNT]]
        expected.dense.append([float(np.float32(math.log1p(max(v, 0)))) for v in ints])
        expected.cat.append([int(f, 16) if f else 0 for f in fields[1 + INT_FEATURE_COUNT :]])
    return expected


# ---------------------------------------------------------------- generators

_label = st.sampled_from([b"0", b"1"])
_int = st.one_of(
    st.just(b""),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: str(v).encode()),
    st.integers(0, 10**6).map(lambda v: b"000" + str(v).encode()),  # leading zeros are still an integer
)
_hex = st.one_of(
    st.just(b""),
    st.builds(
        lambda value, width, upper: (f"{value:0{width}X}" if upper else f"{value:0{width}x}").encode()[-8:],
        st.integers(0, 2**32 - 1),
        st.integers(1, 8),
        st.booleans(),
    ).filter(lambda s: len(s) >= 1),
)
valid_row = st.tuples(_label, st.tuples(*[_int] * INT_FEATURE_COUNT), st.tuples(*[_hex] * CAT_FEATURE_COUNT)).map(
    lambda r: b"\t".join([r[0], *r[1], *r[2]])
)
valid_unlabeled_row = st.tuples(st.tuples(*[_int] * INT_FEATURE_COUNT), st.tuples(*[_hex] * CAT_FEATURE_COUNT)).map(
    lambda r: b"\t".join([*r[0], *r[1]])
)

# Field values that are wrong somewhere in the format, and a few right ones, to splice into valid rows.
_odd_values = st.one_of(
    st.sampled_from(
        [
            b"+5",
            b" 5",
            b"5 ",
            b"0x10",
            b"0X1f",
            b"1e3",
            b"1.0",
            b"-",
            b"--1",
            b"00",
            b"01",
            b"-0",
            b" 1",
            b"\xef\xbb\xbf0",
            b"9223372036854775808",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"1" * 5000,
            b"0" * 5000 + b"7",
            b"123456789",
            b"zz",
            b"g",
            b"\x00",
            b"\xff\xfe",
            b"\r",
            b"a\rb",
            "é".encode(),
            "١٢".encode(),
            b"NaN",
            b"",
            b"\t",
            b"0\t",
            b'"1"',
            b"'0'",
        ]
    ),
    st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=12),
    st.integers().map(lambda v: str(v).encode()),
)


@st.composite
def mutated_row(draw: st.DrawFn) -> bytes:
    """A valid (labeled or unlabeled) row with one change: a field replaced, a field added or dropped, a byte
    inserted, or a BOM."""
    row = draw(st.one_of(valid_row, valid_unlabeled_row))
    kind = draw(st.sampled_from(["field", "field", "add", "drop", "insert", "bom", "trailing_tab"]))
    fields = row.split(b"\t")
    if kind == "field":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(_odd_values)
        return b"\t".join(fields)
    if kind == "add":
        fields.insert(draw(st.integers(0, len(fields))), draw(_odd_values))
        return b"\t".join(fields)
    if kind == "drop":
        del fields[draw(st.integers(0, len(fields) - 1))]
        return b"\t".join(fields)
    if kind == "insert":
        at = draw(st.integers(0, len(row)))
        return row[:at] + draw(st.sampled_from([b"\r", b" ", b"x", b"\x00", b"\xc3", b"+", b"-", b"\r\r"])) + row[at:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + row
    return row + b"\t"


def _join(rows: list[bytes], newline: bytes, final_newline: bool) -> bytes:
    return newline.join(rows) + (newline if final_newline and rows else b"")


valid_file = st.builds(
    _join,
    st.one_of(st.lists(valid_row, min_size=1, max_size=12), st.lists(valid_unlabeled_row, min_size=1, max_size=12)),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)
mixed_file = st.builds(
    _join,
    st.lists(st.one_of(valid_row, valid_unlabeled_row, mutated_row(), st.just(b"")), min_size=0, max_size=10),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.booleans(),
)
noise_file = st.one_of(
    st.binary(max_size=400),
    st.text(alphabet="01-9aF\t\r\n x+é\x00", max_size=400).map(lambda s: s.encode()),
)
any_file = st.one_of(valid_file, mixed_file, noise_file)
block_bytes = st.sampled_from([1, 64, 300, 16 << 20])


# ---------------------------------------------------------------- running the parser


def _write(directory: Path, data: bytes, compressed: bool) -> Path:
    path = directory / ("in.tsv.gz" if compressed else "in.tsv")
    path.write_bytes(gzip.compress(data) if compressed else data)
    return path


def _parse(path: Path, on_bad_line: str, blocks: int) -> tuple[ParseStats, dict[str, np.ndarray]]:
    stats = ParseStats()
    parts = []
    for rows, _, _ in iter_parsed(path, on_bad_line, stats, block_bytes=blocks):
        lines = rows.line_numbers
        if lines is None:
            lines = np.arange(rows.first_line, rows.first_line + len(rows))
        parts.append((lines, rows.labels, rows.dense, rows.cat))
    out = {
        "lines": np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
        "labels": np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint8),
        "dense": np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, INT_FEATURE_COUNT), np.float32),
        "cat": np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, CAT_FEATURE_COUNT), np.uint32),
    }
    return stats, out


def _assert_rows(got: dict[str, np.ndarray], expected: Expected) -> None:
    np.testing.assert_array_equal(got["lines"], expected.lines)
    np.testing.assert_array_equal(got["labels"], expected.labels)
    assert got["labels"].dtype == np.uint8
    assert got["dense"].dtype == np.float32
    assert got["cat"].dtype == np.uint32
    np.testing.assert_array_equal(got["dense"], np.float32(expected.dense).reshape(-1, INT_FEATURE_COUNT))
    np.testing.assert_array_equal(got["cat"], np.uint32(expected.cat).reshape(-1, CAT_FEATURE_COUNT))


def _assert_names(err: CriteoFormatError, path: Path, line: int | None, column: str | None) -> None:
    assert err.path == str(path)
    assert err.line == line
    assert err.column == column
    assert str(err).startswith(str(path) if line is None else f"{path}:{line}")
    if column is not None:
        assert f"(field {column})" in str(err)


def check_against_reference(path: Path, data: bytes, blocks: int) -> None:
    """Both modes on one file: rows equal the reference, or the first bad line and field are named."""
    expected = reference(data)
    if expected.empty:
        for mode in ("error", "skip"):
            with pytest.raises(CriteoFormatError, match="file is empty") as info:
                _parse(path, mode, blocks)
            _assert_names(info.value, path, None, None)
        return
    if expected.bad:
        with pytest.raises(CriteoFormatError) as info:
            _parse(path, "error", blocks)
        _assert_names(info.value, path, *expected.bad[0])
    else:
        _, got = _parse(path, "error", blocks)
        _assert_rows(got, expected)
    stats, got = _parse(path, "skip", blocks)
    _assert_rows(got, expected)
    assert stats.skipped == len(expected.bad)
    assert stats.rows == len(expected.lines)


# ---------------------------------------------------------------- the properties


@FUZZ
@given(data=valid_file, blocks=block_bytes)
@example(data=ROW_1 + b"\n" + ROW_0, blocks=1)  # last line without its newline
@example(data=UNLABELED + b"\n" + b"\t" * 38, blocks=16 << 20)  # an unlabeled row of empty fields is valid
@example(data=_with(ROW_1, "I1", b"-9223372036854775808"), blocks=16 << 20)  # int64's minimum is an int64
@example(data=_with(ROW_1, "I1", b"0" * 5000 + b"7"), blocks=16 << 20)  # leading zeros beyond Python's digit limit
def test_valid_rows_parse_like_the_reference_on_both_paths(tmp_path, data, blocks):
    expected = reference(data)
    assert not expected.bad
    path = _write(tmp_path, data, compressed=False)
    _, fast = _parse(path, "error", blocks)
    _assert_rows(fast, expected)
    # the line-by-line path (taken when pyarrow rejects a block) re-reads the valid rows of the block
    stats = ParseStats()
    slow = parse_block(data, path, 1, "skip", stats, parsed=pa.ArrowInvalid("forced"))
    assert stats.skipped == 0
    lines = slow.line_numbers if slow.line_numbers is not None else np.arange(len(slow)) + slow.first_line
    _assert_rows({"lines": lines, "labels": slow.labels, "dense": slow.dense, "cat": slow.cat}, expected)


@FUZZ
@given(data=any_file, blocks=block_bytes)
@example(data=_with(ROW_1, "I1", b"+5"), blocks=16 << 20)  # pyarrow rejects "+5"
@example(data=_with(ROW_1, "I1", b" 5"), blocks=16 << 20)  # pyarrow trims spaces around integers
@example(data=_with(ROW_1, "I3", b"0x10"), blocks=16 << 20)  # pyarrow reads 0x-prefixed hexadecimal integers
@example(data=_with(ROW_1, "label", b"01"), blocks=16 << 20)  # pyarrow reads the label as an integer
@example(data=_with(ROW_1, "label", b"-0"), blocks=16 << 20)
@example(data=b"\xef\xbb\xbf" + ROW_0, blocks=16 << 20)  # pyarrow skips a byte-order mark at a block's start
@example(data=ROW_1 + b"\n" + ROW_0 + b"\n\xef\xbb\xbf" + ROW_0, blocks=64)
@example(data=ROW_1 + b"\r" + ROW_0 + b"\n" + ROW_1 + b"\n", blocks=16 << 20)  # pyarrow ends a row at a lone CR
@example(data=ROW_1 + b"\r" + ROW_0 + b"\n+" + ROW_1 + b"\n", blocks=16 << 20)
@example(data=_with(ROW_1, "I2", b"1" * 5000), blocks=16 << 20)  # Python's int() refuses over 4300 digits
@example(data=b"garbage\n" + _with(ROW_1, "I1", b"+5"), blocks=16 << 20)  # skip mode re-reads the good lines
@example(data=b"\n", blocks=16 << 20)
# rows after lines dropped at the start of a block keep their line numbers
@example(data=b"garbage\n" + ROW_1 + b"\n" + ROW_0 + b"\n", blocks=16 << 20)
@example(data=ROW_1 + b"\n\n", blocks=16 << 20)
@example(data=ROW_1 + b"\r\r\n", blocks=16 << 20)
@example(data=ROW_1 + b"\t\r\n", blocks=16 << 20)
# an unlabeled file (its first line has 39 fields): an empty line is not a row of 39 empty fields, a labeled line is bad
@example(data=UNLABELED + b"\n\n" + UNLABELED + b"\n", blocks=16 << 20)
@example(data=UNLABELED + b"\r\n\r\n" + UNLABELED, blocks=16 << 20)
@example(data=UNLABELED + b"\n" + UNLABELED + b"\n\r", blocks=16 << 20)
@example(data=UNLABELED + b"\n" + ROW_1 + b"\n" + UNLABELED + b"\n", blocks=16 << 20)
@example(data=ROW_1 + b"\n" + UNLABELED + b"\n", blocks=64)  # a labeled file: 39 fields are a bad line
@example(data=b"\xef\xbb\xbf" + UNLABELED + b"\n" + UNLABELED, blocks=16 << 20)
def test_any_input_parses_like_the_reference_or_names_the_bad_line(tmp_path, data, blocks):
    check_against_reference(_write(tmp_path, data, compressed=False), data, blocks)


@FEW
@given(data=any_file)
def test_gzip_files_parse_like_their_content(tmp_path, data):
    check_against_reference(_write(tmp_path, data, compressed=True), data, 16 << 20)


@FUZZ
@given(data=valid_file, cut=st.floats(0, 1, exclude_max=True), flip=st.integers(0, 2**16), kind=st.integers(0, 2))
@example(data=ROW_1, cut=0.0, flip=0, kind=0)  # a 0-byte .gz
@example(data=ROW_1, cut=0.5, flip=0, kind=0)
def test_truncated_or_corrupt_gzip_is_a_clear_error(tmp_path, data, cut, flip, kind):
    payload = gzip.compress((data if data.endswith(b"\n") else data + b"\n") * 3)
    if kind == 0:
        payload = payload[: int(len(payload) * cut)]  # cut short (possibly to nothing)
    elif kind == 1:
        at = flip % len(payload)
        payload = payload[:at] + bytes([payload[at] ^ (1 + flip // len(payload) % 255)]) + payload[at + 1 :]
    else:
        payload = b"not gzip at all " + payload
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(payload)
    try:
        content = gzip.decompress(payload)
    except (EOFError, OSError, zlib.error):
        content = None
    if content is not None:  # e.g. a flipped bit in the header's timestamp: still a valid stream
        check_against_reference(path, content, 16 << 20)
        return
    if not payload:
        with pytest.raises(CriteoFormatError, match="file is empty"):
            _parse(path, "error", 16 << 20)
        return
    # a flipped byte may first decompress to garbage lines, which are named as such
    message = None if kind == 1 else "corrupt or truncated compressed stream"
    for mode in ("error", "skip"):
        with pytest.raises(CriteoFormatError, match=message) as info:
            _parse(path, mode, 300)
        assert info.value.path == str(path)
        assert info.value.line is not None
        assert str(info.value).startswith(f"{path}:{info.value.line}")


@FEW
@given(data=any_file, compressed=st.booleans(), truncate=st.booleans())
@example(data=ROW_1 + b"\n" + _with(ROW_0, "I1", b"0x10") + b"\n", compressed=False, truncate=False)
@example(data=(ROW_1 + b"\n") * 8, compressed=True, truncate=True)  # kaggle_jobs counts the lines of a cut .gz
def test_prepare_on_fuzzed_files(tmp_path, data, compressed, truncate):
    """``dqrm data prepare`` (explicit and Kaggle layouts, skip mode) keeps the reference rows or names the file."""
    path = _write(tmp_path, data, compressed)
    truncate = truncate and compressed
    if truncate:
        path.write_bytes(path.read_bytes()[:-9])  # into the deflate stream: the trailer is 8 bytes
    expected = reference(data)
    total_lines = len(expected.lines) + len(expected.bad)
    with tempfile.TemporaryDirectory(dir=tmp_path) as out:
        for name in ("explicit", "kaggle"):

            def run(name=name):
                jobs = explicit_jobs({"train": [str(path)]}) if name == "explicit" else kaggle_jobs(path)
                return prepare(jobs, Path(out) / name, PrepareOptions(on_bad_line="skip"))

            if truncate or expected.empty or (name == "kaggle" and total_lines < 7):  # 7 days need 7 lines
                with pytest.raises(CriteoFormatError) as info:
                    run()
                assert info.value.path == str(path)
                continue
            meta = run()
            assert meta["skipped_lines"] == len(expected.bad)
            assert meta["rows"] == len(expected.lines)
            # days 1-6 train, day 7's first half test, second half val: in this order the rows are in file order
            shards = [p for split in ("train", "test", "val") for p, _ in shard_paths(Path(out) / name, split)]
            cat = np.concatenate([np.load(f"{p}.cat.npy") for p in shards]) if shards else np.zeros((0, 26))
            labels = np.concatenate([np.load(f"{p}.labels.npy") for p in shards]) if shards else np.zeros(0)
            np.testing.assert_array_equal(cat.reshape(-1, CAT_FEATURE_COUNT), np.uint32(expected.cat).reshape(-1, 26))
            np.testing.assert_array_equal(labels, expected.labels)
