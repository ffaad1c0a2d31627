"""Fault injection for multi-process tests (used through `--trainer.callbacks` class paths)."""

import os

import lightning.pytorch as pl


class DieAtStep(pl.Callback):
    """Kill this process (no cleanup, like a crashed node) at training step ``step`` on rank ``rank``."""

    def __init__(self, step: int = 3, rank: int = 1) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(17)


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process (rank ``rank`` only) as training step ``step`` starts, as Ctrl-C or a
    scheduler's SIGTERM would; the run handles it like any other delivery of the signal."""

    def __init__(self, step: int = 3, signum: int = 2, rank: int = 0) -> None:
        self.step = step
        self.signum = signum
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
