"""Export a checkpoint (QAT, or FP32 with post-training quantization) to a DQRM artifact."""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dqrm_lightning.checkpoint import load_file, read_dcp, verify_directory
from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.export.artifact import ArtifactWriter, check_output_dir, pack_codes
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import (
    asymmetric_scale,
    fake_quantize,
    qrange,
    quantize_codes,
    symmetric_scale,
)
from dqrm_lightning.quant.linear import weight_scale

PtqScales = Literal["trained", "init"]
_TABLE_KEY = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
_LINEAR_KEY = re.compile(r"^model\.(dense_arch|over_arch)\.(.+)\.weight$")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict of plain tensors: a single file, or a directory written by TorchRecStrategy
    (torch.distributed.checkpoint shards of any world size, gathered into full tensors). Nothing is unpickled beyond
    tensors and plain Python values.

    Raises:
        CheckpointError: a checkpoint whose loading would run code, or an unreadable one.
    """
    path = Path(path)
    if not path.is_dir():
        return load_file(path, mmap=True)
    from dqrm_lightning.strategies.base import META_FILE

    verify_directory(path)
    rest = load_file(path / META_FILE)
    return rest | read_dcp(path, ("state_dict",))


def _linear_layers(state: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor, torch.Tensor | None]]:
    """(arch, name, weight, bias) of every MLP layer, bottom MLP first, in forward order."""
    layers = []
    for key, value in state.items():
        match = _LINEAR_KEY.match(key)
        if match and value.dim() == 2:
            arch, name = match.groups()
            layers.append((arch, name, value, state.get(key[: -len("weight")] + "bias")))
    order = {"dense_arch": 0, "over_arch": 1}
    return sorted(layers, key=lambda layer: (order[layer[0]], [int(t) for t in re.findall(r"\d+", layer[1])]))


def _table_grid(
    weight: torch.Tensor, bits: int, config: QATConfig, state: dict[str, torch.Tensor], f: int, ptq: PtqScales | None
) -> tuple[float, float]:
    """(scale, offset) of one table: the QAT model's frozen ones, or PTQ ones from the trained (or init) table."""
    if ptq is None:
        return float(state["embedding_quantizer.scale"][f]), float(state["embedding_quantizer.offset"][f])
    if ptq == "init":  # the reference code's PTQ: scales of the random initial table, U(-1/sqrt(rows), 1/sqrt(rows))
        bound = torch.tensor(1.0 / math.sqrt(weight.shape[0]))
        low, high = -bound, bound
    else:
        low, high = torch.aminmax(weight)
    if config.embedding_mode == "symmetric":
        return float(symmetric_scale(torch.maximum(low.abs(), high.abs()), bits)), 0.0
    scale, offset = asymmetric_scale(low, high, bits)
    return float(scale), float(offset)


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    embedding_bits: int | None = None,
    mlp_bits: int | None = None,
    ptq_scales: PtqScales = "trained",
    quantize_mlp: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write the artifact of a checkpoint; returns its manifest.

    A QAT checkpoint is exported with its own bits and frozen scales (its predictions are the QAT model's eval
    predictions). An FP32 checkpoint needs ``embedding_bits`` (32 keeps FP32 tables) and optionally ``mlp_bits``:
    post-training quantization with scales from the trained tables (``ptq_scales="trained"``, the honest baseline)
    or from the initial tables (``"init"``, what the DQRM reference code's PTQ effectively did).

    Args:
        quantize_mlp: ``False`` keeps MLP weights FP32 even when the model was trained with MLP QAT.
        force: replace ``out`` even when it holds files that are not a previous artifact.
    """
    check_output_dir(out, force)  # before reading the checkpoint: nothing of the user's is ever overwritten
    checkpoint = read_checkpoint(ckpt_path)
    hp = checkpoint.get("hyper_parameters")
    if not hp or "num_embeddings_per_feature" not in hp:
        raise ValueError(f"{ckpt_path}: not a DLRMModule checkpoint (no hyper_parameters)")
    state = checkpoint["state_dict"]
    ptq: PtqScales | None = None
    if "qat_config" in checkpoint:
        if embedding_bits is not None or mlp_bits is not None:
            raise ValueError(f"{ckpt_path} was trained with QAT ({checkpoint['qat_config']}); its bits are fixed")
        config = QATConfig(**checkpoint["qat_config"])
        if int(state.get("embedding_quantizer.refreshes", 0)) == 0 and config.quantizes_embeddings:
            ptq = "trained"  # never trained with quantization active (e.g. stopped in the FP32 warm-up)
    else:
        if embedding_bits is None:
            raise ValueError(f"{ckpt_path} is an FP32 checkpoint: give `embedding_bits` for post-training quantization")
        if ptq_scales not in ("trained", "init"):
            raise ValueError(f"`ptq_scales` must be 'trained' or 'init', got {ptq_scales!r}")
        if embedding_bits == 32:  # an FP32 artifact (the baseline of inference benchmarks)
            config = QATConfig(embedding_bits=None, mlp_bits=mlp_bits)
        else:
            config = QATConfig(embedding_bits=embedding_bits, mlp_bits=mlp_bits)
        ptq = ptq_scales
    with ArtifactWriter(out, force) as writer:
        tables = []
        dim = int(hp["embedding_dim"])
        for f, (feature, rows) in enumerate(zip(DEFAULT_CAT_NAMES, hp["num_embeddings_per_feature"], strict=True)):
            weight = state[_TABLE_KEY.format(feature)].float()
            bits = config.table_bits(feature, rows)
            entry: dict[str, Any] = {"feature": feature, "rows": int(rows), "dim": dim, "mode": config.embedding_mode}
            if bits is None:
                entry |= {"bits": 32, "scale": 1.0, "offset": 0.0}
                entry["file"] = writer.add(f"tables/{feature}.bin", pack_codes(weight.numpy(), 32))
            else:
                scale, offset = _table_grid(weight, bits, config, state, f, ptq)
                low, high = qrange(bits, config.embedding_mode)
                codes = _chunked_codes(weight, scale, offset, low, high)
                if config.embedding_mode == "symmetric":  # unsigned codes u = q + 2^(b-1): value = u * s - 2^(b-1) * s
                    codes = codes + 2 ** (bits - 1)
                    offset = -(2 ** (bits - 1)) * scale
                entry |= {"bits": bits, "scale": scale, "offset": offset}
                entry["file"] = writer.add(f"tables/{feature}.bin", pack_codes(codes, bits))
            tables.append(entry)
        layers = []
        linears = _linear_layers(state)
        for arch, name, weight, bias in linears:
            bits = config.mlp_bits if quantize_mlp else None
            layer: dict[str, Any] = {"name": f"{arch}.{name}", "arch": arch, "shape": list(weight.shape)}
            base = f"mlp/{arch}.{name}"
            if bits is None:
                layer |= {"bits": 32, "weight": writer.add(f"{base}.w.bin", weight.float().numpy())}
                used_bias = bias
            else:
                scale = weight_scale(weight.float(), bits, config.mlp_granularity).expand(weight.shape[0], 1)
                low, high = qrange(bits)
                codes = quantize_codes(weight, scale, torch.tensor(float(low)), torch.tensor(float(high))) + 2 ** (
                    bits - 1
                )
                layer |= {
                    "bits": bits,
                    "weight": writer.add(f"{base}.w.bin", pack_codes(codes.numpy(), bits)),
                    "scale": writer.add(f"{base}.s.bin", scale.reshape(-1).float().numpy()),
                }
                used_bias = bias
                if bias is not None and config.mlp_bias == "reference":
                    used_bias = fake_quantize(
                        bias.float(), scale.reshape(-1), torch.tensor(float(low)), torch.tensor(float(high))
                    )
            if used_bias is not None:
                layer["bias"] = writer.add(f"{base}.b.bin", used_bias.detach().float().numpy())
            absmax = state.get(f"model.{arch}.{name}.act_absmax")
            if bits is not None and config.mlp_activation_bits is not None and absmax is not None:
                levels = 2 ** (config.mlp_activation_bits - 1) - 1
                layer |= {
                    "activation_bits": config.mlp_activation_bits,
                    "activation_scale": float((absmax.float() / levels).clamp_min(1e-8)),
                }
            layers.append(layer)
        payload = sum(meta["bytes"] for meta in writer.files.values())
        fp32_bytes = sum(int(r) for r in hp["num_embeddings_per_feature"]) * dim * 4 + sum(
            4 * (w.numel() + (b.numel() if b is not None else 0)) for _, _, w, b in linears
        )
        manifest = {
            "model": {
                "num_embeddings_per_feature": [int(r) for r in hp["num_embeddings_per_feature"]],
                "embedding_dim": dim,
                "dense_arch_layer_sizes": list(hp["dense_arch_layer_sizes"]),
                "over_arch_layer_sizes": list(hp["over_arch_layer_sizes"]),
                "feature_names": list(DEFAULT_CAT_NAMES),
            },
            "qat_config": asdict(config),
            "quantization": "qat" if ptq is None else f"ptq ({ptq} scales)",
            "source_checkpoint": str(ckpt_path),
            "tables": tables,
            "mlp": layers,
            "bytes": {"payload": payload, "fp32_model": fp32_bytes, "ratio": payload / fp32_bytes},
        }
        writer.finish(manifest)
        return manifest | {"files": writer.files}


def _chunked_codes(weight: torch.Tensor, scale: float, offset: float, low: int, high: int) -> np.ndarray:
    """Signed codes of a table, a million rows at a time (no second table-sized float temporary)."""
    out = np.empty(weight.shape, dtype=np.int32)
    s, o = torch.tensor(scale), torch.tensor(offset)
    lo, hi = torch.tensor(float(low)), torch.tensor(float(high))
    for start in range(0, weight.shape[0], 1 << 20):
        chunk = weight[start : start + (1 << 20)]
        out[start : start + len(chunk)] = quantize_codes(chunk, s, lo, hi, o).numpy()
    return out
