"""``StopOnSignal``: Ctrl-C (SIGINT) and SIGTERM end training with a resumable checkpoint instead of losing the run.

The first signal only sets a flag (a signal can arrive anywhere, e.g. inside a collective). After each training step
the ranks agree on the flag (one all-reduce of a single number; so it is enough that any rank got the signal, as when a
scheduler signals rank 0 only), all save ``last.ckpt`` at the same step and stop with :class:`RunInterrupted`; ``dqrm``
reports it in one line and exits with 128 + the signal number. ``dqrm fit ... --ckpt_path last`` continues the run in
the same log directory (and wandb run) from that step. A second Ctrl-C stops at once, as Ctrl-C does elsewhere.

The flag is checked between training steps: a signal during a validation takes effect after the validation.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (``None``: checkpointing is off)."""

    def __init__(self, signum: int, step: int, epoch: int, checkpoint: str | None, global_zero: bool) -> None:
        self.signum = signum
        self.step = step
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.global_zero = global_zero
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint saved (checkpointing is off)"
        super().__init__(f"stopped by {self.signal_name} at step {step} (epoch {epoch}); {saved}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal(pl.Callback):
    """Stop ``fit`` at the next step boundary after SIGINT or SIGTERM, saving ``last.ckpt`` first."""

    def __init__(self) -> None:
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
            "(Ctrl-C again to stop without saving)",
            file=sys.stderr,
            flush=True,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's own SIGTERM handler (set just before the loop starts), which it replaces: that
        # one runs a collective inside the handler and stops ranks at different steps
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = 0
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _agreed(self, trainer: pl.Trainer) -> int:
        """The signal any rank received (0: none)."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._agreed(trainer)
        if not signum:
            return
        path = None
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            path = str(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
            trainer.save_checkpoint(path, weights_only=False)  # the full training state; every rank (sharded tables)
        raise RunInterrupted(signum, trainer.global_step, trainer.current_epoch, path, trainer.is_global_zero)


class ContinuedMetrics(pl.Callback):
    """Keeps the metrics a run logged before the checkpoint it continues from.

    A run continued in its own log directory (``--ckpt_path last``) logs to the same ``metrics.csv``, which Lightning's
    CSV logger starts afresh; ``dqrm`` reads the old rows first and this callback logs them again once the checkpoint
    is restored, up to its step (rows logged after the checkpoint, before a crash, are logged anew by the run).

    Args:
        rows: the rows of the previous ``metrics.csv`` (column -> text, as ``csv.DictReader`` reads them).
    """

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        csv = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        rows, self.rows = self.rows, []
        if csv is None or not trainer.is_global_zero:
            return
        for row in rows:
            step = int(float(row.get("step") or 0))
            if step < trainer.global_step:
                csv.log_metrics({k: _number(v) for k, v in row.items() if k != "step" and v not in ("", None)}, step)


def _number(text: str) -> float | int:
    """A metrics.csv value as it was logged (the epoch is an integer)."""
    try:
        return int(text)
    except ValueError:
        return float(text)
