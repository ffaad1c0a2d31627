"""``ShardedEmbeddingStrategy``: TorchRec model parallelism for the DLRM.

``DLRMModule.configure_model`` wraps the DLRM in TorchRec's ``DistributedModelParallel`` over the process group this
strategy starts: tables placed as ``sharding`` says (:class:`~dqrm_lightning.strategies.sharding.EmbeddingLayout`),
dense layers in DDP inside DMP, so the strategy does not wrap the LightningModule in DDP again. The pooled embeddings
travel in an all-to-all that can be quantized (``qcomm_forward`` / ``qcomm_backward``,
:mod:`dqrm_lightning.comms.qcomms`). With ``pipeline=True`` the input all-to-all of each training batch starts one step
early, overlapping the previous step (TorchRec's sparse-dist train pipeline,
:class:`~dqrm_lightning.strategies.pipeline.SparseDistPipeline`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor
from typing_extensions import override

from dqrm_lightning.comms.qcomms import check_precisions, qcomm_registry, reduce_scatter_precision
from dqrm_lightning.strategies.base import TorchRecStrategyBase
from dqrm_lightning.strategies.pipeline import SparseDistPipeline
from dqrm_lightning.strategies.sharding import EmbeddingLayout, EmbeddingPlacement

_ROW_WISE = {"row_wise", "table_row_wise"}


class ShardedEmbeddingStrategy(TorchRecStrategyBase):
    """Tables sharded over the processes by TorchRec (see the module docstring).

    Args:
        sharding: ``"table_wise"`` (fixed plan), ``"auto"`` (TorchRec's planner), a sharding type (``row_wise``,
            ``column_wise``, ``table_row_wise``, ``table_column_wise``, ``data_parallel``) or a mapping
            ``{feature or table: type, default: type}``; see
            :class:`~dqrm_lightning.strategies.sharding.EmbeddingLayout`.
        qcomm_forward: precision of the embedding all-to-all in the forward pass (``fp16``, ``bf16``, ``fp8``,
            ``int8``) or ``None`` (FP32).
        qcomm_backward: the same for the gradients in the backward pass.
        pipeline: start each training batch's embedding input all-to-all while the previous batch trains
            (TorchRec's sparse-dist train pipeline, driven by Lightning's loop); the same results as without it.
        kwargs: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ``timeout``, ...).

    Raises:
        ValueError: naming the argument: an unknown sharding type or precision, or an FP8/INT8 codec with row-wise
            tables (TorchRec would replace it in their reduce-scatter). The codecs themselves are probed on the
            device in ``setup_environment``.

    Example::

        strategy = ShardedEmbeddingStrategy(sharding={"C3": "row_wise", "default": "table_wise"}, qcomm_forward="fp16")
    """

    def __init__(
        self,
        sharding: str | dict[str, str] = "table_wise",
        qcomm_forward: str | None = None,
        qcomm_backward: str | None = None,
        pipeline: bool = False,
        **kwargs: Any,
    ) -> None:
        check_precisions(qcomm_forward, qcomm_backward)
        super().__init__(EmbeddingLayout("sharded", sharding), **kwargs)
        self.qcomm_forward = qcomm_forward
        self.qcomm_backward = qcomm_backward
        self.reduce_scatter_precision = reduce_scatter_precision(qcomm_forward, qcomm_backward)
        self.pipeline = pipeline
        self._pipeline: SparseDistPipeline | None = None
        row_wise = _ROW_WISE & set(sharding.values() if isinstance(sharding, dict) else [sharding])
        if self.reduce_scatter_precision and row_wise:
            raise ValueError(
                f"`qcomm_forward`/`qcomm_backward` {self.reduce_scatter_precision} cannot quantize the reduce-scatter "
                f"of {sorted(row_wise)} sharding (TorchRec would replace it): use fp16/bf16 or another sharding type"
            )

    @override
    def embedding_placement(self) -> EmbeddingPlacement:
        """The layout with the quantized all-to-all codecs, probed on this process's device."""
        codecs = qcomm_registry(self.qcomm_forward, self.qcomm_backward, self.root_device)
        return EmbeddingPlacement(self.layout, codecs, self.reduce_scatter_precision)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """As DDP's, without wrapping the module: DistributedModelParallel inside it data-parallelizes the MLPs."""
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    # ------------------------------------------------------------------------------------ sparse-dist pipeline
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With ``pipeline``, the training DataLoader's batches start their input all-to-all as Lightning reads
        them."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if not self.pipeline or trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if self._pipeline is None:
            self._pipeline = SparseDistPipeline(self.lightning_module.model, self.root_device)  # type: ignore[union-attr]
        return self._pipeline.wrap(dataloader)  # type: ignore[arg-type]  # the training DataLoader

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._pipeline is not None:
            self._pipeline.begin(batch)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._pipeline is not None:
            self._pipeline.after_forward()

    def _detach_pipeline(self) -> None:
        if self._pipeline is not None:
            self._pipeline.detach()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._detach_pipeline()

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        self._detach_pipeline()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._detach_pipeline()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        self._detach_pipeline()
