"""``RunSummary``: one ``summary.json`` per run in the log directory.

It holds the resolved config, the final and best validation metrics (best = the best value of each metric over all
evaluations, as the DQRM paper reports; final = the last evaluation), test metrics, the Bayes-optimal metrics when the
data is synthetic, training speed, the model size (``model_bytes``: ``fp32``, ``training`` with the tables at
``model.table_dtype``, and the quantized export) and the checkpoint paths.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from dqrm_lightning._lightning import connected
from dqrm_lightning.callbacks.comm_accounting import CommunicationAccounting
from dqrm_lightning.callbacks.interrupt import RunInterrupted
from dqrm_lightning.callbacks.qat import QuantizationAwareTraining
from dqrm_lightning.callbacks.step_timer import StepTimer
from dqrm_lightning.callbacks.threads import ThreadPolicy
from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.export.size import model_bytes, quantized_model_bytes, quantized_table_ratio
from dqrm_lightning.model import DLRMModule, model_shape
from dqrm_lightning.schema import schema_of
from dqrm_lightning.table_dtype import table_value_bits


class RunSummary(pl.Callback):
    """Writes ``<log_dir>/summary.json`` at the end of fit, validate, test and predict (rank 0 only), and when a
    signal stops training (:class:`~dqrm_lightning.callbacks.interrupt.StopOnSignal`).

    Args:
        filename: name of the file in the trainer's log directory.
    """

    def __init__(self, filename: str = "summary.json") -> None:
        self.filename = filename
        self.config: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self.path: Path | None = None
        self._metrics: dict[str, float] = {}
        self._started = time.time()

    def _log_dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Any]:
        """Everything the summary holds, as a JSON-friendly dict."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self._metrics.update(metrics)
        summary: dict[str, Any] = {
            "stage": stage,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_seconds": time.time() - self._started,
            "epochs_completed": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "process_group_backend": dist.get_backend() if dist.is_initialized() else None,
        }
        best = getattr(pl_module, "val_best", None)
        if best is not None and best.final:
            summary["val"] = {
                "final": best.final,
                "best": best.best,
                "evaluations_protocol": "final = last evaluation; "
                "best = best value of each metric over all evaluations (the DQRM paper's protocol)",
            }
        test = {k: v for k, v in self._metrics.items() if k.startswith("test/")}
        if test:
            summary["test"] = test
        datamodule = connected(trainer).datamodule
        if isinstance(datamodule, CriteoDataModule):
            truth = datamodule.truth_metrics()
            if truth:
                summary["bayes_optimal"] = truth
            summary["data"] = datamodule.describe()
        for callback in connected(trainer).callbacks:
            if isinstance(callback, StepTimer):
                summary["speed"] = callback.summary()
            if isinstance(callback, CommunicationAccounting) and callback.summary():
                summary["communication"] = callback.summary()
            if isinstance(callback, ThreadPolicy) and callback.settings is not None:
                summary["threads"] = callback.settings.as_dict()
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
                summary["checkpoints"] = {"best": callback.best_model_path, "last": callback.last_model_path or None}
        if isinstance(pl_module, DLRMModule):
            shape = model_shape(pl_module.hparams)
            table_bits = table_value_bits(pl_module.hparams["table_dtype"])
            # `training`: the master model as trained (tables at `model.table_dtype`, float32 MLPs)
            summary["model_bytes"] = {"fp32": model_bytes(shape), "training": model_bytes(shape, table_bits)}
            if pl_module.qat_config is not None:
                schema, config = schema_of(pl_module.hparams), pl_module.qat_config
                quantized = quantized_model_bytes(shape, config, schema)
                summary["model_bytes"] |= {
                    "quantized": quantized,
                    "ratio": quantized / model_bytes(shape),
                    "tables_ratio": quantized_table_ratio(shape.table_rows, shape.embedding_dim, config, schema),
                }
        for callback in connected(trainer).callbacks:
            if isinstance(callback, QuantizationAwareTraining) and callback.enabled:
                summary["qat"] = callback.describe(pl_module)
        if self.config is not None:
            summary["config"] = self.config
        summary.update(self.extra)
        return summary

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        summary = self.collect(trainer, pl_module, stage)
        log_dir = self._log_dir(trainer)  # a collective under multi-process strategies: every rank asks
        if trainer.is_global_zero:
            path = log_dir / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2, default=str))
            self.path = path

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module, "fit")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, RunInterrupted):  # every rank stopped at the same step: a summary of the run so far
            self.extra["interrupted"] = {
                "signal": exception.signal_name,
                "step": exception.step,
                "epoch": exception.epoch,
                "checkpoint": exception.checkpoint,
            }
            self.write(trainer, pl_module, "fit")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module, "test")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.write(trainer, pl_module, "validate")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module, "predict")
