"""Files of any :class:`~dqrm_lightning.schema.FeatureSchema`: Parquet, CSV and TSV, streamed into prepared shards.

The format comes from the extension: ``.parquet``/``.pq`` (read a record batch at a time, never the whole file),
``.csv`` and ``.tsv`` (optionally ``.gz``; the header row names the columns; read a block at a time). A file holds the
schema's columns (others are ignored); the label column may be absent (an unlabeled file, to predict; a split's files
are all labeled or all unlabeled, as for raw Criteo files).

Values, as the schema says:

* label: 0 or 1 (integers, booleans, floats 0.0/1.0, or the texts ``0``/``1``).
* dense: numbers; a missing entry (null, an empty CSV field) is the schema's ``missing`` or, when that is ``null``,
  an error; ``transform: log1p`` is ``log(x + 1)`` (computed in float64, stored as float32), a negative value then an
  error; a value that is not finite is an error.
* sparse one-hot: exactly one integer or string per row (missing or empty: an error).
* sparse multi-hot: a Parquet list column (a null list is an empty bag), or a string split on ``delimiter`` (an
  empty string or a missing CSV field is an empty bag, an empty value between delimiters an error).

Each sparse value becomes a 64-bit key when the shards are written; ids are drawn from the keys per table at batch
time (:class:`~dqrm_lightning.data.encoding.SchemaEncoder`), so one prepared copy serves any table size. The key of
an integer, or of a text that is a decimal integer (``-?[0-9]+``, e.g. every value of a CSV column of ids), is the
integer itself (so a Parquet ``int64`` column and the same ids in a CSV file give the same keys, and ``hash``
encoding is ``value % rows``); any other string's key is :func:`~dqrm_lightning.data.hashing.hash_bytes` of its UTF-8
bytes (stable over processes and platforms), read as a signed 64-bit integer.

A bad value is never filled in or skipped: :class:`TabularFormatError` names the file, the 1-based data row (CSV/TSV:
also the line number, the header being line 1), the column and the value. A column the schema names that the file
lacks is an error naming the file and the column.

Shard layout (beside :mod:`dqrm_lightning.data.prepare`'s ``labels``/``dense``/``prob``)::

    train/part-00000.labels.npy              (N,) uint8 (zeros in an unlabeled split)
    train/part-00000.dense.npy               (N, len(schema.dense)) float32, transformed, missing filled
    train/part-00000.prob.npy                (N,) float32, from <file>.truth.npy when present
    train/part-00000.sparse-<i>.npy          (N,) int64 keys of one-hot sparse feature i (schema.sparse order)
    train/part-00000.sparse-<i>.values.npy   int64 keys of multi-hot feature i, all rows back to back
    train/part-00000.sparse-<i>.offsets.npy  (N + 1,) int64: row r holds values[offsets[r]:offsets[r + 1]]
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dqrm_lightning.data.criteo import CriteoFormatError, OnBadLine, ParseStats, _string_parts
from dqrm_lightning.data.hashing import hash_bytes
from dqrm_lightning.data.prepare import Arrays, Ragged, SourceBlock
from dqrm_lightning.schema import DenseFeature, FeatureSchema, SparseFeature

__all__ = [
    "BLOCK_ROWS",
    "TabularFormat",
    "TabularFormatError",
    "TabularSource",
    "column_names",
    "file_format",
    "read_file",
    "sparse_array",
]

TabularFormat = Literal["parquet", "csv", "tsv"]
BLOCK_ROWS = 1 << 16
"""Rows per Parquet record batch read at a time (CSV/TSV: blocks of 1 MiB)."""
_EXTENSIONS: dict[str, TabularFormat] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
_INTEGER = "^-?[0-9]+$"


def file_format(path: str | Path) -> TabularFormat:
    """The format of a data file from its extension (``.parquet``, ``.pq``, ``.csv``, ``.tsv``; ``.csv.gz``...).

    Raises:
        ValueError: another extension.
    """
    name = str(path).lower()
    for ext, kind in _EXTENSIONS.items():
        if name.endswith(ext) or (kind != "parquet" and name.endswith(ext + ".gz")):
            return kind
    raise ValueError(f"{path}: unknown data file type; with a schema, files end in {sorted(_EXTENSIONS)} (or .gz)")


def sparse_array(index: int) -> str:
    """The shard array of sparse feature ``index`` (schema order): ``sparse-<index>``."""
    return f"sparse-{index}"


class TabularFormatError(CriteoFormatError):
    """A bad value or a missing column in a Parquet/CSV/TSV file; names the file, row (CSV: line) and column.

    Attributes:
        row: 1-based data row (``None``: the whole file, e.g. a missing column).
        line: CSV/TSV line number (the header is line 1), or ``None``.
    """

    def __init__(
        self, path: str | Path, row: int | None, message: str, column: str | None = None, line: int | None = None
    ) -> None:
        super().__init__(path, line, message, column)
        self.row = row
        where = [f"row {row}"] if row is not None else []
        where += [f"line {line}"] if line is not None else []
        where += [f"column {column!r}"] if column is not None else []
        self.args = (f"{path}: {', '.join(where)}{': ' if where else ''}{message}",)


@dataclass(frozen=True)
class _Where:
    """Names a value of a block in errors: the file, its format and the data row of the block's first row."""

    path: str
    csv: bool
    first_row: int

    def error(self, index: int, column: str, message: str) -> TabularFormatError:
        row = self.first_row + index
        return TabularFormatError(self.path, row, message, column, row + 1 if self.csv else None)


