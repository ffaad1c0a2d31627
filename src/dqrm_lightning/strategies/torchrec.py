"""``TorchRecStrategy``: multi-process training of a DLRM under the Lightning Trainer, in two modes.

* Sharded embeddings (model parallelism, default): ``DLRMModule.configure_model`` wraps the DLRM in TorchRec's
  ``DistributedModelParallel`` over the process group this strategy starts (tables placed as ``sharding`` says,
  dense layers in DDP inside DMP), so the strategy does not wrap the LightningModule in DDP again. Optional quantized
  embedding all-to-all (``qcomm_forward`` / ``qcomm_backward``).
* Replicated embeddings (``embeddings: replicated``, the DQRM paper's data parallelism): every rank holds every table
  with sparse gradients; the strategy wraps the module in DDP, whose buckets then carry only the touched rows, and
  registers DQRM's INT-N gradient compression as a communication hook (``gradient_compression``) on any device.

Checkpoints are written by every rank with ``torch.distributed.checkpoint`` (each rank its own shards) into a
directory, plus the non-tensor training state (with the compression's per-rank error-feedback residuals); they load
onto another world size (the tables are resharded). Loading never unpickles objects (:mod:`dqrm_lightning.checkpoint`):
a checkpoint whose loading would run code is refused.

Select it with ``--trainer.strategy torchrec`` (or its class path, with ``init_args``) and ``--trainer.devices N``;
the process group backend is gloo on CPU and nccl on GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn import Module
from typing_extensions import override

from dqrm_lightning.checkpoint import (
    SafeCheckpointIO,
    check_weights_only,
    load_dcp,
    load_file,
    read_dcp_metadata,
    verify_directory,
    write_directory_digests,
)
from dqrm_lightning.comms.compression import GradientCompressionConfig
from dqrm_lightning.comms.ddp_hook import CompressionState, compression_hook
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.sharding import EmbeddingLayout

_TENSORS = "state_dict"
META_FILE = "training_state.pt"


def _split(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for distributed checkpointing, everything else)."""
    tensors = {k: checkpoint[k] for k in (_TENSORS, "sparse_optimizer") if k in checkpoint}
    rest = {k: v for k, v in checkpoint.items() if k not in tensors}
    return tensors, rest


_PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")


def qcomm_registry(forward: str | None, backward: str | None, device: torch.device) -> dict | None:
    """TorchRec's quantized-communication codecs for the embedding all-to-all, checked on ``device``.

    Each codec encodes and decodes a probe tensor first; one that fails or returns wrong values on this device
    (FP8 and INT8 on the CPU, with this FBGEMM) is refused with a message instead of silently replaced.

    Raises:
        ConfigError: unknown precision, or a codec this device cannot run.
    """
    if forward is None and backward is None:
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
    from torchrec.distributed.types import CommOp

    _check_precisions(forward, backward)
    for name, value in (("qcomm_forward", forward), ("qcomm_backward", backward)):
        if value == "bf16" and device.type == "cpu":  # TorchRec would quietly send FP16 instead
            raise ConfigError(f"`{name}: bf16` is not supported on the CPU (gloo); use fp16")
    config = QCommsConfig(
        forward_precision=getattr(CommType, (forward or "fp32").upper()),
        backward_precision=getattr(CommType, (backward or "fp32").upper()),
    )
    probe = torch.linspace(-3.0, 3.0, 8 * 64, device=device).reshape(8, 64)
    try:
        registry = get_qcomm_codecs_registry(config, device=device)
        codecs = registry[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name]
        for direction, codec in (("forward", codecs.forward), ("backward", codecs.backward)):
            error = float((codec.decode(codec.encode(probe)) - probe).abs().max())
            if error > 0.05:
                raise ValueError(f"{direction} codec is off by {error:.3g} on a probe in [-3, 3]")
    except Exception as err:  # any failure of the codec means: not supported here
        raise ConfigError(
            f"`qcomm_forward: {forward}`, `qcomm_backward: {backward}`: this quantized all-to-all is not supported "
            f"on {device.type} with this FBGEMM build ({type(err).__name__}: {err}); use fp16 or bf16, or leave it off"
        ) from None
    return registry


