"""``ThreadPolicy``: size this rank's thread pools once the trainer knows how many ranks share the machine."""

from __future__ import annotations

import socket

import lightning.pytorch as pl
import torch.distributed as dist
from typing_extensions import override

from dqrm_lightning import threads as thread_policy
from dqrm_lightning._lightning import connected


class ThreadPolicy(pl.Callback):
    """Applies :func:`dqrm_lightning.threads.resolve` in ``setup``: ranks on this machine
    (:func:`ranks_on_this_host`), loader workers from the data module; the result is ``settings`` (reported in
    ``summary.json`` as ``threads``).

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
        self.settings = thread_policy.resolve(self.threads, ranks_on_this_host(trainer), workers)
        thread_policy.apply(self.settings)


def ranks_on_this_host(trainer: pl.Trainer) -> int:
    """The ranks of the run that share this machine's cores: on one node the trainer's devices (its launcher,
    torchrun or SLURM starts one process each); on several, the ranks whose host name is this one's (counted with a
    collective: nodes that are one machine, or a scheduler that packs two nodes' tasks on one host, share its
    cores, whatever ``devices`` says)."""
    if trainer.num_nodes == 1 or not (dist.is_available() and dist.is_initialized()):
        return trainer.num_devices
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return sum(host == socket.gethostname() for host in hosts)
