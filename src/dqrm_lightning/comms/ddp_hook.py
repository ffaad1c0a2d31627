"""DQRM's gradient compression as a DDP communication hook (paper Sec. 3.3; the math is in
:mod:`dqrm_lightning.comms.compression`).

DDP hands the hook one bucket at a time, in the same order on every rank. A sparse bucket holds one table's
gradient (``nn.EmbeddingBag(sparse=True)``: only the touched rows), averaged with one INT-N scale per table. A dense
bucket holds MLP weights and biases: each tensor gets its own scales (per output row / per tensor) and error feedback
(one scale per bucket would be cheaper but costs accuracy). The hook queues the buckets and answers them all when the
iteration's last one arrives, with three collectives in all (scales, sparse codes, dense codes) instead of two per
bucket: on gloo each collective costs about a millisecond, whatever its size.

:class:`CompressionState` keeps the error-feedback residuals (per rank: they differ between ranks) and counters that
say what the hook did, so tests and logs can check that compression really ran (Lightning registers DDP hooks on CUDA
only; our strategy registers this one itself on every device).
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dqrm_lightning.comms.compression import GradientCompressionConfig, compress_gradients


class CompressionState:
    """Hook state: configuration, parameter names, error-feedback residuals and counters.

    Args:
        config: the compression settings; ``None``: float32 averages with the same batching (no compression).
        named_parameters: (name, parameter) pairs of the wrapped module, to key the residuals by stable names.
        group: process group (default: the world).
    """

    def __init__(
        self,
        config: GradientCompressionConfig | None,
        named_parameters: list[tuple[str, nn.Parameter]],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.config = config or GradientCompressionConfig(bits=32)
        self.group = group
        self.names = {id(p): name for name, p in named_parameters}
        self.residuals: dict[str, torch.Tensor] = {}
        self.flushes = 0  # iterations compressed
        self.sparse_tables = 0  # table gradients compressed (sparse buckets)
        self.dense_tensors = 0  # MLP gradients compressed
        self.bytes_sent = 0  # INT-N codes + float32 scales this rank contributed (row indices not counted)
        self._queue: list[tuple[torch.Tensor, list, list, torch.futures.Future]] = []

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Every rank's residuals, gathered (a collective: call it on all ranks): ``{name: (world, *shape)}``."""
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        gathered = {}
        for name in sorted(self.residuals):
            local = self.residuals[name].contiguous()
            if world > 1:
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local, group=self.group)
                gathered[name] = torch.stack(parts)
            else:
                gathered[name] = local.unsqueeze(0).clone()
        return {"world_size": world, "residuals": gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's residuals. On another world size the residuals restart from zero (they are per rank)."""
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        if int(state.get("world_size", 0)) != world:
            import warnings

            warnings.warn(
                f"gradient-compression residuals were saved with {state.get('world_size')} processes, this run has "
                f"{world}: error feedback restarts from zero",
                stacklevel=2,
            )
            self.residuals = {}
            return
        self.residuals = {name: value[rank].clone() for name, value in state["residuals"].items()}

    # --------------------------------------------------------------------------------------------------- hook
    def _name(self, param: torch.Tensor) -> str:
        return self.names.get(id(param), f"param_{id(param)}")

    def add(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Queue a bucket; the last bucket of the iteration compresses them all (three collectives in all)."""
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._queue.append((bucket.buffer(), bucket.parameters(), bucket.gradients(), future))
        if bucket.is_last():
            self.flush()
        return future

    def flush(self) -> None:
        queue, self._queue = self._queue, []
        sparse = [buffer.coalesce() for buffer, _, _, _ in queue if buffer.is_sparse]  # repeated ids merged
        names, grads = [], []
        for buffer, params, views, _ in queue:
            if buffer.is_sparse:
                continue
            if sum(v.numel() for v in views) != buffer.numel():
                raise RuntimeError("DDP bucket layout: the gradients do not tile the bucket buffer")
            names += [self._name(p) for p in params]
            grads += [v.detach() for v in views]
        use_errors = self.config.error_compensation != "off"
        errors = [self.residuals.get(n) if use_errors else None for n in names]
        sparse_avg, dense_avg, new_errors = compress_gradients(sparse, grads, errors, self.config, self.group)
        for name, error in zip(names, new_errors, strict=True):
            if error is not None:
                self.residuals[name] = error
        self.sparse_tables += len(sparse)
        self.dense_tensors += len(grads)
        self.flushes += 1
        values = sum(g._nnz() * g.shape[1] for g in sparse) + sum(g.numel() for g in grads)
        scales = 0 if self.config.bits == 32 else len(sparse) + sum(g.shape[0] if g.dim() >= 2 else 1 for g in grads)
        self.bytes_sent += -(-values * self.config.bits // 8) + 4 * scales
        sparse_results, dense_results = iter(sparse_avg), iter(dense_avg)
        for buffer, _, views, future in queue:
            if buffer.is_sparse:
                future.set_result(next(sparse_results))
            else:
                future.set_result(torch.cat([next(dense_results).reshape(-1) for _ in views]).to(buffer.dtype))


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DQRM's INT-N compressed average of the bucket (resolved with the iteration's last)."""
    return state.add(bucket)