def _check_precisions(forward: str | None, backward: str | None) -> None:
    for name, value in (("qcomm_forward", forward), ("qcomm_backward", backward)):
        if value is not None and value not in _PRECISIONS:
            raise ConfigError(f"`{name}` must be one of {_PRECISIONS} or null, got {value!r}")


def _reduce_scatter_precision(forward: str | None, backward: str | None) -> str | None:
    """A requested codec precision that TorchRec cannot use in the row-wise reduce-scatter (it would replace it)."""
    return next((p for p in (forward, backward) if p in ("fp8", "int8")), None)


class TorchRecStrategy(DDPStrategy):
    """Multi-process strategy for the DLRM: TorchRec-sharded or replicated tables (see the module docstring).

    Args:
        embeddings: ``"sharded"`` (TorchRec model parallelism) or ``"replicated"`` (the paper's data parallelism).
        sharding: sharded: ``"table_wise"`` (fixed plan), ``"auto"`` (TorchRec's planner), a sharding type
            (``row_wise``, ``column_wise``, ``table_row_wise``, ``table_column_wise``, ``data_parallel``) or a
            mapping ``{feature or table: type, default: type}``; see :class:`~dqrm_lightning.sharding.EmbeddingLayout`.
        qcomm_forward: sharded: precision of the embedding all-to-all in the forward pass (``fp16``, ``bf16``,
            ``fp8``, ``int8``) or ``None`` (FP32).
        qcomm_backward: the same for the gradients in the backward pass.
        gradient_compression: replicated: DQRM's INT-N gradient compression (``None``: float32 averages of the
            sparse rows and MLP gradients).
        dense_embedding_gradients: replicated: all-reduce whole-table gradients (the paper's dense baseline).
        kwargs: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        embeddings: str = "sharded",
        sharding: str | dict[str, str] = "table_wise",
        qcomm_forward: str | None = None,
        qcomm_backward: str | None = None,
        gradient_compression: GradientCompressionConfig | None = None,
        dense_embedding_gradients: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layout = self.check_arguments(
            embeddings, sharding, qcomm_forward, qcomm_backward, gradient_compression, dense_embedding_gradients
        )
        self.qcomm_forward = qcomm_forward
        self.qcomm_backward = qcomm_backward
        self.reduce_scatter_precision = _reduce_scatter_precision(qcomm_forward, qcomm_backward)
        self.qcomm_codecs_registry: dict | None = None
        self.gradient_compression = gradient_compression
        self.compression_state: CompressionState | None = None
        self._pending_compression: dict[str, Any] | None = None

    @staticmethod
    def check_arguments(
        embeddings: str = "sharded",
        sharding: str | dict[str, str] = "table_wise",
        qcomm_forward: str | None = None,
        qcomm_backward: str | None = None,
        gradient_compression: Any = None,
        dense_embedding_gradients: bool = False,
    ) -> EmbeddingLayout:
        """Check this strategy's own arguments (also before it is built, by the CLI); returns the table layout.

        Raises:
            ValueError: naming the argument (unknown layout or sharding type, unknown all-to-all precision, or
                settings of the other mode); the codecs themselves are probed on the device at setup.
        """
        _check_precisions(qcomm_forward, qcomm_backward)
        layout = EmbeddingLayout(embeddings, sharding, dense_embedding_gradients)  # type: ignore[arg-type]
        if embeddings == "replicated" and (qcomm_forward or qcomm_backward):
            raise ValueError(
                "`qcomm_forward`/`qcomm_backward` quantize the sharded all-to-all; replicated tables "
                "have none (use `gradient_compression`)"
            )
        if gradient_compression is not None and embeddings != "replicated":
            raise ValueError("`gradient_compression` is the data-parallel mode's: set `embeddings: replicated`")
        if gradient_compression is not None and dense_embedding_gradients:
            raise ValueError("`gradient_compression` compresses sparse rows: unset `dense_embedding_gradients`")
        precision = _reduce_scatter_precision(qcomm_forward, qcomm_backward)
        row_wise = {"row_wise", "table_row_wise"} & set(sharding.values() if isinstance(sharding, dict) else [sharding])
        if precision and row_wise:
            raise ValueError(
                f"`qcomm_forward`/`qcomm_backward` {precision} cannot quantize the reduce-scatter of "
                f"{sorted(row_wise)} sharding (TorchRec would replace it): use fp16/bf16 or another sharding type"
            )
        return layout

    @property
    def replicated(self) -> bool:
        return self.layout.embeddings == "replicated"

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.replicated and self._get_process_group_backend() == "nccl":
            raise ValueError(
                "`embeddings: replicated` all-reduces sparse gradients, which nccl cannot: set "
                "`process_group_backend: gloo`, or use sharded embeddings on GPUs"
            )
        self.qcomm_codecs_registry = qcomm_registry(self.qcomm_forward, self.qcomm_backward, self.root_device)

    @override
    def _setup_model(self, model: Module) -> Module:
        if not self.replicated:
            return model  # DistributedModelParallel inside the model already data-parallelizes the dense layers
        ddp = super()._setup_model(model)
        assert self.lightning_module is not None
        # batched averaging (INT-N, or float32 without compression), registered on every device, not on CUDA only
        self.compression_state = CompressionState(
            self.gradient_compression, list(self.lightning_module.named_parameters())
        )
        if self._pending_compression is not None:
            self.compression_state.load_state_dict(self._pending_compression)
            self._pending_compression = None
        ddp.register_comm_hook(self.compression_state, compression_hook)
        return ddp

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self.replicated:
            super().setup(trainer)  # DDP around the module for fitting (our _setup_model adds the hook)
            return
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into the directory ``filepath``; rank 0 adds the training state."""
        path = Path(filepath)
        if self.compression_state is not None:  # every rank's residuals, gathered (collective)
            checkpoint["gradient_compression"] = self.compression_state.state_dict()
        tensors, rest = _split(checkpoint)
        # written beside the target and swapped in when complete: a run killed while saving keeps the old one
        partial = path.with_name(path.name + ".partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier("torchrec_checkpoint_dir")
        dcp.save(tensors, checkpoint_id=str(partial))
        if self.is_global_zero:
            torch.save(rest, partial / META_FILE)
        self.barrier("torchrec_checkpoint_written")
        if self.is_global_zero:
            write_directory_digests(partial)  # every file is complete: checked on each load
            old = path.with_name(path.name + ".old")
            if path.exists():
                path.rename(old)
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("torchrec_checkpoint_saved")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a directory written by :meth:`save_checkpoint` (any world size), or a single-file checkpoint.

        Nothing is unpickled beyond tensors and plain Python values (``weights_only=False`` is refused).

        Raises:
            CheckpointError: a checkpoint whose loading would run code, or an unreadable one.
        """
        check_weights_only(weights_only, checkpoint_path)
        path = Path(checkpoint_path)
        if not path.is_dir():
            checkpoint = SafeCheckpointIO().load_checkpoint(checkpoint_path)
            self._restore_compression(checkpoint)
            return checkpoint
        verify_directory(path)
        rest = load_file(path / META_FILE)
        saved = read_dcp_metadata(path).state_dict_metadata  # checked before anything is restored
        self._restore_compression(rest)
        module = self.lightning_module
        assert module is not None
        module.on_load_checkpoint(rest)  # prepares QAT first, so the target state has every key
        target = {_TENSORS: module.state_dict()}
        fused = getattr(getattr(module, "model", None), "fused_optimizer", None)
        if fused is not None and any(k.startswith("sparse_optimizer.") for k in saved):
            target["sparse_optimizer"] = fused.state_dict()  # e.g. Adagrad's accumulators
        load_dcp(target, path)
        return rest | target

    def _restore_compression(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gradient_compression")
        if state is None:
            return
        if self.compression_state is not None:
            self.compression_state.load_state_dict(state)
        else:
            self._pending_compression = state  # the hook is registered when DDP wraps the model

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="TorchRec-sharded DLRM, one process per device")
