"""``DLRMModule``: TorchRec's DLRM as a LightningModule with sparse, fused embedding updates.

Notation: B batch size, F sparse features (26 on Criteo), T tables (T <= F: features may share one), D embedding
dimension.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from typing_extensions import override

from dqrm_lightning._logging import logging_step
from dqrm_lightning.checkpoint import CheckpointError
from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.export.inference import ArtifactDLRM, load_inference_model
from dqrm_lightning.metrics import BestTracker, ClickMetrics, binary_auroc, binary_log_loss
from dqrm_lightning.names import QAT_CONFIG_KEY, QUANTIZER_PREFIX, table_weight_key
from dqrm_lightning.quant import EmbeddingQuantizer, QATConfig, prepare_qat
from dqrm_lightning.schema import FeatureSchema, load_schema, schema_of
from dqrm_lightning.strategies.sharding import (
    EmbeddingPlacement,
    copy_into,
    replicate_embeddings,
    shard_model,
    to_plain,
)
from dqrm_lightning.table_dtype import TABLE_DTYPES, TableDtype, check_table_dtype

_OPTIMIZERS: dict[str, type[torch.optim.SGD | torch.optim.Adagrad]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}
ARCHITECTURES = ("dlrm", "dcn")  # the dot interaction (DLRM), or TorchRec's DLRM_DCN (DCN-v2 cross layers)


def model_shape(hparams: Mapping[str, Any]) -> ModelShape:
    """Table sizes, D, the (in, out) of every MLP Linear (bottom MLP first, in forward order) and the cross layers'
    parameters (``dcn``) of the model that ``DLRMModule(**hparams)`` builds."""
    schema, dim = schema_of(hparams), hparams["embedding_dim"]
    vectors = len(schema.sparse) + 1  # the dense vector joins the pooled embeddings in the interaction
    dcn = hparams.get("architecture", "dlrm") == "dcn"
    interaction = vectors * dim if dcn else dim + vectors * (vectors - 1) // 2
    layers = []
    for width, sizes in (
        (len(schema.dense), hparams["dense_arch_layer_sizes"]),
        (interaction, hparams["over_arch_layer_sizes"]),
    ):
        for out in sizes:
            layers.append((width, out))
            width = out
    rank = hparams.get("dcn_low_rank_dim", 0)
    cross = hparams.get("dcn_num_layers", 0) * (2 * interaction * rank + interaction) if dcn else 0  # W, V, bias
    return ModelShape(schema.table_rows(), dim, layers, cross)


class DLRMModule(pl.LightningModule):
    """DLRM (bottom MLP, embedding tables, dot interaction, top MLP) trained with BCE-with-logits; or, with
    ``architecture: dcn``, TorchRec's ``DLRM_DCN`` (DCN-v2 low-rank cross layers as the interaction).

    The features and tables come from a :class:`~dqrm_lightning.schema.FeatureSchema` (``schema``), by default
    Criteo's: 13 dense inputs and 26 one-hot features, each in its own table of ``num_embeddings_per_feature`` rows.

    Embedding tables are built on the meta device and materialised by TorchRec's DistributedModelParallel in
    ``configure_model``; their optimizer runs fused in the backward pass and touches only the looked-up rows. Dense
    layers use a regular optimizer. Defaults are the DQRM paper's: plain SGD, learning rate 0.1 for both, no schedule.
    :meth:`prepare_qat` (the ``QuantizationAwareTraining`` callback calls it) makes the model quantization-aware;
    :meth:`use_artifact` evaluates an exported INT-N model instead.

    Args:
        num_embeddings_per_feature: Criteo: rows of each of the 26 tables (linked from the data module by the CLI);
            ``None`` with ``schema``.
        embedding_dim: D (every table's dimension: the interaction needs one).
        dense_arch_layer_sizes: bottom MLP widths after the dense inputs; the last must equal D.
        over_arch_layer_sizes: top MLP widths; the last must be 1.
        optimizer: ``"sgd"`` or ``"adagrad"`` (both parts).
        learning_rate: dense learning rate.
        sparse_learning_rate: embedding learning rate (default: ``learning_rate``).
        table_dtype: precision of the stored master tables, ``"fp32"`` or ``"fp16"`` (half the table memory; the
            lookups still hand float32 activations on). See :mod:`dqrm_lightning.table_dtype`.
        schema: the features and tables (``FeatureSchema.to_dict()``, every table sized), or ``None``: Criteo.
        architecture: ``"dlrm"`` (dot interaction) or ``"dcn"`` (DCN-v2, the MLPerf DLRMv2 model).
        dcn_num_layers: ``dcn``: cross layers.
        dcn_low_rank_dim: ``dcn``: rank of each cross layer's weight.

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
        table_dtype: TableDtype = "fp32",
        schema: dict[str, Any] | None = None,
        architecture: Literal["dlrm", "dcn"] = "dlrm",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 64,
    ) -> None:
        super().__init__()
        dense_arch_layer_sizes = dense_arch_layer_sizes or [512, 256, 64, embedding_dim]
        over_arch_layer_sizes = over_arch_layer_sizes or [512, 256, 1]
        self.save_hyperparameters()
        if num_embeddings_per_feature is None and schema is None:
            raise ValueError("`num_embeddings_per_feature` is required (the CLI links it from the data module)")
        self.check_arguments(self.hparams)
        self.schema: FeatureSchema = schema_of(self.hparams)  # the features and tables
        self.model: nn.Module | None = None  # the DLRM (sharded or not), or an exported artifact (use_artifact)
        self.placement = EmbeddingPlacement()  # a multi-process strategy hands over its own (`place_embeddings`)
        self.qat_config: QATConfig | None = None  # what prepare_qat made the model; saved in checkpoints
        self.embedding_quantizer: EmbeddingQuantizer | None = None  # registered here: checkpoints keep its state
        self._train_window: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_metrics = ClickMetrics("val/")
        self.test_metrics = ClickMetrics("test/")
        self.val_best = BestTracker()

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any]) -> None:
        """Check ``__init__`` arguments given by name (missing ones take their defaults, ``None`` layer sizes are
        the defaults). The CLI checks them before building the data module, which sizes the tables: then
        ``num_embeddings_per_feature`` is not known yet and not checked.

        Raises:
            ValueError: naming the first bad argument.
        """
        defaults = {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()}
        args = defaults | dict(arguments)
        tables = args["num_embeddings_per_feature"]
        if tables is not None and args["schema"] is not None:
            raise ValueError(
                "give `schema` (its tables' rows) or `num_embeddings_per_feature` (the Criteo tables), not both"
            )
        if tables is not None and len(tables) != len(DEFAULT_CAT_NAMES):
            raise ValueError(f"`num_embeddings_per_feature` needs {len(DEFAULT_CAT_NAMES)} sizes, got {len(tables)}")
        if tables is not None and not all(_positive_int(n) for n in tables):
            raise ValueError(f"`num_embeddings_per_feature` must be positive integers, got {tables}")
        if not _positive_int(args["embedding_dim"]):
            raise ValueError(f"`embedding_dim` must be a positive integer, got {args['embedding_dim']!r}")
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            if args[name] and not all(_positive_int(n) for n in args[name]):
                raise ValueError(f"`{name}` must be positive integers, got {args[name]}")
        dense, over = args["dense_arch_layer_sizes"], args["over_arch_layer_sizes"]
        if dense and dense[-1] != args["embedding_dim"]:
            raise ValueError(
                f"the last `dense_arch_layer_sizes` entry must equal `embedding_dim` ({args['embedding_dim']}), "
                f"got {dense}"
            )
        if over and over[-1] != 1:
            raise ValueError(f"the last `over_arch_layer_sizes` entry must be 1, got {over}")
        if args["optimizer"] not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {sorted(_OPTIMIZERS)}, got {args['optimizer']!r}")
        if args["learning_rate"] <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {args['learning_rate']}")
        if args["sparse_learning_rate"] is not None and args["sparse_learning_rate"] <= 0:
            raise ValueError(f"`sparse_learning_rate` must be positive or null, got {args['sparse_learning_rate']}")
        check_table_dtype(args["table_dtype"])
        _check_architecture(args)
        if args["schema"] is not None:
            _check_schema(load_schema(args["schema"]), args["embedding_dim"])

    # --------------------------------------------------------------------------------------------------- building
    def table_configs(self) -> list[EmbeddingBagConfig]:
        """One config per schema table, in schema order, looked up by each of its features."""
        hp, schema = self.hparams, self.schema
        return [
            EmbeddingBagConfig(
                name=table.name,
                embedding_dim=schema.dim_of(table.name, hp["embedding_dim"]),
                num_embeddings=rows,
                feature_names=schema.features_of(table.name),
                pooling=PoolingType.MEAN if table.pooling == "mean" else PoolingType.SUM,
                data_type=TABLE_DTYPES[hp["table_dtype"]],
            )  # default init: U(-1/sqrt(rows), 1/sqrt(rows)), as DLRM
            for table, rows in zip(schema.tables, schema.table_rows(), strict=True)
        ]

    def build_dlrm(self) -> DLRM:
        """The unsharded DLRM (or DLRM_DCN): EBC on the meta device, MLPs on the CPU with DLRM's initialisation."""
        hp = self.hparams
        ebc = EmbeddingBagCollection(tables=self.table_configs(), device=torch.device("meta"))
        arch: dict[str, Any] = {
            "embedding_bag_collection": ebc,
            "dense_in_features": len(self.schema.dense),
            "dense_arch_layer_sizes": list(hp["dense_arch_layer_sizes"]),
            "over_arch_layer_sizes": list(hp["over_arch_layer_sizes"]),
            "dense_device": torch.device("cpu"),
        }
        if hp["architecture"] == "dcn":
            dcn = {"dcn_num_layers": hp["dcn_num_layers"], "dcn_low_rank_dim": hp["dcn_low_rank_dim"]}
            dlrm: DLRM = DLRM_DCN(**arch, **dcn)  # its cross layers keep TorchRec's initialisation
        else:
            dlrm = DLRM(**arch)
        for module in (dlrm.dense_arch, dlrm.over_arch):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    _dlrm_init_(layer)
        return dlrm

    def use_artifact(self, path: str, engine: str = "torchrec", mlp_precision: str = "fp32") -> None:
        """Validate, test or predict with an exported artifact (:mod:`dqrm_lightning.export.inference`) as the model,
        run by ``engine`` with its MLP products in ``mlp_precision``.

        Raises:
            ConfigError: the artifact's model shape is not this module's.
        """
        model = load_inference_model(path, engine, mlp_precision=mlp_precision)
        differences = _shape_differences(model.manifest["model"], self.hparams)
        if differences:
            raise ConfigError(
                f"the artifact {path} does not fit this model: {differences}; use the data (table sizes come from "
                "`data`: `num_embeddings_per_feature` or the vocabulary) and model settings it was exported with"
            )
        self.model = model

    def place_embeddings(self, placement: EmbeddingPlacement) -> None:
        """Build the tables where ``placement`` says (a multi-process strategy calls this before ``configure_model``;
        without one they are sharded table-wise over a one-process group)."""
        self.placement = placement

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        dlrm = self.build_dlrm()
        layout = self.placement.layout
        # built on the strategy's device, where the module moves after this
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if layout.embeddings == "replicated":  # plain modules with sparse gradients; DDP outside averages them
            self._check_replicated_tables()
            self.model = replicate_embeddings(dlrm, device, sparse=not layout.dense_embedding_gradients)
            return
        apply_optimizer_in_backward(
            _OPTIMIZERS[self.hparams["optimizer"]], dlrm.sparse_arch.parameters(), {"lr": self._sparse_lr}
        )
        codecs, precision = self.placement.qcomm_codecs_registry, self.placement.reduce_scatter_precision
        self.model = shard_model(dlrm, device, codecs, layout, precision)

    def _check_replicated_tables(self) -> None:
        """Refuse float16 replicated tables under Adagrad: torch's sparse Adagrad keeps its sums in the table's dtype,
        where its epsilon (1e-10) is 0, so an untouched coordinate divides 0 by 0 (NaN within a few steps).

        Raises:
            ConfigError: naming both settings.
        """
        if self.hparams["table_dtype"] == "fp16" and self.hparams["optimizer"] == "adagrad":
            raise ConfigError(
                "`model.table_dtype: fp16` with `model.optimizer: adagrad` needs sharded tables (FBGEMM keeps the "
                "Adagrad state in float32); replicated tables train float16 with `optimizer: sgd` only"
            )

    @property
    def _sparse_lr(self) -> float:
        return self.hparams["sparse_learning_rate"] or self.hparams["learning_rate"]

    # ------------------------------------------------------------------------------------------------------- QAT
    def prepare_qat(self, config: QATConfig) -> None:
        """Make the model quantization-aware for ``config``, in place (:func:`dqrm_lightning.quant.prepare_qat`),
        building it first if needed (before or after sharding). A model prepared already keeps its quantized
        structure and adopts the schedule of ``config`` (scale period, tracking); an exported artifact is left as is.

        Raises:
            ValueError: the model is prepared for a different quantization.
        """
        if isinstance(self.model, ArtifactDLRM):
            return  # an exported artifact is already quantized
        if self.qat_config is not None:
            self._check_quantization(config)
            self.qat_config = config
            if self.embedding_quantizer is not None:
                self.embedding_quantizer.config = config
            return
        self.configure_model()
        self.embedding_quantizer = prepare_qat(self.dlrm, config)
        if self.embedding_quantizer is not None:
            self.embedding_quantizer.multi_hot_features = {s.name for s in self.schema.sparse if s.multi_hot}
        self.qat_config = config

    def _check_quantization(self, config: QATConfig) -> None:
        """Raise unless ``config`` quantizes as the model was prepared to (the schedule may differ)."""
        assert self.qat_config is not None
        differences = self.qat_config.structural_differences(config)
        if differences:
            detail = ", ".join(f"{k}: {getattr(self.qat_config, k)!r} vs {getattr(config, k)!r}" for k in differences)
            raise ValueError(
                f"the model is prepared for a different quantization ({detail}); use the QAT "
                "settings the checkpoint was trained with"
            )

    @property
    def dlrm(self) -> DLRM:
        """The DLRM (inside the DistributedModelParallel wrapper when sharded)."""
        assert self.model is not None, "call configure_model() first"
        return self.model.module if isinstance(self.model, DistributedModelParallel) else self.model

    @property
    def _fused_optimizer(self) -> Any:
        """The sharded tables' in-backward optimizer (``None`` with replicated tables: the regular one updates them)."""
        return getattr(self.model, "fused_optimizer", None)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.model is not None
        optimizer = _OPTIMIZERS[self.hparams["optimizer"]]
        if self._fused_optimizer is None:  # replicated tables: sparse gradients, updated here at their own rate
            tables = list(self.dlrm.sparse_arch.parameters())
            ids = {id(p) for p in tables}
            dense = [p for p in self.model.parameters() if id(p) not in ids]
            groups: list[dict[str, Any]] = [{"params": dense}, {"params": tables, "lr": self._sparse_lr}]
            return optimizer(groups + self._learned_scale_groups(), lr=self.hparams["learning_rate"])
        dense = [p for _, p in in_backward_optimizer_filter(self.model.named_parameters())]
        learned = self._learned_scale_groups()
        if learned:
            return optimizer([{"params": dense}, *learned], lr=self.hparams["learning_rate"])
        return optimizer(dense, lr=self.hparams["learning_rate"])

    def _learned_scale_groups(self) -> list[dict[str, Any]]:
        """The dense optimizer's parameter group of the embedding quantizer's learned scales (``scale_learning:
        lsq``; none otherwise), at ``lsq_lr_scale`` times the dense learning rate."""
        if self.embedding_quantizer is None or self.qat_config is None:
            return []
        params = list(self.embedding_quantizer.parameters())
        if not params:
            return []
        return [{"params": params, "lr": self.hparams["learning_rate"] * self.qat_config.lsq_lr_scale}]

    @override
    def on_after_backward(self) -> None:
        # Sharded tables: DistributedModelParallel data-parallelizes the MLPs only, so the learned scales' gradients
        # are averaged here (with replicated tables DDP wraps this whole module and averages them).
        if self.embedding_quantizer is not None and isinstance(self.model, DistributedModelParallel):
            self.embedding_quantizer.average_gradients()

    # ---------------------------------------------------------------------------------------------------- forward
    @override
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits of shape (B,).

        With QAT (:meth:`prepare_qat`) the DLRM's sparse arch is a ``FakeQuantizedSparseArch`` (each table's
        looked-up rows on its integer grid) and its MLP layers are ``FakeQuantizedLinear``; after
        :meth:`use_artifact` the model is the exported integer one.
        """
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
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # a second loader is the test split (CriteoDataModule's `evaluate_test_split`)
        metrics = self.val_metrics if dataloader_idx == 0 else self.test_metrics
        metrics.update_logits(self(batch), batch.labels)

    @override
    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        test_values: dict[str, float] = {}
        if self.test_metrics["auc"].update_count:  # the test split at this evaluation (the paper's protocol)
            test_values = {k.replace("test/", "fit_test/"): float(v) for k, v in self.test_metrics.compute().items()}
            self.test_metrics.reset()
        if not self.trainer.sanity_checking:
            self.val_best.update(values)
            self.log_dict(values, prog_bar=True)
            self.log_dict({k.replace("val/", "val_best/"): v for k, v in self.val_best.best.items()})
            self.log_dict(test_values)

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
            checkpoint[QAT_CONFIG_KEY] = asdict(self.qat_config)
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
        if QAT_CONFIG_KEY in checkpoint:  # a QAT checkpoint describes itself
            saved = QATConfig(**checkpoint[QAT_CONFIG_KEY])
            if self.qat_config is None:
                self.prepare_qat(saved)
            else:  # prepared for this run (callback): its schedule is kept
                self._check_quantization(saved)
        self.val_best.load_state_dict(checkpoint.get("val_best", {}))
        self._pending_sparse_optimizer = checkpoint.get("sparse_optimizer")

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self.configure_model()
        current = self.state_dict()
        # An FP32 checkpoint loaded into a QAT model has no quantizer state: scales are then computed from the
        # loaded tables at the first forward (post-training quantization).
        missing = [k for k in current if k not in state_dict and not k.startswith(QUANTIZER_PREFIX)]
        unexpected = [k for k in state_dict if k not in current]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        _note_table_casts(state_dict, current, self.schema.table_names)
        for key, value in state_dict.items():
            if key in current:
                copy_into(current[key], value, key)
        if self.embedding_quantizer is not None:
            self.embedding_quantizer.tables_changed()
        pending = getattr(self, "_pending_sparse_optimizer", None)
        if pending and self._fused_optimizer is not None:
            optimizer_state = self._fused_optimizer.state_dict()
            _copy_nested(optimizer_state, pending, "sparse_optimizer")
            self._pending_sparse_optimizer = None
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


def _note_table_casts(saved: Mapping[str, Any], current: Mapping[str, Any], table_names: list[str]) -> None:
    """Say so when a checkpoint's tables are loaded into tables of another precision (``copy_into`` casts them:
    float32 values round to the nearest float16, float16 ones widen exactly)."""
    tables = [table_weight_key(table) for table in table_names]
    casts = {
        (saved[key].dtype, current[key].dtype)
        for key in tables
        if key in saved and key in current and saved[key].dtype != current[key].dtype
    }
    for old, new in sorted(casts, key=str):
        how = "exact" if new.itemsize > old.itemsize else "each value rounded to the nearest"
        rank_zero_info(f"the checkpoint's tables are {old}, this model's `table_dtype` stores {new}: cast ({how})")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_architecture(args: Mapping[str, Any]) -> None:
    """Raise unless ``architecture`` and its DCN settings are valid (``ValueError`` naming the argument)."""
    if args["architecture"] not in ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {args['architecture']!r}")
    for name in ("dcn_num_layers", "dcn_low_rank_dim"):
        if not _positive_int(args[name]):
            raise ValueError(f"`{name}` must be a positive integer, got {args[name]!r}")


def _check_schema(schema: FeatureSchema, embedding_dim: int) -> None:
    """Raise unless the model can be built from ``schema``: dense inputs, every table sized, one dimension.

    Raises:
        ConfigError: naming the tables (and dimensions) at fault and what works.
    """
    if not schema.dense:
        raise ConfigError("`schema.dense` is empty: the model's bottom MLP needs at least one dense feature")
    reserved = [t.name for t in schema.tables if hasattr(nn.ModuleDict, t.name)]
    if reserved:
        raise ConfigError(
            f"`schema` tables {reserved} are named like methods of torch's ModuleDict, which holds TorchRec's tables "
            "by name: rename them (e.g. with a `t_` prefix)"
        )
    unsized = [t.name for t in schema.tables if t.rows is None]
    if unsized:
        raise ConfigError(
            f"`schema` tables {unsized} have no `rows`: the model needs every table sized (give `rows`, or let the "
            "data module size vocab tables and link its resolved schema)"
        )
    other = {t.name: t.dim for t in schema.tables if t.dim is not None and t.dim != embedding_dim}
    if other:
        raise ConfigError(
            f"`schema` tables {other} (name: dim) differ from `embedding_dim` {embedding_dim}: the interaction "
            "(dot products, or DCN's stacked vectors) needs one dimension; give every table the bottom MLP's output "
            "width (`dim: null` or the same as `embedding_dim`)"
        )


_SHAPE_KEYS = (
    "num_embeddings_per_feature",
    "schema",
    "embedding_dim",
    "dense_arch_layer_sizes",
    "over_arch_layer_sizes",
    "architecture",
    "dcn_num_layers",
    "dcn_low_rank_dim",
)


def _shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The model-shape hyper-parameters that differ between a checkpoint (or artifact) and this model, in words."""
    parts = []
    for key in _SHAPE_KEYS:
        old, new = _plain(saved.get(key, _ARCH_DEFAULTS.get(key))), _plain(current.get(key, _ARCH_DEFAULTS.get(key)))
        if old is None or old == new:
            continue
        if key == "schema":
            parts.append(_schema_difference(old, new))
        elif key == "num_embeddings_per_feature" and new is not None and len(old) == len(new):
            tables = [f"{f}: {a} vs {b}" for f, a, b in zip(DEFAULT_CAT_NAMES, old, new, strict=True) if a != b]
            shown = ", ".join(tables[:4]) + (f" (+{len(tables) - 4} more)" if len(tables) > 4 else "")
            parts.append(f"`model.{key}` differs in {len(tables)} tables (saved vs this run: {shown})")
        else:
            parts.append(f"`model.{key}` is {old} there, {new} in this run")
    return "; ".join(parts)


_ARCH_DEFAULTS = {"architecture": "dlrm", "dcn_num_layers": 3, "dcn_low_rank_dim": 64}  # before DCN existed


def _schema_difference(old: Mapping[str, Any], new: Mapping[str, Any] | None) -> str:
    """How a saved schema differs from this run's (``None``: the Criteo preset), in words."""
    if new is None:
        return "`model.schema` is set there (features and tables of its own), the Criteo preset in this run"
    before, after = load_schema(old), load_schema(new)
    if before.table_names == after.table_names and before.feature_names == after.feature_names:
        rows = [f"{t.name}: {t.rows} vs {u.rows}" for t, u in zip(before.tables, after.tables, strict=True)]
        changed = [r for r, t, u in zip(rows, before.tables, after.tables, strict=True) if t != u]
        return f"`model.schema` differs in tables (saved vs this run: {', '.join(changed[:4]) or 'settings'})"
    return (
        f"`model.schema` has features {before.feature_names} and tables {before.table_names} there, "
        f"{after.feature_names} and {after.table_names} in this run"
    )


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