def _show(value: Any) -> str:
    return "a missing value" if value is None else repr(value)[:60]


def column_names(path: str | Path) -> list[str]:
    """The columns of a data file: Parquet's schema, or the header row of a CSV/TSV file.

    Raises:
        TabularFormatError: a CSV/TSV file without a header row.
    """
    kind = file_format(path)
    if kind == "parquet":
        return list(pq.read_schema(path).names)
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as stream:
        header = next(csv.reader(stream, delimiter="," if kind == "csv" else "\t"), None)
    if not header:
        raise TabularFormatError(path, None, "is empty: a CSV/TSV file starts with a header row naming its columns")
    return header


def _batches(path: str, kind: TabularFormat, columns: list[str], block_rows: int) -> Iterator[pa.RecordBatch]:
    """The schema's columns of a file, a record batch at a time (CSV/TSV: every column as text)."""
    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=block_rows, columns=columns)
        return
    bad: list[Any] = []

    def invalid(row: Any) -> str:
        bad.append(row)
        return "error"

    try:  # open_csv reads the first block already
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),  # line numbers of malformed rows need one thread
            parse_options=pacsv.ParseOptions(
                delimiter="," if kind == "csv" else "\t", ignore_empty_lines=False, invalid_row_handler=invalid
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types=dict.fromkeys(columns, pa.string()),
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
        yield from reader
    except pa.ArrowInvalid as err:
        if not bad:
            raise TabularFormatError(path, None, f"unreadable: {err}") from None
        row = bad[0]
        raise TabularFormatError(
            path,
            row.number - 1 if row.number else None,
            f"expected {row.expected_columns} fields, found {row.actual_columns}: {row.text[:80]!r}",
            line=row.number,
        ) from None


class TabularSource:
    """Reads Parquet/CSV/TSV files of a schema for :func:`~dqrm_lightning.data.prepare.prepare`.

    Args:
        schema: the columns to read and how.
        block_rows: rows per Parquet record batch.
    """

    byte_offsets = False  # blocks end at row counts

    def __init__(self, schema: FeatureSchema, block_rows: int = BLOCK_ROWS) -> None:
        self.schema = schema
        self.block_rows = block_rows

    def key(self) -> dict[str, Any]:
        """What shapes the shards: the label, dense and sparse entries (tables act later, at batch time)."""
        schema = self.schema.to_dict()
        return {"schema": {k: schema[k] for k in ("label", "dense", "sparse")}}

    def is_labeled(self, path: str) -> bool:
        return self.schema.label is not None and self.schema.label in column_names(path)

    def mixed_labels(self, unlabeled: str, labeled: str, split: str) -> ValueError:
        return TabularFormatError(
            unlabeled,
            None,
            f"has no label column, but {labeled} of the same {split} split has one: "
            "the files of a split are all labeled or all unlabeled",
            self.schema.label,
        )

    def _columns(self, path: str, labeled: bool) -> list[str]:
        """The columns to read, after checking the file has them all."""
        wanted = [d.source for d in self.schema.dense] + [s.source for s in self.schema.sparse]
        names = set(column_names(path))
        for column in wanted:
            if column not in names:
                raise TabularFormatError(path, None, "the file has no such column", column)
        assert self.schema.label is not None or not labeled
        return list(dict.fromkeys(([self.schema.label] if labeled and self.schema.label else []) + wanted))

    def blocks(
        self, path: str, on_bad_line: OnBadLine, stats: ParseStats, start: int, first_line: int
    ) -> Iterable[SourceBlock]:
        """Read a file from data row ``start + 1`` on (``start``: rows already prepared; re-read, not converted).

        Raises:
            TabularFormatError: the first bad value, or a missing column.
            ValueError: ``on_bad_line`` other than ``error`` (bad values of schema files are never skipped).
        """
        if on_bad_line != "error":
            raise ValueError("`on_bad_line: skip` is for raw Criteo files; files of a schema stop at a bad value")
        kind = file_format(path)
        labeled = self.is_labeled(path)
        columns = self._columns(path, labeled)
        done = 0
        for batch in _batches(path, kind, columns, self.block_rows):
            if done + batch.num_rows <= start:
                done += batch.num_rows
                continue
            if done < start:
                batch, done = batch.slice(start - done), start
            if batch.num_rows == 0:
                continue
            arrays = self.convert(batch, _Where(path, kind != "parquet", done + 1), labeled)
            lines = np.arange(done + 1, done + 1 + batch.num_rows, dtype=np.int64)
            done += batch.num_rows
            stats.rows += batch.num_rows
            yield SourceBlock(lines, arrays, labeled, done, done + 1)
        if done == 0:
            raise TabularFormatError(path, None, "has no data rows")

    def convert(self, batch: pa.RecordBatch, where: _Where, labeled: bool) -> Arrays:
        """The shard arrays of a record batch (see the module docstring)."""
        n = batch.num_rows
        label = self.schema.label
        labels = _labels(batch.column(label), where, label) if labeled and label else np.zeros(n, np.uint8)
        dense = np.empty((n, len(self.schema.dense)), dtype=np.float32)  # (N, D)
        for j, feature in enumerate(self.schema.dense):
            dense[:, j] = _dense(batch.column(feature.source), feature, where)
        arrays: Arrays = {"labels": labels, "dense": dense}
        for i, sparse in enumerate(self.schema.sparse):
            column = batch.column(sparse.source)
            if sparse.multi_hot:
                arrays[sparse_array(i)] = _multi_hot(column, sparse, where)
            else:
                arrays[sparse_array(i)] = _one_hot(column, where, sparse.source)
        return arrays


def _labels(column: pa.Array, where: _Where, name: str) -> np.ndarray:
    """``(N,)`` uint8 labels: 0 or 1 of a text, boolean or numeric column; anything else is an error."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        ones = pc.fill_null(pc.equal(column, "1"), False).to_numpy(zero_copy_only=False)
        good = ones | pc.fill_null(pc.equal(column, "0"), False).to_numpy(zero_copy_only=False)
    elif pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        ones, good = values == 1, (values == 0) | (values == 1)
    else:
        raise where.error(0, name, f"a label column holds 0 or 1, this one holds {kind}")
    bad = np.flatnonzero(~good)
    if len(bad):
        raise where.error(int(bad[0]), name, f"label must be 0 or 1, got {_show(column[int(bad[0])].as_py())}")
    return ones.astype(np.uint8)


def _dense(column: pa.Array, feature: DenseFeature, where: _Where) -> np.ndarray:
    """``(N,)`` float64 values of a dense column: missing filled (or an error), finite, transformed."""
    name = feature.source
    kind = column.type
    missing = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column = pc.cast(column, pa.float64())
        except pa.ArrowInvalid:
            for i, text in enumerate(column.to_pylist()):
                try:
                    pc.cast(pa.array([text], pa.string()), pa.float64())
                except pa.ArrowInvalid:
                    raise where.error(i, name, f"expected a number, got {_show(text)}") from None
            raise
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        raise where.error(0, name, f"a dense column holds numbers, this one holds {kind}")
    values = pc.fill_null(pc.cast(column, pa.float64()), 0.0).to_numpy(zero_copy_only=False).copy()
    if missing.any():
        if feature.missing is None:
            i = int(np.argmax(missing))
            raise where.error(i, name, "missing value (the schema's `missing` is null: give a number to fill it)")
        values[missing] = feature.missing
    infinite = ~np.isfinite(values)
    if infinite.any():
        i = int(np.argmax(infinite))
        raise where.error(i, name, f"not a finite number: {float(values[i])!r}")
    if feature.transform == "log1p":
        negative = values < 0
        if negative.any():
            i = int(np.argmax(negative))
            raise where.error(i, name, f"negative value {float(values[i])!r} with `transform: log1p`")
        values = np.log1p(values)
    return values


def _one_hot(column: pa.Array, where: _Where, name: str) -> np.ndarray:
    """``(N,)`` int64 keys of a one-hot column (exactly one value per row)."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        raise where.error(0, name, "a list column for a one-hot feature: set `multi_hot: true`")
    return _keys(column, where, name, lambda i: i)


def _multi_hot(column: pa.Array, feature: SparseFeature, where: _Where) -> Ragged:
    """The keys of a multi-hot column: a list column, or text split on the feature's delimiter."""
    name = feature.source
    kind = column.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if is_list and feature.delimiter is not None:
        raise where.error(0, name, "a list column, but the feature has a `delimiter` (for text columns)")
    if not is_list:
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise where.error(0, name, f"a multi-hot column is a list or text column, this one holds {kind}")
        if feature.delimiter is None:
            raise where.error(0, name, "a text column for a multi-hot feature needs `delimiter`")
        text = pc.fill_null(column, "")
        split = pc.split_pattern(text, feature.delimiter)
        column = pc.if_else(pc.equal(text, ""), pa.scalar(None, split.type), split)  # "" -> an empty bag
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = pc.list_flatten(column)
    keys = _keys(flat, where, name, lambda i: int(np.searchsorted(offsets, i, side="right")) - 1)
    return Ragged(keys, lengths)


def _keys(values: pa.Array, where: _Where, name: str, row_of: Callable[[int], int]) -> np.ndarray:
    """``(K,)`` int64 keys of sparse values (see the module docstring); ``row_of`` maps a value to its row."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = values.type
    missing = values.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        missing |= pc.fill_null(pc.equal(values, ""), False).to_numpy(zero_copy_only=False)
    if missing.any():
        raise where.error(row_of(int(np.argmax(missing))), name, "missing or empty value")
    if pa.types.is_integer(kind):
        try:
            return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            big = pc.greater(values, np.iinfo(np.int64).max).to_numpy(zero_copy_only=False)
            i = int(np.argmax(big))
            raise where.error(row_of(i), name, f"integer beyond the signed 64-bit range: {values[i]}") from None
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise where.error(row_of(0), name, f"a sparse column holds integers or strings, this one holds {kind}")
    values = pc.cast(values, pa.string())
    is_int = pc.match_substring_regex(values, _INTEGER).to_numpy(zero_copy_only=False)
    keys = np.empty(len(values), dtype=np.int64)
    if is_int.any():
        ints = values.filter(pa.array(is_int))
        try:
            keys[is_int] = pc.cast(ints, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            for at in np.flatnonzero(is_int).tolist():
                text = values[at].as_py()
                if not -(2**63) <= int(text) < 2**63:
                    raise where.error(row_of(at), name, f"integer beyond the signed 64-bit range: {text}") from None
            raise
    if not is_int.all():
        encoded = pc.dictionary_encode(values.filter(pa.array(~is_int)))
        offsets, data = _string_parts(encoded.dictionary)
        hashes = hash_bytes(offsets - offsets[0], data).view(np.int64)
        keys[~is_int] = hashes[encoded.indices.to_numpy(zero_copy_only=False)]
    return keys


def read_file(path: str | Path, schema: FeatureSchema) -> Arrays:
    """Every row of a (small) file as shard arrays, in one piece; convenient for tests and notebooks."""
    blocks = list(TabularSource(schema).blocks(str(path), "error", ParseStats(), 0, 1))
    return {
        key: Ragged.concat([b.arrays[key] for b in blocks])
        if isinstance(blocks[0].arrays[key], Ragged)
        else np.concatenate([b.arrays[key] for b in blocks])
        for key in blocks[0].arrays
    }
