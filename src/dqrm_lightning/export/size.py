"""Analytic model sizes in bytes: the FP32 model, and the INT-N model a QAT config exports to.

``shape`` is a model's :class:`~dqrm_lightning.comms.accounting.ModelShape`
(:func:`dqrm_lightning.model.model_shape` of its hyper-parameters), its tables in the order of its
:class:`~dqrm_lightning.schema.FeatureSchema` (``schema``; ``None``: Criteo's 26 tables). Each table is counted once,
however many features look it up, at the bits of its first feature (:class:`QATConfig` gives bits by feature) and its
own dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.quant.config import QATConfig, stored_table_bytes
from dqrm_lightning.schema import FeatureSchema, criteo_schema


def model_bytes(shape: ModelShape, embedding_bits: int = 32, dense_bits: int = 32) -> int:
    """Sum over tables of rows x D x bits / 8, plus MLP parameters (weights and biases) x bits / 8.

    Example::

        fp32 = model_bytes(model_shape(module.hparams))
    """
    table_bytes = sum(shape.table_rows) * shape.embedding_dim * embedding_bits // 8
    return table_bytes + (shape.mlp_weights + shape.mlp_biases) * dense_bits // 8


def quantized_model_bytes(shape: ModelShape, config: QATConfig, schema: FeatureSchema | None = None) -> int:
    """Bytes of the INT-N model as the artifact stores it: each table at the bits :meth:`QATConfig.assign_bits` gives
    it (:func:`~dqrm_lightning.quant.config.stored_table_bytes`: packed codes plus an fp16 scale and offset per table,
    or per row for ``per_row`` tables; FP32 tables at 4 bytes a value), MLP weight rows at their bits (packed to
    whole bytes) with a float32 scale each, float32 biases. This is the manifest's ``bytes.model``.

    It is the artifact size, not the serving memory: FBGEMM's row-wise INT-N tables (TorchRec's quantized
    EmbeddingBagCollection) hold an fp16 scale and bias on every row, so a ``per_table`` table takes the ``per_row``
    bytes once loaded.
    """
    tables = quantized_table_bytes(shape.table_rows, shape.embedding_dim, config, schema)
    mlp = 0
    for width, out in shape.mlp_layers:
        weight = 4 * width * out if config.mlp_bits is None else out * (-(-width * config.mlp_bits // 8) + 4)
        mlp += weight + 4 * out
    return tables + mlp


def quantized_table_bytes(
    table_rows: Sequence[int], dim: int, config: QATConfig, schema: FeatureSchema | None = None
) -> int:
    """Bytes of the embedding tables alone as the artifact stores them (scales and biases included); divided by
    their FP32 bytes it is the tables' fraction of FP32 (``size_budget``'s measure). ``table_rows`` are in the
    schema's table order; ``dim`` is the dimension of tables without their own."""
    tables = _tables(table_rows, dim, schema)
    bits = config.assign_bits({first: rows for first, rows, _ in tables}, dim)
    return sum(stored_table_bytes(rows, d, bits[first], config.embedding_granularity) for first, rows, d in tables)


def quantized_table_ratio(
    table_rows: Sequence[int], dim: int, config: QATConfig, schema: FeatureSchema | None = None
) -> float:
    """The stored tables' fraction of their FP32 bytes (``size_budget``'s measure; ``model_bytes.tables_ratio``)."""
    fp32 = sum(4 * rows * d for _, rows, d in _tables(table_rows, dim, schema))
    return quantized_table_bytes(table_rows, dim, config, schema) / fp32


def _tables(table_rows: Sequence[int], dim: int, schema: FeatureSchema | None) -> list[tuple[str, int, int]]:
    """(first feature, rows, dimension) of each table, in the schema's table order."""
    schema = schema or criteo_schema(table_rows)
    if len(table_rows) != len(schema.tables):
        raise ValueError(f"{len(table_rows)} table sizes for the {len(schema.tables)} tables of the schema")
    return [
        (schema.features_of(table)[0], int(rows), schema.dim_of(table, dim))
        for table, rows in zip(schema.table_names, table_rows, strict=True)
    ]
