import numpy as np
import pytest

from dqrm_lightning.data.encoding import CategoricalEncoder, build_vocab, vocab_dir_for
from dqrm_lightning.data.prepare import explicit_jobs, prepare, terabyte_jobs
from tests.helpers.criteo import raw_line


def _write(path, values_c1):
    """One line per value of C1 (other categoricals constant)."""
    path.write_text("\n".join(raw_line(cat=[v] + ["aa"] * 25) for v in values_c1) + "\n")
    return path


def test_hash_encoding_is_value_modulo_table_size():
    encoder = CategoricalEncoder("hash", [7] * 26, max_ind_range=100)
    raw = np.full((2, 26), 1234, dtype=np.uint32)
    raw[1, 0] = 0xFFFFFFFF
    ids = encoder.encode(raw)
    assert ids[0, 0] == (1234 % 100) % 7
    assert ids[1, 0] == (0xFFFFFFFF % 100) % 7


def test_vocab_is_first_seen_over_train_val_test(tmp_path):
    train = _write(tmp_path / "train.tsv", ["30", "10", "30", "20"])
    val = _write(tmp_path / "val.tsv", ["40", "10"])
    test = _write(tmp_path / "test.tsv", ["50"])
    out = tmp_path / "p"
    prepare(explicit_jobs({"train": [str(train)], "val": [str(val)], "test": [str(test)]}), out)
    sizes = build_vocab(out)
    assert sizes[0] == 5
    assert sizes[1] == 1
    encoder = CategoricalEncoder("vocab", sizes, vocab_dir=str(vocab_dir_for(out, None, 1)))
    raw = np.zeros((6, 26), dtype=np.uint32)
    raw[:, 0] = [0x30, 0x10, 0x20, 0x40, 0x50, 0x99]  # 0x99 never seen -> 0
    raw[:, 1:] = 0xAA
    np.testing.assert_array_equal(encoder.encode(raw)[:, 0], [0, 1, 2, 3, 4, 0])


def test_vocab_min_frequency_and_max_ind_range(tmp_path):
    train = _write(tmp_path / "train.tsv", ["1", "2", "2", "3", "3", "3", "13"])
    out = tmp_path / "p"
    prepare(explicit_jobs({"train": [str(train)]}), out)
    sizes = build_vocab(out, max_ind_range=10, min_frequency=2)  # 13 % 10 == 3: four 3s
    assert sizes[0] == 3  # rare bucket + {2, 3}
    encoder = CategoricalEncoder("vocab", sizes, max_ind_range=10, vocab_dir=str(vocab_dir_for(out, 10, 2)))
    raw = np.full((3, 26), 0xAA, dtype=np.uint32)
    raw[:, 0] = [1, 2, 23]
    np.testing.assert_array_equal(encoder.encode(raw)[:, 0], [0, 1, 2])


def test_terabyte_layout(tmp_path):
    for day in range(24):
        (tmp_path / f"day_{day}").write_text("\n".join(raw_line(label=day % 2) for _ in range(5)) + "\n")
    jobs = terabyte_jobs(tmp_path)
    meta = prepare(jobs, tmp_path / "p")
    assert meta["splits"]["train"]["rows"] == 23 * 5
    assert meta["splits"]["test"]["rows"] == 3
    assert meta["splits"]["val"]["rows"] == 2
    (tmp_path / "day_7").unlink()
    with pytest.raises(FileNotFoundError, match="day_7"):
        terabyte_jobs(tmp_path)
