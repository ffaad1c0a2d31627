"""``TorchRecStrategy``: the one entry point for multi-process DLRM training, in either table layout.

Select it with ``--trainer.strategy torchrec`` (or its class path, with ``init_args``) and ``--trainer.devices N``;
the process group backend is gloo on CPU and nccl on GPU. ``embeddings`` picks the strategy it builds:

* ``"sharded"`` (default): :class:`~dqrm_lightning.strategies.ShardedEmbeddingStrategy`, TorchRec model parallelism
  (``sharding``, ``qcomm_forward``, ``qcomm_backward``, ``pipeline``);
* ``"replicated"``: :class:`~dqrm_lightning.strategies.ReplicatedEmbeddingStrategy`, the DQRM paper's data
  parallelism (``gradient_compression``, ``dense_embedding_gradients``).

Each of the two can also be named by its own class path.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from dqrm_lightning.comms.compression import GradientCompressionConfig
from dqrm_lightning.strategies.base import TorchRecStrategyBase
from dqrm_lightning.strategies.replicated import ReplicatedEmbeddingStrategy
from dqrm_lightning.strategies.sharded import ShardedEmbeddingStrategy
from dqrm_lightning.strategies.sharding import EmbeddingLayout


class TorchRecStrategy(TorchRecStrategyBase):
    """Builds the strategy of the table layout ``embeddings`` names: calling it returns a
    :class:`~dqrm_lightning.strategies.ShardedEmbeddingStrategy` or a
    :class:`~dqrm_lightning.strategies.ReplicatedEmbeddingStrategy` (see the module docstring).

    Args:
        embeddings: ``"sharded"`` (TorchRec model parallelism) or ``"replicated"`` (the paper's data parallelism).
        sharding: sharded: see :class:`~dqrm_lightning.strategies.ShardedEmbeddingStrategy`.
        qcomm_forward: sharded: precision of the embedding all-to-all in the forward pass, or ``None`` (FP32).
        qcomm_backward: sharded: the same for the gradients in the backward pass.
        pipeline: sharded: overlap each batch's embedding input all-to-all with the previous step (TorchRec's
            sparse-dist train pipeline).
        gradient_compression: replicated: DQRM's INT-N gradient compression (``None``: float32 averages).
        dense_embedding_gradients: replicated: all-reduce whole-table gradients (the paper's dense baseline).
        kwargs: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ``timeout``, ...).

    Raises:
        ValueError: naming the argument: an unknown layout, a setting of the other layout, or the chosen strategy's
            own refusals.

    Example::

        strategy = TorchRecStrategy(embeddings="replicated", gradient_compression=GradientCompressionConfig(bits=8))
        assert isinstance(strategy, ReplicatedEmbeddingStrategy)
    """

    def __new__(  # type: ignore[misc]  # a factory: it returns the strategy of the chosen layout
        cls,
        embeddings: str = "sharded",
        sharding: str | dict[str, str] = "table_wise",
        qcomm_forward: str | None = None,
        qcomm_backward: str | None = None,
        gradient_compression: GradientCompressionConfig | None = None,
        dense_embedding_gradients: bool = False,
        pipeline: bool = False,
        **kwargs: Any,
    ) -> ShardedEmbeddingStrategy | ReplicatedEmbeddingStrategy:
        # the layout's own checks first: an unknown layout or sharding type, a setting of the other layout
        EmbeddingLayout(embeddings, sharding, dense_embedding_gradients)  # type: ignore[arg-type]  # it checks the str
        if embeddings == "replicated":
            if qcomm_forward or qcomm_backward:
                raise ValueError(
                    "`qcomm_forward`/`qcomm_backward` quantize the sharded all-to-all; replicated tables "
                    "have none (use `gradient_compression`)"
                )
            if pipeline:
                raise ValueError(
                    "`pipeline` overlaps the sharded tables' input all-to-all; replicated tables have none"
                )
            return ReplicatedEmbeddingStrategy(gradient_compression, dense_embedding_gradients, **kwargs)
        if gradient_compression is not None:
            raise ValueError("`gradient_compression` is the data-parallel mode's: set `embeddings: replicated`")
        return ShardedEmbeddingStrategy(sharding, qcomm_forward, qcomm_backward, pipeline, **kwargs)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="TorchRec-sharded DLRM, one process per device")
