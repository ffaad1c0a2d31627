"""``QuantizationAwareTraining``: DQRM QAT as a Lightning callback."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from dqrm_lightning._logging import logging_step
from dqrm_lightning.quant.config import BiasMode, MLPGranularity, QATConfig, ScaleTracking
from dqrm_lightning.quant.fake_quant import Mode, Ste


class QuantizationAwareTraining(pl.Callback):
    """Prepares the DLRM for QAT in ``setup`` (before checkpoint restore and sharding, never in ``on_fit_start``),
    refreshes embedding scales at step 0 and every ``scale_period`` optimizer steps, switches quantization on after
    an optional FP32 warm-up, and logs each table's scale and quantization error. Disabled when neither
    ``embedding_bits`` nor ``mlp_bits`` is set. The arguments are :class:`~dqrm_lightning.quant.config.QATConfig`'s.

    Example::

        trainer = pl.Trainer(callbacks=[QuantizationAwareTraining(embedding_bits=4, mlp_bits=4)])
    """

    def __init__(
        self,
        embedding_bits: int | None = None,
        embedding_bits_per_table: dict[str, int] | None = None,
        embedding_bits_by_rows: list[list[int]] | None = None,
        embedding_mode: Mode = "symmetric",
        ste: Ste = "identity",
        scale_period: int = 200,
        period_off_by_one: bool = False,
        scale_tracking: ScaleTracking = "periodic",
        warmup_epochs: int = 0,
        mlp_bits: int | None = None,
        mlp_granularity: MLPGranularity = "per_row",
        mlp_bias: BiasMode = "fp32",
        mlp_activation_bits: int | None = None,
    ) -> None:
        self.config = QATConfig(
            embedding_bits=embedding_bits,
            embedding_bits_per_table=dict(embedding_bits_per_table or {}),
            embedding_bits_by_rows=[list(r) for r in embedding_bits_by_rows or []],
            embedding_mode=embedding_mode,
            ste=ste,
            scale_period=scale_period,
            period_off_by_one=period_off_by_one,
            scale_tracking=scale_tracking,
            warmup_epochs=warmup_epochs,
            mlp_bits=mlp_bits,
            mlp_granularity=mlp_granularity,
            mlp_bias=mlp_bias,
            mlp_activation_bits=mlp_activation_bits,
        )

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled:
            pl_module.prepare_qat(self.config)  # type: ignore[operator]

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.config.warmup_epochs

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            pl_module.set_quantization_active(self._active(trainer))  # type: ignore[operator]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        quantizer = getattr(pl_module, "embedding_quantizer", None)
        if quantizer is None or not self._active(trainer):
            return
        quantizer.active = True
        quantizer.maybe_refresh(trainer.global_step)
        quantizer.record_error = logging_step(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        quantizer = getattr(pl_module, "embedding_quantizer", None)
        if quantizer is not None and self.config.scale_tracking == "exact" and self._active(trainer):
            quantizer.track(batch.sparse_features)  # the optimizer step has run: keep max|W| exact
        if quantizer is None or not quantizer.record_error or quantizer.last_error is None:
            return
        values = {f"qat/scale/{f}": s for f, s in quantizer.scales().items()}
        errors = quantizer.last_error.tolist()
        values |= {f"qat/error/{f}": errors[i] for i, f in enumerate(quantizer.feature_names) if quantizer.bits[i] > 0}
        values["qat/scale_refreshes"] = float(quantizer.refreshes)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        quantizer.record_error = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer = getattr(pl_module, "embedding_quantizer", None)
        if quantizer is not None:
            quantizer.record_error = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config)}

    def describe(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """QAT facts for the run summary."""
        if not self.enabled:
            return {}
        quantizer = getattr(pl_module, "embedding_quantizer", None)
        info: dict[str, Any] = {"config": asdict(self.config)}
        if quantizer is not None:
            info |= {
                "table_bits": quantizer.table_bits(),
                "scales": quantizer.scales(),
                "scale_refreshes": int(quantizer.refreshes),
            }
        return info
