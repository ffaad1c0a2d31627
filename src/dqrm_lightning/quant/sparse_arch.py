"""``FakeQuantizedSparseArch``: DLRM's sparse arch with each table's looked-up rows fake-quantized (embedding QAT).

Notation: B batch size, F sparse features (several may share a table), D embedding dimension.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import SparseArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from typing_extensions import override

from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import (
    EmbeddingQuantizer,
    embedding_dim,
    feature_tables,
    mean_pooled_tables,
    table_rows,
)


class FakeQuantizedSparseArch(nn.Module):
    """TorchRec's ``SparseArch`` (pooled embedding lookups of each feature in its table) followed by an
    :class:`~dqrm_lightning.quant.embedding.EmbeddingQuantizer`.

    Build with :meth:`from_sparse_arch`, which shares the arch's EmbeddingBagCollection (sharded or not: the tables,
    their fused optimizer and their state-dict keys stay as they are). The quantizer is not a registered submodule:
    its scales and counters are training state that the model's owner registers where checkpoints keep them
    (``DLRMModule.embedding_quantizer``).

    Args:
        embedding_bag_collection: the tables.
        feature_names: the F features in output order.
        quantizer: fake-quantizes the pooled rows.

    Example::

        dlrm.sparse_arch = FakeQuantizedSparseArch.from_sparse_arch(dlrm.sparse_arch, QATConfig(embedding_bits=4))
    """

    def __init__(self, embedding_bag_collection: nn.Module, feature_names: list[str], quantizer: EmbeddingQuantizer):
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.sparse_feature_names = list(feature_names)
        self._quantizer = (quantizer,)  # a tuple: not registered here (see the class docstring)

    @classmethod
    def from_sparse_arch(cls, arch: SparseArch, config: QATConfig) -> FakeQuantizedSparseArch:
        """Wrap ``arch``'s EmbeddingBagCollection (nothing is copied) with a new quantizer for ``config``."""
        ebc = arch.embedding_bag_collection
        features = list(arch.sparse_feature_names)
        rows, tables = table_rows(ebc), feature_tables(ebc)
        quantizer = EmbeddingQuantizer(
            features,
            [rows[feature] for feature in features],
            embedding_dim(ebc),
            config,
            tables=[tables[feature] for feature in features],
            mean_tables=mean_pooled_tables(ebc),
        )
        quantizer.attach(ebc)
        return cls(ebc, features, quantizer)

    @property
    def quantizer(self) -> EmbeddingQuantizer:
        return self._quantizer[0]

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Fake-quantize the rows (``False``: FP32 rows, e.g. during an FP32 warm-up)."""
        self.quantizer.enable_fake_quant(enabled)

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    @override
    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings of ``features`` (F keys, B samples each) from fake-quantized rows, shape (B, F, D)."""
        pooled = self.embedding_bag_collection(features).to_dict()  # feature -> (B, D)
        sparse = torch.stack([pooled[name] for name in self.sparse_feature_names], dim=1)  # (B, F, D)
        if isinstance(sparse, torch.fx.Proxy):
            # TorchRec's sparse-dist train pipeline traces this forward only to find which input feeds the tables;
            # the quantizer (eager code behind the lookup, not a submodule) stays out of that graph and runs eagerly.
            return sparse
        return self.quantizer(sparse, features)  # each table's looked-up rows on its integer grid
