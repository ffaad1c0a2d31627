"""Bytes sent per iteration and rank for each communication mode (the structure of paper Table 4), and how they scale.

Modes:

* ``dense``: every parameter as float32 (tables included: what plain data parallelism all-reduces);
* ``sparse_fp32``: MLP gradients as float32 plus only the table rows the rank touched;
* ``sparse_int8``: the same with 1-byte codes (``bits`` in general) plus the scales (one float32 per table, per MLP
  output row and per bias), the paper's compressed mode.

``rows_per_table`` is either measured (the unique ids of a batch) or the paper's analytic upper bound
``min(rows_t, local batch)`` for one-hot features (:func:`touched_rows_upper_bound`), or the expected number of
distinct ids of a rank-Zipf law (:func:`expected_unique_ids`).

:func:`bytes_per_iteration` is the size of what a rank contributes (the 2-process case of paper Table 4).
:func:`bytes_at_scale` is the analytic scaling model: the bytes a rank puts on the wire per iteration at world size
``W`` under weak scaling (fixed local batch ``B``, global batch ``W * B``), in one convention for every mode,
bandwidth-optimal collectives:

* all-reduce of an ``n``-byte buffer (ring: reduce-scatter + all-gather): ``2 (W - 1) / W * n`` per rank;
* all-gather of ``n`` bytes from each rank (what gloo's sparse all-reduce does with the rows and values of every
  rank, then summing locally): ``(W - 1) * n`` per rank, since each rank's rows must reach ``W - 1`` others;
* all-to-all: what a rank sends to the ``W - 1`` others (its share for itself stays local).

At ``W = 2`` every factor is 1, so :func:`bytes_at_scale` of the data-parallel modes equals
:func:`bytes_per_iteration`, and the all-to-all part of ``model_parallel`` the logged ``model_parallel_a2a``. Row
indices, message headers, latency, overlap with compute and hierarchical (intra-/inter-node) collectives are not
modelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MODES_AT_SCALE = ("dense", "sparse_fp32", "sparse_int8", "model_parallel")
"""The modes of :func:`bytes_at_scale`: the three data-parallel ones and TorchRec table-wise model parallelism."""


@dataclass(frozen=True)
class ModelShape:
    """Table sizes, embedding dimension, MLP layer shapes ``(in, out)`` and the parameters of other dense layers
    (DCN-v2 cross layers; their gradients travel like the MLP's)."""

    table_rows: Sequence[int]
    embedding_dim: int
    mlp_layers: Sequence[tuple[int, int]]
    cross_parameters: int = 0

    @property
    def mlp_weights(self) -> int:
        return sum(i * o for i, o in self.mlp_layers)

    @property
    def mlp_biases(self) -> int:
        return sum(o for _, o in self.mlp_layers)


def touched_rows_upper_bound(shape: ModelShape, local_batch: int) -> list[int]:
    """At most one row per sample and table (one-hot features), and never more than the table has."""
    return [min(rows, local_batch) for rows in shape.table_rows]


def expected_unique_ids(n_ids: int, draws: int, exponent: float, chunk: int = 1 << 20) -> float:
    """Expected number of distinct ids among ``draws`` independent draws of the rank-Zipf law
    ``p(k) ~ (k + 1) ** -exponent`` on ``[0, n_ids)`` (the synthetic generators' law): ``sum_k 1 - (1 - p(k))^draws``.

    Exact sum over all ``n_ids`` ranks, in chunks of ``chunk`` (a 10M-row table takes well under a second).
    """
    if n_ids < 1 or draws < 0 or exponent <= 0:
        raise ValueError(f"need n_ids >= 1, draws >= 0, exponent > 0; got {n_ids}, {draws}, {exponent}")
    if n_ids == 1 or draws == 0:
        return float(min(n_ids, draws))

    def weights() -> Iterator[np.ndarray]:
        for start in range(1, n_ids + 1, chunk):
            yield np.arange(start, min(start + chunk, n_ids + 1), dtype=np.float64) ** -exponent

    total = sum(float(w.sum()) for w in weights())
    return sum(float(-np.expm1(draws * np.log1p(-w / total)).sum()) for w in weights())


def bytes_per_iteration(
    shape: ModelShape, mode: str, rows_per_table: Sequence[int] | None = None, bits: int = 8
) -> int:
    """Bytes one rank sends per iteration in ``mode`` (``dense``, ``sparse_fp32`` or ``sparse_int8``).

    Sparse rows carry their values only; row indices are not counted (as in the paper's accounting).
    """
    mlp = shape.mlp_weights + shape.mlp_biases + shape.cross_parameters
    if mode == "dense":
        return 4 * (mlp + sum(shape.table_rows) * shape.embedding_dim)
    if rows_per_table is None:
        raise ValueError(f"mode {mode!r} needs `rows_per_table` (measured, or touched_rows_upper_bound)")
    rows = sum(rows_per_table) * shape.embedding_dim
    if mode == "sparse_fp32":
        return 4 * (mlp + rows)
    if mode == "sparse_int8":
        scales = len(shape.table_rows) + sum(o for _, o in shape.mlp_layers) + len(shape.mlp_layers)
        return -(-(mlp + rows) * bits // 8) + 4 * scales
    raise ValueError(f"unknown mode {mode!r}; expected 'dense', 'sparse_fp32' or 'sparse_int8'")


def allreduce_factor(world: int) -> float:
    """Bytes a rank sends per byte of buffer in a ring all-reduce of ``world`` ranks: ``2 (W - 1) / W``."""
    if world < 1:
        raise ValueError(f"`world` must be >= 1, got {world}")
    return 2 * (world - 1) / world


def model_parallel_a2a_bytes(
    shape: ModelShape, local_batch: int, world: int, tables_on_rank: int | None = None, features: int | None = None
) -> float:
    """Bytes one rank sends per iteration in TorchRec's pooled-embedding all-to-all (table-wise sharding, float32).

    With ``F`` pooled features per sample (``features``; default one per table, as Criteo), a rank holding ``k`` of
    them sends, forward, their pooled embeddings for the other ranks' samples (``k (W - 1) B D`` floats) and,
    backward, the gradients of the pooled embeddings of its own samples for the ``F - k`` held elsewhere
    (``(F - k) B D``). ``tables_on_rank=None`` is the mean rank (``k = F / W``, tables spread evenly):
    ``2 * 4 * B * F * D * (W - 1) / W`` bytes, integer-divided as the logged ``model_parallel_a2a``.
    """
    pooled, dim = len(shape.table_rows) if features is None else features, shape.embedding_dim
    if tables_on_rank is None:
        return float(2 * 4 * local_batch * pooled * dim * (world - 1) // world)
    if not 0 <= tables_on_rank <= pooled:
        raise ValueError(f"`tables_on_rank` must be in [0, {pooled}], got {tables_on_rank}")
    return 4.0 * local_batch * dim * (tables_on_rank * (world - 1) + pooled - tables_on_rank)


def busiest_rank_tables(shape: ModelShape, world: int) -> int:
    """Tables on the busiest rank under round-robin table-wise placement: ``ceil(T / W)``."""
    return -(-len(shape.table_rows) // world)


def bytes_at_scale(
    shape: ModelShape,
    mode: str,
    world: int,
    local_batch: int,
    rows_per_table: Sequence[float] | None = None,
    bits: int = 8,
    tables_on_rank: int | None = None,
) -> float:
    """Bytes one rank puts on the wire per iteration in ``mode`` (:data:`MODES_AT_SCALE`) at world size ``world``,
    local batch ``local_batch`` (weak scaling), in the module's convention (ring all-reduce, all-gather of sparse rows).

    * ``dense``: ring all-reduce of every parameter in float32: ``2 (W-1)/W * 4 (M + sum_t rows_t D)``;
    * ``sparse_fp32``: ring all-reduce of the float32 dense gradients (``M`` parameters: MLPs, cross layers) plus an
      all-gather of the rows this rank touched: ``2 (W-1)/W * 4 M + (W-1) * 4 R D``, with ``R = sum(rows_per_table)``
      rows per rank (fixed by the local batch, so this term grows linearly in ``W``);
    * ``sparse_int8``: the same with ``bits``-bit codes, plus the float32 scales (all-reduced):
      ``2 (W-1)/W * (M bits/8 + 4 S) + (W-1) * R D bits/8``;
    * ``model_parallel``: TorchRec's pooled all-to-all (:func:`model_parallel_a2a_bytes`, mean rank unless
      ``tables_on_rank``) plus the ring all-reduce of the float32 dense gradients (DDP over the dense layers).

    ``rows_per_table`` (sparse modes): touched rows per rank and table, e.g. :func:`touched_rows_upper_bound`.
    """
    ring = allreduce_factor(world)
    mlp = shape.mlp_weights + shape.mlp_biases + shape.cross_parameters
    if mode == "dense":
        return ring * bytes_per_iteration(shape, "dense")
    if mode == "model_parallel":
        return model_parallel_a2a_bytes(shape, local_batch, world, tables_on_rank) + ring * 4 * mlp
    if mode not in ("sparse_fp32", "sparse_int8"):
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES_AT_SCALE)}")
    if rows_per_table is None:
        raise ValueError(f"mode {mode!r} needs `rows_per_table` (measured, or touched_rows_upper_bound)")
    values = sum(rows_per_table) * shape.embedding_dim
    if mode == "sparse_fp32":
        return ring * 4 * mlp + (world - 1) * 4 * values
    scales = len(shape.table_rows) + shape.mlp_biases + len(shape.mlp_layers)
    return ring * (mlp * bits / 8 + 4 * scales) + (world - 1) * values * bits / 8
