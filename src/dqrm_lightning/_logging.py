"""When to log per-step values."""

from __future__ import annotations

import lightning.pytorch as pl

from dqrm_lightning._lightning import connected


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether this training step's values reach the loggers (every ``log_every_n_steps``).

    Lightning's ``self.log`` costs about half a millisecond per call on the CPU, a sizeable part of a DLRM step, so
    per-step values are only logged on the steps the loggers write anyway.
    """
    every = max(1, connected(trainer).log_every_n_steps)
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
