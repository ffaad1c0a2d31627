"""``ThreadPolicy``: size this rank's thread pools once the trainer knows how many ranks share the machine."""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from dqrm_lightning import threads as thread_policy
from dqrm_lightning._lightning import connected


class ThreadPolicy(pl.Callback):
    """Applies :func:`dqrm_lightning.threads.resolve` in ``setup``: ranks on this machine from the trainer, loader
    workers from the data module; the result is ``settings`` (reported in ``summary.json`` as ``threads``).

    Args:
        threads: intra-op threads per rank; None: the policy decides (``OMP_NUM_THREADS`` wins over both).
    """

    def __init__(self, threads: int | None = None) -> None:
        thread_policy.check_threads(threads)
        self.threads = threads
        self.settings: thread_policy.ThreadSettings | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = connected(trainer).datamodule
        hparams = getattr(datamodule, "hparams", {}) if datamodule is not None else {}
        workers = int(hparams.get("num_workers", 0) or 0)
        # the ranks on this machine: the trainer's devices (its launcher, torchrun or SLURM starts one process each)
        self.settings = thread_policy.resolve(self.threads, trainer.num_devices, workers)
        thread_policy.apply(self.settings)
