"""The raw Criteo Display Advertising format: constants and a strict, fast parser.

A raw Criteo row is one line of 40 tab-separated fields::

    label \t I1 ... I13 \t C1 ... C26 \n

or, in an unlabeled file (Kaggle's ``test.txt``, production logs to score), of the 39 fields without the label::

    I1 ... I13 \t C1 ... C26 \n

``label`` is 0 or 1, ``I1..I13`` are integer counts (empty = missing; ASCII digits with an optional minus sign,
within the signed 64-bit range), ``C1..C26`` are hashed categoricals written as hexadecimal strings of at most 8 digits
(empty = missing). A file is labeled or unlabeled throughout, as its first line: 39 fields there make the file
unlabeled (its rows get label 0), anything else labeled; a line of the other kind is a bad line like any other.
Lines end with ``\n``, optionally preceded by one ``\r``; the last line may lack its newline. Both the Kaggle
``train.txt`` and the Terabyte ``day_N`` files use this format, plain or gzip-compressed.

Parsing follows the DLRM reference preprocessing: missing -> 0, negative dense -> 0, dense -> ``log(x + 1)``,
categorical hex -> unsigned 32-bit integer. Mapping categorical values to embedding ids happens later
(:mod:`dqrm_lightning.data.encoding`) so one parsed copy serves any table size.

The fast path hands blocks of lines to pyarrow's multi-threaded CSV reader and decodes the hex columns with numpy.
When pyarrow rejects a block, the block is re-read line by line in Python to name the exact line and column of the
first problem, so a malformed file is never silently mis-parsed and never surfaces as a deep pyarrow traceback.
pyarrow is more lenient than the format (it trims spaces around integers, reads ``0x10`` as 16, skips a byte-order mark
and ends a row at a lone ``\r``), so only blocks of the format's bytes whose row count equals their line count take
the fast path, and labels are checked as text.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

INT_FEATURE_COUNT = 13
CAT_FEATURE_COUNT = 26
FIELD_COUNT = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
UNLABELED_FIELD_COUNT = INT_FEATURE_COUNT + CAT_FEATURE_COUNT
DEFAULT_INT_NAMES = tuple(f"I{i}" for i in range(1, INT_FEATURE_COUNT + 1))
DEFAULT_CAT_NAMES = tuple(f"C{i}" for i in range(1, CAT_FEATURE_COUNT + 1))
COLUMN_NAMES = ("label", *DEFAULT_INT_NAMES, *DEFAULT_CAT_NAMES)
UNLABELED_COLUMN_NAMES = COLUMN_NAMES[1:]
MAX_HEX_DIGITS = 8

OnBadLine = Literal["error", "skip"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}")
# ASCII byte -> nibble value; 255 marks a byte that is not a hex digit.
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
# The bytes a valid block can hold; a block with any other byte takes the line-by-line path.
_FORMAT_BYTES = b"0123456789abcdefABCDEF-\t\r\n"

_READ_OPTIONS = pacsv.ReadOptions(column_names=list(COLUMN_NAMES), use_threads=True, block_size=1 << 22)
_UNLABELED_READ_OPTIONS = pacsv.ReadOptions(
    column_names=list(UNLABELED_COLUMN_NAMES), use_threads=True, block_size=1 << 22
)
_PARSE_OPTIONS = pacsv.ParseOptions(
    delimiter="\t", quote_char=False, double_quote=False, escape_char=False, ignore_empty_lines=False
)
_CONVERT_OPTIONS = pacsv.ConvertOptions(
    column_types={"label": pa.string(), **dict.fromkeys(DEFAULT_INT_NAMES, pa.int64())}
    | dict.fromkeys(DEFAULT_CAT_NAMES, pa.string()),
    null_values=[""],
    strings_can_be_null=True,
    quoted_strings_can_be_null=False,
)
_UNLABELED_CONVERT_OPTIONS = pacsv.ConvertOptions(
    column_types=dict.fromkeys(DEFAULT_INT_NAMES, pa.int64()) | dict.fromkeys(DEFAULT_CAT_NAMES, pa.string()),
    null_values=[""],
    strings_can_be_null=True,
    quoted_strings_can_be_null=False,
)


class CriteoFormatError(ValueError):
    """A raw Criteo file does not follow the format; names the file, 1-based line and field."""

    def __init__(self, path: str | Path, line: int | None, message: str, column: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        field = f" (field {column})" if column else ""
        super().__init__(f"{where}{field}: {message}")


@dataclass
class ParsedRows:
    """A block of parsed rows. N: rows in the block.

    Attributes:
        labels: ``(N,)`` uint8 click labels (0 for every row of an unlabeled file).
        dense: ``(N, 13)`` float32, ``log(max(x, 0) + 1)`` with missing -> 0.
        cat: ``(N, 26)`` uint32 raw categorical values (missing -> 0).
        first_line: 1-based line number of the first row in its file.
        line_numbers: ``(N,)`` int64 1-based line numbers, set only when bad lines were skipped.
        labeled: whether the file has labels (40 fields per line) or not (39).
    """

    labels: np.ndarray
    dense: np.ndarray
    cat: np.ndarray
    first_line: int
    line_numbers: np.ndarray | None = None
    labeled: bool = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ParseStats:
    """Counters of a parse: rows kept, bad lines skipped, and the first few skip reasons."""

    rows: int = 0
    skipped: int = 0
    examples: list[str] | None = None

    def record_skip(self, error: CriteoFormatError) -> None:
        self.skipped += 1
        if self.examples is None:
            self.examples = []
        if len(self.examples) < 5:
            self.examples.append(str(error))


def open_raw(path: str | Path) -> BinaryIO:
    """Open a raw Criteo file for binary reading, transparently decompressing ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a binary file, though not typed as BinaryIO
    return open(path, "rb")


