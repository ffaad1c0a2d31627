"""Wrap a DLRM in TorchRec's DistributedModelParallel so that embedding updates are sparse and fused.

Every table is placed table-wise with FBGEMM's fused kernel: the optimizer registered with
``apply_optimizer_in_backward`` runs inside the backward pass on the rows the batch touched, so no dense gradient of a
whole table ever exists. (TorchRec's planner would put small tables in ``data_parallel`` with dense gradients.)

Checkpoints hold plain tensors: a ShardedTensor whose shards are all local is written as one full tensor and copied
back into the local shards on load. This keeps checkpoints loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

logging.getLogger("torchrec.distributed.utils").setLevel(logging.ERROR)


def ensure_process_group() -> None:
    """Start a one-process gloo group (in-memory store, no network) when none exists."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def find_ebc(model: nn.Module) -> tuple[str, EmbeddingBagCollection]:
    for name, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            return name, module
    raise ValueError(f"{type(model).__name__} has no EmbeddingBagCollection to shard")


def fused_table_wise_plan(model: nn.Module, world_size: int, device_type: str = "cpu") -> ShardingPlan:
    """Place each table whole (round-robin over ranks) with the fused FBGEMM kernel."""
    path, ebc = find_ebc(model)
    per_param = {
        cfg.name: table_wise(rank=i % world_size, compute_kernel="fused")
        for i, cfg in enumerate(ebc.embedding_bag_configs())
    }
    module_plan = construct_module_sharding_plan(ebc, per_param, world_size=world_size, device_type=device_type)
    return ShardingPlan({path: module_plan})


def shard_model(
    model: nn.Module, device: torch.device, qcomm_codecs_registry: dict | None = None
) -> DistributedModelParallel:
    """Wrap ``model`` (EBC on the meta device, sparse optimizer already registered) in DMP; optional quantized
    all-to-all codecs (see :func:`dqrm_lightning.strategies.torchrec.qcomm_registry`)."""
    ensure_process_group()
    plan = fused_table_wise_plan(model, dist.get_world_size(), device.type)
    sharder = EmbeddingBagCollectionSharder(qcomm_codecs_registry=qcomm_codecs_registry)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])


def _shard_index(shard: Any) -> tuple[slice, ...]:
    """Where a local shard sits in its full tensor."""
    return tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True))


def gather_full(tensor: ShardedTensor) -> torch.Tensor:
    """The full tensor of a ShardedTensor whose shards are all on this process."""
    if not is_local(tensor):
        raise NotImplementedError(
            "this checkpoint path needs every shard on one process; multi-process checkpoints use the TorchRec strategy"
        )
    shards = tensor.local_shards()
    if len(shards) == 1:
        return shards[0].tensor  # one shard holds the whole table: no copy
    full = torch.empty(tensor.size(), dtype=shards[0].tensor.dtype)
    for shard in shards:
        full[_shard_index(shard)] = shard.tensor
    return full


def is_local(tensor: ShardedTensor) -> bool:
    """Whether this process holds every shard of ``tensor``."""
    return sum(shard.tensor.numel() for shard in tensor.local_shards()) == math.prod(tensor.size())


def to_plain(state: Any) -> Any:
    """Replace every ShardedTensor held wholly by this process with its full plain tensor (others stay sharded: a
    multi-process strategy writes them with torch.distributed.checkpoint)."""
    if isinstance(state, ShardedTensor):
        return gather_full(state) if is_local(state) else state
    if isinstance(state, Mapping):
        return {k: to_plain(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_plain(v) for v in state)
    return state


def copy_into(target: Any, source: Any, name: str) -> None:
    """Copy a full tensor (or a ShardedTensor of the same layout) into a (possibly sharded) destination."""
    if source is target:
        return  # already loaded in place (distributed checkpoint)
    if isinstance(source, ShardedTensor):
        for dst, src in zip(target.local_shards(), source.local_shards(), strict=True):
            dst.tensor.copy_(src.tensor)
        return
    if tuple(target.size()) != tuple(source.shape):
        raise ValueError(
            f"checkpoint entry `{name}` has shape {tuple(source.shape)}, the model expects {tuple(target.size())}"
        )
    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                shard.tensor.copy_(source[_shard_index(shard)])
        else:
            target.copy_(source)
