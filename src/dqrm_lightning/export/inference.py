"""Run an artifact: on TorchRec's quantized EmbeddingBagCollection (FBGEMM INT-N kernels), or in plain torch.

Notation: B batch size, F = 26 sparse features, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dqrm_lightning.export.artifact import (
    Artifact,
    dequantized_mlp_weight,
    load_artifact,
    scale_bias,
    unpack_codes,
)
from dqrm_lightning.names import table_name


class _InputQuantizer(nn.Module):
    """Fake-quantizes a layer's input on the grid it was trained with (MLP activation QAT)."""

    def __init__(self, bits: int, scale: float) -> None:
        super().__init__()
        self.scale, self.low, self.high = scale, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale), self.low, self.high) * self.scale


def _mlp(layers: Sequence[dict[str, Any]], artifact: Artifact, relu_last: bool) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        if layer.get("activation_bits"):
            modules.append(_InputQuantizer(layer["activation_bits"], layer["activation_scale"]))
        out_features, in_features = layer["shape"]
        arrays = artifact.mlp[layer["name"]]
        linear = nn.Linear(in_features, out_features, bias="bias" in arrays)
        with torch.no_grad():
            linear.weight.copy_(dequantized_mlp_weight(layer, arrays))
            if "bias" in arrays:
                linear.bias.copy_(torch.from_numpy(np.array(arrays["bias"])))
        modules.append(linear)
        if relu_last or i < len(layers) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval()


def _interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """DLRM dot interaction: (B, D) and (B, F, D) -> (B, D + (F + 1) choose 2), TorchRec's order."""
    combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # (B, F + 1, D)
    interactions = torch.bmm(combined, combined.transpose(1, 2))  # (B, F + 1, F + 1)
    rows, cols = torch.triu_indices(combined.shape[1], combined.shape[1], offset=1)
    return torch.cat((dense, interactions[:, rows, cols]), dim=1)


class ArtifactDLRM(nn.Module):
    """An exported DLRM: the artifact's MLPs as float32 ``nn.Linear`` layers holding the dequantized weights, and
    an engine-specific :meth:`embed` of the tables. ``manifest`` is the artifact's."""

    def __init__(self, artifact: Artifact) -> None:
        super().__init__()
        self.manifest = artifact.manifest
        layers = artifact.manifest["mlp"]
        self.dense_arch = _mlp([layer for layer in layers if layer["arch"] == "dense_arch"], artifact, relu_last=True)
        self.over_arch = _mlp([layer for layer in layers if layer["arch"] == "over_arch"], artifact, relu_last=False)
        self.feature_names = artifact.manifest["model"]["feature_names"]

    def embed(self, features: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:
        """Logits (B, 1)."""
        dense = self.dense_arch(dense_features)  # (B, D)
        sparse = self.embed(sparse_features)  # (B, F, D)
        return self.over_arch(_interaction(dense, sparse))


class PlainTorchDLRM(ArtifactDLRM):
    """The artifact in plain torch (no TorchRec, no FBGEMM): looked-up rows are unpacked and dequantized per batch.

    ``embed`` takes a dict ``feature -> (B,) int64 ids`` (one id per feature and sample) or anything with
    ``__getitem__(feature).values()`` such as a KeyedJaggedTensor of one-hot features.
    """

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        self.tables = {t["feature"]: t for t in artifact.manifest["tables"]}
        self.codes = {f: torch.from_numpy(np.array(artifact.tables[f])) for f in self.feature_names}
        self.scale_bias = {
            t["feature"]: scale_bias(artifact, t) for t in artifact.manifest["tables"] if t["bits"] != 32
        }

    def embed(self, features: Any) -> torch.Tensor:
        out = []
        for feature in self.feature_names:
            ids = features[feature]
            ids = ids.values() if hasattr(ids, "values") and callable(ids.values) else ids
            table = self.tables[feature]
            codes = unpack_codes(self.codes[feature][ids.long()], table["bits"], table["dim"])
            if table["bits"] == 32:
                out.append(codes)
            else:
                grid = self.scale_bias[feature][ids.long()].float()  # (B, 2)
                out.append(codes.float() * grid[:, :1] + grid[:, 1:])
        return torch.stack(out, dim=1)  # (B, F, D)


class TorchRecDLRM(ArtifactDLRM):
    """The artifact on TorchRec's quantized EmbeddingBagCollection (FBGEMM IntN TBE kernels on CPU or GPU)."""

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

        data_types = {2: DataType.INT2, 4: DataType.INT4, 8: DataType.INT8, 32: DataType.FP32}
        configs: list[EmbeddingBagConfig] = []
        weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # table: (rows, fp16 scale and bias per row)
        for table in artifact.manifest["tables"]:
            bits = table["bits"]
            codes = torch.from_numpy(np.array(artifact.tables[table["feature"]]))
            if bits == 16:  # FBGEMM has no INT16 rows: serve the dequantized values in FP32
                grid = scale_bias(artifact, table).float()  # (rows, 2)
                values = unpack_codes(codes, 16, table["dim"]).float() * grid[:, :1] + grid[:, 1:]
                codes, bits = values.contiguous().view(torch.uint8), 32
            name = table_name(table["feature"])
            configs.append(
                EmbeddingBagConfig(
                    name=name,
                    embedding_dim=table["dim"],
                    num_embeddings=table["rows"],
                    feature_names=[table["feature"]],
                    data_type=data_types[bits],
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
        pooled = self.ebc(features).to_dict()
        return torch.stack([pooled[f] for f in self.feature_names], dim=1)  # (B, F, D)


def load_inference_model(path: str | Path, engine: str = "torchrec", verify: bool = True) -> ArtifactDLRM:
    """Load an artifact for inference: ``engine`` is ``torchrec`` (FBGEMM kernels) or ``plain`` (torch only)."""
    artifact = load_artifact(path, verify=verify)
    if engine == "torchrec":
        return TorchRecDLRM(artifact).eval()
    if engine == "plain":
        return PlainTorchDLRM(artifact).eval()
    raise ValueError(f"`engine` must be 'torchrec' or 'plain', got {engine!r}")