def read_chunk(stream: BinaryIO, size: int, path: str | Path, line: int | None) -> bytes:
    """``stream.read(size)``, turning a corrupt or truncated gzip stream into :class:`CriteoFormatError`.

    ``line`` is the line the chunk starts with. A compressed stream is read in 64 KiB pieces, so the error names the
    line where the readable data ends (within a few hundred lines), not the first line of the chunk.
    """
    if not isinstance(stream, gzip.GzipFile):
        return stream.read(size)
    pieces: list[bytes] = []
    remaining = size
    try:
        while remaining > 0:
            piece = stream.read(min(remaining, 1 << 16))
            if not piece:
                break
            pieces.append(piece)
            remaining -= len(piece)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        complete = sum(piece.count(b"\n") for piece in pieces)
        at = None if line is None else line + complete
        where = f" after line {at - 1}" if at is not None and at > 1 else ""
        raise CriteoFormatError(path, at, f"corrupt or truncated compressed stream{where} ({err})") from None
    return b"".join(pieces)


def line_is_labeled(first_line: bytes) -> bool:
    """Whether a file whose first line (without its newline) is ``first_line`` is labeled: not 39 fields there."""
    if first_line.endswith(b"\r"):
        first_line = first_line[:-1]
    return first_line.count(b"\t") != UNLABELED_FIELD_COUNT - 1


def _first_line(data: bytes) -> bytes:
    end = data.find(b"\n")
    return data if end < 0 else data[:end]


def is_labeled(path: str | Path) -> bool:
    """Whether a raw file is labeled (40 fields per line) or unlabeled (39), read from its first line.

    An empty file counts as labeled (parsing it fails anyway). Reading stops at the first newline, or as soon as the
    line has more tabs than an unlabeled row.
    """
    head = b""
    with open_raw(path) as stream:
        while b"\n" not in head and head.count(b"\t") < UNLABELED_FIELD_COUNT:
            piece = read_chunk(stream, 1 << 16, path, 1)
            if not piece:
                break
            head += piece
    return line_is_labeled(_first_line(head))


