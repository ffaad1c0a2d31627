"""Names shared by the model, the strategies, checkpoints and the exporter, defined once.

A sparse feature ``C3`` is looked up in table ``t_C3``; a DLRMModule checkpoint keeps the DLRM's parameters under
``model.``, the QAT description under ``qat_config`` and the embedding quantizer's state under ``embedding_quantizer.``.
"""

from __future__ import annotations

# Where a DLRMModule checkpoint keeps things (the exporter reads them by these names)
QAT_CONFIG_KEY = "qat_config"  # asdict(QATConfig) of a QAT model: the checkpoint describes its own quantization
QUANTIZER_PREFIX = "embedding_quantizer."  # state of DLRMModule.embedding_quantizer (scales, offsets, counters)
MLP_ARCHS = ("dense_arch", "over_arch")  # the bottom and top MLP, in forward order


def table_name(feature: str) -> str:
    """The embedding table of a sparse feature (``C3`` -> ``t_C3``)."""
    return f"t_{feature}"


def dlrm_key(name: str) -> str:
    """State-dict key of a DLRM parameter or buffer (``over_arch.model.0.weight``) in a DLRMModule checkpoint."""
    return f"model.{name}"


def table_key(feature: str) -> str:
    """State-dict key of a feature's table (its master weights) in a DLRMModule checkpoint and state dict."""
    return table_weight_key(table_name(feature))


def table_weight_key(table: str) -> str:
    """State-dict key of a table, by its name (a shared table of a schema: ``movies``), in a DLRMModule checkpoint."""
    return dlrm_key(f"sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight")
