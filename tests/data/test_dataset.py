from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dqrm_lightning.data.dataset import CriteoIterableDataset, rank_slices
from dqrm_lightning.data.encoding import CategoricalEncoder
from dqrm_lightning.data.prepare import PrepareOptions, explicit_jobs, prepare, shard_paths
from tests.helpers.criteo import row_ids, write_rows

ROWS = 1003


@pytest.fixture
def shards(tmp_path):
    raw = write_rows(tmp_path / "train.tsv", ROWS)
    prepare(explicit_jobs({"train": [str(raw)]}), tmp_path / "p", PrepareOptions(rows_per_shard=300))
    return shard_paths(tmp_path / "p", "train")


def _encoder():
    return CategoricalEncoder("hash", [97] * 26)


def _seen(dataset, workers, epoch=0, start=0):
    dataset.set_position(epoch, start)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [row_ids(batch.dense_features.numpy()) for batch in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_cover_every_row_once(shards, shuffle):
    seen = []
    counts = []
    for rank in range(2):
        dataset = CriteoIterableDataset(shards, _encoder(), 64, shuffle=shuffle, seed=5, rank=rank, world_size=2)
        batches = _seen(dataset, workers=2)
        counts.append(len(batches))
        assert len(batches) == len(dataset)
        seen.extend(batches)
    assert counts[0] == counts[1]  # equal batch counts on all ranks (DDP would hang otherwise)
    all_rows = np.sort(np.concatenate(seen))
    np.testing.assert_array_equal(all_rows, np.arange(ROWS))


def test_worker_count_does_not_change_the_stream(shards):
    dataset = CriteoIterableDataset(shards, _encoder(), 50, shuffle=True, seed=1)
    one = _seen(dataset, workers=0)
    two = _seen(dataset, workers=2)
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_shuffle_differs_per_epoch_and_is_seeded(shards):
    dataset = CriteoIterableDataset(shards, _encoder(), 50, shuffle=True, seed=1)
    e0, e1 = np.concatenate(_seen(dataset, 0, epoch=0)), np.concatenate(_seen(dataset, 0, epoch=1))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
    again = np.concatenate(_seen(CriteoIterableDataset(shards, _encoder(), 50, shuffle=True, seed=1), 0, epoch=0))
    np.testing.assert_array_equal(e0, again)


def test_resume_yields_exactly_the_remaining_rows(shards):
    dataset = CriteoIterableDataset(shards, _encoder(), 64, shuffle=True, seed=2)
    full = _seen(dataset, workers=2, epoch=3)
    resumed = _seen(dataset, workers=2, epoch=3, start=7)
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batches_are_torchrec_batches(shards):
    dataset = CriteoIterableDataset(shards, _encoder(), 8)
    batch = next(iter(dataset))
    assert batch.dense_features.shape == (8, 13)
    assert batch.labels.shape == (8,)
    kjt = batch.sparse_features
    assert kjt.keys()[:2] == ["C1", "C2"]
    assert len(kjt.keys()) == 26
    assert torch.all(kjt.lengths() == 1)
    ids = kjt["C3"].values()
    assert ids.shape == (8,)
    assert int(ids.max()) < 97


@pytest.mark.parametrize(("total", "batch", "world"), [(1003, 64, 2), (10, 4, 3), (128, 64, 2), (5, 2, 2)])
def test_rank_slices_partition(total, batch, world):
    slices = [rank_slices(total, batch, world, r) for r in range(world)]
    assert len({len(s) for s in slices}) == 1
    covered = sorted(i for s in slices for a, b in s for i in range(a, b))
    assert covered == list(range(total))


def test_prediction_files_of_several_ranks_hold_global_row_ids(shards, tmp_path):
    """Each rank's predictions file names its rows by their position in the split: merged, they are the input."""
    from types import SimpleNamespace

    from dqrm_lightning.callbacks.predictions import PredictionWriter

    writers, datasets = [], []
    for rank in range(2):
        dataset = CriteoIterableDataset(shards, _encoder(), 64, rank=rank, world_size=2, labeled=False)
        trainer = SimpleNamespace(
            world_size=2, global_rank=rank, log_dir=str(tmp_path), default_root_dir=str(tmp_path), callbacks=[],
            predict_dataloaders=DataLoader(dataset, batch_size=None), strategy=None,
        )  # fmt: skip
        writer = PredictionWriter()
        writer.on_predict_start(trainer, None)
        for j, batch in enumerate(dataset):
            prob = torch.from_numpy(row_ids(batch.dense_features.numpy()) / ROWS)  # the true row, to check ids
            writer.write_on_batch_end(trainer, None, {"prob": prob, "label": batch.labels}, None, batch, j)
        writers.append((writer, trainer))
        datasets.append(dataset)
    counts = torch.tensor([writer.rows for writer, _ in writers])
    for writer, trainer in writers:
        trainer.strategy = SimpleNamespace(all_gather=lambda tensor, counts=counts: counts)
        writer.on_predict_epoch_end(trainer, None)
    assert [f["rows"] for f in writers[0][0].files] == counts.tolist()
    assert sum(counts.tolist()) == ROWS
    lines = []
    for f in writers[0][0].files:
        text = Path(f["path"]).read_text().splitlines()
        assert text[0] == "row\tprobability"  # unlabeled input: no label column
        lines += [line.split("\t") for line in text[1:]]
    rows = np.array([int(row) for row, _ in lines])
    np.testing.assert_array_equal(np.sort(rows), np.arange(ROWS))
    np.testing.assert_allclose([float(p) for _, p in lines], rows / ROWS, atol=1e-8)
    assert (
        writers[0][0].describe() == f"{tmp_path}/predictions.tsv.rank* ({ROWS} rows in 2 files, one per rank; "
        "merge them by `row`)"
    )