def iter_line_blocks(
    stream: BinaryIO, path: str | Path, block_bytes: int = 16 << 20, first_line: int = 1
) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield ``(block, first_line, end_offset, lines)``: whole lines of a stream, about ``block_bytes`` at a time.

    ``end_offset`` is the offset (in the decompressed stream, relative to where reading started) just past the block,
    so a reader can resume there. A truncated gzip stream raises :class:`CriteoFormatError`.
    """
    carry = b""
    offset = 0
    line = first_line
    while True:
        chunk = read_chunk(stream, block_bytes, path, line + carry.count(b"\n"))
        if not chunk:
            break
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        block, carry = data[:cut], data[cut:]
        offset += len(block)
        lines = block.count(b"\n")
        yield block, line, offset, lines
        line += lines
    if carry:
        offset += len(carry)
        yield carry, line, offset, 1


def _check_field(path: str | Path, line: int, index: int, field: bytes) -> None:
    """Validate field ``index`` (in :data:`COLUMN_NAMES`) of a line against the format (the slow path)."""
    name = COLUMN_NAMES[index]
    if index == 0:
        if field not in (b"0", b"1"):
            raise CriteoFormatError(path, line, f"label must be 0 or 1, got {field[:40]!r}", name)
    elif index <= INT_FEATURE_COUNT:
        if field and not _INT_RE.fullmatch(field):
            raise CriteoFormatError(path, line, f"expected an integer or empty, got {field[:40]!r}", name)
        if field and not _in_int64_range(field):
            raise CriteoFormatError(path, line, f"integer out of the 64-bit range: {field[:40]!r}", name)
    elif field and not _HEX_RE.fullmatch(field):
        raise CriteoFormatError(
            path, line, f"expected at most {MAX_HEX_DIGITS} hex digits or empty, got {field[:40]!r}", name
        )


def _in_int64_range(field: bytes) -> bool:
    """Whether a ``-?[0-9]+`` field is a signed 64-bit integer (leading zeros allowed, without Python's digit limit)."""
    digits = field.lstrip(b"-").lstrip(b"0")
    if len(digits) > 19:
        return False
    value = -int(digits or b"0") if field.startswith(b"-") else int(digits or b"0")
    return _INT64_MIN <= value <= _INT64_MAX


def check_line(path: str | Path, line_number: int, line: bytes, labeled: bool = True) -> None:
    """Raise :class:`CriteoFormatError` if one raw line (without its newline) is not a valid row of a labeled (40
    fields) or unlabeled (39 fields) file."""
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    if labeled and len(fields) != FIELD_COUNT:
        hint = ""
        if len(fields) == UNLABELED_FIELD_COUNT and line_number > 1:
            hint = " (a line without label in a labeled file: line 1 does not have 39 fields)"
        raise CriteoFormatError(
            path, line_number, f"expected {FIELD_COUNT} tab-separated fields, found {len(fields)}{hint}"
        )
    if not labeled and len(fields) != UNLABELED_FIELD_COUNT:
        raise CriteoFormatError(
            path,
            line_number,
            f"expected {UNLABELED_FIELD_COUNT} tab-separated fields (an unlabeled file: line 1 has 39), "
            f"found {len(fields)}",
        )
    first = 0 if labeled else 1
    for index, field in enumerate(fields):
        _check_field(path, line_number, first + index, field)


def _split_lines(block: bytes) -> list[bytes]:
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _string_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, data)`` of a string array; value ``i`` starts at ``data[offsets[i] - offsets[0]]``."""
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data_buffer = column.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return offsets, data[offsets[0] : offsets[-1]]


def _decode_label(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decode the label column (text, no nulls) into uint8; returns ``(values, bad_mask)``: exactly "0" or "1"."""
    offsets, data = _string_parts(column)
    one_byte = np.diff(offsets) == 1
    first = np.zeros(len(column), dtype=np.uint8)
    first[one_byte] = data[offsets[:-1][one_byte] - offsets[0]]
    bad = ~one_byte | ((first != ord("0")) & (first != ord("1")))
    return (first == ord("1")).astype(np.uint8), bad


