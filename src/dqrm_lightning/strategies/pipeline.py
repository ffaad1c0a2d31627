"""``SparseDistPipeline``: TorchRec's sparse-data-dist train pipeline under Lightning's own loop.

TorchRec's :class:`~torchrec.distributed.train_pipeline.TrainPipelineSparseDist` starts the input all-to-all of the
sharded tables (``ShardedModule.input_dist``: the feature ids of batch i+1 sent to the ranks that own their tables)
while batch i trains, and it rewrites the sharded modules' ``forward`` to take their input from that finished
all-to-all. Its ``progress()`` also runs zero_grad, forward, backward and the optimizer step, which Lightning's loop
owns (callbacks, the fused and dense optimizers, gradient clipping, logging), so this class drives only the staging
part of that pipeline and leaves the step to Lightning:

* when Lightning's data fetcher takes batch i+1 from the training DataLoader (one batch ahead of the step, as it
  always does), :meth:`start` begins its input all-to-all (the splits exchange, TorchRec's
  ``start_sparse_data_dist``);
* the strategy's ``on_train_batch_start`` calls :meth:`begin` for batch i: the sharded modules read batch i's
  finished input;
* after the forward of batch i, the strategy's ``pre_backward`` calls :meth:`after_forward`: the feature exchange of
  batch i+1 (``wait_sparse_data_dist``) is launched and overlaps the backward of batch i.

No batch is read beyond what Lightning's fetcher reads, so the data module's resume position (the number of batches
Lightning processed) and the epoch's end are unchanged. Evaluation between training steps runs on the original
forwards (:meth:`detach`). On a CUDA device TorchRec's copy and data-dist streams are used; on the CPU both are the
current stream and the pipeline gives exactly the plain loop's results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.pipeline_context import TrainPipelineContext
from torchrec.distributed.train_pipeline.utils import _pipeline_detach_model, _wait_for_batch


class _BatchForward(nn.Module):
    """The DLRM called with a whole :class:`Batch`: TorchRec's tracer then finds that the tables' input is
    ``batch.sparse_features`` and can start its all-to-all from the batch alone."""

    def __init__(self, dlrm: nn.Module) -> None:
        super().__init__()
        self.dlrm = dlrm

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.dlrm(batch.dense_features, batch.sparse_features)


class SparseDistPipeline:
    """Starts each training batch's embedding input all-to-all one step early (see the module docstring).

    Args:
        model: the module's ``DistributedModelParallel``.
        device: where the batches train.

    Example::

        pipeline = SparseDistPipeline(module.model, torch.device("cpu"))
        for batch in pipeline.wrap(loader):  # the input all-to-all of each batch starts here
            pipeline.begin(batch)
            loss = module.training_step(batch, 0)
            pipeline.after_forward()
            loss.backward()
    """

    def __init__(self, model: DistributedModelParallel, device: torch.device) -> None:
        # The optimizer is TorchRec's for `progress()`, which is never called: Lightning steps the optimizers.
        self._torchrec = TrainPipelineSparseDist(_BatchForward(model.module), torch.optim.SGD([nn.Parameter()]), device)
        self.device = device
        self._pending: deque[tuple[Batch, TrainPipelineContext]] = deque()  # started, not yet trained
        self._forwards: list[Any] = []  # the pipelined forwards, kept while detached
        self._kjt_forwards: list[Any] = []

    @property
    def attached(self) -> bool:
        """Whether the sharded modules take their input from the pipeline."""
        return bool(self._torchrec._pipelined_modules) and not self._forwards

    def wrap(self, loader: Iterable[Batch]) -> _PipelinedLoader:
        """``loader`` whose batches start their input all-to-all as they are read."""
        return _PipelinedLoader(loader, self)

    def start(self, batch: Batch) -> Batch:
        """Copy ``batch`` to the device and start its input all-to-all; returns the batch on the device."""
        pipeline = self._torchrec
        with pipeline._stream_context(pipeline._memcpy_stream):  # None on the CPU: the current stream
            if self.device.type != "cpu":
                batch = batch.to(self.device, non_blocking=True)
        context = pipeline._create_context()
        self.attach()
        if pipeline._pipelined_modules:
            pipeline.start_sparse_data_dist(batch, context)
        else:  # the first batch: rewrite the sharded modules' forwards (traced once), then start
            pipeline._pipeline_model(batch, context, pipeline._pipelined_forward_type)
            if not pipeline._pipelined_modules:
                raise RuntimeError("TorchRec's pipeline found no sharded module fed by `batch.sparse_features`")
        self._pending.append((batch, context))
        return batch

    def begin(self, batch: Batch) -> None:
        """Batch ``batch`` (the oldest started one) trains now: its input exchange is finished and used."""
        if not self._pending:
            raise RuntimeError("a training batch that did not come through `SparseDistPipeline.wrap`")
        _, context = self._pending.popleft()
        self.attach()
        pipeline = self._torchrec
        pipeline.wait_sparse_data_dist(context)  # no-op if `after_forward` already did it
        _wait_for_batch(batch, pipeline._data_dist_stream)
        pipeline._set_module_context(context)

    def after_forward(self) -> None:
        """Launch the next batch's feature exchange, to overlap the backward pass of the current one."""
        if self._pending and self.attached:
            self._torchrec.wait_sparse_data_dist(self._pending[0][1])

    def reset(self) -> None:
        """Forget started batches (a new pass over the DataLoader)."""
        self._pending.clear()

    def detach(self) -> None:
        """Give the sharded modules their original forwards (evaluation, export); :meth:`attach` undoes it."""
        pipeline = self._torchrec
        if not self.attached:
            return
        modules = pipeline._pipelined_modules
        self._forwards = [m.forward for m in modules]
        self._kjt_forwards = [d.forward for d in _kjt_dists(modules)]
        _pipeline_detach_model(
            pipeline._model, modules, pipeline._original_forwards, pipeline._original_kjt_dist_forwards, []
        )

    def attach(self) -> None:
        """Undo :meth:`detach`."""
        if not self._forwards:
            return
        modules = self._torchrec._pipelined_modules
        for module, forward in zip(modules, self._forwards, strict=True):
            module.forward = forward
        for dist, forward in zip(_kjt_dists(modules), self._kjt_forwards, strict=True):
            dist.forward = forward
        self._forwards, self._kjt_forwards = [], []


def _kjt_dists(modules: list[Any]) -> list[Any]:
    """The KJT all-to-all modules of the sharded modules' input dists, in TorchRec's order."""
    return [
        input_dist._dist
        for module in modules
        for _, child in module.named_modules()
        for input_dist in getattr(child, "_input_dists", [])
        if hasattr(input_dist, "_dist")
    ]


class _PipelinedLoader:
    """An iterable over a DataLoader whose batches start their input all-to-all as they are read."""

    def __init__(self, loader: Iterable[Batch], pipeline: SparseDistPipeline) -> None:
        self.loader = loader
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # Lightning asks only when the DataLoader has one

    def __iter__(self) -> Iterator[Batch]:
        self.pipeline.reset()
        for batch in self.loader:
            yield self.pipeline.start(batch)

    def __getattr__(self, name: str) -> Any:  # the DataLoader's own attributes (sampler, dataset, ...)
        return getattr(self.loader, name)
