"""``CommunicationAccounting``: bytes each rank would send per iteration in each communication mode.

Sampled on logging steps from the real batches (unique ids per table on this rank), so the sparse modes count the
rows actually touched, not an upper bound. Modes (see :mod:`dqrm_lightning.comms.accounting`): ``dense`` (plain data
parallelism: every parameter), ``sparse_fp32`` (touched rows + MLP gradients), ``sparse_int8`` (the same as 1-byte
codes plus scales, the DQRM compressed mode), and ``model_parallel_a2a`` (TorchRec's pooled-embedding all-to-all,
forward and backward, float32: what a table-wise sharded model sends).

With replicated tables (``TorchRecStrategy(embeddings="replicated")``) the strategy's communication hook also counts
what it really sent: ``comm/hook_bytes`` per iteration and rank, and the hook's counters in the summary (so a run
shows that compression ran, not only what it would save).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from dqrm_lightning._logging import logging_step
from dqrm_lightning.comms.accounting import ModelShape, bytes_per_iteration, model_parallel_a2a_bytes
from dqrm_lightning.model import DLRMModule, model_shape

MODES = ("dense", "sparse_fp32", "sparse_int8", "model_parallel_a2a")


class CommunicationAccounting(pl.Callback):
    """Logs ``comm/<mode>_bytes`` per iteration and rank, and reports their means in the run summary."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(MODES, 0.0)
        self.samples = 0
        self.hook: dict[str, Any] = {}
        self._hook_seen = (0, 0)  # (bytes, iterations) at the last logging step

    def _shape(self, pl_module: pl.LightningModule) -> ModelShape:
        return model_shape(pl_module.hparams)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not (logging_step(trainer) or self.samples == 0) or not isinstance(pl_module, DLRMModule):
            return  # sampled: the first step and every logging step
        shape = self._shape(pl_module)
        features = batch.sparse_features.to_dict()
        rows = [int(torch.unique(jagged.values()).numel()) for jagged in features.values()]
        world = trainer.world_size
        local_batch = int(batch.labels.numel())
        values = {
            "dense": bytes_per_iteration(shape, "dense"),
            "sparse_fp32": bytes_per_iteration(shape, "sparse_fp32", rows),
            "sparse_int8": bytes_per_iteration(shape, "sparse_int8", rows),
            # pooled embeddings of the other ranks' tables, forward and their gradients backward
            "model_parallel_a2a": model_parallel_a2a_bytes(shape, local_batch, world, features=len(rows)),
        }
        for mode, value in values.items():
            self.totals[mode] += value
        self.samples += 1
        metrics = {f"comm/{mode}_bytes": float(v) for mode, v in values.items()}
        metrics["data/rows_touched"] = float(sum(rows))  # unique ids of this rank's batch, all tables
        state = getattr(trainer.strategy, "compression_state", None)
        if state is not None and state.flushes > self._hook_seen[1]:
            sent, iterations = state.bytes_sent - self._hook_seen[0], state.flushes - self._hook_seen[1]
            metrics["comm/hook_bytes"] = sent / iterations  # per iteration since the last logging step
            self._hook_seen = (state.bytes_sent, state.flushes)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = getattr(trainer.strategy, "compression_state", None)
        if state is not None and state.flushes:
            self.hook = {
                "bits": state.config.bits,
                "iterations": state.flushes,
                "tables_compressed": state.sparse_tables,
                "mlp_tensors_compressed": state.dense_tensors,
                "bytes_per_iteration_per_rank": state.bytes_sent / state.flushes,
            }

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        means = {mode: total / self.samples for mode, total in self.totals.items()}
        summary = {
            "bytes_per_iteration_per_rank": means,
            "sampled_steps": self.samples,
            "sparse_fp32_over_sparse_int8": means["sparse_fp32"] / max(means["sparse_int8"], 1.0),
        }
        if self.hook:
            summary["hook"] = self.hook
        return summary
