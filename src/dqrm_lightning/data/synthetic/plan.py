"""Where each row of the synthetic row stream goes: splits, data files and generation blocks.

The row stream is split in order: the first rows form ``train``, then ``val``, then ``test``. A split goes to
``<split>.tsv``, or, when ``rows_per_file`` is set and the split is larger, to ``<split>-00000.tsv``,
``<split>-00001.tsv``, ... (``.parquet`` instead of ``.tsv`` for Parquet output). Rows are generated in blocks of
:data:`BLOCK_ROWS`, which may feed several files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dqrm_lightning.data.prepare import SPLITS, TRUTH_SUFFIX, truth_file
from dqrm_lightning.data.synthetic.bayes import AUC_METHOD, BayesStats

__all__ = ["BLOCK_ROWS", "PlannedFile", "block_pieces", "plan_files", "remove_stale", "split_counts", "split_summary"]

BLOCK_ROWS = 65_536
"""Rows per generated block (the unit of the random streams and of memory use)."""


@dataclass(frozen=True)
class PlannedFile:
    """One data file of the output.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        name: File name in the output directory.
        start: Index of its first row in the row stream.
        rows: Number of rows.
    """

    split: str
    name: str
    start: int
    rows: int


def split_counts(rows: int, fractions: Sequence[float]) -> list[int]:
    """Rows of train, val and test: ``rows`` cut at the rounded cumulative ``fractions``."""
    first = math.floor(rows * fractions[0] + 0.5)
    second = math.floor(rows * (fractions[0] + fractions[1]) + 0.5)
    second = min(max(second, first), rows)
    return [first, second - first, rows - second]


def plan_files(counts: Sequence[int], rows_per_file: int | None, suffix: str = ".tsv") -> list[PlannedFile]:
    """The data files of splits of ``counts`` rows, each file at most ``rows_per_file`` rows (None: one per split),
    named ``<split>[-NNNNN]<suffix>``."""
    plan, start = [], 0
    for split, count in zip(SPLITS, counts, strict=True):
        if rows_per_file is None or count <= rows_per_file:
            plan.append(PlannedFile(split, f"{split}{suffix}", start, count))
        else:
            for i, lo in enumerate(range(0, count, rows_per_file)):
                size = min(rows_per_file, count - lo)
                plan.append(PlannedFile(split, f"{split}-{i:05d}{suffix}", start + lo, size))
        start += count
    return plan


def block_pieces(plan: Sequence[PlannedFile], block: int, total: int) -> list[tuple[int, int, int]]:
    """``(file index, start, stop)`` row ranges of ``block`` (relative to the block) for each file it feeds."""
    lo, hi = block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, total)
    pieces = []
    for index, planned in enumerate(plan):
        start, stop = max(lo, planned.start), min(hi, planned.start + planned.rows)
        if start < stop:
            pieces.append((index, start - lo, stop - lo))
    return pieces


def remove_stale(out_dir: Path, plan: Sequence[PlannedFile], suffix: str = ".tsv") -> None:
    """Delete ``<suffix>`` data files of an earlier run with another layout, so that ``train*<suffix>`` globs stay
    right."""
    keep = {p.name for p in plan} | {truth_file(p.name).name for p in plan}
    for split in SPLITS:
        for path in [*out_dir.glob(f"{split}{suffix}*"), *out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9]{suffix}*")]:
            if path.name not in keep and path.name.endswith((suffix, suffix + TRUTH_SUFFIX)):
                path.unlink()


def split_summary(
    plan: Sequence[PlannedFile],
    rows: int,
    fractions: Sequence[float],
    rows_per_file: int | None,
    stats: dict[str, BayesStats],
) -> dict:
    """The split part of a generated data set's ``truth.json``: rows, fractions, files and the Bayes-optimal metrics
    of each split (every generator adds what describes its own click model)."""
    splits = {split: stats[split].result() | {"files": [p.name for p in plan if p.split == split]} for split in SPLITS}
    return {
        "rows": rows,
        "rows_per_split": {split: splits[split]["rows"] for split in SPLITS},
        "split_fractions": list(fractions),
        "rows_per_file": rows_per_file,
        "auc_method": AUC_METHOD,
        "splits": splits,
    }
