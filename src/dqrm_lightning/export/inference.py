"""Run an artifact: on TorchRec's quantized EmbeddingBagCollection (FBGEMM INT-N kernels), or in plain torch.

MLP precision: ``fp32`` (default) computes with the float32 weights the QAT model used, dequantized once at load, so
predictions equal the QAT model's eval predictions. ``bf16`` runs the MLP products in bfloat16 (oneDNN, fp32
accumulation; several times faster than fp32 on CPUs with AVX512-BF16 or AMX, slower on CPUs without): a quantized
layer's integer codes are exact in bfloat16 (bits <= 8) and its scale per output row is applied in fp32 after the
product, so only the layer's input and the product's output are rounded to bfloat16 (8 significant bits). It changes
predictions slightly (measured AUC change: benchmarks/results/inference_speed.txt).

Any feature schema: a table may be looked up by several features, and a feature's bag may hold any number of ids
(0: a vector of zeros), pooled by the table's ``sum`` or ``mean``. The interaction is DLRM's dot product, or for a
DCN-v2 artifact (``architecture: dcn``) the low-rank cross network, kept in FP32.

Notation: B batch size, F sparse features (Criteo: 26), D embedding dimension, N = (F + 1) D.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dqrm_lightning.export.artifact import (
    Artifact,
    entry_features,
    entry_name,
    entry_table,
    load_artifact,
    mlp_weight_codes,
    scale_bias,
    unpack_codes,
)
from dqrm_lightning.names import MLP_ARCHS


class _InputQuantizer(nn.Module):
    """Fake-quantizes a layer's input on the grid it was trained with (MLP activation QAT)."""

    def __init__(self, bits: int, scale: float) -> None:
        super().__init__()
        self.scale, self.low, self.high = scale, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale), self.low, self.high) * self.scale


MLP_PRECISIONS = ("fp32", "bf16")


def check_mlp_precision(mlp_precision: str) -> None:
    """Raises ValueError unless ``mlp_precision`` is one of :data:`MLP_PRECISIONS`."""
    if mlp_precision not in MLP_PRECISIONS:
        raise ValueError(f"`mlp_precision` must be one of {MLP_PRECISIONS}, got {mlp_precision!r}")


class _BF16Linear(nn.Module):
    """``y = (x W^T) * scale + bias`` with the product in bfloat16 (fp32 accumulation): ``W`` is a quantized layer's
    integer codes (exact in bfloat16) and ``scale`` its fp32 scale per output row, or an FP32 layer's weight rounded
    to bfloat16 and ``scale`` None. Input (B, in), output (B, out) float32."""

    scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Buffer(weight.to(torch.bfloat16))  # (out, in)
        self.register_buffer("scale", None if scale is None else scale.reshape(-1))  # (out,)
        self.register_buffer("bias", bias)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()  # (B, out)
        if self.scale is None:
            return y if self.bias is None else y + self.bias
        return y * self.scale if self.bias is None else torch.addcmul(self.bias, y, self.scale)


