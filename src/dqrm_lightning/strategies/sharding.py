"""Where the embedding tables live: sharded by TorchRec's DistributedModelParallel, or replicated on every rank.

``EmbeddingLayout`` describes it, and a strategy hands it to the module as an :class:`EmbeddingPlacement` (with the
quantized all-to-all codecs of sharded tables) before the module builds its tables:

* ``embeddings="sharded"`` (default): DistributedModelParallel places the tables. ``sharding="table_wise"`` (default)
  puts each table whole on one rank (round-robin) with FBGEMM's fused kernel: the optimizer registered with
  ``apply_optimizer_in_backward`` runs inside the backward pass on the rows the batch touched, so no dense gradient of
  a whole table ever exists. Any other value goes through TorchRec's planner: ``"auto"`` (the planner chooses; it
  puts small tables in ``data_parallel``, whose gradients are dense), one sharding type for every table, or a mapping
  from feature (``C3``) or table name (``t_C3``) to a sharding type, with an optional ``default``. On the CPU,
  TorchRec's sharder offers no row-wise types; :class:`CPUEmbeddingBagCollectionSharder` adds them (tested with 2
  gloo processes).
* ``embeddings="replicated"``: the DQRM paper's data-parallel mode. Every rank holds every table as plain
  ``nn.EmbeddingBag`` modules inside TorchRec's (unsharded) EmbeddingBagCollection with sparse gradients, so only
  the touched rows travel when DDP averages them (optionally INT8-compressed,
  :mod:`dqrm_lightning.comms.ddp_hook`). ``dense_embedding_gradients=True`` gives the paper's "dense" baseline
  (whole-table gradients all-reduced).

Checkpoints hold plain tensors: a ShardedTensor whose shards are all local is written as one full tensor and copied
back into the local shards on load. This keeps checkpoints loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from typing_extensions import override

from dqrm_lightning.mapped import copy_rows
from dqrm_lightning.names import table_name

logging.getLogger("torchrec.distributed.utils").setLevel(logging.ERROR)


SHARDING_TYPES = tuple(t.value for t in ShardingType if t is not ShardingType.GRID_SHARD)


@dataclass
class EmbeddingLayout:
    """How the embedding tables are placed across processes (see the module docstring).

    Args:
        embeddings: ``"sharded"`` (TorchRec model parallelism) or ``"replicated"`` (the paper's data parallelism).
        sharding: sharded only: ``"table_wise"`` (fixed round-robin plan, fused kernel), ``"auto"`` (TorchRec's
            planner), one of :data:`SHARDING_TYPES` for every table, or ``{feature or table: type, "default": type}``.
        dense_embedding_gradients: replicated only: all-reduce whole-table gradients (the paper's dense baseline).
    """

    embeddings: Literal["sharded", "replicated"] = "sharded"
    sharding: str | dict[str, str] = "table_wise"
    dense_embedding_gradients: bool = False

    def __post_init__(self) -> None:
        if self.embeddings not in ("sharded", "replicated"):
            raise ValueError(f"`embeddings` must be 'sharded' or 'replicated', got {self.embeddings!r}")
        types = self.sharding.values() if isinstance(self.sharding, Mapping) else [self.sharding]
        allowed = (*SHARDING_TYPES, "auto") if not isinstance(self.sharding, Mapping) else SHARDING_TYPES
        for value in types:
            if value not in allowed:
                raise ValueError(f"`sharding`: unknown sharding type {value!r}; expected one of {allowed}")
        if self.embeddings == "replicated" and self.sharding != "table_wise":
            raise ValueError("`sharding` applies to sharded embeddings; replicated tables are not sharded")
        if self.embeddings == "sharded" and self.dense_embedding_gradients:
            raise ValueError("`dense_embedding_gradients` applies to replicated embeddings only")

    def sharding_type(self, feature: str, table: str | None = None) -> str | None:
        """The sharding type asked for the table of a feature (``None``: the planner's choice); ``table``: its name
        when it is not ``t_<feature>`` (a table named by the schema, perhaps shared)."""
        if isinstance(self.sharding, Mapping):
            for key in (feature, table or table_name(feature), "default"):
                if key in self.sharding:
                    return self.sharding[key]
            return None
        return None if self.sharding == "auto" else self.sharding

    def check_tables(self, features: list[str], tables: list[str] | None = None) -> None:
        """Refuse per-table keys that name no table (``tables``: the table names, default ``t_<feature>``)."""
        if isinstance(self.sharding, Mapping):
            known = {*features, *(tables if tables is not None else [table_name(f) for f in features]), "default"}
            unknown = sorted(set(self.sharding) - known)
            if unknown:
                raise ValueError(f"`sharding` names unknown tables {unknown}; tables are {features[0]}..{features[-1]}")


@dataclass(frozen=True)
class EmbeddingPlacement:
    """Where the module builds its tables, as a strategy hands it over (``DLRMModule.place_embeddings``).

    Args:
        layout: sharded or replicated tables, and how the sharded ones are placed.
        qcomm_codecs_registry: sharded: TorchRec's quantized all-to-all codecs
            (:func:`~dqrm_lightning.comms.qcomms.qcomm_registry`), or ``None`` (FP32).
        reduce_scatter_precision: sharded: a codec precision TorchRec cannot use in the row-wise reduce-scatter; a plan
            with row-wise tables is then refused (:func:`shard_model`).

    Example::

        placement = EmbeddingPlacement(EmbeddingLayout(sharding="row_wise"))
    """

    layout: EmbeddingLayout = field(default_factory=EmbeddingLayout)
    qcomm_codecs_registry: dict | None = None
    reduce_scatter_precision: str | None = None


class CPUEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, plus row-wise and table-row-wise placements on the CPU (TorchRec offers them on CUDA only;
    they run on gloo: tested to train like one process)."""

    @override
    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value) if t not in types]
        return types


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


def sharding_planner(
    ebc: EmbeddingBagCollection, layout: EmbeddingLayout, world_size: int, local_world_size: int, device_type: str
) -> EmbeddingShardingPlanner:
    """TorchRec's planner for ``world_size`` ranks, with the layout's sharding type per table as a constraint (the
    fused kernel, or the dense one for ``data_parallel``); tables the layout leaves open are the planner's choice."""
    constraints = {}
    for cfg in ebc.embedding_bag_configs():
        wanted = layout.sharding_type(cfg.feature_names[0], cfg.name)
        if wanted is not None:
            kernel = "dense" if wanted == ShardingType.DATA_PARALLEL.value else "fused"
            constraints[cfg.name] = ParameterConstraints(sharding_types=[wanted], compute_kernels=[kernel])
    topology = Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world_size)
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints)


