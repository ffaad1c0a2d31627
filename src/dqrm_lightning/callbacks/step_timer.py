"""``StepTimer``: wall time per training step and samples per second, shown in the progress bar."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from dqrm_lightning._logging import logging_step


class StepTimer(pl.Callback):
    """Measures training speed after ``warmup_steps`` steps, two ways.

    * step: batch start to batch end (forward, backward, optimizer) -> ``mean_step_ms``, ``samples_per_s``;
    * loop: batch end to the next batch end, data loading and logging included (intervals that contain a validation
      run are left out) -> ``loop_samples_per_s``, the end-to-end training throughput.

    Logged on logging steps: ``train/step_ms`` (this step) and ``train/samples_per_s`` (end to end since the previous
    logging step, the figure the progress bar shows: what the run really trains at, data loading included).

    Args:
        warmup_steps: steps left out of the averages (first steps pay for allocation and thread start-up).
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.timed_samples = 0
        self._start = 0.0
        self._last_end: float | None = None
        self.loop_seconds = 0.0
        self.loop_samples = 0
        self._window_start: float | None = None
        self._window_samples = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        seconds = now - self._start
        samples = int(batch.labels.numel()) * trainer.world_size
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.timed_steps += 1
            self.timed_seconds += seconds
            self.timed_samples += samples
            if self._last_end is not None:
                self.loop_seconds += now - self._last_end
                self.loop_samples += samples
        self._last_end = now
        if self._window_start is None:
            self._window_start = self._start
        self._window_samples += samples
        if seconds > 0 and logging_step(trainer):
            window = max(now - self._window_start, 1e-9)
            pl_module.log(
                "train/samples_per_s", self._window_samples / window, prog_bar=True, on_step=True, on_epoch=False
            )
            pl_module.log("train/step_ms", seconds * 1000.0, on_step=True, on_epoch=False)
            self._window_start, self._window_samples = now, 0

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = self._window_start = None
        self._window_samples = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = self._window_start = None
        self._window_samples = 0

    def summary(self) -> dict[str, float | int | None]:
        """Mean step time (ms) and samples per second over the timed steps (all ranks' samples)."""
        if not self.timed_steps:
            return {"timed_steps": 0, "mean_step_ms": None, "samples_per_s": None}
        return {
            "timed_steps": self.timed_steps,
            "mean_step_ms": 1000.0 * self.timed_seconds / self.timed_steps,
            "samples_per_s": self.timed_samples / self.timed_seconds,
            "loop_samples_per_s": self.loop_samples / self.loop_seconds if self.loop_seconds else None,
        }
