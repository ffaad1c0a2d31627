"""Data-loader workers: started from a forkserver (never forked from a multi-threaded training process), single-
threaded, and reading exactly the batches the training process reads itself."""

import torch

from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.threads import single_threaded_worker
from tests.helpers.criteo import write_rows


def _datamodule(tmp_path, workers: int) -> CriteoDataModule:
    files = {
        s: str(write_rows(tmp_path / f"{s}.tsv", n, seed=i))
        for i, (s, n) in enumerate([("train", 700), ("val", 50), ("test", 50)])
    }
    datamodule = CriteoDataModule(
        **{f"{s}_files": f for s, f in files.items()},
        batch_size=64,
        num_workers=workers,
        seed=5,
        categorical_encoding="hash",
        num_embeddings_per_feature=[97] * 26,
    )
    datamodule.setup("fit")
    return datamodule


def test_workers_start_from_a_forkserver_and_read_what_the_training_process_reads(tmp_path):
    in_process = _datamodule(tmp_path, 0).train_dataloader()
    assert in_process.num_workers == 0
    loader = _datamodule(tmp_path, 2).train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert loader.worker_init_fn is single_threaded_worker
    expected, got = list(in_process), list(loader)
    assert len(got) == len(expected) == 11
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.labels, b.labels)
