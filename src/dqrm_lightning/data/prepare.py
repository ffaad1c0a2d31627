"""Turn raw Criteo files into binary, memory-mappable shards, once.

Layout of a prepared directory::

    meta.json                        splits (rows, shards, labeled), sources, skipped lines
    train/part-00000.labels.npy      (N,) uint8 (zeros in a split of unlabeled, 39-field files)
    train/part-00000.dense.npy       (N, 13) float32, log(x + 1)
    train/part-00000.cat.npy         (N, 26) uint32 raw categorical values
    train/part-00000.prob.npy        (N,) float32 true click probability (synthetic data only)
    val/...  test/...

The input is read in segments of at least ``rows_per_shard`` lines (cut at 16 MB block boundaries); after each
segment every split's shard is written (in a background thread) to a temporary name, renamed, and the position is
recorded in ``_progress.json``. An interrupted ``prepare`` started again with the same arguments resumes after the
last recorded segment.

Split layouts (DLRM's preprocessing):

* explicit: each file belongs wholly to one split (``train_files``, ``val_files``, ``test_files``);
* Kaggle ``train.txt``: cut into 7 near-equal "days"; days 1-6 train; day 7's first half test, second half val;
* Terabyte ``day_0`` .. ``day_23``: days 0-22 train; day 23's first half test, second half val.

A split holds labeled files (40 fields per line) or unlabeled ones (39, no label: logs to score), never both;
``meta.json`` records which per split (``labeled``; a ``meta.json`` without it predates unlabeled input: labeled).

Files of any :class:`~dqrm_lightning.schema.FeatureSchema` (Parquet, CSV, TSV) go through the same machinery with
another :class:`RowSource` (:class:`dqrm_lightning.data.tabular.TabularSource`); their shards hold ``labels``,
``dense`` (N, len(schema.dense)), ``prob`` and one array per sparse feature instead of ``cat`` (see
:mod:`dqrm_lightning.data.tabular`), and ``meta.json`` records the schema under ``schema``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dqrm_lightning._progress import ProgressMeter
from dqrm_lightning.data.criteo import (
    CriteoFormatError,
    OnBadLine,
    ParseStats,
    is_labeled,
    iter_parsed,
    open_raw,
    read_chunk,
)
from dqrm_lightning.data.hashing import hash_uniform

SPLITS = ("train", "val", "test")
ARRAYS = ("labels", "dense", "cat")
FORMAT_VERSION = 1
META_FILE = "meta.json"
TRUTH_SUFFIX = ".truth.npy"
_PROGRESS_FILE = "_progress.json"


def shard_name(index: int) -> str:
    """The name of a split's ``index``-th shard: ``part-00000``."""
    return f"part-{index:05d}"


def shard_file(prefix: str | Path, array: str) -> Path:
    """The file of one array of a shard: prefix ``train/part-00000`` and ``labels`` -> ``train/part-00000.labels.npy``.

    Args:
        prefix: The shard's path without suffix (the directory of its split and its :func:`shard_name`).
        array: ``labels``, ``dense``, ``cat`` or ``prob`` (schema data: also ``sparse-<i>``, ``sparse-<i>.values``,
            ``sparse-<i>.offsets``).
    """
    return Path(f"{prefix}.{array}.npy")


