"""The precision the master embedding tables are stored and trained in (``model.table_dtype``).

* ``fp32`` (default): float32 tables.
* ``fp16``: float16 tables, half the memory of FP32. TorchRec hands the tables' ``data_type`` to FBGEMM's fused
  kernel as its ``weights_precision``: the lookup reads float16 rows and returns float32 pooled embeddings (FBGEMM's
  ``output_dtype``, float32 by default), so everything after the tables (QAT's fake quantization, the interaction,
  the MLPs) sees float32 activations. The fused optimizer computes each update in float32 and rounds the new weight
  to float16: on the CPU to nearest, whatever ``stochastic_rounding`` says (measured with fbgemm-gpu-cpu 1.8.0; see
  the README). Replicated tables are float16 ``nn.EmbeddingBag`` modules whose sparse gradients are float16 too.
* ``int8``: FBGEMM's INT8 training tables (a row-wise scale and bias inside each row). Refused: the CPU build cannot
  run their backward pass, and the QAT scales, checkpoints and export here read plain float rows.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torchrec.modules.embedding_configs import DataType

TableDtype = Literal["fp32", "fp16", "int8"]

TABLE_DTYPES: dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}


def table_value_bits(table_dtype: str) -> int:
    """Bits each stored table value takes in training memory (``fp16``: 16)."""
    return {"fp32": 32, "fp16": 16, "int8": 8}[table_dtype]


def check_table_dtype(table_dtype: str) -> None:
    """Refuse a table precision that is unknown or that this FBGEMM build cannot train.

    Raises:
        ValueError: naming ``table_dtype`` and what is allowed.
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"`table_dtype` must be one of {sorted(TABLE_DTYPES)}, got {table_dtype!r}")
    if table_dtype == "int8":
        raise ValueError(f"`table_dtype: int8` is not supported: {_int8_training_problem()}; use fp16 or fp32")


@functools.cache
def _int8_training_problem() -> str:
    """Why INT8 tables cannot be trained here: FBGEMM's answer to a one-row INT8 table's backward on the CPU, or,
    where FBGEMM can train one, that the QAT scales, checkpoints and export read float rows only."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    table = SplitTableBatchedEmbeddingBagsCodegen(
        [(1, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        weights_precision=SparseType.INT8,
        optimizer=EmbOptimType.EXACT_SGD,
    )
    try:
        table(torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1])).sum().backward()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        return f"FBGEMM cannot train INT8 tables on the CPU ({reason})"
    return "INT8 tables keep a scale and bias inside each row, which QAT scales, checkpoints and export do not read"
