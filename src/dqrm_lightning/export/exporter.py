"""Export a checkpoint (QAT, or FP32 with post-training quantization) to a DQRM artifact: QAT's convert step.

The checkpoint's quantized parts are rebuilt as the modules that trained them (an
:class:`~dqrm_lightning.quant.embedding.EmbeddingQuantizer` with its saved scales, a
:class:`~dqrm_lightning.quant.linear.FakeQuantizedLinear` per MLP layer), which give the integer codes and grids; the
FP32 tables are read a million rows at a time from the memory-mapped checkpoint, one table resident at a time.

One table is written per table of the model's :class:`~dqrm_lightning.schema.FeatureSchema` (several features may
share one); the quantizer holds a grid per feature (equal for the features of a table), and a table's grid is that of
its first feature. A DCN-v2 model (``architecture: dcn``) also stores its cross network, in FP32. A Criteo DLRM
checkpoint (no ``schema``) exports exactly as before schemas existed: entries keyed by feature, format version 3.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dqrm_lightning.checkpoint import load_file, read_dcp
from dqrm_lightning.export.artifact import CROSSNET_KEYS, ArtifactWriter, check_output_dir, pack_codes
from dqrm_lightning.mapped import release, row_chunks
from dqrm_lightning.names import MLP_ARCHS, QAT_CONFIG_KEY, QUANTIZER_PREFIX, dlrm_key, table_weight_key
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.fake_quant import Mode, grid_from_extrema, qrange, quantize_codes
from dqrm_lightning.quant.linear import FakeQuantizedLinear, linear_kwargs
from dqrm_lightning.schema import FeatureSchema, TableSpec, schema_of

PtqScales = Literal["trained", "init"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict of plain tensors: a single file, or a directory written by TorchRecStrategy
    (torch.distributed.checkpoint shards of any world size, gathered into full tensors). Nothing is unpickled beyond
    tensors and plain Python values.

    Raises:
        CheckpointError: a checkpoint whose loading would run code, or an unreadable one.
    """
    path = Path(path)
    if not path.is_dir():
        return load_file(path)
    from dqrm_lightning.strategies.base import META_FILE

    tensors = read_dcp(path, ("state_dict",))  # checks every file of the directory against its digests first
    return load_file(path / META_FILE) | tensors


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
        ckpt_path: a checkpoint file, or a directory written by TorchRecStrategy.
        out: the artifact directory.
        embedding_bits: FP32 checkpoints: the bits of every table.
        mlp_bits: FP32 checkpoints: the bits of the MLP weights (``None``: FP32).
        ptq_scales: FP32 checkpoints: where the scales come from.
        quantize_mlp: ``False`` keeps MLP weights FP32 even when the model was trained with MLP QAT.
        force: replace ``out`` even when it holds files that are not a previous artifact.

    Raises:
        ValueError: not a DLRMModule checkpoint, or bits that do not fit it.
        ArtifactError: ``out`` holds a user's files.
    """
    check_output_dir(out, force)  # before reading the checkpoint: nothing of the user's is ever overwritten
    checkpoint = read_checkpoint(ckpt_path)
    hp = checkpoint.get("hyper_parameters")
    if not hp or ("num_embeddings_per_feature" not in hp and not hp.get("schema")):
        raise ValueError(f"{ckpt_path}: not a DLRMModule checkpoint (no hyper_parameters)")
    schema, architecture = schema_of(hp), hp.get("architecture") or "dlrm"
    if architecture not in ("dlrm", "dcn"):
        raise ValueError(f"{ckpt_path}: `architecture` must be 'dlrm' or 'dcn', got {architecture!r}")
    legacy = not hp.get("schema") and architecture == "dlrm"  # a Criteo DLRM: written exactly as before schemas
    config, ptq = _quantization(checkpoint, ckpt_path, embedding_bits, mlp_bits, ptq_scales)
    state = checkpoint["state_dict"]
    features = schema.pooled_feature_names  # the embedding quantizer's feature order (TorchRec's SparseArch)
    tables_of = [schema.table_of(feature).name for feature in features]
    table_rows = dict(zip(schema.table_names, schema.table_rows(), strict=True))
    mean_tables = {table.name for table in schema.tables if table.pooling == "mean"}
    rows = [table_rows[table] for table in tables_of]
    quantizer = EmbeddingQuantizer(features, rows, int(hp["embedding_dim"]), config, tables_of, mean_tables)
    quantizer.load_saved(_under(state, QUANTIZER_PREFIX))
    if ptq is None and config.quantizes_embeddings and not quantizer.initialized:
        ptq = "trained"  # never trained with quantization active (e.g. stopped in the FP32 warm-up)
    with ArtifactWriter(out, force) as writer:
        bits = quantizer.table_bits()  # the trained bits (saved with the quantizer), by feature
        tables = []
        for table in schema.tables:
            first = schema.features_of(table.name)[0]  # the features of a table hold equal grids
            stored = state[table_weight_key(table.name)]  # in its stored dtype: _write_table converts a chunk at a time
            identity = _table_identity(schema, table, legacy)
            tables.append(
                _write_table(writer, identity, features.index(first), stored, bits[first], config, quantizer, ptq)
            )
            release(stored)  # of a mapped checkpoint, one table is resident at a time

        layers = [
            _write_layer(writer, name, layer, config if quantize_mlp else None) for name, layer in _mlp_layers(state)
        ]
        crossnet = _write_crossnet(writer, state, hp) if architecture == "dcn" else None
        model = _model_entry(hp, schema, architecture, legacy)
        manifest = _manifest(model, config, ptq, ckpt_path, tables, layers, crossnet)
        manifest["bytes"] = _sizes(tables, layers, crossnet, writer.files)
        writer.finish(manifest)
        return manifest | {"files": writer.files}


def _table_identity(schema: FeatureSchema, table: TableSpec, legacy: bool) -> dict[str, Any]:
    """The start of a table's manifest entry: its name, the features that look it up (interaction order) and its
    pooling; a Criteo artifact from before schemas names only its one feature (``C1`` for table ``t_C1``)."""
    if legacy:
        return {"feature": schema.features_of(table.name)[0]}
    return {"table": table.name, "features": schema.features_of(table.name), "pooling": table.pooling}


def _model_entry(hp: dict[str, Any], schema: FeatureSchema, architecture: str, legacy: bool) -> dict[str, Any]:
    """The manifest's ``model``: the shape hyperparameters, and (not for Criteo DLRMs, whose artifacts stay as before
    schemas) the schema, the architecture and the DCN settings."""
    model: dict[str, Any] = {}
    if not hp.get("schema"):
        model["num_embeddings_per_feature"] = [int(r) for r in hp["num_embeddings_per_feature"]]
    model |= {
        "embedding_dim": int(hp["embedding_dim"]),
        "dense_arch_layer_sizes": list(hp["dense_arch_layer_sizes"]),
        "over_arch_layer_sizes": list(hp["over_arch_layer_sizes"]),
        "feature_names": schema.pooled_feature_names,
    }
    if legacy:
        return model
    model |= {"schema": schema.to_dict(), "architecture": architecture}
    if architecture == "dcn":
        model |= {
            "dcn_num_layers": int(hp.get("dcn_num_layers", 3)),
            "dcn_low_rank_dim": int(hp.get("dcn_low_rank_dim", 64)),
        }
    return model


def _manifest(
    model: dict[str, Any],
    config: QATConfig,
    ptq: PtqScales | None,
    ckpt_path: str | Path,
    tables: list[dict[str, Any]],
    layers: list[dict[str, Any]],
    crossnet: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of an artifact, without its sizes, file list and digest."""
    manifest = {
        "model": model,
        "qat_config": asdict(config),
        "quantization": "qat" if ptq is None else f"ptq ({ptq} scales)",
        "source_checkpoint": str(ckpt_path),
        "tables": tables,
        "mlp": layers,
    }
    return manifest if crossnet is None else manifest | {"crossnet": crossnet}