@dataclass
class Ragged:
    """Rows of varying length (a multi-hot feature): every row's values back to back, and each row's length.

    A shard stores it as ``<array>.values.npy`` (the values) and ``<array>.offsets.npy`` (N + 1 int64: row ``i``
    holds ``values[offsets[i]:offsets[i + 1]]``).
    """

    values: np.ndarray  # (sum of lengths,)
    lengths: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, rows: np.ndarray) -> Ragged:
        """The rows where the boolean mask ``rows`` is true."""
        return Ragged(self.values[np.repeat(rows, self.lengths)], self.lengths[rows])

    def offsets(self) -> np.ndarray:
        """``(N + 1,)`` int64 start of each row in :attr:`values`, and the end."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)

    @staticmethod
    def concat(parts: Sequence[Ragged]) -> Ragged:
        return Ragged(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts]))


Arrays = dict[str, Any]  # shard array name -> (N, ...) np.ndarray or Ragged, all of N rows


@dataclass
class SourceBlock:
    """A block of rows read from one input file by a :class:`RowSource`.

    Attributes:
        lines: ``(N,)`` int64 1-based row numbers in the file (Criteo: line numbers), what split ranges and
            ``<file>.truth.npy`` are indexed by.
        arrays: the shard arrays of the rows (``labels`` among them).
        labeled: whether the file has labels.
        end: where a resumed read starts after this block (a byte offset, or a row count: the source's own unit).
        next_line: the row number that follows the block.
    """

    lines: np.ndarray
    arrays: Arrays
    labeled: bool
    end: int
    next_line: int


class RowSource(Protocol):
    """How ``prepare`` reads one kind of input file (raw Criteo, or files of a schema)."""

    byte_offsets: bool  # whether :attr:`SourceBlock.end` counts bytes of the file (progress in MB within a file)

    def key(self) -> Any:
        """What, besides the files and options, shapes the prepared data (part of the cache key; ``None``: nothing)."""

    def is_labeled(self, path: str) -> bool:
        """Whether a file has labels (read from its head)."""

    def mixed_labels(self, unlabeled: str, labeled: str, split: str) -> ValueError:
        """The error for a split holding both an unlabeled and a labeled file."""

    def blocks(
        self, path: str, on_bad_line: OnBadLine, stats: ParseStats, start: int, first_line: int
    ) -> Iterable[SourceBlock]:
        """Read a file from a position a previous block ended at (``start``, ``first_line``; 0 and 1: the start)."""


class CriteoSource:
    """Raw Criteo files (:mod:`dqrm_lightning.data.criteo`): shards of ``labels``, ``dense`` and ``cat``."""

    byte_offsets = True

    def key(self) -> Any:
        return None

    def is_labeled(self, path: str) -> bool:
        return is_labeled(path)

    def mixed_labels(self, unlabeled: str, labeled: str, split: str) -> ValueError:
        return CriteoFormatError(
            unlabeled,
            1,
            f"39 fields (unlabeled), but {labeled} of the same {split} split is labeled (40 fields): "
            "the files of a split are all labeled or all unlabeled",
        )

    def blocks(
        self, path: str, on_bad_line: OnBadLine, stats: ParseStats, start: int, first_line: int
    ) -> Iterable[SourceBlock]:
        for rows, end, next_line in iter_parsed(path, on_bad_line, stats, start_offset=start, first_line=first_line):
            lines = rows.line_numbers
            if lines is None:
                lines = np.arange(rows.first_line, rows.first_line + len(rows), dtype=np.int64)
            arrays = {"labels": rows.labels, "dense": rows.dense, "cat": rows.cat}
            yield SourceBlock(lines, arrays, rows.labeled, end, next_line)


def truth_file(raw_path: str | Path) -> Path:
    """The true click probabilities beside a raw file (synthetic data only): ``<raw file>.truth.npy``, float32."""
    return Path(f"{raw_path}{TRUTH_SUFFIX}")


@dataclass
class FileJob:
    """One raw input file and which of its lines go to which split.

    ``ranges`` holds ``(split, first_line, end_line)`` with 1-based, end-exclusive line numbers; ``end_line=None``
    means "to the end of the file".
    """

    path: str
    ranges: list[tuple[str, int, int | None]]

    def split_of(self, lines: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean masks per split for an array of line numbers."""
        masks: dict[str, np.ndarray] = {}
        for split, start, end in self.ranges:
            mask = lines >= start
            if end is not None:
                mask &= lines < end
            masks[split] = masks[split] | mask if split in masks else mask
        return masks


def count_lines(path: str | Path) -> int:
    """Count the lines of a raw file (a last line without newline counts)."""
    count = 0
    last = b"\n"
    with open_raw(path) as stream:
        while chunk := read_chunk(stream, 64 << 20, path, count + 1):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _day_bounds(total: int, days: int) -> list[int]:
    """DLRM's split of ``total`` lines into ``days`` near-equal parts (the first ``total % days`` get one more)."""
    size, extra = divmod(total, days)
    bounds = [0]
    for day in range(days):
        bounds.append(bounds[-1] + size + (1 if day < extra else 0))
    return bounds


def kaggle_jobs(train_txt: str | Path) -> list[FileJob]:
    """DLRM's Kaggle split of ``train.txt``: days 1-6 train, day 7 first half test, second half val."""
    total = count_lines(train_txt)
    if total < 7:
        raise CriteoFormatError(train_txt, None, f"needs at least 7 lines for the 7-day split, has {total}")
    bounds = _day_bounds(total, 7)
    day7 = bounds[7] - bounds[6]
    test_end = bounds[6] + (day7 + 1) // 2  # np.array_split: the first half gets the extra line
    return [
        FileJob(
            str(train_txt),
            [("train", 1, bounds[6] + 1), ("test", bounds[6] + 1, test_end + 1), ("val", test_end + 1, None)],
        )
    ]


def terabyte_jobs(directory: str | Path) -> list[FileJob]:
    """DLRM's Terabyte split: ``day_0`` .. ``day_22`` train, ``day_23`` first half test, second half val."""
    directory = Path(directory)
    days = []
    for day in range(24):
        found = [p for p in (directory / f"day_{day}", directory / f"day_{day}.gz") if p.exists()]
        if not found:
            raise FileNotFoundError(f"Terabyte layout: {directory}/day_{day} (or day_{day}.gz) is missing")
        days.append(found[0])
    total = count_lines(days[23])
    test_end = (total + 1) // 2
    jobs = [FileJob(str(p), [("train", 1, None)]) for p in days[:23]]
    jobs.append(FileJob(str(days[23]), [("test", 1, test_end + 1), ("val", test_end + 1, None)]))
    return jobs


def explicit_jobs(files: dict[str, Sequence[str | Path]]) -> list[FileJob]:
    """Each listed file belongs wholly to its split."""
    return [FileJob(str(path), [(split, 1, None)]) for split in SPLITS for path in files.get(split, ())]


def raw_jobs(
    train_files: Iterable[str] | str | None = None,
    val_files: Iterable[str] | str | None = None,
    test_files: Iterable[str] | str | None = None,
    kaggle_train_txt: str | Path | None = None,
    terabyte_dir: str | Path | None = None,
) -> list[FileJob]:
    """The jobs for raw input given one of three ways; the first given wins, in the order Kaggle, Terabyte, files.

    Args:
        train_files: Glob pattern(s) of training files.
        val_files: Glob pattern(s) of validation files.
        test_files: Glob pattern(s) of test files.
        kaggle_train_txt: Kaggle's ``train.txt``, for :func:`kaggle_jobs`.
        terabyte_dir: The directory of Terabyte's ``day_N`` files, for :func:`terabyte_jobs`.

    Returns:
        The jobs; empty when nothing is given.

    Raises:
        FileNotFoundError: A pattern that matches no file, or a missing Terabyte day.
    """
    if kaggle_train_txt:
        return kaggle_jobs(kaggle_train_txt)
    if terabyte_dir:
        return terabyte_jobs(terabyte_dir)
    patterns = {"train": train_files, "val": val_files, "test": test_files}
    return explicit_jobs({split: resolve_files(patterns[split]) for split in SPLITS})


@dataclass
class PrepareOptions:
    """What shapes the prepared data (part of the cache key)."""

    rows_per_shard: int = 1 << 21
    on_bad_line: OnBadLine = "error"
    negative_subsample: float = 0.0
    subsample_splits: tuple[str, ...] = ("train",)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows_per_shard <= 0:
            raise ValueError(f"`rows_per_shard` must be positive, got {self.rows_per_shard}")
        if self.on_bad_line not in ("error", "skip"):
            raise ValueError(f"`on_bad_line` must be 'error' or 'skip', got {self.on_bad_line!r}")
        if not 0.0 <= self.negative_subsample < 1.0:
            raise ValueError(f"`negative_subsample` must be in [0, 1), got {self.negative_subsample}")
        unknown = set(self.subsample_splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"`subsample_splits` must be among {SPLITS}, got {sorted(unknown)}")


def cache_key(jobs: Sequence[FileJob], options: PrepareOptions, source: RowSource | None = None) -> str:
    """A short hash of the inputs (paths, sizes, modification times, split ranges), the options and what the source
    adds (a schema's columns; raw Criteo: nothing, so Criteo keys are unchanged)."""
    parts = []
    for job in jobs:
        stat = os.stat(job.path)
        parts.append([os.path.abspath(job.path), stat.st_size, stat.st_mtime_ns, job.ranges])
    options_dict = asdict(options)
    options_dict["subsample_splits"] = list(options.subsample_splits)
    if not options.negative_subsample:
        options_dict["seed"] = 0  # the seed only draws the sub-sample: runs with other seeds share the prepared data
    extra = source.key() if source is not None else None
    key: list[Any] = [FORMAT_VERSION, parts, options_dict] + ([extra] if extra is not None else [])
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class _SplitWriter:
    """Buffers parsed rows of one split; ``take`` cuts them into the next numbered shard."""

    directory: Path
    shards: list[dict] = field(default_factory=list)
    buffers: list[Arrays] = field(default_factory=list)

    def add(self, arrays: Arrays) -> None:
        if len(arrays["labels"]):
            self.buffers.append(arrays)

    def take(self) -> tuple[Path, str, list[Arrays]] | None:
        """Name the next shard, record it, and hand over its buffers for writing."""
        if not self.buffers:
            return None
        name = shard_name(len(self.shards))
        self.shards.append({"name": name, "rows": sum(len(b["labels"]) for b in self.buffers)})
        buffers, self.buffers = self.buffers, []
        return self.directory, name, buffers


def _write_shard(directory: Path, name: str, buffers: list[Arrays]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key in buffers[0]:
        if isinstance(buffers[0][key], Ragged):
            ragged = Ragged.concat([b[key] for b in buffers])
            files = {f"{key}.values": ragged.values, f"{key}.offsets": ragged.offsets()}
        else:
            files = {key: np.concatenate([b[key] for b in buffers])}
        for array, values in files.items():
            tmp = directory / f".{name}.{array}.tmp.npy"
            np.save(tmp, values)
            os.replace(tmp, shard_file(directory / name, array))


class _BackgroundWriter:
    """Writes shards, then the progress file that records them, in a second thread (one batch in flight)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._last: Future | None = None

    def submit(self, shards: list[tuple[Path, str, list[Arrays]]], progress: Path, state: str) -> None:
        self.wait()
        self._last = self._pool.submit(self._write, shards, progress, state)

    @staticmethod
    def _write(shards: list[tuple[Path, str, list[Arrays]]], progress: Path, state: str) -> None:
        for shard in shards:
            _write_shard(*shard)
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(state)
        os.replace(tmp, progress)

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def split_labels(jobs: Sequence[FileJob], source: RowSource | None = None) -> dict[str, bool]:
    """Whether each split is labeled, from the head of its files (a split without files counts as labeled).

    Raises:
        CriteoFormatError: a split with both labeled (Criteo: 40 fields) and unlabeled (39 fields) files, naming one
            of each.
    """
    source = source or CriteoSource()
    kinds: dict[str, dict[bool, str]] = {split: {} for split in SPLITS}
    for job in jobs:
        labeled = source.is_labeled(job.path)
        for split, _, _ in job.ranges:
            kinds[split].setdefault(labeled, job.path)
    for split, found in kinds.items():
        if len(found) == 2:
            raise source.mixed_labels(found[False], found[True], split)
    return {split: False not in found for split, found in kinds.items()}


def split_is_labeled(meta: dict, split: str) -> bool:
    """Whether a prepared split has labels (``meta.json`` written before unlabeled input existed: labeled)."""
    return bool(meta["splits"][split].get("labeled", True))


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _truth_for(path: str) -> np.ndarray | None:
    truth = truth_file(path)
    return np.load(truth, mmap_mode="r") if truth.exists() else None


def _with_truth(block: SourceBlock, truth: np.ndarray | None, path: str) -> Arrays:
    """The block's arrays, with ``prob`` (the truth of its rows) when the file has a ``<file>.truth.npy``."""
    if truth is None:
        return block.arrays
    lines = block.lines
    if len(lines) and lines[-1] > len(truth):
        raise CriteoFormatError(truth_file(path), None, f"truth file has {len(truth)} rows, data has more")
    return block.arrays | {"prob": np.asarray(truth[lines - 1], dtype=np.float32)}


def prepare(
    jobs: Sequence[FileJob],
    out_dir: str | Path,
    options: PrepareOptions | None = None,
    progress: bool = False,
    source: RowSource | None = None,
) -> dict:
    """Parse input files into shards under ``out_dir`` (resuming an interrupted run); returns ``meta.json``.

    Args:
        jobs: the files and which of their rows go to which split.
        out_dir: the prepared directory.
        options: what shapes the shards.
        progress: show a progress bar.
        source: how to read the files (default: raw Criteo; files of a schema:
            :class:`~dqrm_lightning.data.tabular.TabularSource`).

    Raises:
        CriteoFormatError: malformed input with ``on_bad_line="error"`` (names file, line and field).
    """
    options = options or PrepareOptions()
    source = source or CriteoSource()
    out = Path(out_dir)
    meta_path = out / META_FILE
    key = cache_key(jobs, options, source)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
        raise FileExistsError(f"{out} holds data prepared from other inputs or options; choose another directory")
    labeled = split_labels(jobs, source)  # before any parsing: a mixed split is refused at once
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / _PROGRESS_FILE
    state = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if state is None or state.get("key") != key:
        state = {"key": key, "files": {}, "shards": {s: [] for s in SPLITS}, "skipped": 0, "rows": 0, "seconds": 0.0}
    writers = {s: _SplitWriter(out / s, shards=list(state["shards"][s])) for s in SPLITS}
    total_bytes = sum(os.path.getsize(job.path) for job in jobs)
    bar = ProgressMeter(total_bytes, "prepare", unit="MB", enabled=progress)
    start = time.perf_counter()
    writer_thread = _BackgroundWriter()
    try:
        for index, job in enumerate(jobs):
            done = state["files"].get(f"{index}:{job.path}", {"offset": 0, "line": 1, "done": False})
            if done["done"]:
                bar.update(os.path.getsize(job.path))
                continue
            _prepare_file(index, job, options, writers, state, progress_path, done, bar, writer_thread, source)
    finally:
        writer_thread.close()
        bar.close()
    state["seconds"] += time.perf_counter() - start
    meta = _meta(out, jobs, options, state, writers, labeled)
    if source.key() is not None:
        meta["source"] = source.key()
    _atomic_json(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    return meta


def _meta(
    out: Path,
    jobs: Sequence[FileJob],
    options: PrepareOptions,
    state: dict,
    writers: dict[str, _SplitWriter],
    labeled: dict[str, bool],
) -> dict:
    """The content of ``meta.json`` once every file is prepared."""
    return {
        "format": FORMAT_VERSION,
        "key": state["key"],
        "sources": [asdict(job) for job in jobs],
        "options": asdict(options),
        "splits": {
            s: {"rows": sum(x["rows"] for x in w.shards), "shards": w.shards, "labeled": labeled[s]}
            for s, w in writers.items()
        },
        "has_prob": any(
            shard_file(out / s / w.shards[0]["name"], "prob").exists() for s, w in writers.items() if w.shards
        ),
        "skipped_lines": state["skipped"],
        "skip_examples": state.get("skip_examples", []),
        "rows": state["rows"],
        "seconds": state["seconds"],
    }


def _prepare_file(
    index: int,
    job: FileJob,
    options: PrepareOptions,
    writers: dict[str, _SplitWriter],
    state: dict,
    progress_path: Path,
    done: dict,
    bar: ProgressMeter,
    writer_thread: _BackgroundWriter,
    source: RowSource,
) -> None:
    stats = ParseStats()
    truth = _truth_for(job.path)
    pending = 0
    compressed = job.path.endswith(".gz") or not source.byte_offsets
    file_size = os.path.getsize(job.path)
    reported = 0 if compressed else done["offset"]

    def checkpoint(offset: int, line: int, finished: bool) -> None:
        shards = [shard for writer in writers.values() if (shard := writer.take()) is not None]
        state["files"][f"{index}:{job.path}"] = {"offset": offset, "line": line, "done": finished}
        state["shards"] = {s: w.shards for s, w in writers.items()}
        state["skipped"] += stats.skipped
        state["rows"] += stats.rows
        state.setdefault("skip_examples", []).extend((stats.examples or [])[: 5 - len(state["skip_examples"])])
        stats.skipped, stats.rows, stats.examples = 0, 0, None
        writer_thread.submit(shards, progress_path, json.dumps(state, indent=1))

    next_line, end = done["line"], done["offset"]
    for block in source.blocks(job.path, options.on_bad_line, stats, done["offset"], done["line"]):
        end, next_line, lines = block.end, block.next_line, block.lines
        arrays = _with_truth(block, truth, job.path)
        keep = _subsample_mask(arrays["labels"], lines, job, options, index) if block.labeled else None
        for split, mask in job.split_of(lines).items():
            mask = mask & keep if keep is not None else mask
            whole = bool(mask.all())
            writers[split].add(arrays if whole else {k: v[mask] for k, v in arrays.items()})
        pending += len(lines)
        if not compressed:
            bar.update(end - reported)
            reported = end
        if pending >= options.rows_per_shard:
            checkpoint(end, next_line, False)
            pending = 0
    checkpoint(end, next_line, True)
    bar.update(file_size - reported)


def _subsample_mask(
    labels: np.ndarray, lines: np.ndarray, job: FileJob, options: PrepareOptions, index: int
) -> np.ndarray | None:
    """Drop negatives with probability ``negative_subsample`` in the chosen splits (DLRM's Terabyte setting).

    The decision for a line depends only on (seed, file index, line number), so resumed runs decide alike.
    """
    if options.negative_subsample <= 0:
        return None
    in_scope = np.zeros(len(lines), dtype=bool)
    for split, mask in job.split_of(lines).items():
        if split in options.subsample_splits:
            in_scope |= mask
    uniform = hash_uniform(lines.astype(np.uint64) + (np.uint64(index) << np.uint64(40)), options.seed)
    return ~(in_scope & (labels == 0) & (uniform < options.negative_subsample))


def load_meta(prepared_dir: str | Path) -> dict:
    """Read ``meta.json`` of a prepared directory, with a clear error when it is missing or incomplete."""
    path = Path(prepared_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{prepared_dir} is not a prepared Criteo directory (no {META_FILE}); run `dqrm data prepare`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: prepared format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    return meta


def shard_paths(prepared_dir: str | Path, split: str, meta: dict | None = None) -> list[tuple[Path, int]]:
    """``(shard prefix, rows)`` of a split, in order."""
    meta = meta or load_meta(prepared_dir)
    return [(Path(prepared_dir) / split / s["name"], int(s["rows"])) for s in meta["splits"][split]["shards"]]


def resolve_files(patterns: Iterable[str] | str | None) -> list[str]:
    """Expand glob patterns (sorted, de-duplicated); a pattern that matches nothing is an error."""
    import glob

    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if not p.endswith(TRUTH_SUFFIX))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        folders = [m for m in matches if os.path.isdir(m)]
        if folders:
            raise ValueError(
                f"{pattern!r} names the directory {folders[0]}: give the files in it (e.g. '{folders[0]}/*.tsv')"
            )
        files.extend(m for m in matches if m not in files)
    return files
