"""The DQRM model artifact: packed integer tables and MLPs plus a JSON manifest. No pickle anywhere.

Layout of an artifact directory::

    manifest.json          format, model shape, QAT settings, one entry per table and MLP layer, sha256 of each file,
                           and the sha256 of the manifest itself (``digest``)
    tables/C1.bin ...      table codes, row-major, packed: INT2 four per byte, INT4 two per byte (element 2k in the low
                           nibble, as FBGEMM), INT8 one byte, INT16 two bytes (little endian), FP32 four bytes
    tables/C1.sb.bin ...   row-wise tables only: float16 (rows, 2), each row's scale and bias
    mlp/<layer>.w.bin      MLP weight codes (INT4 packed two per byte, INT8) or float32 weights
    mlp/<layer>.s.bin      float32 scale per output row (quantized layers)
    mlp/<layer>.b.bin      float32 bias (the value the QAT model used)
    crossnet/<k>.<l>.bin   DCN-v2 models only: float32 ``W_kernels`` (N, r), ``V_kernels`` (r, N) and ``bias`` (N,) of
                           cross layer l (the cross network is not quantized)

A Criteo DLRM's table entries name their one feature (``"feature": "C1"``, files ``tables/C1.bin``, format version 3).
An artifact of any other model (format version 4) records the model's ``schema`` and ``architecture`` (``dlrm`` or
``dcn``, with ``dcn_num_layers`` and ``dcn_low_rank_dim``) under ``model``, and one entry per table: its name
(``"table"``, files ``tables/<table>.bin``), the ``features`` that look it up and its ``pooling`` (``sum`` or
``mean``).

Codes are stored unsigned: ``u = q + 2^(b-1)`` for the symmetric grid (``q`` signed), ``u = q`` for the asymmetric
one; each table's value is ``u * scale + offset`` with a float16-exact ``scale`` and ``offset`` (``offset =
-2^(b-1) * scale`` for symmetric tables), which is exactly FBGEMM's row-wise INT-N format with the same scale and bias
on every row. A row-wise table (entry ``"granularity": "per_row"``) has instead its own scale and bias per row, in
the ``scale_bias`` file of its entry.

Loading checks the manifest's own digest, every file's size and sha256, that file names stay inside the artifact,
and that each table's and layer's file has the shape its entry describes, before use: a tampered, truncated or
incomplete artifact is refused with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dqrm_lightning.checkpoint import file_sha256
from dqrm_lightning.names import table_name

FORMAT = "dqrm-artifact"
# 2: the manifest carries its own sha256 (``digest``); 3: row-wise tables (``scale_bias`` files); 4: any feature schema
# (tables named, shared by features, pooled sum or mean) and DCN-v2 models
VERSION = 4
_READS = (2, 3, VERSION)  # version 2 artifacts are version 3 ones without row-wise tables, 3 Criteo DLRMs of 4
CROSSNET_KEYS = ("W_kernels", "V_kernels", "bias")  # the parameters of each DCN-v2 cross layer
_DTYPES = ("|u1", "<f4", "<f2")  # what the writer stores: packed codes (bytes), float32 and float16 arrays


class ArtifactError(ValueError):
    """An artifact that cannot be trusted or read (missing, tampered, truncated, unknown format)."""


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (rows, D) into bytes (rows, D * bits / 8); element k of a byte in bits [k*b, (k+1)*b)."""
    codes = np.asarray(codes)
    if bits == 32:
        return np.ascontiguousarray(codes, dtype="<f4").view(np.uint8)
    if bits == 16:
        return np.ascontiguousarray(codes, dtype="<u2").view(np.uint8)
    if bits == 8:
        return codes.astype(np.uint8)
    per_byte = 8 // bits
    rows, dim = codes.shape
    padded = -(-dim // per_byte) * per_byte  # rows are padded with zero codes to whole bytes
    grouped = np.zeros((rows, padded), dtype=np.uint8)
    grouped[:, :dim] = codes
    grouped = grouped.reshape(rows, padded // per_byte, per_byte)
    packed = np.zeros((rows, padded // per_byte), dtype=np.uint8)
    for k in range(per_byte):
        packed |= grouped[:, :, k] << np.uint8(k * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` for a (N, bytes) uint8 tensor -> (N, dim) float32 codes (int for 8/16 bits)."""
    if bits == 32:
        return packed.contiguous().view(torch.float32).reshape(-1, dim)
    if bits == 16:
        return packed.contiguous().view(torch.int16).reshape(-1, dim).to(torch.int32) & 0xFFFF
    if bits == 8:
        return packed.to(torch.int32)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed.to(torch.int32) >> (k * bits)) & mask for k in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)[:, :dim]


@dataclass
class Artifact:
    """A loaded, verified artifact: the manifest and its arrays (numpy, memory-mapped where large)."""

    path: Path
    manifest: dict[str, Any]
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # by :func:`entry_name`
    scale_bias: dict[str, np.ndarray] = field(default_factory=dict)  # row-wise tables: float16 (rows, 2)
    mlp: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    crossnet: list[dict[str, np.ndarray]] = field(default_factory=list)  # DCN-v2: each layer's CROSSNET_KEYS


def entry_name(table: dict[str, Any]) -> str:
    """The name a table entry of the manifest is known by: its table (version 4), or its one feature (a Criteo
    artifact: ``C1``, whose table is ``t_C1``)."""
    return str(table["table"]) if "table" in table else str(table["feature"])


def entry_table(table: dict[str, Any]) -> str:
    """The TorchRec table name of a table entry (``t_C1`` for a Criteo entry ``C1``)."""
    return str(table["table"]) if "table" in table else table_name(table["feature"])


def entry_features(table: dict[str, Any]) -> list[str]:
    """The features looking up a table entry's table."""
    return list(table["features"]) if "table" in table else [table["feature"]]


def format_version(manifest: dict[str, Any]) -> int:
    """The format version an artifact is written in: 3 for a Criteo DLRM (read by earlier versions too), else 4."""
    return VERSION if "schema" in manifest["model"] else 3


def check_output_dir(out: str | Path, force: bool = False) -> None:
    """Refuse an output path that would lose a user's files: an existing file, or a non-empty directory that is not
    a previous artifact (``force`` replaces it anyway). A previous artifact is replaced, as re-exporting expects.

    Raises:
        ArtifactError: naming the path and what it holds.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"`--out {out}` is an existing file: give a directory path for the artifact")
    if force or not any(out.iterdir()) or _is_artifact(out):
        return
    held = sorted(p.name for p in out.iterdir())
    shown = ", ".join(held[:3]) + (f" (+{len(held) - 3} more)" if len(held) > 3 else "")
    raise ArtifactError(
        f"`--out {out}` is a directory holding files that are not a dqrm artifact ({shown}); "
        "choose another directory, or pass --force to replace it"
    )


def _is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class ArtifactWriter:
    """Writes files under a temporary directory and moves it into place with its manifest at the end; on any error
    the temporary directory is removed (use it as a context manager), so a failed export leaves nothing behind.

    Args:
        out: the artifact directory (checked with :func:`check_output_dir` before anything is written).
        force: replace ``out`` even if it holds other files.
    """

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.out = Path(out)
        check_output_dir(self.out, force)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # already moved into place after `finish`

    def add(self, name: str, array: np.ndarray) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.ascontiguousarray(array)
        array.tofile(path)
        self.files[name] = {
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }
        return name

    def finish(self, manifest: dict[str, Any]) -> Path:
        manifest = {"format": FORMAT, "version": format_version(manifest), **manifest, "files": self.files}
        manifest["digest"] = manifest_digest(manifest)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``digest`` entry (keys sorted): any edit of the manifest changes it."""
    content = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def row_bytes(bits: int, dim: int) -> int:
    """Bytes of one packed row of ``dim`` codes at ``bits`` (rows are padded to whole bytes)."""
    return dim * bits // 8 if bits >= 8 else -(-dim // (8 // bits))


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and verify an artifact; never executes code from it.

    ``verify=False`` skips only the sha256 of the data files (sizes, shapes and the manifest are always checked).

    Raises:
        ArtifactError: missing or modified manifest, unknown format, a file missing, truncated, modified (sha256
            mismatch), outside the artifact, or not of the shape its entry describes.
    """
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise ArtifactError(f"{root}: not a DQRM artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: unreadable manifest (not a JSON object)")
    if manifest.get("format") != FORMAT or manifest.get("version") not in _READS:
        raise ArtifactError(
            f"{manifest_path}: format {manifest.get('format')!r} v{manifest.get('version')} unsupported "
            f"(this version reads {FORMAT!r} v{'/v'.join(map(str, _READS))}; export the checkpoint again)"
        )
    if manifest.get("digest") != manifest_digest(manifest):
        raise ArtifactError(f"{manifest_path}: digest mismatch (the manifest was modified)")
    try:
        arrays = {name: _open_file(root, name, meta, verify) for name, meta in manifest["files"].items()}
        artifact = Artifact(root, manifest)
        for table in manifest["tables"]:
            _load_table(artifact, arrays, table, manifest_path)
        for layer in manifest["mlp"]:
            files = {key: layer[key] for key in ("weight", "scale", "bias") if layer.get(key)}
            artifact.mlp[layer["name"]] = {
                key: _entry_file(arrays, name, manifest_path, f"layer {layer['name']} {key}")
                for key, name in files.items()
            }
        architecture = manifest["model"].get("architecture", "dlrm")
        if architecture not in ("dlrm", "dcn"):
            raise ArtifactError(f"{manifest_path}: unknown architecture {architecture!r} (not 'dlrm' or 'dcn')")
        if architecture == "dcn":  # its cross network is part of the model: never run without it
            _load_crossnet(artifact, arrays, manifest["crossnet"], manifest_path)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{manifest_path}: incomplete manifest ({type(err).__name__}: {err})") from None
    return artifact


def _load_table(artifact: Artifact, arrays: dict[str, np.ndarray], table: dict[str, Any], manifest_path: Path) -> None:
    """Check a table entry's files against it and keep them in ``artifact``."""
    name, root = entry_name(table), artifact.path
    array = _entry_file(arrays, table["file"], manifest_path, f"table {name}")
    _check_shape(root / table["file"], array, (table["rows"], row_bytes(table["bits"], table["dim"])))
    artifact.tables[name] = array
    if table.get("pooling", "sum") not in ("sum", "mean"):
        raise ArtifactError(f"{manifest_path}: table {name} has pooling {table['pooling']!r} (not 'sum' or 'mean')")
    if table.get("scale_bias"):
        scale_bias = _entry_file(arrays, table["scale_bias"], manifest_path, f"table {name}")
        _check_shape(root / table["scale_bias"], scale_bias, (table["rows"], 2), np.float16)
        artifact.scale_bias[name] = scale_bias


def _load_crossnet(
    artifact: Artifact, arrays: dict[str, np.ndarray], crossnet: dict[str, Any], manifest_path: Path
) -> None:
    """Check a DCN-v2 cross network's files against their shapes: ``W`` (N, r), ``V`` (r, N), ``bias`` (N,)."""
    n, r = int(crossnet["in_features"]), int(crossnet["low_rank"])
    shapes = {"W_kernels": (n, r), "V_kernels": (r, n), "bias": (n,)}
    for index, layer in enumerate(crossnet["layers"]):
        loaded = {}
        for key in CROSSNET_KEYS:
            array = _entry_file(arrays, layer[key], manifest_path, f"cross layer {index} {key}")
            if array.dtype != np.float32 or tuple(array.shape) != shapes[key]:
                raise ArtifactError(
                    f"{artifact.path / layer[key]}: holds {array.dtype} {list(array.shape)}, cross layer {index} "
                    f"needs float32 {list(shapes[key])}"
                )
            loaded[key] = array
        artifact.crossnet.append(loaded)


def _open_file(root: Path, name: str, meta: dict[str, Any], verify: bool) -> np.ndarray:
    """Memory-map one file of the artifact after checking its name, size, sha256, dtype and shape."""
    relative = Path(name)
    inside = not relative.is_absolute() and ".." not in relative.parts
    if not inside or not (root / relative).resolve().is_relative_to(root.resolve()):  # also through a symlink
        raise ArtifactError(f"{root}/manifest.json: refused: the file {name!r} lies outside the artifact")
    file = root / name
    if not file.is_file():
        raise ArtifactError(f"{file}: missing")
    size = file.stat().st_size
    if size != meta["bytes"]:
        raise ArtifactError(f"{file}: {size} bytes, the manifest says {meta['bytes']} (truncated or modified)")
    if verify and file_sha256(file) != meta["sha256"]:
        raise ArtifactError(f"{file}: sha256 mismatch (the file was modified)")
    if meta["dtype"] not in _DTYPES:
        raise ArtifactError(f"{file}: unsupported dtype {meta['dtype']!r} (expected one of {_DTYPES})")
    dtype = np.dtype(meta["dtype"])
    shape = tuple(int(n) for n in meta["shape"])
    if math.prod(shape) * dtype.itemsize != size:
        raise ArtifactError(f"{file}: shape {list(shape)} of {dtype} does not fill its {size} bytes")
    if size == 0:
        return np.zeros(shape, dtype=dtype)  # a memory map cannot be empty
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


def _entry_file(arrays: dict[str, np.ndarray], name: str, manifest_path: Path, what: str) -> np.ndarray:
    if name not in arrays:
        raise ArtifactError(f"{manifest_path}: {what} names the file {name!r}, which the manifest does not list")
    return arrays[name]


def _check_shape(file: Path, array: np.ndarray, expected: tuple[int, int], dtype: type = np.uint8) -> None:
    if array.ndim == 2 and array.dtype == dtype and tuple(array.shape) == expected:
        return
    raise ArtifactError(
        f"{file}: holds {array.dtype} {list(array.shape)}, its table entry needs {np.dtype(dtype)} {list(expected)}"
    )


def scale_bias(artifact: Artifact, table: dict[str, Any]) -> torch.Tensor:
    """(rows, 2) float16 ``(scale, bias)`` of every row of a quantized table (manifest entry ``table``): its own per
    row for a row-wise table, the table's on every row (a broadcast view) otherwise. A row's value is
    ``codes * scale + bias``, as in FBGEMM's row-wise INT-N format."""
    if entry_name(table) in artifact.scale_bias:
        return torch.from_numpy(np.array(artifact.scale_bias[entry_name(table)]))
    return torch.tensor([table["scale"], table["offset"]], dtype=torch.float16).expand(table["rows"], 2)


def mlp_weight_codes(layer: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantized MLP layer's signed integer codes ``q`` (out, in) as float32 and its float32 scale per output row
    (out, 1); an FP32 layer's weight and ``None``. The layer computes with the weight ``q * scale``."""
    weight = torch.from_numpy(np.array(arrays["weight"]))
    out_features, in_features = layer["shape"]
    bits = layer["bits"]
    if bits == 32:
        return weight.view(torch.float32).reshape(out_features, in_features), None
    codes = unpack_codes(weight, bits, in_features).float() - 2 ** (bits - 1)
    return codes, torch.from_numpy(np.array(arrays["scale"])).reshape(-1, 1)


def dequantized_mlp_weight(layer: dict[str, Any], arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """The float32 weight a quantized MLP layer computes with: ``q * s`` per output row."""
    codes, scale = mlp_weight_codes(layer, arrays)
    return codes if scale is None else codes * scale
