"""Reading large tensors of a memory-mapped checkpoint without keeping them resident.

A tensor loaded with ``torch.load(mmap=True)`` lives in a mapping of the file: its pages become resident (and count in
the process's RSS) as they are read, and stay so until released. :func:`release` drops them
(``madvise(MADV_DONTNEED)``; a later read brings them back from the file), and :func:`row_chunks` and
:func:`copy_rows` read a tensor a bounded number of bytes at a time, releasing each piece once read, so reading a
checkpoint's tables keeps about one piece of them resident at a time (not a second copy of the tables).

Only pages of a file-backed mapping are released (checked in ``/proc/self/maps``): other memory (a model's own
tensors) is never touched, and on systems other than Linux nothing is released. The pieces released must only have
been read: a page of a private mapping that was written to would return to the file's content.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 64 << 20  # bytes of a tensor read at a time
_MADV_DONTNEED = 4  # Linux
_PAGE = mmap.PAGESIZE


def _madvise() -> Any:
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def _file_backed(start: int, end: int) -> bool:
    """Whether the addresses ``[start, end)`` lie in one mapping of a file (not anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start < high:
            inode, name = fields[4], fields[5] if len(fields) > 5 else ""
            return end <= high and inode != "0" and not name.startswith("[")
    return False


def release(tensor: torch.Tensor) -> None:
    """Drop the resident pages wholly inside ``tensor``'s memory when it lies in a file mapping (e.g. a tensor of
    ``torch.load(mmap=True)``) that was only read; anything else is left as it is."""
    if _MADVISE is None or tensor.device.type != "cpu" or tensor.numel() == 0 or min(tensor.stride(), default=0) < 0:
        return
    start = tensor.data_ptr()
    span = (sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)) + 1) * (
        tensor.element_size()
    )
    first, end = -(-start // _PAGE) * _PAGE, (start + span) // _PAGE * _PAGE
    if end > first and _file_backed(first, end):
        _MADVISE(first, end - first, _MADV_DONTNEED)


def row_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """``tensor`` in pieces of whole rows (its first dimension) of about ``chunk_bytes``; each piece is released
    (:func:`release`) once the next one is asked for, so a mapped tensor is never resident as a whole."""
    if tensor.dim() == 0:
        yield tensor
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if len(tensor) else 1
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, len(tensor), step):
        piece = tensor[start : start + step]
        yield piece
        release(piece)


def copy_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` (same shape, any dtypes) a piece of rows at a time (:func:`row_chunks`)."""
    with torch.no_grad():
        if source.dim() == 0:
            target.copy_(source)
            return
        start = 0
        for piece in row_chunks(source):
            target[start : start + len(piece)].copy_(piece)
            start += len(piece)
