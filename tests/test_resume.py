"""Mid-epoch resume through the Trainer: the data position is in the checkpoint, a resumed run sees exactly the
remaining rows, in the same order as an uninterrupted run."""

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.model import DLRMModule
from tests.helpers.criteo import row_ids, write_rows

BATCH = 32


class RecordRows(pl.Callback):
    def __init__(self):
        self.rows: list[tuple[int, np.ndarray]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.current_epoch, row_ids(batch.dense_features.numpy())))


def _datamodule(tmp_path):
    files = {
        s: str(write_rows(tmp_path / f"{s}.tsv", n, seed=i))
        for i, (s, n) in enumerate([("train", 1000), ("val", 100), ("test", 100)])
    }
    return CriteoDataModule(
        train_files=files["train"],
        val_files=files["val"],
        test_files=files["test"],
        batch_size=BATCH,
        num_workers=1,
        shuffle=True,
        seed=3,
        categorical_encoding="hash",
        num_embeddings_per_feature=[101] * 26,
    )


def _module():
    torch.manual_seed(0)
    return DLRMModule([101] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def _trainer(tmp_path, callbacks, **kwargs):
    return pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def test_resume_mid_epoch_sees_exactly_the_remaining_rows(tmp_path):
    per_epoch = -(-1000 // BATCH)  # 32 batches
    stop_at = per_epoch + 11  # 11 batches into the second epoch
    reference = RecordRows()
    _trainer(tmp_path / "ref", [reference], max_epochs=2).fit(_module(), datamodule=_datamodule(tmp_path))

    first = RecordRows()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at, save_top_k=-1)
    _trainer(tmp_path / "a", [first, checkpoint], max_steps=stop_at).fit(_module(), datamodule=_datamodule(tmp_path))
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    assert torch.load(path, weights_only=True)["CriteoDataModule"] == {"epoch": 1, "train_batches": 11}

    second = RecordRows()
    module = _module()
    _trainer(tmp_path / "b", [second], max_epochs=2).fit(module, datamodule=_datamodule(tmp_path), ckpt_path=path)
    resumed = [rows for epoch, rows in second.rows if epoch == 1]
    expected = [rows for epoch, rows in reference.rows if epoch == 1][11:]
    assert len(resumed) == len(expected) == per_epoch - 11
    for got, want in zip(resumed, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    seen = np.concatenate([rows for epoch, rows in first.rows if epoch == 1] + resumed)
    np.testing.assert_array_equal(np.sort(seen), np.arange(1000))