def _decode_hex(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decode a string column of hex values into uint32; returns ``(values, bad_mask)``."""
    n = len(column)
    offsets, data = _string_parts(column)
    lengths = np.diff(offsets)
    full = lengths == MAX_HEX_DIGITS
    if np.count_nonzero(full) * MAX_HEX_DIGITS == len(data):
        return _decode_packed_hex(data, full)  # Criteo: every value has exactly 8 digits or is empty
    values = np.zeros(n, dtype=np.uint32)
    bad = lengths > MAX_HEX_DIGITS
    ends = offsets[1:] - offsets[0]
    for k in range(MAX_HEX_DIGITS):
        has = lengths > k
        if not has.any():
            break
        nibbles = _HEX_LUT[data[ends[has] - 1 - k]]
        bad[has] |= nibbles == 255
        values[has] |= nibbles.astype(np.uint32) << np.uint32(4 * k)
    return values, bad


def _decode_packed_hex(data: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast path: the non-empty values are 8 hex digits each, packed back to back in ``data``."""
    nibbles = _HEX_LUT[data].reshape(-1, MAX_HEX_DIGITS // 2, 2)  # (K, 4, 2): two digits per byte
    packed = np.ascontiguousarray((nibbles[:, :, 0] << 4) | (nibbles[:, :, 1] & 0x0F))  # (K, 4) uint8
    values = np.zeros(len(full), dtype=np.uint32)
    values[full] = packed.view(">u4").ravel()
    bad = np.zeros(len(full), dtype=bool)
    invalid = nibbles == 255
    if invalid.any():
        bad[full] = invalid.reshape(len(packed), -1).any(axis=1)
    return values, bad


def _table_to_rows(
    table: pa.Table,
    path: str | Path,
    first_line: int,
    on_bad_line: OnBadLine,
    stats: ParseStats,
    lines: np.ndarray,
    labeled: bool = True,
) -> ParsedRows:
    """Convert a parsed arrow table to arrays, validating label values and hex digits (unlabeled: labels are 0)."""
    n = table.num_rows
    reasons: dict[int, CriteoFormatError] = {}
    if labeled:
        label_column = table.column("label").combine_chunks()  # no nulls: see _read_checked
        labels, bad = _decode_label(label_column)
        for i in np.flatnonzero(bad)[: None if on_bad_line == "skip" else 1]:
            raw_label = label_column[int(i)].as_py().encode()
            reasons[int(i)] = CriteoFormatError(
                path, int(lines[i]), f"label must be 0 or 1, got {raw_label[:40]!r}", "label"
            )
    else:
        labels, bad = np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=bool)
    cat = np.empty((n, CAT_FEATURE_COUNT), dtype=np.uint32)
    for j, name in enumerate(DEFAULT_CAT_NAMES):
        values, bad_hex = _decode_hex(table.column(name).combine_chunks())
        cat[:, j] = values
        if bad_hex.any():
            for i in np.flatnonzero(bad_hex)[: None if on_bad_line == "skip" else 1]:
                raw_value = table.column(name)[int(i)].as_py()
                reasons.setdefault(
                    int(i),
                    CriteoFormatError(
                        path,
                        int(lines[i]),
                        f"expected at most {MAX_HEX_DIGITS} hex digits or empty, got {raw_value[:40]!r}",
                        name,
                    ),
                )
            bad |= bad_hex
    if bad.any():
        if on_bad_line == "error":
            raise reasons[min(reasons)]
        for i in sorted(reasons):
            stats.record_skip(reasons[i])
    dense = np.empty((n, INT_FEATURE_COUNT), dtype=np.float32)
    for j, name in enumerate(DEFAULT_INT_NAMES):
        col = table.column(name).combine_chunks().fill_null(0).to_numpy(zero_copy_only=False)
        dense[:, j] = np.log1p(np.maximum(col, 0).astype(np.float64))
    if bad.any():
        keep = ~bad
        labels, dense, cat, lines = labels[keep], dense[keep], cat[keep], lines[keep]
    contiguous = len(lines) == 0 or int(lines[-1] - lines[0]) + 1 == len(lines)
    if contiguous and len(lines):
        first_line = int(lines[0])  # bad lines dropped at the start of the block shift the first row
    return ParsedRows(labels, dense, cat, first_line, None if contiguous else lines, labeled)


def _read_table(block: bytes, labeled: bool = True) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(block),
        read_options=_READ_OPTIONS if labeled else _UNLABELED_READ_OPTIONS,
        parse_options=_PARSE_OPTIONS,
        convert_options=_CONVERT_OPTIONS if labeled else _UNLABELED_CONVERT_OPTIONS,
    )


