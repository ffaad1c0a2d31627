"""``PredictionWriter``: stream ``dqrm predict`` probabilities to a TSV file in the log directory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from dqrm_lightning._lightning import connected
from dqrm_lightning.callbacks.summary import RunSummary


class PredictionWriter(BasePredictionWriter):
    """Writes one line per predicted row, batch by batch, under a header line:

    * labeled input (40 fields per line): ``row<TAB>probability<TAB>label``;
    * unlabeled input (39 fields per line, no label): ``row<TAB>probability``.

    ``row`` is the row's 0-based position among the input rows of the predicted split (the test split): its files in
    the order given (a glob's matches sorted by name), each file's lines in order. Lines dropped by
    ``on_bad_line: skip`` are not counted, so ``row`` is a file's line index only when no line was skipped (the summary
    reports skipped lines). When several ranks predict, each rank writes its own file (``<filename>.rank<R>``) with
    global row ids: the files merged and sorted by ``row`` are the input order.

    Args:
        filename: file name inside the trainer's log directory.
    """

    def __init__(self, filename: str = "predictions.tsv") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: Path | None = None
        self.rows = 0
        self.labeled = True
        self.files: list[dict[str, Any]] = []  # every rank's file and rows, known after the predict epoch
        self._positions: list[tuple[int, int]] | None = None

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.filename if trainer.world_size == 1 else f"{self.filename}.rank{trainer.global_rank}"
        self.path = (Path(trainer.log_dir or trainer.default_root_dir) / name).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dataset = getattr(_first_loader(trainer.predict_dataloaders), "dataset", None)
        self.labeled = bool(getattr(dataset, "labeled", True))
        # batch j of this rank holds the rows at positions [start, stop) of the split (eval batches are unshuffled)
        positions = getattr(dataset, "batch_positions", None)
        self._positions = positions() if positions is not None else None
        self.path.write_text("row\tprobability\tlabel\n" if self.labeled else "row\tprobability\n")
        self.rows = 0
        self.files = []

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
        prob = prediction["prob"].detach().cpu().double().numpy().reshape(-1)
        start = self.rows  # without positions (another data module): rows in the order this rank saw them
        if self._positions is not None:
            start, stop = self._positions[batch_idx]
            if stop - start != len(prob):
                raise RuntimeError(f"predict batch {batch_idx} has {len(prob)} rows, its positions {stop - start}")
        columns = [np.arange(start, start + len(prob), dtype=np.float64), prob]
        fmt = ["%d", "%.8f"]
        if self.labeled:
            columns.append(prediction["label"].detach().cpu().double().numpy().reshape(-1))
            fmt.append("%d")
        with open(self.path, "a") as handle:
            np.savetxt(handle, np.stack(columns, axis=1), fmt=fmt, delimiter="\t")
        self.rows += len(prob)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.path is not None
        self.files = [{"path": str(self.path), "rows": self.rows}]
        if trainer.world_size > 1:  # every rank takes part: rank 0 reports all files
            counts = trainer.strategy.all_gather(torch.tensor(self.rows, dtype=torch.int64)).reshape(-1).tolist()
            self.files = [
                {"path": str(self.path.with_name(f"{Path(self.filename).name}.rank{rank}")), "rows": int(rows)}
                for rank, rows in enumerate(counts)
            ]
        entry: dict[str, Any] = {"path": str(self.path), "rows": self.rows, "labels": self.labeled}
        if len(self.files) > 1:
            entry["files"] = self.files
        for callback in connected(trainer).callbacks:
            if isinstance(callback, RunSummary):
                callback.extra["predictions"] = entry

    def describe(self) -> str:
        """Where the predictions went, for the run's output: ``<absolute path> (<rows> rows)``; several ranks' files
        as one glob pattern with their total rows."""
        if len(self.files) <= 1:
            return f"{self.path} ({self.rows} rows)"
        assert self.path is not None
        total = sum(f["rows"] for f in self.files)
        pattern = self.path.with_name(f"{Path(self.filename).name}.rank*")
        return f"{pattern} ({total} rows in {len(self.files)} files, one per rank; merge them by `row`)"


def _first_loader(loaders: Any) -> Any:
    """The (first) predict loader: Lightning hands back one loader, or a sequence or mapping of them."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders
