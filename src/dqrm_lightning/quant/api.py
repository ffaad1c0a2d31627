"""The two QAT steps of a DLRM: :func:`prepare_qat` before training; conversion is the export
(:func:`dqrm_lightning.export.exporter.export_checkpoint`), never a training hook. Plus the fake-quantization
toggles of an FP32 warm-up.
"""

from __future__ import annotations

from torch import nn
from torchrec.models.dlrm import DLRM

from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.linear import FakeQuantizedLinear, WeightStaging, linear_kwargs, swap_linears
from dqrm_lightning.quant.sparse_arch import FakeQuantizedSparseArch

_FAKE_QUANTIZERS = (EmbeddingQuantizer, FakeQuantizedLinear, FakeQuantizedSparseArch)


def prepare_qat(model: DLRM, config: QATConfig) -> EmbeddingQuantizer | None:
    """Make a DLRM quantization-aware, in place: with ``config.mlp_bits`` every ``nn.Linear`` of the bottom and top
    MLPs becomes a :class:`FakeQuantizedLinear`, and with quantized tables the sparse arch becomes a
    :class:`FakeQuantizedSparseArch`. Both share the existing Parameters, so this works before or after sharding
    (DistributedModelParallel keeps the parameters, not the modules).

    Returns:
        The embedding quantizer (``None`` without embedding QAT). Its scales and counters are training state: the
        caller registers it where checkpoints keep it.

    Example::

        quantizer = prepare_qat(dlrm, QATConfig(embedding_bits=4, mlp_bits=4))
    """
    if config.mlp_bits is not None:
        for arch in (model.dense_arch, model.over_arch):
            swap_linears(arch, **linear_kwargs(config))
        WeightStaging.register(model)  # all MLP weights fake-quantized at once before each forward
    if not config.quantizes_embeddings:
        return None
    model.sparse_arch = FakeQuantizedSparseArch.from_sparse_arch(model.sparse_arch, config)
    return model.sparse_arch.quantizer


def enable_fake_quant(module: nn.Module, enabled: bool = True) -> None:
    """Switch fake quantization on (or off: plain FP32) in every quantized layer below ``module``; scales and
    counters are kept."""
    for child in module.modules():
        if isinstance(child, _FAKE_QUANTIZERS):
            child.enable_fake_quant(enabled)


def disable_fake_quant(module: nn.Module) -> None:
    """Plain FP32 forwards (e.g. an FP32 warm-up) until :func:`enable_fake_quant`."""
    enable_fake_quant(module, False)
