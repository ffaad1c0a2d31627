"""Mid-epoch resume through the Trainer: the data position is in the checkpoint, a resumed run sees exactly the
remaining rows, in the same order as an uninterrupted run."""

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers.criteo import row_ids
from tests.helpers.training import BATCH, quiet_trainer, small_datamodule, small_module


class RecordRows(pl.Callback):
    def __init__(self):
        self.rows: list[tuple[int, np.ndarray]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.current_epoch, row_ids(batch.dense_features.numpy())))


def test_resume_mid_epoch_sees_exactly_the_remaining_rows(tmp_path):
    per_epoch = -(-1000 // BATCH)  # 32 batches
    stop_at = per_epoch + 11  # 11 batches into the second epoch
    reference = RecordRows()
    quiet_trainer(tmp_path / "ref", [reference], max_epochs=2).fit(
        small_module(), datamodule=small_datamodule(tmp_path)
    )

    first = RecordRows()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at, save_top_k=-1)
    quiet_trainer(tmp_path / "a", [first, checkpoint], max_steps=stop_at).fit(
        small_module(), datamodule=small_datamodule(tmp_path)
    )
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    assert torch.load(path, weights_only=True)["CriteoDataModule"] == {"epoch": 1, "train_batches": 11}

    second = RecordRows()
    module = small_module()
    quiet_trainer(tmp_path / "b", [second], max_epochs=2).fit(
        module, datamodule=small_datamodule(tmp_path), ckpt_path=path
    )
    resumed = [rows for epoch, rows in second.rows if epoch == 1]
    expected = [rows for epoch, rows in reference.rows if epoch == 1][11:]
    assert len(resumed) == len(expected) == per_epoch - 11
    for got, want in zip(resumed, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    seen = np.concatenate([rows for epoch, rows in first.rows if epoch == 1] + resumed)
    np.testing.assert_array_equal(np.sort(seen), np.arange(1000))
