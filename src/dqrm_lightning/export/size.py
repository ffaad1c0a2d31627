"""Analytic model sizes in bytes: the FP32 model, and the INT-N model a QAT config exports to.

``shape`` is a model's :class:`~dqrm_lightning.comms.accounting.ModelShape`
(:func:`dqrm_lightning.model.model_shape` of its hyper-parameters).
"""

from __future__ import annotations

from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.quant.config import QATConfig


def model_bytes(shape: ModelShape, embedding_bits: int = 32, dense_bits: int = 32) -> int:
    """Sum over tables of rows x D x bits / 8, plus MLP parameters (weights and biases) x bits / 8.

    Example::

        fp32 = model_bytes(model_shape(module.hparams))
    """
    table_bytes = sum(shape.table_rows) * shape.embedding_dim * embedding_bits // 8
    return table_bytes + (shape.mlp_weights + shape.mlp_biases) * dense_bits // 8


def quantized_model_bytes(shape: ModelShape, config: QATConfig) -> int:
    """Bytes of the INT-N model: packed table codes plus one fp16 scale and offset per quantized table, MLP weight
    rows at their bits (packed to whole bytes) with a float32 scale each, float32 biases; FP32 parts at 4 bytes."""
    dim = shape.embedding_dim
    tables = 0
    for feature, rows in zip(DEFAULT_CAT_NAMES, shape.table_rows, strict=True):
        bits = config.table_bits(feature, rows)
        tables += rows * dim * 4 if bits is None else -(-rows * dim * bits // 8) + 4
    mlp = 0
    for width, out in shape.mlp_layers:
        weight = 4 * width * out if config.mlp_bits is None else out * (-(-width * config.mlp_bits // 8) + 4)
        mlp += weight + 4 * out
    return tables + mlp
