"""Progress output that fits where it goes: ``TerminalProgress`` (a live bar) on a terminal, ``LineProgress`` (plain
lines) on a file or a pipe.

A live bar redraws itself with carriage returns many times a second; in a log file that is megabytes of frames. When
standard output is not a terminal ``dqrm`` uses this callback instead of Lightning's bar: one line per epoch (or every
N training steps) with the same figures, e.g.::

    epoch 1: 1250/1250 steps, 4.9 s training, 32,595 samples/s, train/loss 0.5446, val/auc 0.7112, val/log_loss 0.5126
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import TQDMProgressBar
from typing_extensions import override


class LineProgress(ProgressBar):
    """Plain progress lines on rank 0.

    Args:
        every_n_steps: also print a line every N training steps (0: one line per epoch only).
    """

    def __init__(self, every_n_steps: int = 0) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"`progress_every_n_steps` must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started = self._last_end = 0.0
        self._samples = 0
        self._last_batch = -1

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def _figures(self, trainer: pl.Trainer, prefixes: tuple[str, ...]) -> str:
        metrics: dict[str, float | torch.Tensor] = {**trainer.progress_bar_metrics, **trainer.callback_metrics}
        parts = []
        for key in sorted(metrics):
            if key.startswith(prefixes) and key != "train/samples_per_s":
                value = metrics[key]
                number = float(value.item() if isinstance(value, torch.Tensor) else value)
                parts.append(f"{key} {number:.4f}")
        return ", ".join(parts)

    def _train_line(self, trainer: pl.Trainer, batch_idx: int, prefixes: tuple[str, ...]) -> str:
        seconds = max(self._last_end - self._started, 1e-9)
        total = self.total_train_batches
        total_text = str(int(total)) if total != float("inf") else "?"
        line = (
            f"epoch {trainer.current_epoch}: {batch_idx + 1}/{total_text} steps, {seconds:.1f} s training, "
            f"{self._samples / seconds:,.0f} samples/s"
        )
        figures = self._figures(trainer, prefixes)
        return f"{line}, {figures}" if figures else line

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch does not start that epoch again

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._samples = 0
        self._last_batch = -1
        self._last_end = self._started

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = getattr(batch, "labels", None)
        self._samples += (int(labels.numel()) if labels is not None else 1) * trainer.world_size
        self._last_batch = batch_idx
        self._last_end = time.perf_counter()
        if self.every_n_steps and (batch_idx + 1) % self.every_n_steps == 0:
            self.print(self._train_line(trainer, batch_idx, ("train/",)))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(self._train_line(trainer, self._last_batch, ("train/", "val/")))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.print(f"validation: {self._figures(trainer, ('val/',))}")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"test: {self._figures(trainer, ('test/',))}")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"predict: {sum(trainer.num_predict_batches)} batches")


class TerminalProgress(TQDMProgressBar):
    """Lightning's live bar; ``v_num`` is the run's version (``lightning_logs/version_N``), not the joined versions of
    all loggers (Lightning shows the tail of ``"N_<wandb run id>"`` when wandb logs too)."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # a run resumed mid-epoch does not start that epoch again: give the bar its epoch and total now (else it
        # counts "Training: 302/?")
        self.on_train_epoch_start(trainer, pl_module)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items: dict[str, Any] = super().get_metrics(trainer, pl_module)
        if trainer.loggers and "v_num" in items:
            items["v_num"] = trainer.loggers[0].version
        return items


def stdout_is_terminal() -> bool:
    """Whether a live progress bar can redraw in place."""
    return sys.stdout.isatty()
