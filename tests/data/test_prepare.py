import json

import numpy as np
import pytest

from dqrm_lightning.data import prepare as prepare_mod
from dqrm_lightning.data.criteo import CriteoFormatError
from dqrm_lightning.data.prepare import PrepareOptions, explicit_jobs, kaggle_jobs, prepare, shard_paths
from tests.helpers.criteo import row_ids, write_rows


def _rows_of(out, split):
    return np.concatenate([row_ids(np.load(f"{p}.dense.npy")) for p, _ in shard_paths(out, split)] or [np.zeros(0)])


def test_kaggle_split_is_dlrms_seven_days(tmp_path):
    # 100 lines -> days of 15,15,14,14,14,14,14 (DLRM: the first 100 % 7 days get one more line)
    train = write_rows(tmp_path / "train.txt", 100)
    out = tmp_path / "prep"
    meta = prepare(kaggle_jobs(train), out, PrepareOptions(rows_per_shard=32))
    assert meta["splits"]["train"]["rows"] == 86
    np.testing.assert_array_equal(_rows_of(out, "train"), np.arange(86))
    np.testing.assert_array_equal(_rows_of(out, "test"), np.arange(86, 93))  # first half of day 7
    np.testing.assert_array_equal(_rows_of(out, "val"), np.arange(93, 100))


def test_shards_hold_parsed_values(tmp_path, criteo_sample):
    out = tmp_path / "prep"
    prepare(explicit_jobs({"train": [str(criteo_sample)]}), out, PrepareOptions(rows_per_shard=64))
    shards = shard_paths(out, "train")
    assert sum(rows for _, rows in shards) == 200
    cat = np.concatenate([np.load(f"{p}.cat.npy") for p, _ in shards])
    assert cat.dtype == np.uint32
    assert cat[0, 0] == 0x05DB9164


def test_resume_after_interruption_gives_identical_output(tmp_path, monkeypatch):
    raw = write_rows(tmp_path / "a.tsv", 5000)
    raw2 = write_rows(tmp_path / "b.tsv", 3000, seed=1)
    jobs = explicit_jobs({"train": [str(raw)], "val": [str(raw2)]})
    options = PrepareOptions(rows_per_shard=1000)
    reference = prepare(jobs, tmp_path / "ref", options)

    calls = {"n": 0}
    original = prepare_mod._write_shard

    def crashing_write(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")  # interrupted mid-way
        original(*args)

    monkeypatch.setattr(prepare_mod, "_write_shard", crashing_write)
    monkeypatch.setattr(prepare_mod, "iter_parsed", _small_blocks(prepare_mod.iter_parsed))
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(jobs, tmp_path / "resumed", options)
    progress = json.loads((tmp_path / "resumed" / "_progress.json").read_text())
    assert len(progress["shards"]["train"]) == 3  # three shards were recorded before the interruption
    monkeypatch.setattr(prepare_mod, "_write_shard", original)
    resumed = prepare(jobs, tmp_path / "resumed", options)
    assert resumed["splits"]["train"]["rows"] == reference["splits"]["train"]["rows"] == 5000
    for split in ("train", "val"):
        np.testing.assert_array_equal(_rows_of(tmp_path / "resumed", split), _rows_of(tmp_path / "ref", split))


def _small_blocks(original):
    def wrapper(*args, **kwargs):
        kwargs["block_bytes"] = 20000
        return original(*args, **kwargs)

    return wrapper


def test_changed_inputs_are_refused_in_the_same_directory(tmp_path):
    raw = write_rows(tmp_path / "a.tsv", 50)
    prepare(explicit_jobs({"train": [str(raw)]}), tmp_path / "p")
    with pytest.raises(FileExistsError):
        prepare(explicit_jobs({"train": [str(raw)]}), tmp_path / "p", PrepareOptions(rows_per_shard=7))


def test_negative_subsampling_drops_only_training_negatives(tmp_path):
    raw = write_rows(tmp_path / "a.tsv", 4000)
    jobs = explicit_jobs({"train": [str(raw)], "test": [str(raw)]})
    meta = prepare(jobs, tmp_path / "p", PrepareOptions(negative_subsample=0.875, seed=3))
    labels = np.concatenate([np.load(f"{p}.labels.npy") for p, _ in shard_paths(tmp_path / "p", "train")])
    positives = int((np.load(f"{shard_paths(tmp_path / 'p', 'test')[0][0]}.labels.npy") == 1).sum())
    assert (labels == 1).sum() == positives  # every positive kept
    negatives = 4000 - positives
    assert 0.08 * negatives < (labels == 0).sum() < 0.17 * negatives
    assert meta["splits"]["test"]["rows"] == 4000


def _unlabeled(source, target):
    target.write_text("".join(line.split("\t", 1)[1] for line in source.read_text().splitlines(keepends=True)))
    return target


def test_unlabeled_files_make_an_unlabeled_split(tmp_path):
    raw = write_rows(tmp_path / "a.tsv", 300)
    logs = _unlabeled(write_rows(tmp_path / "b.tsv", 120, seed=1), tmp_path / "logs.tsv")
    jobs = explicit_jobs({"train": [str(raw)], "test": [str(logs)]})
    # negatives are dropped from labeled rows only: unlabeled rows (label 0) are all kept
    options = PrepareOptions(rows_per_shard=50, negative_subsample=0.5, subsample_splits=("train", "test"))
    meta = prepare(jobs, tmp_path / "p", options)
    assert {s: v["labeled"] for s, v in meta["splits"].items()} == {"train": True, "val": True, "test": False}
    assert meta["splits"]["test"]["rows"] == 120
    np.testing.assert_array_equal(_rows_of(tmp_path / "p", "test"), np.arange(120))
    labels = np.concatenate([np.load(f"{p}.labels.npy") for p, _ in shard_paths(tmp_path / "p", "test")])
    np.testing.assert_array_equal(labels, np.zeros(120, dtype=np.uint8))
    assert prepare_mod.split_is_labeled(meta, "train")
    assert not prepare_mod.split_is_labeled(meta, "test")
    # a meta.json written before unlabeled input existed has no flag: its splits are labeled
    old = {"splits": {"test": {k: v for k, v in meta["splits"]["test"].items() if k != "labeled"}}}
    assert prepare_mod.split_is_labeled(old, "test")


def test_a_split_mixing_labeled_and_unlabeled_files_is_refused_naming_both(tmp_path):
    raw = write_rows(tmp_path / "a.tsv", 30)
    logs = _unlabeled(write_rows(tmp_path / "b.tsv", 30, seed=1), tmp_path / "logs.tsv")
    jobs = explicit_jobs({"train": [str(raw)], "test": [str(raw), str(logs)]})
    with pytest.raises(CriteoFormatError, match="the files of a split are all labeled or all unlabeled") as info:
        prepare(jobs, tmp_path / "p")
    assert f"{logs}:1: 39 fields (unlabeled), but {raw} of the same test split is labeled" in str(info.value)
    assert not (tmp_path / "p").exists()  # refused before any parsing
