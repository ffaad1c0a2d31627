"""Synthetic rows as raw Criteo text, and the data files that hold them with their true probabilities.

The text is written exactly like the raw Criteo files: 40 tab-separated fields (label, ``I1..I13`` integer counts,
``C1..C26`` 8-digit lowercase hex values), empty fields for missing values, no header, no quoting, ``\\n`` line ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dqrm_lightning.data.criteo import COLUMN_NAMES, INT_FEATURE_COUNT
from dqrm_lightning.data.prepare import truth_file
from dqrm_lightning.data.synthetic.truth import SyntheticRows

__all__ = ["RawFileWriter", "TruthWriter", "format_raw", "format_rows"]


def _hex_table() -> np.ndarray:
    """The 4 lowercase hex digits of every 16-bit value, as one uint32 (4 ASCII bytes in memory order) each."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    values = np.arange(1 << 16, dtype=np.uint32)[:, None]
    chars = digits[(values >> np.array([12, 8, 4, 0], dtype=np.uint32)) & np.uint32(15)]
    return np.ascontiguousarray(chars).view(np.uint32).ravel()


_HEX4 = _hex_table()
_WRITE_OPTIONS = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none", batch_size=8192)


def _hex_columns(cat_t: np.ndarray, missing_t: np.ndarray) -> list[pa.Array]:
    """Feature-major 32-bit values -> string arrays of 8 lowercase hex digits, null where missing."""
    n = cat_t.shape[1]
    halves = np.ascontiguousarray(cat_t, dtype=">u4").view(">u2").astype(np.intp)
    chars = np.take(_HEX4, halves).view(np.uint8)  # (26, 8 n)
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    valid = ~missing_t
    bitmaps = np.packbits(valid, axis=1, bitorder="little")
    nulls = n - valid.sum(axis=1)
    columns = []
    for f in range(cat_t.shape[0]):
        bitmap = pa.py_buffer(bitmaps[f]) if nulls[f] else None
        columns.append(pa.StringArray.from_buffers(n, offsets, pa.py_buffer(chars[f]), bitmap, int(nulls[f])))
    return columns


def format_rows(rows: SyntheticRows) -> pa.Buffer:
    """The raw Criteo text of ``rows``: tab-separated, empty fields for missing values, ``\\n`` after each row."""
    return format_raw(rows.labels, rows.dense, rows.dense_missing, rows.cat, rows.cat_missing)


def format_raw(
    labels: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray, cat: np.ndarray, cat_missing: np.ndarray
) -> pa.Buffer:
    """Raw Criteo text of N rows given as arrays: tab-separated, empty fields for missing values, ``\\n`` line ends.

    Args:
        labels: ``(N,)`` uint8 labels (0 or 1).
        dense: ``(N, 13)`` int64 counts ``I1..I13``.
        dense_missing: ``(N, 13)`` bool, true where a count is missing (written as an empty field).
        cat: ``(N, 26)`` uint32 values ``C1..C26``, written as 8 lowercase hex digits.
        cat_missing: ``(N, 26)`` bool, true where a value is missing (written as an empty field).
    """
    dense_t, dense_missing_t = dense.T, dense_missing.T
    columns: list[pa.Array] = [pa.array(np.ascontiguousarray(labels))]
    for j in range(INT_FEATURE_COUNT):
        columns.append(pa.array(np.ascontiguousarray(dense_t[j]), mask=np.ascontiguousarray(dense_missing_t[j])))
    columns.extend(_hex_columns(cat.T, np.ascontiguousarray(cat_missing.T)))
    table = pa.Table.from_arrays(columns, names=list(COLUMN_NAMES))
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, _WRITE_OPTIONS)
    return sink.getvalue()


class TruthWriter:
    """A ``.truth.npy`` file (float32 true click probability per row), written under a temporary name and renamed
    when complete.

    Args:
        path: The truth file (``prepare.truth_file`` of its data file).
        rows: The number of rows it will hold (the ``.npy`` header states it up front).
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.rows = rows
        self.written = 0
        self._tmp = path.with_name(path.name + ".partial")
        self._file: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows,)}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, prob: np.ndarray) -> None:
        """Append ``(n,)`` true probabilities."""
        self._file.write(np.ascontiguousarray(prob, dtype="<f4").tobytes())
        self.written += len(prob)

    def commit(self) -> None:
        """Close and move into place; refuses a file with fewer or more rows than planned."""
        self._file.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.path}: wrote {self.written} rows, planned {self.rows}")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class RawFileWriter:
    """One data file and its ``.truth.npy``, written under temporary names and renamed when complete.

    Args:
        path: The data file.
        rows: The number of rows it will hold (the truth file's header states it up front).

    Example::

        writer = RawFileWriter(out / "val.tsv", len(rows))
        writer.write(format_rows(rows), rows.prob.astype(np.float32))
        writer.commit()  # or abort() on failure
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.truth_path = truth_file(path)
        self.rows = rows
        self._tmp = path.with_name(path.name + ".partial")
        self._data: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._truth = TruthWriter(self.truth_path, rows)

    @property
    def written(self) -> int:
        return self._truth.written

    def write(self, text: pa.Buffer, prob: np.ndarray) -> None:
        """Append rows: their text (from :func:`format_rows`) and ``(n,)`` true probabilities."""
        self._data.write(text)
        self._truth.write(prob)

    def commit(self) -> None:
        """Close both files and move them into place; refuses a file with fewer or more rows than planned."""
        self._data.close()
        if self.written != self.rows:
            self.abort()
            raise RuntimeError(f"{self.path}: wrote {self.written} rows, planned {self.rows}")
        os.replace(self._tmp, self.path)
        self._truth.commit()

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._data.close()
        self._truth.abort()
        self._tmp.unlink(missing_ok=True)