def _write_crossnet(writer: ArtifactWriter, state: dict[str, torch.Tensor], hp: dict[str, Any]) -> dict[str, Any]:
    """Write a DCN-v2 model's low-rank cross network (``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l``; ``W_l`` (N, r),
    ``V_l`` (r, N), ``b_l`` (N,)) in FP32 and return its manifest entry: QAT does not quantize it, nor does export."""
    prefix = dlrm_key("inter_arch.crossnet.")
    num_layers = int(hp.get("dcn_num_layers", 3))
    layers = []
    for layer in range(num_layers):
        files = {}
        for key in CROSSNET_KEYS:
            name = f"{prefix}{key}.{layer}"
            if name not in state:
                raise ValueError(f"the DCN checkpoint lacks {name!r} (`dcn_num_layers` is {num_layers})")
            files[key] = writer.add(f"crossnet/{key}.{layer}.bin", state[name].detach().float().numpy())
        layers.append(files)
    in_features, low_rank = state[f"{prefix}W_kernels.0"].shape if num_layers else (0, 0)
    return {"bits": 32, "in_features": int(in_features), "low_rank": int(low_rank), "layers": layers}


def _sizes(
    tables: list[dict[str, Any]],
    layers: list[dict[str, Any]],
    crossnet: dict[str, Any] | None,
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The manifest's ``bytes``: ``payload`` (its files), ``model`` (the payload plus the fp16 scale and offset of
    each per-table quantized table, kept in the manifest: :func:`~dqrm_lightning.export.size.quantized_model_bytes`),
    ``scale_bias`` (the tables' scales and offsets, included in both), ``tables`` (the stored tables) and the FP32
    counterparts (tables, MLP weights and biases, the DCN cross network) with their ratios."""
    payload = sum(meta["bytes"] for meta in files.values())
    in_manifest = 4 * sum(1 for t in tables if t["bits"] != 32 and "scale_bias" not in t)
    per_row = sum(files[t["scale_bias"]]["bytes"] for t in tables if "scale_bias" in t)
    stored_tables = in_manifest + per_row + sum(files[t["file"]]["bytes"] for t in tables)
    fp32_tables = sum(4 * t["rows"] * t["dim"] for t in tables)
    fp32_mlp = sum(
        4 * (out * width + (out if "bias" in layer else 0)) for layer in layers for out, width in [layer["shape"]]
    )
    fp32_crossnet = sum(files[name]["bytes"] for layer in (crossnet or {}).get("layers", []) for name in layer.values())
    fp32_model = fp32_tables + fp32_mlp + fp32_crossnet
    return {
        "payload": payload,
        "model": payload + in_manifest,
        "scale_bias": in_manifest + per_row,
        "tables": stored_tables,
        "fp32_model": fp32_model,
        "fp32_tables": fp32_tables,
        "ratio": payload / fp32_model,
        "table_ratio": stored_tables / fp32_tables,
    }


def _quantization(
    checkpoint: dict[str, Any],
    ckpt_path: str | Path,
    embedding_bits: int | None,
    mlp_bits: int | None,
    ptq_scales: PtqScales,
) -> tuple[QATConfig, PtqScales | None]:
    """The quantization to export: a QAT checkpoint's own (no PTQ), or PTQ of an FP32 checkpoint at the given bits."""
    if QAT_CONFIG_KEY in checkpoint:
        if embedding_bits is not None or mlp_bits is not None:
            raise ValueError(f"{ckpt_path} was trained with QAT ({checkpoint[QAT_CONFIG_KEY]}); its bits are fixed")
        return QATConfig(**checkpoint[QAT_CONFIG_KEY]), None
    if embedding_bits is None:
        raise ValueError(f"{ckpt_path} is an FP32 checkpoint: give `embedding_bits` for post-training quantization")
    if ptq_scales not in ("trained", "init"):
        raise ValueError(f"`ptq_scales` must be 'trained' or 'init', got {ptq_scales!r}")
    # embedding_bits 32: an FP32 artifact (the baseline of inference benchmarks)
    return QATConfig(embedding_bits=None if embedding_bits == 32 else embedding_bits, mlp_bits=mlp_bits), ptq_scales


def _write_table(
    writer: ArtifactWriter,
    identity: dict[str, Any],
    f: int,
    weight: torch.Tensor,
    bits: int | None,
    config: QATConfig,
    quantizer: EmbeddingQuantizer,
    ptq: PtqScales | None,
) -> dict[str, Any]:
    """Write a table (FP32, or unsigned codes at ``bits``) on the grid of the quantizer's feature ``f`` and return its
    manifest entry, which starts with ``identity`` (:func:`_table_identity`). ``weight`` is the table as trained
    (float32 or float16: an FP32 table of float16 training holds its values exactly)."""
    name, (rows, dim) = identity.get("table", identity.get("feature")), weight.shape
    entry: dict[str, Any] = identity | {"rows": int(rows), "dim": int(dim), "mode": config.embedding_mode}
    if bits is None:
        entry |= {"bits": 32, "scale": 1.0, "offset": 0.0}
        entry["file"] = writer.add(f"tables/{name}.bin", _packed_rows(weight, 32, lambda chunk: chunk.numpy()))
        return entry
    if config.embedding_granularity == "per_row":  # each row's own grid, as QAT computed it from the same rows
        codes, scale_bias = _row_wise_codes(weight, bits, config.embedding_mode, quantizer, f)
        entry |= {"bits": bits, "granularity": "per_row"}
        entry["scale_bias"] = writer.add(f"tables/{name}.sb.bin", scale_bias)
        entry["file"] = writer.add(f"tables/{name}.bin", pack_codes(codes, bits))
        return entry
    if ptq is None:  # the QAT model's frozen grid
        grid_scale, grid_offset = (quantizer.per_feature(t.detach()) for t in quantizer.grid())  # as QAT used it
        scale, offset = float(grid_scale[f]), float(grid_offset[f])
    else:
        scale, offset = _ptq_grid(weight, bits, config, ptq)
    low, high = qrange(bits, config.embedding_mode)
    # symmetric: unsigned codes u = q + 2^(b-1), value = u * s - 2^(b-1) * s
    shift = 2 ** (bits - 1) if config.embedding_mode == "symmetric" else 0
    s, o = torch.tensor(scale), torch.tensor(offset)
    lo, hi = torch.tensor(float(low)), torch.tensor(float(high))
    packed = _packed_rows(weight, bits, lambda chunk: quantize_codes(chunk, s, lo, hi, o).numpy() + shift)
    entry |= {"bits": bits, "scale": scale, "offset": -shift * scale if shift else offset}
    entry["file"] = writer.add(f"tables/{name}.bin", packed)
    return entry


def _ptq_grid(weight: torch.Tensor, bits: int, config: QATConfig, ptq: PtqScales) -> tuple[float, float]:
    """PTQ (scale, offset) of one table, from the trained table or the initial one."""
    if ptq == "init":  # the reference code's PTQ: scales of the random initial table, U(-1/sqrt(rows), 1/sqrt(rows))
        bound = torch.tensor(1.0 / math.sqrt(weight.shape[0]))
        low, high = -bound, bound
    else:
        low, high = (value.float() for value in torch.aminmax(weight))
    scale, offset = grid_from_extrema(low, high, bits, config.embedding_mode)
    return float(scale), float(offset)


def _mlp_layers(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(name, state) of every MLP layer, bottom MLP first, each in forward order (``dense_arch.model._mlp.0._linear``
    and its ``weight``, ``bias``, ...)."""
    layers = []
    for arch in MLP_ARCHS:
        arch_state = _under(state, dlrm_key(f"{arch}."))
        names = [key.removesuffix(".weight") for key, value in arch_state.items() if key.endswith(".weight")]
        names = [name for name in names if arch_state[f"{name}.weight"].dim() == 2]
        names.sort(key=lambda name: [int(t) for t in re.findall(r"\d+", name)])
        layers += [(f"{arch}.{name}", _under(arch_state, f"{name}.")) for name in names]
    return layers


def _write_layer(
    writer: ArtifactWriter, name: str, state: dict[str, torch.Tensor], config: QATConfig | None
) -> dict[str, Any]:
    """Write one MLP layer (float32, or unsigned codes and a scale per row at ``config.mlp_bits``; ``config`` None:
    FP32) and return its manifest entry."""
    weight, bias = state["weight"], state.get("bias")
    entry: dict[str, Any] = {"name": name, "arch": name.split(".")[0], "shape": list(weight.shape)}
    base = f"mlp/{name}"
    layer = None
    if config is None or config.mlp_bits is None:
        entry |= {"bits": 32, "weight": writer.add(f"{base}.w.bin", weight.float().numpy())}
    else:
        layer = FakeQuantizedLinear.from_saved(state, **linear_kwargs(config))
        codes, scale, bias = layer.integer_weight()  # bias: as the QAT model used it
        unsigned = (codes + 2 ** (layer.bits - 1)).numpy()
        entry |= {
            "bits": layer.bits,
            "weight": writer.add(f"{base}.w.bin", pack_codes(unsigned, layer.bits)),
            "scale": writer.add(f"{base}.s.bin", scale.reshape(-1).float().numpy()),
        }
    if bias is not None:
        entry["bias"] = writer.add(f"{base}.b.bin", bias.detach().float().numpy())
    if layer is not None and layer.activation_bits is not None:
        entry |= {"activation_bits": layer.activation_bits, "activation_scale": float(layer.activation_scale())}
    return entry


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` below ``prefix``, keyed without it."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _row_wise_codes(
    weight: torch.Tensor, bits: int, mode: Mode, quantizer: EmbeddingQuantizer, f: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes (rows, D) of table ``f`` on each row's own grid (the QAT forward's, with its learned clipping
    ratio if any), and the grids as float16 (rows, 2) ``(scale, bias)`` (FBGEMM's row-wise format: value ``u * scale
    + bias``), a million rows at a time."""
    codes = np.empty(weight.shape, dtype=np.int32)
    scale_bias = np.empty((weight.shape[0], 2), dtype=np.float16)
    low, high = qrange(bits, mode)
    lo, hi = torch.tensor(float(low)), torch.tensor(float(high))
    for start in range(0, weight.shape[0], 1 << 20):
        chunk = weight[start : start + (1 << 20)].float()  # (n, D)
        with torch.no_grad():
            scale, grid_offset = quantizer.grid_of(chunk, f)  # (n, 1) each
        offset = torch.zeros_like(scale) if grid_offset is None else grid_offset
        chunk_codes = quantize_codes(chunk, scale, lo, hi, offset)
        if mode == "symmetric":  # unsigned codes u = q + 2^(b-1): value = u * s - 2^(b-1) * s
            chunk_codes += 2 ** (bits - 1)
            offset = -(2 ** (bits - 1)) * scale
        codes[start : start + len(chunk)] = chunk_codes.numpy()
        scale_bias[start : start + len(chunk)] = torch.cat([scale, offset], dim=1).half().numpy()
    return codes, scale_bias


def _packed_rows(weight: torch.Tensor, bits: int, encode: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
    """A table's packed codes (:func:`pack_codes`), a piece of rows at a time
    (:func:`~dqrm_lightning.mapped.row_chunks`, which releases each piece of a mapped checkpoint once read): ``encode``
    maps float32 rows to unsigned codes (or float32 values at 32 bits), so no table-sized float or code temporary
    exists beside the output."""
    out: np.ndarray | None = None
    start = 0
    for piece in row_chunks(weight):
        packed = pack_codes(encode(piece.float()), bits)
        if out is None:
            out = np.empty((weight.shape[0], packed.shape[1]), dtype=np.uint8)
        out[start : start + len(packed)] = packed
        start += len(packed)
    return out if out is not None else pack_codes(encode(weight.float()), bits)