def _line_count(block: bytes) -> int:
    return block.count(b"\n") + (not block.endswith(b"\n"))


def _has_empty_line(block: bytes) -> bool:
    """Whether a block of lines holds an empty line (``\n`` or ``\r\n`` alone, or a last line of just ``\r``)."""
    return (
        block.startswith((b"\n", b"\r\n"))
        or b"\n\n" in block
        or b"\n\r\n" in block
        or block == b"\r"
        or block.endswith(b"\n\r")
    )


def _read_checked(block: bytes, labeled: bool = True) -> pa.Table | Exception:
    """pyarrow's parse of a block, or the exception that sends the block to the line-by-line check."""
    if block.translate(None, _FORMAT_BYTES):
        # spaces, "x", "+", a byte-order mark, non-ASCII...: pyarrow accepts some of these in integers
        return pa.ArrowInvalid("bytes outside the format")
    if not labeled and _has_empty_line(block):
        # pyarrow reads an empty line as a row of nulls, which is also a valid unlabeled row of 39 empty fields
        return pa.ArrowInvalid("empty line")
    try:
        table = _read_table(block, labeled)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        return err
    if labeled and table.column("label").null_count:
        # pyarrow reads an empty line as a row of nulls: let the line-by-line check name the problem
        return pa.ArrowInvalid("empty label or empty line")
    if b"\r" in block and table.num_rows != _line_count(block):
        return pa.ArrowInvalid("a lone carriage return inside a line")  # pyarrow ends a row there
    return table


def parse_block(
    block: bytes,
    path: str | Path,
    first_line: int,
    on_bad_line: OnBadLine = "error",
    stats: ParseStats | None = None,
    parsed: pa.Table | Exception | None = None,
    labeled: bool | None = None,
) -> ParsedRows:
    """Parse a block of whole raw lines.

    Args:
        block: bytes holding whole lines (the last line may lack its newline).
        path: file the block came from, for error messages.
        first_line: 1-based line number of the block's first line.
        on_bad_line: ``"error"`` raises :class:`CriteoFormatError` at the first bad line; ``"skip"`` drops bad lines
            and counts them in ``stats``.
        stats: counters updated in place.
        parsed: the result of ``_read_checked(block, labeled)`` when already computed (e.g. in a prefetch thread).
        labeled: whether the file is labeled (40 fields) or not (39); ``None``: from the block's first line (the
            file's first line when ``first_line`` is 1).

    Raises:
        CriteoFormatError: with file, line and field of the first problem (``on_bad_line="error"``).
    """
    stats = stats if stats is not None else ParseStats()
    if labeled is None:
        labeled = line_is_labeled(_first_line(block))
    parsed = _read_checked(block, labeled) if parsed is None else parsed
    if isinstance(parsed, Exception):
        table, lines = _slow_path(block, path, first_line, on_bad_line, stats, parsed, labeled)
    else:
        table = parsed
        lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
    rows = _table_to_rows(table, path, first_line, on_bad_line, stats, lines, labeled)
    stats.rows += len(rows)
    return rows


