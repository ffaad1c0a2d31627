"""Datamodules over small files of :func:`tests.helpers.criteo.write_rows`, a small DLRM sized for them and a quiet
trainer, for short runs through the Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.model import DLRMModule
from tests.helpers.criteo import write_rows

BATCH = 32


def small_datamodule(tmp_path) -> CriteoDataModule:
    """1000 training rows (:func:`write_rows`), 100 validation and 100 test rows, shuffled, hashed into 101 rows."""
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


def loader_datamodule(tmp_path, workers: int) -> CriteoDataModule:
    """A datamodule set up for fitting: 700 training rows, hashed into 97 rows, read by ``workers`` loader workers."""
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


def small_module(**kwargs) -> DLRMModule:
    """A seeded DLRM whose tables fit :func:`small_datamodule` (``kwargs``: more DLRMModule arguments)."""
    torch.manual_seed(0)
    sizes = {"dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}
    return DLRMModule([101] * 26, embedding_dim=8, **sizes, **kwargs)


def quiet_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    """A trainer with no logger, progress bar, model summary or validation."""
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
