"""DQRM quantization: fake quantization, embedding and MLP QAT, export."""

from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.fake_quant import fake_quantize, qrange
from dqrm_lightning.quant.linear import FakeQuantizedLinear

__all__ = ["EmbeddingQuantizer", "FakeQuantizedLinear", "QATConfig", "fake_quantize", "qrange"]
