"""CriteoDataModule: loader workers started from a forkserver (never forked from a multi-threaded training process),
single-threaded, reading exactly the batches the training process reads itself, and tied to their rank; table sizes
from the vocabulary."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dqrm_lightning.data.datamodule import CriteoDataModule, _worker_init
from tests.helpers import process
from tests.helpers.cli import REPO
from tests.helpers.criteo import write_rows
from tests.helpers.training import loader_datamodule


def test_workers_start_from_a_forkserver_and_read_what_the_training_process_reads(tmp_path):
    in_process = loader_datamodule(tmp_path, 0).train_dataloader()
    assert in_process.num_workers == 0
    loader = loader_datamodule(tmp_path, 2).train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert loader.worker_init_fn.func is _worker_init
    assert loader.worker_init_fn.keywords == {"rank_pid": os.getpid()}
    expected, got = list(in_process), list(loader)
    assert len(got) == len(expected) == 11
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.labels, b.labels)


_READER = """
import sys, time
from pathlib import Path
from tests.helpers.training import loader_datamodule
loader = iter(loader_datamodule(Path(sys.argv[1]), 1).train_dataloader())
next(loader)
print(" ".join(str(w.pid) for w in loader._workers), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_workers_exit_when_their_rank_is_killed(tmp_path):
    command = [sys.executable, "-c", _READER, str(tmp_path)]
    with process.session(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as reader:
        workers = [int(pid) for pid in reader.stdout.readline().split()]
        assert len(workers) == 1
        assert _alive(workers[0])
        os.kill(reader.pid, signal.SIGKILL)  # the rank only: its worker is not told
        deadline = time.monotonic() + 15
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers[0]), "the loader worker outlived its rank"


def test_vocab_tables_are_sized_by_the_data_and_the_given_sizes_are_only_an_upper_bound(tmp_path):
    files = {s: str(write_rows(tmp_path / f"{s}.tsv", 40, seed=i)) for i, s in enumerate(("train", "val", "test"))}
    kaggle_like = CriteoDataModule(
        **{f"{s}_files": f for s, f in files.items()},
        categorical_encoding="vocab",
        num_embeddings_per_feature=[10**7] * 26,
    )
    sizes = kaggle_like.table_sizes
    assert all(1 <= size <= 120 for size in sizes)  # 120 rows cannot hold more distinct values: not 10**7 rows
    tight = CriteoDataModule(
        **{f"{s}_files": f for s, f in files.items()},
        categorical_encoding="vocab",
        num_embeddings_per_feature=[1] * 26,
        cache_dir=str(tmp_path / "other"),
    )
    with pytest.raises(ValueError, match="vocabulary exceeds `num_embeddings_per_feature` \\(C1: "):
        tight.table_sizes  # noqa: B018


def test_truth_metrics_of_synthetic_data_are_those_of_truth_json(tmp_path):
    from dqrm_lightning.data.synthetic import synthesize

    truth = synthesize("demo", 6_000, 3, tmp_path / "raw", split_fractions=(0.5, 0.25, 0.25))
    datamodule = CriteoDataModule(
        **{f"{s}_files": str(tmp_path / "raw" / f"{s}.tsv") for s in ("train", "val", "test")},
        num_embeddings_per_feature=[97] * 26,
    )
    metrics = datamodule.truth_metrics()
    assert metrics.keys() == {"val", "test"}
    for split, values in metrics.items():
        assert values["auc"] == pytest.approx(truth["splits"][split]["bayes_auc"], abs=1e-6)
        assert values["log_loss"] == pytest.approx(truth["splits"][split]["bayes_log_loss"], abs=1e-6)
    plain = CriteoDataModule(train_files=str(tmp_path / "raw" / "train.tsv"), num_embeddings_per_feature=[97] * 26)
    (tmp_path / "raw" / "train.tsv.truth.npy").rename(tmp_path / "hidden.npy")
    assert plain.truth_metrics() == {}  # no true probabilities: no ceiling


def test_the_test_split_is_a_second_validation_loader_on_request_and_seeds_share_prepared_data(tmp_path):
    files = {
        s: str(write_rows(tmp_path / f"{s}.tsv", n, seed=i))
        for i, (s, n) in enumerate([("train", 90), ("val", 30), ("test", 20)])
    }
    common = {f"{s}_files": f for s, f in files.items()} | {
        "num_embeddings_per_feature": [97] * 26,
        "eval_batch_size": 8,
    }
    plain = CriteoDataModule(**common, seed=1)
    both = CriteoDataModule(**common, seed=2, evaluate_test_split=True)
    assert both.prepared_dir == plain.prepared_dir  # the seed only orders training rows here: the data is shared
    subsampled = [CriteoDataModule(**common, seed=s, negative_subsample=0.5).prepared_dir for s in (1, 2)]
    assert subsampled[0] != subsampled[1]  # the seed draws the sub-sample: other data
    plain.setup("fit")
    both.setup("fit")
    assert not isinstance(plain.val_dataloader(), list)
    val, test = both.val_dataloader()
    assert [sum(len(b.labels) for b in loader) for loader in (val, test)] == [30, 20]