def _slow_path(
    block: bytes,
    path: str | Path,
    first_line: int,
    on_bad_line: OnBadLine,
    stats: ParseStats,
    err: Exception,
    labeled: bool = True,
) -> tuple[pa.Table, np.ndarray]:
    """Locate bad lines of a block pyarrow rejected; raise, or re-parse the good lines (skip mode)."""
    good: list[bytes] = []
    good_lines: list[int] = []
    for offset, line in enumerate(_split_lines(block)):
        number = first_line + offset
        try:
            check_line(path, number, line, labeled)
        except CriteoFormatError as bad:
            if on_bad_line == "error":
                raise bad from None
            stats.record_skip(bad)
            continue
        good.append(line)
        good_lines.append(number)
    if on_bad_line == "error":
        # pyarrow rejected the block but every line passes our check: never guess, report the block.
        last = first_line + block.count(b"\n")
        raise CriteoFormatError(path, first_line, f"unparseable block (lines {first_line}-{last}): {err}")
    if not good:
        return _empty_table(labeled), np.zeros(0, dtype=np.int64)
    table = _read_checked(b"\n".join(good) + b"\n", labeled)
    if isinstance(table, Exception):
        # every line passes our check but pyarrow disagrees: never guess, report the block.
        last = first_line + block.count(b"\n")
        raise CriteoFormatError(path, first_line, f"unparseable block (lines {first_line}-{last}): {table}")
    return table, np.asarray(good_lines, dtype=np.int64)


def _empty_table(labeled: bool = True) -> pa.Table:
    types = (_CONVERT_OPTIONS if labeled else _UNLABELED_CONVERT_OPTIONS).column_types
    return pa.table({name: pa.array([], type=types[name]) for name in types})


def iter_parsed(
    path: str | Path,
    on_bad_line: OnBadLine = "error",
    stats: ParseStats | None = None,
    block_bytes: int = 16 << 20,
    start_offset: int = 0,
    first_line: int = 1,
) -> Iterator[tuple[ParsedRows, int, int]]:
    """Parse a whole raw file block by block; yields ``(rows, end_offset, next_line)``.

    Whether the file is labeled (40 fields) or unlabeled (39) is read from its first line (``rows.labeled``).
    ``start_offset``/``first_line`` resume a previous parse at a block boundary (offsets count decompressed bytes).

    Raises:
        CriteoFormatError: empty file, truncated gzip, or the first malformed line (``on_bad_line="error"``).
    """
    stats = stats if stats is not None else ParseStats()
    empty = True
    labeled = is_labeled(path) if start_offset else None
    # pyarrow parses block i+1 in a second thread (it releases the GIL) while block i is decoded here.
    with open_raw(path) as stream, ThreadPoolExecutor(max_workers=1) as pool:
        _skip_bytes(stream, start_offset, path)
        pending: tuple[Future, bytes, int, int, int] | None = None
        for block, line, end, lines in iter_line_blocks(stream, path, block_bytes, first_line):
            empty = False
            if labeled is None:  # the file's first line decides
                labeled = line_is_labeled(_first_line(block))
            future = pool.submit(_read_checked, block, labeled)
            if pending is not None:
                yield _finish(pending, path, on_bad_line, stats, start_offset, labeled)
            pending = (future, block, line, end, lines)
        if pending is not None:
            yield _finish(pending, path, on_bad_line, stats, start_offset, labeled)
    if empty and start_offset == 0:
        raise CriteoFormatError(path, None, "file is empty")


def _finish(
    pending: tuple[Future, bytes, int, int, int],
    path: str | Path,
    on_bad_line: OnBadLine,
    stats: ParseStats,
    base: int,
    labeled: bool | None,
) -> tuple[ParsedRows, int, int]:
    future, block, line, end, lines = pending
    rows = parse_block(block, path, line, on_bad_line, stats, future.result(), labeled)
    return rows, base + end, line + lines


def _skip_bytes(stream: BinaryIO, count: int, path: str | Path) -> None:
    remaining = count
    while remaining > 0:
        chunk = read_chunk(stream, min(remaining, 64 << 20), path, None)
        if not chunk:
            raise CriteoFormatError(path, None, f"file is shorter than the resume offset {count}")
        remaining -= len(chunk)


def parse_file(path: str | Path, on_bad_line: OnBadLine = "error") -> ParsedRows:
    """Parse a whole (small) raw file into one :class:`ParsedRows`; convenient for tests and notebooks."""
    blocks = [rows for rows, _, _ in iter_parsed(path, on_bad_line)]
    return ParsedRows(
        labels=np.concatenate([b.labels for b in blocks]),
        dense=np.concatenate([b.dense for b in blocks]),
        cat=np.concatenate([b.cat for b in blocks]),
        first_line=1,
        labeled=blocks[0].labeled,
    )
