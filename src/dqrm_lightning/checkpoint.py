"""Loading checkpoints without running code from them.

Checkpoints of this project hold tensors and plain Python values only, so every load here refuses anything else:

* single files: ``torch.load(weights_only=True)``; a file that needs more (a pickled object whose unpickling would call
  a function, e.g. ``os.system``) is refused with :class:`CheckpointError` naming it, before anything of it runs;
* ``torch.distributed.checkpoint`` directories (written by :class:`~dqrm_lightning.strategies.TorchRecStrategy`): the
  training state file loads with ``weights_only=True``; torch keeps the directory's metadata in a plain pickle
  (``.metadata``) and loads non-tensor values with ``weights_only=False``. :class:`SafeFileSystemReader` reads the
  metadata with an unpickler that only builds torch's checkpoint metadata classes, and :class:`SafeLoadPlanner`
  loads non-tensor values with ``weights_only=True``; shard files must lie inside the directory.

``dqrm`` subcommands load through these (``SafeCheckpointIO`` for single files under any strategy).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from typing_extensions import override

from dqrm_lightning.mapped import CHUNK_BYTES, row_chunks


class CheckpointError(ValueError):
    """A checkpoint that is refused (it would run code when loaded, or is unreadable) or does not fit the model."""


_REFUSED = (
    "refused: it holds pickled objects other than tensors and plain Python values, and loading them could run code "
    "from the file (checkpoints written by dqrm never do)"
)


def _refuse(path: _PATH, err: BaseException) -> CheckpointError:
    detail = str(err).strip().splitlines()
    reason = next((line for line in detail if "nsupported" in line and ("global" in line or "GLOBAL" in line)), "")
    return CheckpointError(f"{path}: {_REFUSED}" + (f" [{reason.strip()}]" if reason else ""))


def check_weights_only(weights_only: bool | None, path: _PATH) -> None:
    """Refuse ``weights_only=False``: nothing here unpickles objects."""
    if weights_only is False:
        raise CheckpointError(
            f"{path}: `weights_only=False` is not supported: checkpoints are loaded without unpickling objects"
        )


_INTEGRITY = "integrity"


def content_digest(checkpoint: Any) -> str:
    """sha256 over a checkpoint's content: every tensor's key path, dtype, shape and bytes, and every other value's
    ``repr`` (keys sorted), so a checkpoint written and read back hashes the same and one changed byte does not.
    Tensors are read a piece at a time (:func:`~dqrm_lightning.mapped.row_chunks`)."""
    digest = hashlib.sha256()

    def visit(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            for piece in row_chunks(tensor):  # a mapped tensor is never resident as a whole
                digest.update(piece.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            for name in sorted(value, key=str):
                visit(value[name], f"{key}/{name}")
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                visit(item, f"{key}[{index}]")
        else:
            digest.update(f"{key}={value!r};".encode())

    visit({k: v for k, v in checkpoint.items() if k != _INTEGRITY}, "")
    return digest.hexdigest()


def verify_integrity(checkpoint: Any, path: _PATH) -> Any:
    """Check (and remove) the digest a checkpoint was written with; checkpoints without one load as they are."""
    if not isinstance(checkpoint, dict) or _INTEGRITY not in checkpoint:
        return checkpoint
    expected = checkpoint.pop(_INTEGRITY)
    recorded = expected.get("sha256") if isinstance(expected, dict) else None
    if recorded != content_digest(checkpoint):
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its content does not match the sha256 digest written with it "
            "(changed or damaged bytes); use another checkpoint (e.g. the previous last.ckpt or best.ckpt)"
        )
    return checkpoint


DIGESTS_FILE = "digests.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_directory_digests(path: _PATH) -> None:
    """Record the sha256 of every file of a checkpoint directory in its ``digests.json`` (after all are written)."""
    directory = Path(path)
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != DIGESTS_FILE)
    digests = {name: file_sha256(directory / name) for name in files}
    (directory / DIGESTS_FILE).write_text(json.dumps({"sha256": digests}, indent=1, sort_keys=True))


def verify_directory(path: _PATH) -> None:
    """Check a checkpoint directory's files against its ``digests.json``: a changed, missing or added file is refused
    naming it. Directories written before digests existed (no ``digests.json``) load as they are."""
    directory = Path(path)
    record = directory / DIGESTS_FILE
    if not record.exists():
        return
    try:
        expected = json.loads(record.read_text())["sha256"]
        assert isinstance(expected, dict)
    except Exception:
        raise CheckpointError(f"{record}: corrupt checkpoint digests (not the JSON written with it)") from None
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != DIGESTS_FILE}
    for name in sorted(set(expected) | present):
        if name not in present:
            raise CheckpointError(f"{directory / name}: missing from the checkpoint directory")
        if name not in expected:
            raise CheckpointError(f"{directory / name}: not part of the checkpoint (not in its {DIGESTS_FILE})")
        if file_sha256(directory / name) != expected[name]:
            raise CheckpointError(
                f"{directory / name}: corrupt checkpoint: the file does not match the sha256 digest written with it "
                "(changed or damaged bytes); use another checkpoint (e.g. the previous last.ckpt or best.ckpt)"
            )


def load_file(path: _PATH, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True, mmap=True)``, with :class:`CheckpointError` naming the file when it is
    refused or its content does not match its digest.

    The file is mapped, not read: its digest is checked a piece at a time, and tensors whose storage holds at least
    :data:`~dqrm_lightning.mapped.CHUNK_BYTES` stay in the mapping (read them with
    :func:`~dqrm_lightning.mapped.copy_rows` or :func:`~dqrm_lightning.mapped.row_chunks`, which release what they
    read), so loading never holds a second copy of the tables. Smaller tensors are copied out of it: the state that
    lives on after loading (an optimizer's) does not keep the file open.
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=_is_zip(path))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:
        raise load_error(path, err) from None
    return _unmap_small(verify_integrity(checkpoint, path))


def _is_zip(path: _PATH) -> bool:
    """Whether ``path`` is in torch's zip format, the one that can be mapped (torch's legacy format, from
    ``_use_new_zipfile_serialization=False``, is read into memory instead)."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return True  # let torch.load name the problem


