"""``PredictionWriter``: stream ``dqrm predict`` probabilities to a TSV file in the log directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from dqrm_lightning.callbacks.summary import RunSummary


class PredictionWriter(BasePredictionWriter):
    """Appends ``probability<TAB>label`` per row, batch by batch (rank-suffixed when several ranks predict).

    Args:
        filename: file name inside the trainer's log directory.
    """

    def __init__(self, filename: str = "predictions.tsv") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Path | None = None
        self.rows = 0

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.filename if trainer.world_size == 1 else f"{self.filename}.rank{trainer.global_rank}"
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("probability\tlabel\n")
        self.rows = 0

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.path is not None
        table = np.stack([prediction["prob"].double().numpy(), prediction["label"].double().numpy()], axis=1)
        with open(self.path, "a") as handle:
            np.savetxt(handle, table, fmt=["%.8f", "%d"], delimiter="\t")
        self.rows += len(table)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, RunSummary):
                callback.extra["predictions"] = {"path": str(self.path), "rows": self.rows}