def planned(
    model: nn.Module, layout: EmbeddingLayout, sharder: EmbeddingBagCollectionSharder, device: torch.device
) -> ShardingPlan:
    """TorchRec's planner under the layout's per-table constraints, planned on rank 0 and shared with all ranks."""
    _, ebc = find_ebc(model)
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    planner = sharding_planner(ebc, layout, world, local, device.type)
    try:
        return planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    except PlannerError as err:
        raise ValueError(f"TorchRec's planner found no plan for `sharding={layout.sharding!r}`: {err}") from None


def shard_model(
    model: nn.Module,
    device: torch.device,
    qcomm_codecs_registry: dict | None = None,
    layout: EmbeddingLayout | None = None,
    reduce_scatter_precision: str | None = None,
) -> DistributedModelParallel:
    """Wrap ``model`` (EBC on the meta device, sparse optimizer already registered) in DMP, placed as ``layout``
    says; optional quantized all-to-all codecs (see :func:`dqrm_lightning.comms.qcomms.qcomm_registry`).
    ``reduce_scatter_precision``: a codec precision TorchRec cannot use for the row-wise reduce-scatter (it would
    replace it); a plan with row-wise tables is then refused."""
    layout = layout or EmbeddingLayout()
    ensure_process_group()
    _, ebc = find_ebc(model)
    configs = ebc.embedding_bag_configs()
    layout.check_tables([f for cfg in configs for f in cfg.feature_names], [cfg.name for cfg in configs])
    sharder = CPUEmbeddingBagCollectionSharder(qcomm_codecs_registry=qcomm_codecs_registry)
    if layout.sharding == "table_wise":
        plan = fused_table_wise_plan(model, dist.get_world_size(), device.type)
    else:
        plan = planned(model, layout, sharder, device)
    if reduce_scatter_precision is not None:
        row_wise = sorted(
            name
            for module_plan in plan.plan.values()
            for name, parameter in module_plan.items()
            if parameter.sharding_type in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
        )
        if row_wise:
            raise ValueError(
                f"the plan shards {row_wise} row-wise, whose reduce-scatter cannot carry {reduce_scatter_precision} "
                "(TorchRec would replace it): use fp16/bf16 quantized communication or constrain `sharding`"
            )
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])


def replicate_embeddings(model: nn.Module, device: torch.device, sparse: bool = True) -> nn.Module:
    """Materialise the EBC's tables on ``device`` (TorchRec's default initialisation) with sparse gradients."""
    path, ebc = find_ebc(model)
    replica = EmbeddingBagCollection(tables=ebc.embedding_bag_configs(), device=device, is_weighted=ebc.is_weighted())
    for bag in replica.embedding_bags.values():
        bag.sparse = sparse
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], replica)
    return model


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
    """Copy a full tensor (or a ShardedTensor of the same layout) into a (possibly sharded) destination, a piece of
    rows at a time (a memory-mapped checkpoint's tensor is never resident as a whole: :func:`copy_rows`)."""
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
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            copy_rows(shard.tensor, source[_shard_index(shard)])
    else:
        copy_rows(target, source)
