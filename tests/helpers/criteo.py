"""Tiny raw Criteo files for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def raw_line(label: int = 0, dense: list[str] | None = None, cat: list[str] | None = None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cat = cat if cat is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([str(label), *dense, *cat])


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` valid lines whose I1 holds the row number (so tests can identify rows after parsing)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        dense = [str(i)] + [str(int(x)) if x >= 0 else "" for x in rng.integers(-3, 50, size=12)]
        cat = [f"{int(v):08x}" if v % 7 else "" for v in rng.integers(0, 2**32, size=26)]
        lines.append(raw_line(int(rng.integers(0, 2)), dense, cat))
    path.write_text("\n".join(lines) + "\n")
    return path


def row_ids(dense: np.ndarray) -> np.ndarray:
    """Invert log1p of I1 to recover the row numbers written by :func:`write_rows`."""
    return np.rint(np.expm1(dense[:, 0].astype(np.float64))).astype(np.int64)
