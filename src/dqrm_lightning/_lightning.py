"""Types for the ``Trainer`` attributes that Lightning assigns from outside the class.

Lightning's connectors set ``trainer.callbacks`` (``_CallbackConnector``), ``trainer.datamodule``
(``_DataConnector``) and ``trainer.log_every_n_steps`` (``_LoggerConnector``) on the trainer while it is built and
attached, so ``Trainer``'s own annotations do not declare them. Code here reads and writes them through
:func:`connected`, which is the same trainer object with those attributes typed, instead of ``getattr`` or
``type: ignore`` at each use.

Hyperparameters are a separate case: ``LightningModule.hparams`` is declared as a ``MutableMapping`` (at run time an
``AttributeDict``), so they are read by key (``self.hparams["batch_size"]``), which that declaration types.
"""

from __future__ import annotations

from typing import Protocol, cast

import lightning.pytorch as pl


class ConnectedTrainer(Protocol):
    """The attributes a ``Trainer`` holds once its connectors have run (from ``Trainer.__init__`` on)."""

    callbacks: list[pl.Callback]
    datamodule: pl.LightningDataModule | None
    log_every_n_steps: int


def connected(trainer: pl.Trainer) -> ConnectedTrainer:
    """``trainer`` itself, typed with the attributes its connectors set (no copy, no check: a cast)."""
    return cast(ConnectedTrainer, trainer)
