"""``QuantizationAwareTraining``: DQRM QAT as a Lightning callback."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from dqrm_lightning._logging import logging_step
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant import EmbeddingQuantizer, QATConfig, enable_fake_quant


class QuantizationAwareTraining(pl.Callback):
    """Runs the QAT of a :class:`~dqrm_lightning.model.DLRMModule` as ``config`` describes it.

    Prepares the model in ``setup`` (before checkpoint restore and sharding, never in ``on_fit_start``), refreshes
    embedding scales at step 0 and every ``scale_period`` optimizer steps, switches fake quantization on after an
    optional FP32 warm-up, and logs each table's scale and quantization error. Disabled when ``config`` quantizes
    nothing. It never converts the model: export does (``dqrm export``).

    A model restored from a QAT checkpoint is prepared by the checkpoint itself; its scales keep being refreshed (and
    logged) even when this callback is disabled.

    Args:
        config: the QAT settings (on the command line: ``--qat.embedding_bits 4`` etc.).

    Raises:
        TypeError: ``config`` is not a QATConfig.

    Example::

        trainer = pl.Trainer(callbacks=[QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4))])
    """

    def __init__(self, config: QATConfig) -> None:
        if not isinstance(config, QATConfig):
            raise TypeError(
                f"`config` must be a QATConfig, got {type(config).__name__}; "
                "did you mean QuantizationAwareTraining(QATConfig(embedding_bits=4))?"
            )
        self.config = config

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        if not isinstance(pl_module, DLRMModule):
            raise TypeError(f"QuantizationAwareTraining prepares a DLRMModule, got {type(pl_module).__name__}")
        pl_module.prepare_qat(self.config)

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.config.warmup_epochs

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            enable_fake_quant(pl_module, self._active(trainer))  # off during the FP32 warm-up

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        quantizer = _quantizer(pl_module)
        if quantizer is None or not self._active(trainer):
            return
        quantizer.enable_fake_quant()
        quantizer.maybe_refresh(trainer.global_step)
        quantizer.record_error = logging_step(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        quantizer = _quantizer(pl_module)
        if quantizer is None:
            return
        if self.config.scale_tracking == "exact" and self._active(trainer):
            quantizer.track(batch.sparse_features)  # the optimizer step has run: keep max|W| exact
        if quantizer.record_error and quantizer.last_error is not None:
            self._log(trainer, quantizer)
            quantizer.record_error = False

    @staticmethod
    def _log(trainer: pl.Trainer, quantizer: EmbeddingQuantizer) -> None:
        values = {f"qat/scale/{f}": s for f, s in quantizer.scales().items()}
        values |= {f"qat/error/{f}": e for f, e in quantizer.errors().items()}
        values["qat/scale_refreshes"] = float(quantizer.refreshes)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer = _quantizer(pl_module)
        if quantizer is not None:
            quantizer.record_error = False

    def describe(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """QAT facts for the run summary."""
        if not self.enabled:
            return {}
        info: dict[str, Any] = {"config": asdict(self.config)}
        quantizer = _quantizer(pl_module)
        if quantizer is not None:
            info |= {
                "table_bits": quantizer.table_bits(),
                "scales": quantizer.scales(),
                "scale_refreshes": int(quantizer.refreshes),
            }
        return info


def _quantizer(pl_module: pl.LightningModule) -> EmbeddingQuantizer | None:
    """The embedding quantizer of a DLRMModule prepared for embedding QAT (by this callback or its checkpoint)."""
    return pl_module.embedding_quantizer if isinstance(pl_module, DLRMModule) else None
