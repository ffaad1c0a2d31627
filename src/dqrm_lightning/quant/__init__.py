"""DQRM quantization-aware training, torchao style: a validated :class:`QATConfig`, :func:`prepare_qat` (swap the
DLRM's MLP Linears and sparse arch for fake-quantized ones), fake-quantization toggles, and the quantizer math.
Conversion to an integer model is the export (:mod:`dqrm_lightning.export`)."""

from dqrm_lightning.quant.api import disable_fake_quant, enable_fake_quant, prepare_qat
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.fake_quant import fake_quantize, grid_from_extrema, qrange
from dqrm_lightning.quant.linear import FakeQuantizedLinear, swap_linears
from dqrm_lightning.quant.sparse_arch import FakeQuantizedSparseArch

__all__ = [
    "EmbeddingQuantizer",
    "FakeQuantizedLinear",
    "FakeQuantizedSparseArch",
    "QATConfig",
    "disable_fake_quant",
    "enable_fake_quant",
    "fake_quantize",
    "grid_from_extrema",
    "prepare_qat",
    "qrange",
    "swap_linears",
]