def _linear(layer: dict[str, Any], arrays: dict[str, np.ndarray], precision: str) -> nn.Module:
    """One MLP layer of the artifact: an ``nn.Linear`` holding the dequantized float32 weight (``fp32``), or a
    :class:`_BF16Linear` (``bf16``)."""
    out_features, in_features = layer["shape"]
    codes, scale = mlp_weight_codes(layer, arrays)
    bias = torch.from_numpy(np.array(arrays["bias"])) if "bias" in arrays else None
    if precision == "bf16":
        if scale is not None and layer["bits"] > 8:  # codes beyond 8 bits are not exact in bfloat16
            codes, scale = codes * scale, None
        return _BF16Linear(codes, scale, bias)
    linear = nn.Linear(in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(codes if scale is None else codes * scale)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _mlp(layers: Sequence[dict[str, Any]], artifact: Artifact, relu_last: bool, precision: str) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        if layer.get("activation_bits"):
            modules.append(_InputQuantizer(layer["activation_bits"], layer["activation_scale"]))
        modules.append(_linear(layer, artifact.mlp[layer["name"]], precision))
        if relu_last or i < len(layers) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval()


@functools.cache
def _upper_pairs(n: int) -> torch.Tensor:
    """Flat indices into an (n, n) matrix of its entries above the diagonal, row by row (TorchRec's order)."""
    rows, cols = torch.triu_indices(n, n, offset=1)
    return rows * n + cols


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """DLRM dot interaction: (B, D) and (B, F, D) -> (B, D + (F + 1) choose 2), TorchRec's order."""
    combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # (B, F + 1, D)
    interactions = torch.bmm(combined, combined.transpose(1, 2))  # (B, F + 1, F + 1)
    pairs = interactions.flatten(1).index_select(1, _upper_pairs(combined.shape[1]))  # (B, (F + 1) choose 2)
    return torch.cat((dense, pairs), dim=1)


class CrossNet(nn.Module):
    """DCN-v2's low-rank cross network (Wang et al. 2021, arXiv 2008.13535; TorchRec's ``LowRankCrossNet``): layer
    l maps ``x_l`` to ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l`` with ``W_l`` (N, r), ``V_l`` (r, N), ``b_l``
    (N,) and ``*`` elementwise; input and output (B, N)."""

    def __init__(self, layers: Sequence[dict[str, np.ndarray]]) -> None:
        super().__init__()
        self.w = nn.ParameterList(torch.from_numpy(np.array(layer["W_kernels"])) for layer in layers)
        self.v = nn.ParameterList(torch.from_numpy(np.array(layer["V_kernels"])) for layer in layers)
        self.b = nn.ParameterList(torch.from_numpy(np.array(layer["bias"])) for layer in layers)
        self.requires_grad_(False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, v, b in zip(self.w, self.v, self.b, strict=True):
            x = x0 * F.linear(F.linear(x, v), w, b) + x  # V x: (B, r); W (V x) + b: (B, N)
        return x


class ArtifactDLRM(nn.Module):
    """An exported DLRM or DCN-v2 model: the artifact's MLPs (float32 ``nn.Linear`` layers holding the dequantized
    weights, or bfloat16 products with ``mlp_precision="bf16"``, see the module docstring), the interaction (dot
    product, or the FP32 cross network of a DCN artifact) and an engine-specific :meth:`embed` of the tables.
    ``manifest`` is the artifact's.

    Raises:
        ValueError: ``mlp_precision`` not one of :data:`MLP_PRECISIONS`.
    """

    def __init__(self, artifact: Artifact, mlp_precision: str = "fp32") -> None:
        super().__init__()
        check_mlp_precision(mlp_precision)
        self.manifest = artifact.manifest
        self.mlp_precision = mlp_precision
        dense, over = ([layer for layer in artifact.manifest["mlp"] if layer["arch"] == arch] for arch in MLP_ARCHS)
        self.dense_arch = _mlp(dense, artifact, relu_last=True, precision=mlp_precision)
        self.over_arch = _mlp(over, artifact, relu_last=False, precision=mlp_precision)
        self.feature_names = artifact.manifest["model"]["feature_names"]  # in the interaction's order
        self.crossnet = CrossNet(artifact.crossnet) if artifact.manifest["model"].get("architecture") == "dcn" else None

    def embed(self, features: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:
        """Logits (B, 1)."""
        dense = self.dense_arch(dense_features)  # (B, D)
        sparse = self.embed(sparse_features)  # (B, F, D)
        if self.crossnet is None:
            return self.over_arch(dot_interaction(dense, sparse))
        combined = torch.cat((dense.unsqueeze(1), sparse), dim=1).flatten(1)  # (B, N)
        return self.over_arch(self.crossnet(combined))


class PlainTorchDLRM(ArtifactDLRM):
    """The artifact in plain torch (no TorchRec, no FBGEMM): looked-up rows are unpacked and dequantized per batch,
    then pooled per bag by their table's ``sum`` or ``mean``.

    ``embed`` takes a KeyedJaggedTensor (any bag lengths), or a dict ``feature -> (B,) int64 ids`` (one id per
    feature and sample).
    """

    def __init__(self, artifact: Artifact, mlp_precision: str = "fp32") -> None:
        super().__init__(artifact, mlp_precision)
        self.tables = {f: t for t in artifact.manifest["tables"] for f in entry_features(t)}  # by feature
        self.codes = {
            entry_name(t): torch.from_numpy(np.array(artifact.tables[entry_name(t)])) for t in self.tables.values()
        }
        self.scale_bias = {
            entry_name(t): scale_bias(artifact, t) for t in artifact.manifest["tables"] if t["bits"] != 32
        }

    def _rows(self, table: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows ``ids`` (N,) of a table: (N, D) float32."""
        name = entry_name(table)
        codes = unpack_codes(self.codes[name][ids], table["bits"], table["dim"])
        if table["bits"] == 32:
            return codes
        grid = self.scale_bias[name][ids].float()  # (N, 2)
        return codes.float() * grid[:, :1] + grid[:, 1:]

    def embed(self, features: Any) -> torch.Tensor:
        out = []
        for feature in self.feature_names:
            bag = features[feature]
            if callable(getattr(bag, "values", None)):  # a JaggedTensor: ids and bag lengths
                ids, offsets = bag.values().long(), bag.offsets()[:-1].long()
            else:
                ids = bag.long()
                offsets = torch.arange(len(ids))
            table = self.tables[feature]
            rows = self._rows(table, ids)  # (N, D)
            mode = table.get("pooling", "sum")
            out.append(F.embedding_bag(torch.arange(len(ids)), rows, offsets, mode=mode))  # (B, D)
        return torch.stack(out, dim=1)  # (B, F, D)


class TorchRecDLRM(ArtifactDLRM):
    """The artifact on TorchRec's quantized EmbeddingBagCollection (FBGEMM IntN TBE kernels on CPU or GPU), one
    table per manifest entry with the features that look it up and its pooling."""

    def __init__(self, artifact: Artifact, mlp_precision: str = "fp32") -> None:
        super().__init__(artifact, mlp_precision)
        from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

        data_types = {2: DataType.INT2, 4: DataType.INT4, 8: DataType.INT8, 32: DataType.FP32}
        poolings = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        configs: list[EmbeddingBagConfig] = []
        weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # table: (rows, fp16 scale and bias per row)
        for table in artifact.manifest["tables"]:
            bits = table["bits"]
            codes = torch.from_numpy(np.array(artifact.tables[entry_name(table)]))
            if bits == 16:  # FBGEMM has no INT16 rows: serve the dequantized values in FP32
                grid = scale_bias(artifact, table).float()  # (rows, 2)
                values = unpack_codes(codes, 16, table["dim"]).float() * grid[:, :1] + grid[:, 1:]
                codes, bits = values.contiguous().view(torch.uint8), 32
            name = entry_table(table)
            configs.append(
                EmbeddingBagConfig(
                    name=name,
                    embedding_dim=table["dim"],
                    num_embeddings=table["rows"],
                    feature_names=entry_features(table),
                    data_type=data_types[bits],
                    pooling=poolings[table.get("pooling", "sum")],
                )
            )
            if bits == 32:
                weights[name] = (codes.reshape(table["rows"], -1), None)
            else:
                weights[name] = (codes, scale_bias(artifact, table).contiguous().view(torch.uint8))  # (rows, 4)
        self.ebc = QuantEBC(
            tables=configs, is_weighted=False, device=torch.device("cpu"), table_name_to_quantized_weights=weights
        )

    def embed(self, features: Any) -> torch.Tensor:
        pooled = self.ebc(features)  # KeyedTensor, values (B, F * D) in the tables' order (grouped by pooling)
        if pooled.keys() == self.feature_names:  # the exporter's order: a view, no copy
            return pooled.values().view(pooled.values().shape[0], len(self.feature_names), -1)  # (B, F, D)
        by_feature = pooled.to_dict()
        return torch.stack([by_feature[f] for f in self.feature_names], dim=1)  # (B, F, D)


def load_inference_model(
    path: str | Path, engine: str = "torchrec", verify: bool = True, mlp_precision: str = "fp32"
) -> ArtifactDLRM:
    """Load an artifact for inference: ``engine`` is ``torchrec`` (FBGEMM kernels) or ``plain`` (torch only);
    ``mlp_precision`` ``fp32`` (predictions equal the QAT model's) or ``bf16`` (faster, see the module docstring).

    Raises:
        ValueError: an unknown ``engine`` or ``mlp_precision``.
        ArtifactError: an artifact that cannot be trusted or read.
    """
    engines = {"torchrec": TorchRecDLRM, "plain": PlainTorchDLRM}
    if engine not in engines:
        raise ValueError(f"`engine` must be 'torchrec' or 'plain', got {engine!r}")
    check_mlp_precision(mlp_precision)  # before reading the artifact
    return engines[engine](load_artifact(path, verify=verify), mlp_precision).eval()
