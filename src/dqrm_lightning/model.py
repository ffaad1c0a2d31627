"""``DLRMModule``: TorchRec's DLRM as a LightningModule with sparse, fused embedding updates.

Notation: B batch size, F = 26 sparse features, D embedding dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from typing_extensions import override

from dqrm_lightning._logging import logging_step
from dqrm_lightning.checkpoint import CheckpointError
from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.metrics import BestTracker, ClickMetrics, binary_auroc, binary_log_loss
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.linear import FakeQuantizedLinear, swap_linears
from dqrm_lightning.strategies.sharding import (
    EmbeddingPlacement,
    copy_into,
    replicate_embeddings,
    shard_model,
    to_plain,
)

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


class DLRMModule(pl.LightningModule):
    """DLRM (bottom MLP, 26 embedding tables, dot interaction, top MLP) trained with BCE-with-logits.

    Embedding tables are built on the meta device and materialised by TorchRec's DistributedModelParallel in
    ``configure_model``; their optimizer runs fused in the backward pass and touches only the looked-up rows. Dense
    layers use a regular optimizer. Defaults are the DQRM paper's: plain SGD, learning rate 0.1 for both, no schedule.

    Args:
        num_embeddings_per_feature: rows of each of the 26 tables (linked from the data module by the CLI).
        embedding_dim: D.
        dense_arch_layer_sizes: bottom MLP widths after the 13 dense inputs; the last must equal D.
        over_arch_layer_sizes: top MLP widths; the last must be 1.
        optimizer: ``"sgd"`` or ``"adagrad"`` (both parts).
        learning_rate: dense learning rate.
        sparse_learning_rate: embedding learning rate (default: ``learning_rate``).

    Example::

        module = DLRMModule([100] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int] | None = None,
        embedding_dim: int = 16,
        dense_arch_layer_sizes: list[int] | None = None,
        over_arch_layer_sizes: list[int] | None = None,
        optimizer: Literal["sgd", "adagrad"] = "sgd",
        learning_rate: float = 0.1,
        sparse_learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        dense_arch_layer_sizes = dense_arch_layer_sizes or [512, 256, 64, embedding_dim]
        over_arch_layer_sizes = over_arch_layer_sizes or [512, 256, 1]
        self.save_hyperparameters()
        if num_embeddings_per_feature is None:
            raise ValueError("`num_embeddings_per_feature` is required (the CLI links it from the data module)")
        self.check_arguments(
            num_embeddings_per_feature,
            embedding_dim,
            dense_arch_layer_sizes,
            over_arch_layer_sizes,
            optimizer,
            learning_rate,
            sparse_learning_rate,
        )
        self.model: nn.Module | None = None
        self.placement = EmbeddingPlacement()  # a multi-process strategy hands over its own (`place_embeddings`)
        self.qat_config: QATConfig | None = None
        self.artifact_model: nn.Module | None = None
        self.embedding_quantizer: EmbeddingQuantizer | None = None
        self._train_window: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_metrics = ClickMetrics("val/")
        self.test_metrics = ClickMetrics("test/")
        self.val_best = BestTracker()

    @staticmethod
    def check_arguments(
        num_embeddings_per_feature: list[int] | None = None,
        embedding_dim: int = 16,
        dense_arch_layer_sizes: list[int] | None = None,
        over_arch_layer_sizes: list[int] | None = None,
        optimizer: str = "sgd",
        learning_rate: float = 0.1,
        sparse_learning_rate: float | None = None,
    ) -> None:
        """Check the arguments (also before the module is built, by the CLI: table sizes may not be known yet).

        Raises:
            ValueError: naming the argument.
        """
        if num_embeddings_per_feature is not None:
            if len(num_embeddings_per_feature) != len(DEFAULT_CAT_NAMES):
                raise ValueError(
                    f"`num_embeddings_per_feature` needs {len(DEFAULT_CAT_NAMES)} sizes, "
                    f"got {len(num_embeddings_per_feature)}"
                )
            if not all(_positive_int(n) for n in num_embeddings_per_feature):
                raise ValueError(
                    f"`num_embeddings_per_feature` must be positive integers, got {num_embeddings_per_feature}"
                )
        if not _positive_int(embedding_dim):
            raise ValueError(f"`embedding_dim` must be a positive integer, got {embedding_dim!r}")
        dense_arch_layer_sizes = dense_arch_layer_sizes or [512, 256, 64, embedding_dim]
        over_arch_layer_sizes = over_arch_layer_sizes or [512, 256, 1]
        for name, sizes in (
            ("dense_arch_layer_sizes", dense_arch_layer_sizes),
            ("over_arch_layer_sizes", over_arch_layer_sizes),
        ):
            if not all(_positive_int(n) for n in sizes):
                raise ValueError(f"`{name}` must be positive integers, got {sizes}")
        if dense_arch_layer_sizes[-1] != embedding_dim:
            raise ValueError(
                f"the last `dense_arch_layer_sizes` entry must equal `embedding_dim` ({embedding_dim}), "
                f"got {dense_arch_layer_sizes}"
            )
        if over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"the last `over_arch_layer_sizes` entry must be 1, got {over_arch_layer_sizes}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {learning_rate}")
        if sparse_learning_rate is not None and sparse_learning_rate <= 0:
            raise ValueError(f"`sparse_learning_rate` must be positive or null, got {sparse_learning_rate}")

    # --------------------------------------------------------------------------------------------------- building
    def table_configs(self) -> list[EmbeddingBagConfig]:
        hp = self.hparams
        return [
            EmbeddingBagConfig(
                name=f"t_{feature}",
                embedding_dim=hp.embedding_dim,
                num_embeddings=rows,
                feature_names=[feature],
            )  # default init: U(-1/sqrt(rows), 1/sqrt(rows)), as DLRM
            for feature, rows in zip(DEFAULT_CAT_NAMES, hp.num_embeddings_per_feature, strict=True)
        ]

    def build_dlrm(self) -> DLRM:
        """The unsharded DLRM: EBC on the meta device, MLPs on the CPU with DLRM's initialisation."""
        hp = self.hparams
        ebc = EmbeddingBagCollection(tables=self.table_configs(), device=torch.device("meta"))
        dlrm = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=INT_FEATURE_COUNT,
            dense_arch_layer_sizes=list(hp.dense_arch_layer_sizes),
            over_arch_layer_sizes=list(hp.over_arch_layer_sizes),
            dense_device=torch.device("cpu"),
        )
        for module in (dlrm.dense_arch, dlrm.over_arch):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    _dlrm_init_(layer)
        return dlrm

    def use_artifact(self, path: str, engine: str = "torchrec") -> None:
        """Evaluate / predict with an exported artifact instead of the trainable model."""
        from dqrm_lightning.export.inference import load_inference_model

        model = load_inference_model(path, engine)
        differences = _shape_differences(model.manifest["model"], self.hparams)
        if differences:
            raise ConfigError(
                f"the artifact {path} does not fit this model: {differences}; use the data (table sizes come from "
                "`data`: `num_embeddings_per_feature` or the vocabulary) and model settings it was exported with"
            )
        self.artifact_model = model

    def place_embeddings(self, placement: EmbeddingPlacement) -> None:
        """Build the tables where ``placement`` says (a multi-process strategy calls this before ``configure_model``;
        without one they are sharded table-wise over a one-process group)."""
        self.placement = placement

    @override
    def configure_model(self) -> None:
        if self.model is not None or self.artifact_model is not None:
            return
        dlrm = self.build_dlrm()
        layout = self.placement.layout
        # built on the strategy's device, where the module moves after this
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if layout.embeddings == "replicated":  # plain modules with sparse gradients; DDP outside averages them
            self.model = replicate_embeddings(dlrm, device, sparse=not layout.dense_embedding_gradients)
            return
        apply_optimizer_in_backward(
            _OPTIMIZERS[self.hparams.optimizer], dlrm.sparse_arch.parameters(), {"lr": self._sparse_lr}
        )
        codecs, precision = self.placement.qcomm_codecs_registry, self.placement.reduce_scatter_precision
        self.model = shard_model(dlrm, device, codecs, layout, precision)

    @property
    def _sparse_lr(self) -> float:
        return self.hparams.sparse_learning_rate or self.hparams.learning_rate

    # ------------------------------------------------------------------------------------------------------- QAT
    def prepare_qat(self, config: QATConfig, update_schedule: bool = True) -> None:
        """Make the model quantization-aware, in place (DQRM). Idempotent for the same config.

        Embeddings: an :class:`EmbeddingQuantizer` hooked on the sparse arch fake-quantizes looked-up rows.
        MLPs (``config.mlp_bits``): every ``nn.Linear`` of the bottom and top MLPs becomes a FakeQuantizedLinear
        sharing its parameters. Works before or after sharding (DMP keeps the parameters, not the modules).
        Preparing again with the same quantized structure only adopts the new schedule (``update_schedule``).
        """
        if self.artifact_model is not None:
            return  # an exported artifact is already quantized
        if self.qat_config is not None:
            differences = self.qat_config.structural_differences(config)
            if differences:
                detail = ", ".join(
                    f"{k}: {getattr(self.qat_config, k)!r} vs {getattr(config, k)!r}" for k in differences
                )
                raise ValueError(
                    f"the model is prepared for a different quantization ({detail}); use the QAT "
                    "settings the checkpoint was trained with"
                )
            if update_schedule:  # same quantized model, possibly another schedule (period, warm-up)
                self.qat_config = config
                if self.embedding_quantizer is not None:
                    self.embedding_quantizer.config = config
            return
        self.configure_model()
        dlrm = self.dlrm
        if config.mlp_bits is not None:
            for arch in (dlrm.dense_arch, dlrm.over_arch):
                swap_linears(
                    arch,
                    bits=config.mlp_bits,
                    granularity=config.mlp_granularity,
                    bias_mode=config.mlp_bias,
                    ste=config.ste,
                    activation_bits=config.mlp_activation_bits,
                )
        if config.quantizes_embeddings:
            hp = self.hparams
            self.embedding_quantizer = EmbeddingQuantizer(
                list(DEFAULT_CAT_NAMES), list(hp.num_embeddings_per_feature), config
            )
            self.embedding_quantizer.attach(dlrm.sparse_arch)
        self.qat_config = config

    @property
    def dlrm(self) -> DLRM:
        """The DLRM (inside the DistributedModelParallel wrapper when sharded)."""
        assert self.model is not None, "call configure_model() first"
        return self.model.module if isinstance(self.model, DistributedModelParallel) else self.model  # type: ignore

    @property
    def _fused_optimizer(self) -> Any:
        """The sharded tables' in-backward optimizer (``None`` with replicated tables: the regular one updates them)."""
        return getattr(self.model, "fused_optimizer", None)

    def set_quantization_active(self, active: bool) -> None:
        """Switch fake quantization on or off (FP32 warm-up); scales and counters are kept."""
        if self.embedding_quantizer is not None:
            self.embedding_quantizer.active = active
        for module in self.dlrm.modules():
            if isinstance(module, FakeQuantizedLinear):
                module.active = active

    def quantized_model_bytes(self) -> int | None:
        """Bytes of the INT-N model (analytic): packed table codes plus one fp16 scale and offset per quantized table,
        MLP weight rows at their bits (packed to whole bytes) with a float32 scale each, float32 biases. ``None``
        without QAT."""
        config = self.qat_config
        if config is None:
            return None
        hp = self.hparams
        tables = 0
        for feature, rows in zip(DEFAULT_CAT_NAMES, hp.num_embeddings_per_feature, strict=True):
            bits = config.table_bits(feature, rows)
            tables += rows * hp.embedding_dim * 4 if bits is None else -(-rows * hp.embedding_dim * bits // 8) + 4
        mlp = 0
        for width, out in self._mlp_layers():
            # quantized rows are packed to whole bytes, with a float32 scale each
            weight = 4 * width * out if config.mlp_bits is None else out * (-(-width * config.mlp_bits // 8) + 4)
            mlp += weight + 4 * out
        return tables + mlp

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.model is not None
        optimizer = _OPTIMIZERS[self.hparams.optimizer]
        if self._fused_optimizer is None:  # replicated tables: sparse gradients, updated here at their own rate
            tables = list(self.dlrm.sparse_arch.parameters())
            ids = {id(p) for p in tables}
            dense = [p for p in self.model.parameters() if id(p) not in ids]
            return optimizer(
                [{"params": dense}, {"params": tables, "lr": self._sparse_lr}], lr=self.hparams.learning_rate
            )
        dense = [p for _, p in in_backward_optimizer_filter(self.model.named_parameters())]
        return optimizer(dense, lr=self.hparams.learning_rate)

    # ---------------------------------------------------------------------------------------------------- forward
    @override
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits of shape (B,)."""
        if self.artifact_model is not None:
            return self.artifact_model(batch.dense_features, batch.sparse_features).squeeze(-1)
        assert self.model is not None, "call configure_model() first"
        return self.model(batch.dense_features, batch.sparse_features).squeeze(-1)  # (B, 1) -> (B,)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A torchrec Batch moves itself (Pipelineable.to); Lightning's generic traversal of it costs ~0.1 ms a step.
        if isinstance(batch, Batch):
            return batch if device.type == "cpu" else batch.to(device=device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self._loss(logits, batch)
        if self.loggers:
            self._train_window.append((logits.detach(), batch.labels))
        if logging_step(self.trainer):
            self.log("train/loss", loss, prog_bar=True, batch_size=batch.labels.numel())
            if self._train_window:
                self._log_train_window()
        return loss

    def _log_train_window(self) -> None:
        """Training AUC, accuracy and log loss of this rank's batches since the last logging step (cheap: the
        logits are kept, metrics computed once per logging interval)."""
        logits = torch.cat([x for x, _ in self._train_window]).float()
        labels = torch.cat([y for _, y in self._train_window])
        self._train_window.clear()
        prob = torch.sigmoid(logits)
        values = {"train/accuracy": float(((prob > 0.5) == labels.bool()).float().mean())}
        values["train/log_loss"] = binary_log_loss(prob, labels)
        if 0 < int(labels.sum()) < labels.numel():  # AUC needs both classes
            values["train/auc"] = binary_auroc(prob, labels)
        for logger in self.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update_logits(self(batch), batch.labels)

    @override
    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.val_best.update(values)
            self.log_dict(values, prog_bar=True)
            self.log_dict({k.replace("val/", "val_best/"): v for k, v in self.val_best.best.items()})

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_metrics.update_logits(self(batch), batch.labels)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict({k: float(v) for k, v in self.test_metrics.compute().items()})
        self.test_metrics.reset()

    @override
    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"prob": torch.sigmoid(self(batch)), "label": batch.labels}

    # --------------------------------------------------------------------------------------------- checkpointing
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.qat_config is not None:
            checkpoint["qat_config"] = asdict(self.qat_config)
        checkpoint["state_dict"] = to_plain(checkpoint["state_dict"])
        if self._fused_optimizer is not None:
            checkpoint["sparse_optimizer"] = to_plain(self._fused_optimizer.state_dict())
        checkpoint["val_best"] = self.val_best.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        differences = _shape_differences(checkpoint.get("hyper_parameters") or {}, self.hparams)
        if differences:
            raise CheckpointError(
                f"the checkpoint does not fit this model: {differences}; use the data (table sizes come from "
                "`data`: `num_embeddings_per_feature` or the vocabulary) and model settings it was trained with"
            )
        if "qat_config" in checkpoint:
            # a QAT checkpoint describes itself; a schedule given for this run (callback) is kept
            self.prepare_qat(QATConfig(**checkpoint["qat_config"]), update_schedule=False)
        self.val_best.load_state_dict(checkpoint.get("val_best", {}))
        self._pending_sparse_optimizer = checkpoint.get("sparse_optimizer")

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self.configure_model()
        current = self.state_dict()
        # An FP32 checkpoint loaded into a QAT model has no quantizer state: scales are then computed from the
        # loaded tables at the first forward (post-training quantization).
        missing = [k for k in current if k not in state_dict and not k.startswith("embedding_quantizer.")]
        unexpected = [k for k in state_dict if k not in current]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, value in state_dict.items():
            if key in current:
                copy_into(current[key], value, key)
        pending = getattr(self, "_pending_sparse_optimizer", None)
        if pending and self._fused_optimizer is not None:
            optimizer_state = self._fused_optimizer.state_dict()
            _copy_nested(optimizer_state, pending, "sparse_optimizer")
            self._pending_sparse_optimizer = None
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    # ----------------------------------------------------------------------------------------------------- sizes
    def model_bytes(self, embedding_bits: int = 32, dense_bits: int = 32) -> int:
        """Analytic model size: sum over tables of rows x D x bits / 8, plus MLP parameters x bits / 8."""
        hp = self.hparams
        table_bytes = sum(hp.num_embeddings_per_feature) * hp.embedding_dim * embedding_bits // 8
        dense_params = sum(width * out + out for width, out in self._mlp_layers())
        return table_bytes + dense_params * dense_bits // 8

    def _mlp_layers(self) -> list[tuple[int, int]]:
        """(in, out) of every Linear of the bottom and top MLPs."""
        hp = self.hparams
        features = len(DEFAULT_CAT_NAMES) + 1
        layers = []
        for width, sizes in (
            (INT_FEATURE_COUNT, hp.dense_arch_layer_sizes),
            (hp.embedding_dim + features * (features - 1) // 2, hp.over_arch_layer_sizes),
        ):
            for out in sizes:
                layers.append((width, out))
                width = out
        return layers


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_SHAPE_KEYS = ("num_embeddings_per_feature", "embedding_dim", "dense_arch_layer_sizes", "over_arch_layer_sizes")


def _shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The model-shape hyper-parameters that differ between a checkpoint (or artifact) and this model, in words."""
    parts = []
    for key in _SHAPE_KEYS:
        if saved.get(key) is None:
            continue
        old, new = _plain(saved[key]), _plain(current[key])
        if old == new:
            continue
        if key == "num_embeddings_per_feature" and len(old) == len(new):
            tables = [f"{f}: {a} vs {b}" for f, a, b in zip(DEFAULT_CAT_NAMES, old, new, strict=True) if a != b]
            shown = ", ".join(tables[:4]) + (f" (+{len(tables) - 4} more)" if len(tables) > 4 else "")
            parts.append(f"`model.{key}` differs in {len(tables)} tables (saved vs this run: {shown})")
        else:
            parts.append(f"`model.{key}` is {old} there, {new} in this run")
    return "; ".join(parts)


def _plain(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, list | tuple) else value


def _dlrm_init_(layer: nn.Linear) -> None:
    """DLRM's MLP init: W ~ N(0, sqrt(2 / (in + out))), b ~ N(0, sqrt(1 / out))."""
    out_features, in_features = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (in_features + out_features)))
        if layer.bias is not None:
            layer.bias.normal_(0.0, math.sqrt(1.0 / out_features))


def _copy_nested(target: Any, source: Any, name: str) -> None:
    if isinstance(target, Mapping):
        for key, value in target.items():
            if key in source:
                _copy_nested(value, source[key], f"{name}.{key}")
    elif isinstance(target, torch.Tensor) or hasattr(target, "local_shards"):
        copy_into(target, source, name)