def _unmap_small(value: Any) -> Any:
    """``value`` with every tensor whose storage is smaller than ``CHUNK_BYTES`` copied into memory of its own (the
    tables, views of one large storage when saved from one process, stay mapped)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.untyped_storage().nbytes() < CHUNK_BYTES else value
    if isinstance(value, dict):
        return {key: _unmap_small(item) for key, item in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_unmap_small(item) for item in value)
    return value


def load_error(path: _PATH, err: BaseException) -> CheckpointError:
    """The :class:`CheckpointError` for an exception of ``torch.load(path, weights_only=True)``."""
    if isinstance(err, pickle.UnpicklingError):
        return _refuse(path, err)
    # empty, truncated or not a torch file (EOFError, RuntimeError, KeyError, ...)
    return CheckpointError(f"{path}: unreadable checkpoint ({_describe(err)})")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO for single files, loading with ``weights_only=True`` whatever it is asked, and
    writing to a temporary name renamed into place, so a process killed while saving leaves the previous checkpoint
    intact (``--ckpt_path last`` then resumes from it). Each file carries a sha256 digest of its content, checked on
    every load: a damaged file is refused naming it, never loaded. Neither saving nor loading holds a second copy of
    the tables in memory (:func:`load_file`)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by `{type(self).__name__}`, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        checkpoint = {**checkpoint, _INTEGRITY: {"sha256": content_digest(checkpoint)}}
        # straight to the file: torch writes each storage from its own memory (Lightning's save would first
        # serialize the whole checkpoint into memory, a second copy of the tables)
        torch.save(checkpoint, partial)
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # on disk before it replaces the previous checkpoint
        finally:
            os.close(descriptor)
        os.replace(partial, target)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        check_weights_only(weights_only, path)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if Path(path).is_dir():
            raise CheckpointError(
                f"{path} is a directory (a distributed checkpoint): load it with `--trainer.strategy torchrec`"
            )
        return load_file(path, map_location)


# ------------------------------------------------------------------------------- torch.distributed.checkpoint
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "torch": {"Size"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds torch's checkpoint metadata (dataclasses, ``torch.Size``, dtypes) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def read_dcp_metadata(path: str | os.PathLike[str]) -> Metadata:
    """The metadata of a ``torch.distributed.checkpoint`` directory, unpickled with an allowlist."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a distributed checkpoint (no .metadata)") from None
    except pickle.UnpicklingError as err:
        raise _refuse(file, err) from None
    except Exception as err:  # truncated or not a pickle (EOFError, KeyError, ...)
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({_describe(err)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not checkpoint metadata (found {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if (
            PurePosixPath(relative).name != relative
            or PureWindowsPath(relative).name != relative
            or relative in ("", ".", "..")
        ):
            raise CheckpointError(f"{file}: refused: a shard file {relative!r} outside the checkpoint directory")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :func:`read_dcp_metadata` (no arbitrary unpickling)."""

    @override
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not supported")
        metadata = read_dcp_metadata(self.path)
        if metadata.storage_meta is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor values with ``weights_only=True``."""

    @override
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refuse(f"checkpoint entry {read_item.dest_index.fqn}", err) from None
        wrapped = io.BytesIO()
        torch.save(loaded, wrapped)  # the parent class loads it again: now a value that needs no unpickling of code
        wrapped.seek(0)
        super().load_bytes(read_item, wrapped)


def load_dcp(state_dict: dict[str, Any], path: _PATH, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``path`` into ``state_dict`` (in place), without arbitrary unpickling.

    Raises:
        CheckpointError: refused or unreadable metadata or values (also when torch wraps it for all ranks).
    """
    read_dcp_metadata(path)  # checked here first: torch would log the error and retry with per-rank metadata
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as err:
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise


def read_dcp(path: _PATH, top_level: tuple[str, ...] = ("state_dict",)) -> dict[str, Any]:
    """The entries under ``top_level`` keys of a distributed checkpoint as full tensors (any world size wrote it)."""
    verify_directory(path)
    metadata = read_dcp_metadata(path)
    mappings = metadata.planner_data or {}
    target: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        keys = tuple(mappings.get(fqn, tuple(fqn.split(".", 1))))
        if keys[0] not in top_level:
            continue
        if isinstance(entry, TensorStorageMetadata):
            value: Any = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            value = None
        else:
            raise CheckpointError(f"{path}: unsupported checkpoint entry {fqn} ({type(entry).__name__})")
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    if target:
        load_dcp(target, path, no_dist=True)
    return target
