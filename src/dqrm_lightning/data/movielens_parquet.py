"""MovieLens 100K as Parquet files in its own feature schema (``configs/schemas/movielens.yaml``), with a multi-hot
genre bag and the user's viewing history looking up the movie table.

The same ratings, splits, labels and fields as the raw Criteo conversion (:mod:`dqrm_lightning.data.movielens`),
written under natural names; ``train.parquet``, ``val.parquet`` and ``test.parquet`` have these columns:

* ``label``: uint8, 1 when the rating is 4 or 5;
* dense, float32: ``user_age``, ``movie_age`` (rating year - release year, >= 0; null without a release date),
  ``hour`` and ``weekday`` of the rating (UTC, Monday = 0), ``genre_count``, ``user_ratings`` and ``movie_ratings``
  (ratings of the user / movie in the training split);
* one-hot, int64: ``user_id``, ``movie_id`` (MovieLens' own ids), ``gender``, ``occupation``, ``zip`` (codes 1, 2,
  ... of the sorted distinct values; 0 where missing);
* multi-hot, ``list<int64>``: ``genres`` (indices into :data:`~dqrm_lightning.data.movielens.GENRES` of the movie's
  genre flags) and ``history``: the movie ids of the user's previous ratings, strictly earlier in time than this
  one (ties in time excluded), at most :data:`HISTORY_LENGTH`, oldest first. ``history`` holds the same ids as
  ``movie_id`` and looks up the same table. It is computed from which movies were rated and when, never from the
  ratings themselves (the labels), over all splits: what a recommender serving at that moment would know;
* ``timestamp``: int64 Unix seconds of the rating (not a feature of the schema; for checks and analysis).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dqrm_lightning.data.movielens import GENRES, MovieLensTables, _column, _features, _movie_side, _rows_of

__all__ = ["DENSE_COLUMNS", "HISTORY_LENGTH", "ONE_HOT_COLUMNS", "history_ranges", "movielens_table"]

HISTORY_LENGTH = 20
"""The most previous ratings in ``history``."""

DENSE_COLUMNS = ("user_age", "movie_age", "hour", "weekday", "genre_count", "user_ratings", "movie_ratings")
"""The dense columns: raw Criteo fields ``I1..I7``, in order."""

ONE_HOT_COLUMNS = ("user_id", "movie_id", "gender", "occupation", "zip")
"""The one-hot columns: raw Criteo fields ``C1..C5``, in order."""


def history_ranges(
    user_ids: np.ndarray, movie_ids: np.ndarray, timestamps: np.ndarray, length: int = HISTORY_LENGTH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each rating's history lies in the ratings sorted by user, time and movie.

    Returns:
        ``(movies, begin, end)``: the movie ids in that order, and per rating (table order) the range
        ``movies[begin:end]`` of the user's at most ``length`` latest ratings strictly earlier in time.
    """
    order = np.lexsort((movie_ids, timestamps, user_ids))
    users, times = user_ids[order], timestamps[order]
    position = np.arange(len(order))
    new_user = np.r_[True, users[1:] != users[:-1]]
    new_time = new_user | np.r_[True, times[1:] != times[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    end_sorted = np.maximum.accumulate(np.where(new_time, position, 0))  # first rating of the user at that time
    begin_sorted = np.maximum(user_start, end_sorted - length)
    begin, end = np.empty_like(begin_sorted), np.empty_like(end_sorted)
    begin[order], end[order] = begin_sorted, end_sorted
    return movie_ids[order], begin, end


def _bags(source: np.ndarray, begin: np.ndarray, end: np.ndarray) -> pa.ListArray:
    """A ``list<int64>`` array whose row ``i`` is ``source[begin[i]:end[i]]``."""
    lengths = end - begin
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    values = source[np.repeat(begin, lengths) + within].astype(np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def movielens_table(tables: MovieLensTables, train: np.ndarray) -> pa.Table:
    """Every rating (in table order) as a row of the columns in the module docstring; counts from ``train`` rows."""
    labels, dense, dense_missing, cat, cat_missing = _features(tables, train)
    ratings = tables.ratings
    user_ids, movie_ids = _column(ratings, "user_id"), _column(ratings, "movie_id")
    timestamps = _column(ratings, "timestamp").astype(np.int64)
    columns: dict[str, pa.Array] = {"label": pa.array(labels, pa.uint8())}
    for j, name in enumerate(DENSE_COLUMNS):
        columns[name] = pa.array(dense[:, j].astype(np.float32), mask=dense_missing[:, j])
    for j, name in enumerate(ONE_HOT_COLUMNS):
        columns[name] = pa.array(np.where(cat_missing[:, j], 0, cat[:, j]).astype(np.int64))
    movies = _movie_side(tables.items)
    flags = np.stack([_column(tables.items, g).astype(bool) for g in GENRES], axis=1)
    rated = flags[_rows_of(movies, movie_ids, "movie_id")]  # (n, 19)
    genre_ends = np.cumsum(rated.sum(axis=1))
    columns["genres"] = _bags(np.nonzero(rated)[1], genre_ends - rated.sum(axis=1), genre_ends)
    columns["history"] = _bags(*history_ranges(user_ids, movie_ids, timestamps))
    columns["timestamp"] = pa.array(timestamps)
    return pa.table(columns)
