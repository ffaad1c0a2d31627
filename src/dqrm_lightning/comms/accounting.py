"""Bytes sent per iteration and rank for each data-parallel communication mode (the structure of paper Table 4).

Modes:

* ``dense``: every parameter as float32 (tables included: what plain data parallelism all-reduces);
* ``sparse_fp32``: MLP gradients as float32 plus only the table rows the rank touched;
* ``sparse_int8``: the same with 1-byte codes (``bits`` in general) plus the scales (one float32 per table, per MLP
  output row and per bias), the paper's compressed mode.

``rows_per_table`` is either measured (the unique ids of a batch) or the paper's analytic upper bound
``min(rows_t, local batch)`` for one-hot features (:func:`touched_rows_upper_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
