"""``EmbeddingQuantizer``: DQRM's embedding QAT on the rows a batch looks up, with periodic per-table scales.

Notation: B batch size, F sparse features, T tables (T <= F: several features may share a table), D embedding
dimension. Each feature is quantized on its table's grid: scales, offsets and bits are kept per table (T,), so the
features of a shared table share one scale, computed from the whole table.

No quantized copy of a table ever exists. The quantizer runs at the end of DLRM's sparse arch
(:class:`~dqrm_lightning.quant.sparse_arch.FakeQuantizedSparseArch`), on the pooled embedding of each
(sample, feature), shape (B, F, D):

* one-hot features (Criteo: one id per feature and sample): the pooled vector *is* the looked-up row, so
  fake-quantizing feature f's slice with table f's scale is exactly per-row QAT. This works unchanged with TorchRec's
  fused FBGEMM kernels, sharded or not;
* multi-hot features: rows must be quantized before pooling. With the identity straight-through gradient,
  ``sum_i q(w_i) = sum_i w_i + sum_i (q(w_i) - w_i)`` where the second term carries no gradient, so the pooled FP32
  output (with its fused backward) is corrected by a term computed from the looked-up rows under ``no_grad`` (divided
  by the bag's length where the table pools by mean; an empty bag pools to zeros and gets no correction). Rows of a
  table sharded over the ranks (model parallel) are fetched from the ranks holding them in one collective per
  feature (:func:`~dqrm_lightning.quant.row_fetch.fetch_rows`). Which features take this path is the schema's
  declaration (``multi_hot_features``, the same on every rank); without one, a batch with one id per bag everywhere
  takes the one-hot path.

Scales are computed from the FP32 master tables under ``no_grad`` with ``torch.aminmax`` (a reduction: no
table-sized temporary), at the first training step and then every ``scale_period`` optimizer steps; they are frozen
in between and during evaluation. By default (``scale_refresh: incremental``) a refresh after the first rescans only
the blocks of rows that training forwards looked up since the last one, the only rows that can have changed
(:class:`~dqrm_lightning.quant.table_extrema.BlockExtrema`): the same extrema from a fraction of the bytes; with
``scale_refresh: full`` every refresh passes over every table (the paper's procedure). Under
sharding every rank reduces its local shards and the extrema are all-reduced, so all ranks hold identical scales.
Scales, offsets, bits and the refresh counters are buffers: they are saved in checkpoints and a resumed run continues
exactly.

With ``embedding_granularity: per_row`` each looked-up row is quantized on its own grid, computed from that row's
extrema when it is looked up (:func:`~dqrm_lightning.quant.fake_quant.row_grid`): nothing is stored or refreshed
for it, so ``scale_period`` and ``scale_tracking`` play no part (the per-table buffers are still kept, unused).

Two training options (``QATConfig.rounding``, ``QATConfig.scale_learning``):

* stochastic rounding: training forwards round ``floor(v + u)``, ``u ~ U[0, 1)``; evaluation rounds to nearest, as
  the exported model does. The noise of a training forward is drawn from its own generator seeded with
  ``(torch.initial_seed(), optimizer step, forward within the step, rank)``: a run seeded with ``seed_everything``
  draws the same noise again, also when resumed from a checkpoint, and the global random stream is not consumed.
* learned scales (LSQ, LSQ+): ``scale`` (and, asymmetric, ``offset``) are parameters under the same state-dict keys,
  set from the table extrema at the first refresh and then trained by the dense optimizer only. The forward uses
  them clamped to the smallest float16 and rounded to float16 (straight-through): :meth:`EmbeddingQuantizer.grid`,
  which export reads too, so the exported model predicts what QAT evaluation did. One-hot features only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.names import table_name
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import (
    MIN_FP16_SCALE,
    fake_quantize,
    fp16_straight_through,
    grid_from_extrema,
    learned_fake_quantize,
    qrange,
    row_grid,
)
from dqrm_lightning.quant.row_fetch import fetch_rows
from dqrm_lightning.quant.table_extrema import BlockExtrema


class TableAccess:
    """Local FP32 weight views of each table of an EmbeddingBagCollection (sharded or not), by table name and by the
    name of each feature looking the table up (the same views)."""

    def __init__(self, ebc: nn.Module) -> None:
        self.local: dict[str, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}
        self.full_rows: dict[str, int] = {}
        self.spread: set[str] = set()  # tables (and their features) sharded over several ranks
        self._dims: dict[str, int] = {}
        features = {cfg.name: list(cfg.feature_names) for cfg in _table_configs(ebc)}
        several_ranks = dist.is_initialized() and dist.get_world_size() > 1
        for key, value in ebc.state_dict().items():
            table = key.split(".")[-2]
            if table not in features:
                continue
            if isinstance(value, ShardedTensor):
                shards = [(s.tensor, tuple(s.metadata.shard_offsets)) for s in value.local_shards()]
                rows, dim = int(value.size(0)), int(value.size(1))
            else:
                shards, (rows, dim) = [(value, (0, 0))], value.shape
            for name in (*features[table], table):
                self.local[name], self.full_rows[name], self._dims[name] = shards, int(rows), int(dim)
                if several_ranks and isinstance(value, ShardedTensor):  # the same on every rank
                    self.spread.add(name)

    def extrema(self, feature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over this process's shards of a table (+inf/-inf when it holds none)."""
        low = torch.tensor(float("inf"))
        high = torch.tensor(float("-inf"))
        with torch.no_grad():
            for tensor, _ in self.local.get(feature, []):
                if tensor.numel():
                    shard_low, shard_high = torch.aminmax(tensor.detach())
                    low = torch.minimum(low, shard_low.float())
                    high = torch.maximum(high, shard_high.float())
        return low, high

    def whole(self, feature: str) -> torch.Tensor:
        """The FP32 table of a feature held whole by this process (a view of the training weights)."""
        shards = self.local.get(feature, [])
        if len(shards) != 1 or shards[0][0].shape[0] != self.full_rows[feature]:
            raise NotImplementedError(
                f"this needs the whole table of {feature!r} on this process (single process or table-wise placement)"
            )
        return shards[0][0].detach()

    def rows(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a feature's table: from this process, or, for a table sharded over the ranks, fetched from
        the ranks holding them (:func:`~dqrm_lightning.quant.row_fetch.fetch_rows`, a collective: every rank asks
        for the same tables in the same order)."""
        if feature in self.spread:
            return fetch_rows(self.local[feature], ids, self._dims[feature])
        return self.whole(feature)[ids]


def _table_configs(ebc: nn.Module) -> list[Any]:
    configs: Any = getattr(ebc, "embedding_bag_configs", None)  # torchrec's EBC method (untyped)
    if configs is not None:
        return list(configs())
    sharded: Any = ebc  # a ShardedEmbeddingBagCollection keeps the unsharded configs
    return list(sharded._embedding_bag_configs)


def table_rows(ebc: nn.Module) -> dict[str, int]:
    """Rows of each feature's table in an EmbeddingBagCollection (sharded or not), by feature name."""
    return {feature: int(cfg.num_embeddings) for cfg in _table_configs(ebc) for feature in cfg.feature_names}


def feature_tables(ebc: nn.Module) -> dict[str, str]:
    """The table each feature of an EmbeddingBagCollection (sharded or not) looks up, by feature name."""
    return {feature: cfg.name for cfg in _table_configs(ebc) for feature in cfg.feature_names}


def mean_pooled_tables(ebc: nn.Module) -> list[str]:
    """The tables of an EmbeddingBagCollection (sharded or not) that pool a bag by its mean."""
    return [cfg.name for cfg in _table_configs(ebc) if cfg.pooling == PoolingType.MEAN]


def embedding_dim(ebc: nn.Module) -> int:
    """The embedding dimension D of an EmbeddingBagCollection (sharded or not) whose tables all share it."""
    return int(_table_configs(ebc)[0].embedding_dim)


class _TopRows:
    """The ``k`` rows of a table with the largest per-row extreme (max, or -min for the low side), and ``tau``: every
    row outside the set is known to have a value <= ``tau``."""

    def __init__(self, rows: torch.Tensor, values: torch.Tensor, tau: float, k: int) -> None:
        self.rows, self.values, self.tau, self.k = rows, values, tau, k

    @staticmethod
    def _row_values(chunk: torch.Tensor, high: bool) -> torch.Tensor:
        return chunk.amax(dim=1) if high else -chunk.amin(dim=1)

    @classmethod
    def scan(cls, table: torch.Tensor, high: bool, k: int = 1024) -> _TopRows:
        """A full pass, a million rows at a time (per-row temporaries of one chunk only)."""
        rows = torch.zeros(0, dtype=torch.int64)
        values = torch.zeros(0)
        for start in range(0, table.shape[0], 1 << 20):
            chunk_values = cls._row_values(table[start : start + (1 << 20)], high)
            top = chunk_values.topk(min(k, len(chunk_values)))
            values = torch.cat([values, top.values.float()])
            rows = torch.cat([rows, top.indices + start])
            keep = values.topk(min(k, len(values))).indices
            values, rows = values[keep], rows[keep]
        tau = float(values.min()) if table.shape[0] > len(rows) else float("-inf")
        return cls(rows, values, tau, k)

    def update(self, ids: torch.Tensor, values: torch.Tensor) -> bool:
        """Fold in the new values of the touched rows ``ids``; False when the extreme is no longer known exactly."""
        hit = torch.zeros(len(ids), dtype=torch.bool)
        if len(self.rows):
            order = torch.argsort(self.rows)
            position = torch.searchsorted(self.rows[order], ids).clamp_max(len(self.rows) - 1)
            hit = self.rows[order][position] == ids
            self.values[order[position[hit]]] = values[hit].float()
        new = ~hit & (values > self.tau)
        if bool(new.any()):
            self.rows = torch.cat([self.rows, ids[new]])
            self.values = torch.cat([self.values, values[new].float()])
        if len(self.rows) > 2 * self.k:
            keep = self.values.topk(self.k)
            pruned = torch.ones(len(self.rows), dtype=torch.bool)
            pruned[keep.indices] = False
            self.tau = max(self.tau, float(self.values[pruned].max()))
            self.rows, self.values = self.rows[keep.indices], keep.values
        return len(self.values) > 0 and float(self.values.max()) >= self.tau

    def extreme(self) -> float:
        return float(self.values.max())


class EmbeddingQuantizer(nn.Module):
    """Per-table fake quantization of looked-up rows: the end of a
    :class:`~dqrm_lightning.quant.sparse_arch.FakeQuantizedSparseArch`, which :meth:`attach`-es it to the
    EmbeddingBagCollection whose tables set the scales.

    Args:
        feature_names: the F features in SparseArch output order.
        table_rows: rows of each feature's table.
        embedding_dim: D (the bits of a ``size_budget`` depend on it).
        config: the QAT settings.
        tables: the table each feature looks up (default: a table of its own, ``t_<feature>``); features of one table
            share its grid and bits.
        mean_tables: the tables that pool a bag by its mean (the others sum).

    Raises:
        ValueError: ``embedding_bits_per_table`` names no feature (or shared table) of these.
    """

    # buffers, registered in __init__ (declared here for their type: nn.Module looks them up dynamically)
    bits: torch.Tensor  # (T,) int64, 0 = FP32 table
    qmin: torch.Tensor  # (T,)
    qmax: torch.Tensor  # (T,)
    scale: torch.Tensor  # (T,)
    low: torch.Tensor  # (T,)
    high: torch.Tensor  # (T,)
    full_passes: torch.Tensor  # () int64
    offset: torch.Tensor  # (T,)
    refreshes: torch.Tensor  # () int64
    last_refresh_step: torch.Tensor  # () int64
    start_step: torch.Tensor  # () int64
    row_ratio: torch.Tensor  # (T,) learned clipping ratio of row-wise grids (``per_row`` with ``lsq`` only)
    table_index: torch.Tensor  # (F,) int64, not saved: the table of each feature

    def __init__(
        self,
        feature_names: list[str],
        table_rows: list[int],
        embedding_dim: int,
        config: QATConfig,
        tables: Sequence[str] | None = None,
        mean_tables: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.config = config
        self._set_tables(list(tables) if tables is not None else [table_name(f) for f in feature_names], table_rows)
        self.mean_pooled = [self.feature_tables[f] in mean_tables for f in range(len(feature_names))]
        rows = dict(zip(self.table_names, self._table_rows, strict=True))
        assigned = config.assign_bits(rows, embedding_dim, config.table_overrides(self.features_of))
        bits = [assigned[t] for t in self.table_names]
        self.register_buffer("bits", torch.tensor([b or 0 for b in bits], dtype=torch.int64))
        ranges = [qrange(b, config.embedding_mode) if b else (0, 0) for b in bits]
        self.register_buffer("qmin", torch.tensor([r[0] for r in ranges], dtype=torch.float32))
        self.register_buffer("qmax", torch.tensor([r[1] for r in ranges], dtype=torch.float32))
        self._learned = config.scale_learning == "lsq"
        self._register_grid("scale", torch.ones(len(bits)))
        self.register_buffer("low", torch.zeros(len(bits)))  # table extrema at the last refresh (or exact tracking)
        self.register_buffer("high", torch.zeros(len(bits)))
        self.register_buffer("full_passes", torch.zeros((), dtype=torch.int64))
        self._register_grid("offset", torch.zeros(len(bits)))
        if self._learned and config.embedding_granularity == "per_row":  # row-wise LSQ: one clipping ratio per table
            self.register_parameter("row_ratio", nn.Parameter(torch.ones(len(bits))))
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_refresh_step", torch.full((), -1, dtype=torch.int64))
        self.register_buffer("start_step", torch.full((), -1, dtype=torch.int64))
        self._tables: TableAccess | None = None
        self._blocks: BlockExtrema | None = None  # incremental refreshes: per-block extrema of the local shards
        self._top: dict[str, tuple[_TopRows, _TopRows]] = {}  # exact tracking: (low side, high side) per table
        self._all_quantized = all(b is not None for b in bits)
        self._code_range: tuple[tuple[int, ...] | None, tuple[float, float] | None] = (None, None)
        self._ebc: tuple[nn.Module, ...] = ()  # a tuple: not registered as a submodule (its tables are not ours)
        self.active = True  # False: the forward passes the FP32 rows through (see enable_fake_quant)
        self.record_error = False
        # features the schema declares multi-hot (set by the model): quantized before pooling in every batch; without
        # a declaration a batch of one id per bag takes the one-hot path
        self.multi_hot_features: set[str] = set()
        self.last_error: torch.Tensor | None = None
        self._noise_step, self._noise_draws = -1, 0  # stochastic rounding: the step and the forwards drawn in it
        self._generators: dict[torch.device, torch.Generator] = {}

    def _set_tables(self, tables: list[str], feature_rows: list[int]) -> None:
        """The tables (in first-use order), the table of each feature and the rows of each table."""
        if len(tables) != len(self.feature_names) or len(feature_rows) != len(self.feature_names):
            raise ValueError(f"`tables` and `table_rows` need one entry per feature ({len(self.feature_names)})")
        self.feature_tables = tables
        self.table_names = list(dict.fromkeys(tables))
        rows: dict[str, int] = {}
        for feature, table, n in zip(self.feature_names, tables, feature_rows, strict=True):
            if rows.setdefault(table, int(n)) != int(n):
                raise ValueError(f"table {table!r} has {rows[table]} rows, but feature {feature!r} gives {n}")
        self._table_rows = [rows[t] for t in self.table_names]
        index = [self.table_names.index(t) for t in tables]
        self._identity = index == list(range(len(index)))  # one table per feature, in feature order (Criteo)
        self.register_buffer("table_index", torch.tensor(index, dtype=torch.int64), persistent=False)
        self.features_of = {
            t: [f for f, ft in zip(self.feature_names, tables, strict=True) if ft == t] for t in self.table_names
        }
        self._features_per_table = torch.bincount(self.table_index, minlength=len(self.table_names)).float()

    def per_feature(self, value: torch.Tensor) -> torch.Tensor:
        """A per-table tensor (T, ...) as a per-feature one (F, ...): each feature's table's entry."""
        return value if self._identity else value.index_select(0, self.table_index.to(value.device))

    def _register_grid(self, name: str, value: torch.Tensor) -> None:
        """A grid tensor: a buffer, or with learned scales a parameter (the offset only where the grid has one)."""
        per_row = self.config.embedding_granularity == "per_row"  # learns a clipping ratio instead (row_ratio)
        if self._learned and not per_row and (name == "scale" or self.config.embedding_mode == "asymmetric"):
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    # --------------------------------------------------------------------------------------------- attaching
    def attach(self, ebc: nn.Module) -> None:
        """Compute scales from the tables of ``ebc`` (an EmbeddingBagCollection, sharded or not)."""
        self._ebc = (ebc,)
        self._tables = None
        self._blocks = None

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Fake-quantize in the forward (``False``: FP32 rows, e.g. during an FP32 warm-up); scales are kept."""
        if self.active != enabled:  # called every training step: nn.Module.__setattr__ only when it changes
            self.active = enabled

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    @property
    def tables(self) -> TableAccess:
        if self._tables is None:
            assert self._ebc, "attach() the quantizer first"
            self._tables = TableAccess(self._ebc[0])
        return self._tables

    @property
    def block_extrema(self) -> BlockExtrema:
        """The per-block extrema that incremental refreshes keep (``scale_refresh: incremental``)."""
        if self._blocks is None:
            by_feature = dict(zip(self.feature_names, self.feature_tables, strict=True))
            self._blocks = BlockExtrema(self.tables, self.table_names, self._table_rows, by_feature)
        return self._blocks

    @property
    def incremental(self) -> bool:
        """Whether periodic refreshes rescan only the blocks of rows looked up since the last one."""
        periodic = self.config.scale_tracking == "periodic" and not self._learned
        return periodic and self.config.scale_refresh == "incremental"

    def tables_changed(self) -> None:
        """The tables were written other than by training on recorded lookups (e.g. a checkpoint was loaded into
        them): the next refresh scans them whole."""
        if self._blocks is not None:
            self._blocks.invalidate()

    @property
    def quantized(self) -> torch.Tensor:
        """(T,) bool: which tables are quantized (0 bits = FP32)."""
        return self.bits > 0

    @property
    def initialized(self) -> bool:
        return int(self.refreshes) > 0

    # ---------------------------------------------------------------------------------------------- scales
    @torch.no_grad()
    def refresh(self, step: int | None = None) -> None:
        """Recompute every quantized table's scale from its FP32 weights (all ranks agree)."""
        if self.config.scale_tracking == "exact":
            for t, table in enumerate(self.table_names):
                self._exact_extrema(t, table)
        else:
            scanned = self.block_extrema.refresh() if self.incremental else None  # collective when distributed
            for t, table in enumerate(self.table_names):
                self.low[t], self.high[t] = scanned[table] if scanned else self.tables.extrema(table)
        if dist.is_initialized() and dist.get_world_size() > 1:
            extrema = torch.stack([-self.low, self.high])  # (2, T): max(-min), max(max) over ranks
            dist.all_reduce(extrema, op=dist.ReduceOp.MAX)
            self.low.copy_(-extrema[0])
            self.high.copy_(extrema[1])
        self._set_scales()
        self.refreshes += 1
        if step is not None:
            self.last_refresh_step.fill_(step)

    def _set_scales(self) -> None:
        scale, offset = grid_from_extrema(self.low, self.high, self.bits.clamp_min(2), self.config.embedding_mode)
        self.scale.copy_(torch.where(self.quantized, scale, torch.ones_like(scale)))
        self.offset.copy_(torch.where(self.quantized, offset, torch.zeros_like(offset)))

    def _exact_extrema(self, t: int, table: str) -> None:
        """Full pass over a local table: its extrema, and the candidate rows exact tracking starts from."""
        weight = self.tables.whole(table)
        self._top[table] = (_TopRows.scan(weight, high=False), _TopRows.scan(weight, high=True))
        self.low[t] = -self._top[table][0].extreme()
        self.high[t] = self._top[table][1].extreme()

    @torch.no_grad()
    def track(self, features: KeyedJaggedTensor) -> None:
        """Exact scale tracking, after an optimizer step.

        Only the rows this batch touched changed. Each table keeps its ``K`` most extreme rows (per side) and a bound
        ``tau`` that every other row is known to respect; touched rows update or join that set, so the extreme is
        exact while some kept row still reaches ``tau``. A full pass is needed only when all kept rows moved inward.
        """
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise NotImplementedError("exact scale tracking runs in one process; use periodic refreshes when sharded")
        per_feature = features.to_dict()
        for t, table in enumerate(self.table_names):
            if not bool(self.quantized[t]):
                continue
            if table not in self._top:
                self._exact_extrema(t, table)
            looked_up = [per_feature[f].values() for f in self.features_of[table]]
            ids = torch.unique(torch.cat(looked_up))
            rows = self.tables.whole(table)[ids]  # (U, D)
            low_side, high_side = self._top[table]
            exact = low_side.update(ids, -rows.amin(dim=1)) & high_side.update(ids, rows.amax(dim=1))
            if not exact:
                self._exact_extrema(t, table)
                self.full_passes += 1
            else:
                self.low[t] = -low_side.extreme()
                self.high[t] = high_side.extreme()
        self._set_scales()

    def due(self, step: int) -> bool:
        """Whether a refresh is due before optimizer step ``step`` (refresh at the start, then every period; with
        exact tracking only at the start)."""
        if int(self.start_step) < 0 or not self.initialized:
            return True
        if self._learned:
            return False  # learned scales: the extrema set the first grid only
        if self.config.scale_tracking == "exact" and not self._top:
            return True  # exact tracking (new, resumed or switched on): one full pass finds the candidate rows
        if int(self.last_refresh_step) == step or self.config.scale_tracking == "exact":
            return False
        return (step - int(self.start_step)) % self.config.effective_period == 0

    def maybe_refresh(self, step: int) -> bool:
        self._start_noise_step(step)
        if int(self.start_step) < 0:
            self.start_step.fill_(step)
        if self.due(step):
            self.refresh(step)
            return True
        return False

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, pooled: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """Fake-quantize the looked-up rows behind ``pooled`` (B, F, D) of ``features``; returns (B, F, D).

        Passes ``pooled`` through while disabled. A first-ever forward (e.g. evaluating an FP32 checkpoint)
        initialises the scales.
        """
        if self.training and self.incremental:
            if self.active:
                self.block_extrema.record(features)  # these rows may change before the next refresh
            else:
                self.tables_changed()  # trained FP32 without recording its lookups
        if not self.active:
            return pooled
        if not self.initialized:
            self.refresh()
        return self.quantize(pooled, features)

    def quantize(self, pooled: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """Fake-quantize the looked-up rows behind ``pooled`` (B, F, D); returns (B, F, D)."""
        shape = (1, -1, 1)  # broadcast per feature over (B, F, D)
        if self.multi_hot_features:  # declared by the schema: the same on every rank (the correction is collective)
            out = self._quantize_one_hot(pooled)
            multi = torch.tensor([f in self.multi_hot_features for f in self.feature_names]).view(shape)
            out = torch.where(multi, pooled + self._multi_hot_correction(pooled, features, multi.view(-1)), out)
        else:  # no schema says: one-hot batches (Criteo) take the one-hot path
            lengths = features.lengths().view(len(features.keys()), -1)  # (F, B)
            if bool((lengths == 1).all()):
                out = self._quantize_one_hot(pooled)
            else:
                out = pooled + self._multi_hot_correction(pooled, features)
        if not self._all_quantized:
            out = torch.where(self.per_feature(self.quantized).view(shape), out, pooled)
        if self.record_error:
            with torch.no_grad():
                self.last_error = (out - pooled).abs().mean(dim=(0, 2)).detach()  # (F,)
        return out

    def grid_of(self, rows: torch.Tensor, f: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, offset)`` of rows (B, F, D) of every feature, or rows (N, D) of feature ``f``'s table: the
        table's frozen grid, or under ``per_row`` each row's own; ``offset`` is ``None`` for the symmetric grid."""

        def pick(value: torch.Tensor) -> torch.Tensor:  # (T,) -> (1, F, 1), or the scalar of feature f's table
            return self.per_feature(value).view(1, -1, 1) if f is None else value[int(self.table_index[f])]

        if self.config.embedding_granularity == "per_row":
            ratio = pick(self.row_ratio) if self._learned else None
            scale, offset = row_grid(rows, pick(self.bits.clamp_min(2)), self.config.embedding_mode, ratio)
        else:
            scale, offset = (pick(value) for value in self.grid())
        return scale, (offset if self.config.embedding_mode == "asymmetric" else None)

    @torch.no_grad()
    def _multi_hot_correction(
        self, pooled: torch.Tensor, features: KeyedJaggedTensor, only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum over each bag of (q(w) - w): (B, F, D), no gradient; zero for the features outside ``only`` ((F,) bool,
        default: all)."""
        if self.config.ste != "identity":
            raise NotImplementedError("multi-hot QAT supports the identity straight-through gradient only")
        if self._learned:
            raise NotImplementedError("`scale_learning: lsq` learns the scales of one-hot features only")
        correction = torch.zeros_like(pooled)
        batch = pooled.shape[0]
        per_feature = features.to_dict()
        for f, name in enumerate(self.feature_names):
            t = int(self.table_index[f])
            if not bool(self.quantized[t]) or (only is not None and not bool(only[f])):
                continue
            jagged = per_feature[name]
            rows = self.tables.rows(self.table_names[t], jagged.values()).float()  # (N, D)
            scale, offset = self.grid_of(rows, f)
            q = fake_quantize(rows, scale, self.qmin[t], self.qmax[t], offset, noise=self._rounding_noise(rows))
            lengths = jagged.lengths().long()
            bag = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths)
            correction[:, f, :].index_add_(0, bag, (q - rows).to(pooled.dtype))
            if self.mean_pooled[f]:  # the pooled vector is the bag's mean: so is its correction
                correction[:, f, :] /= lengths.clamp_min(1).unsqueeze(1).to(pooled.dtype)
        return correction

    def _quantize_one_hot(self, pooled: torch.Tensor) -> torch.Tensor:
        """Every (sample, feature) vector of ``pooled`` (B, F, D) on its table's grid; returns (B, F, D)."""
        shape = (1, -1, 1)  # broadcast per feature over (B, F, D)
        scale, grid_offset = self.grid_of(pooled)
        noise = self._rounding_noise(pooled)
        if not self._learned:
            uniform = self._uniform_code_range()  # a clamp to two numbers: ~5x faster than to (1, F, 1) tensors
            qmin, qmax = uniform if uniform else (self.per_feature(r).view(shape) for r in (self.qmin, self.qmax))
            return fake_quantize(pooled, scale, qmin, qmax, grid_offset, self.config.ste, noise)
        qmin, qmax = self.per_feature(self.qmin).view(shape), self.per_feature(self.qmax).view(shape)
        values = pooled.shape[0] * pooled.shape[2] * self._features_per_table.to(pooled.device)  # N of each table
        grad_scale = self.per_feature((values * self.qmax.clamp_min(1)).rsqrt()).view(shape)  # LSQ: 1 / sqrt(N Qp)
        return learned_fake_quantize(pooled, scale, qmin, qmax, grad_scale, grid_offset, self.config.ste, noise)

    def _uniform_code_range(self) -> tuple[float, float] | None:
        """``(qmin, qmax)`` as numbers when every table has the same code range, else ``None`` (cached while the
        buffers are unchanged)."""
        key = (id(self.qmin), self.qmin._version, id(self.qmax), self.qmax._version)
        if self._code_range[0] != key:
            low, high = self.qmin.tolist(), self.qmax.tolist()
            uniform = len(set(low)) == 1 and len(set(high)) == 1
            self._code_range = (key, (low[0], high[0]) if uniform else None)
        return self._code_range[1]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset), each (T,), as the forward and the exported model use them: the buffers, or the learned
        parameters clamped to the smallest float16 and rounded to float16 with a straight-through gradient."""
        if not self._learned:
            return self.scale, self.offset
        offset = fp16_straight_through(self.offset) if isinstance(self.offset, nn.Parameter) else self.offset
        return fp16_straight_through(self.scale, MIN_FP16_SCALE), offset

    def average_gradients(self) -> None:
        """Average the learned scales' gradients over the ranks, where no DDP wrapper does it (sharded tables: the
        quantizer sits outside DistributedModelParallel), so every rank keeps identical scales."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(averaged.view_as(g))

    # ----------------------------------------------------------------------------------------- stochastic rounding
    def _start_noise_step(self, step: int) -> None:
        if step != self._noise_step:
            self._noise_step, self._noise_draws = step, 0

    def _rounding_noise(self, like: torch.Tensor) -> torch.Tensor | None:
        """``U[0, 1)`` noise shaped like ``like`` for a stochastic-rounding training forward, else ``None`` (round to
        nearest). Seeded from (initial seed, step, forward within the step, rank): see the module docstring."""
        if self.config.rounding != "stochastic" or not self.training:
            return None
        rank = dist.get_rank() if dist.is_initialized() else 0
        entropy = [torch.initial_seed(), self._noise_step + 1, self._noise_draws, rank]
        self._noise_draws += 1
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
        generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    # --------------------------------------------------------------------------------------------- reports
    def scales(self) -> dict[str, float]:
        """The scale of each quantized table as the forward uses it (none under ``per_row``: every row has its own)."""
        if self.config.embedding_granularity == "per_row":
            return {}
        scale, quantized = self.per_feature(self.grid()[0].detach()), self.per_feature(self.quantized)
        return {f: float(s) for f, s, q in zip(self.feature_names, scale, quantized, strict=True) if q}

    def errors(self) -> dict[str, float]:
        """Mean |fake-quantized - FP32| of each quantized table in the last forward run with ``record_error``."""
        if self.last_error is None:
            return {}
        errors, quantized = self.last_error.tolist(), self.per_feature(self.quantized)
        return {f: errors[i] for i, f in enumerate(self.feature_names) if bool(quantized[i])}

    def load_saved(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a saved quantizer (its :meth:`state_dict`), as export does: a state that was never refreshed leaves
        the scales uninitialised, and checkpoints from before exact tracking lack its buffers.

        Raises:
            ValueError: a refreshed state without its scales or offsets.
        """
        missing = set(self.load_state_dict(state, strict=False).missing_keys)
        if self.initialized and missing & {"scale", "offset"}:
            raise ValueError(f"the saved embedding quantizer lacks {sorted(missing & {'scale', 'offset'})}")

    def table_bits(self) -> dict[str, int | None]:
        """The bits of each feature's table (``None`` = FP32), by feature name."""
        bits = self.per_feature(self.bits)
        return {f: (int(b) if b > 0 else None) for f, b in zip(self.feature_names, bits, strict=True)}
