"""``ReplicatedEmbeddingStrategy``: the DQRM paper's data parallelism for the DLRM.

Every rank holds every table with sparse gradients (``DLRMModule.configure_model`` builds them as plain modules); the
strategy wraps the module in DDP, whose buckets then carry only the touched rows, and registers DQRM's INT-N gradient
compression (:mod:`dqrm_lightning.comms.ddp_hook`) as the communication hook on any device (Lightning registers DDP
hooks on CUDA only). The compression's per-rank error-feedback residuals travel in the checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from dqrm_lightning.comms.compression import GradientCompressionConfig
from dqrm_lightning.comms.ddp_hook import CompressionState, compression_hook
from dqrm_lightning.strategies.base import TorchRecStrategyBase
from dqrm_lightning.strategies.sharding import EmbeddingLayout

_COMPRESSION = "gradient_compression"


class ReplicatedEmbeddingStrategy(TorchRecStrategyBase):
    """Tables replicated on every process, their sparse gradients averaged by DDP (see the module docstring).

    Args:
        gradient_compression: DQRM's INT-N gradient compression (``None``: float32 averages of the sparse rows and
            MLP gradients, with the same batching).
        dense_embedding_gradients: all-reduce whole-table gradients (the paper's dense baseline).
        kwargs: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ``timeout``, ...).

    Raises:
        ValueError: ``gradient_compression`` together with ``dense_embedding_gradients``; in ``setup_environment``,
            the nccl backend (it has no sparse all-reduce).

    Example::

        strategy = ReplicatedEmbeddingStrategy(gradient_compression=GradientCompressionConfig(bits=8))
    """

    def __init__(
        self,
        gradient_compression: GradientCompressionConfig | None = None,
        dense_embedding_gradients: bool = False,
        **kwargs: Any,
    ) -> None:
        if gradient_compression is not None and dense_embedding_gradients:
            raise ValueError("`gradient_compression` compresses sparse rows: unset `dense_embedding_gradients`")
        layout = EmbeddingLayout("replicated", dense_embedding_gradients=dense_embedding_gradients)
        super().__init__(layout, **kwargs)
        self.gradient_compression = gradient_compression
        self.compression_state: CompressionState | None = None
        self._pending_compression: dict[str, Any] | None = None  # restored before DDP wraps the module

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self._get_process_group_backend() == "nccl":
            raise ValueError(
                "`embeddings: replicated` all-reduces sparse gradients, which nccl cannot: set "
                "`process_group_backend: gloo`, or use sharded embeddings on GPUs"
            )

    @override
    def configure_ddp(self) -> None:
        """DDP around the module (fitting only), with the batched averaging hook (INT-N, or float32 without
        compression) registered on every device, not on CUDA only."""
        super().configure_ddp()
        assert self.lightning_module is not None
        self.compression_state = CompressionState(
            self.gradient_compression, list(self.lightning_module.named_parameters())
        )
        if self._pending_compression is not None:
            self.compression_state.load_state_dict(self._pending_compression)
            self._pending_compression = None
        assert isinstance(self.model, DistributedDataParallel)  # what DDPStrategy.configure_ddp wraps the module in
        self.model.register_comm_hook(self.compression_state, compression_hook)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """As the base's, with every rank's error-feedback residuals (gathered: a collective)."""
        if self.compression_state is not None:
            checkpoint[_COMPRESSION] = self.compression_state.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """As the base's; this rank's residuals go to the hook (now, or when DDP wraps the module)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        state = checkpoint.get(_COMPRESSION)
        if state is not None:
            if self.compression_state is not None:
                self.compression_state.load_state_dict(state)
            else:
                self._pending_compression = state
        return checkpoint
