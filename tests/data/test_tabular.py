"""Parquet/CSV/TSV files of a feature schema: shards, batches (multi-hot, shared tables, hash and vocab), resume,
ranks, and one clear error per bad value naming file, row and column."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.data.dataset import CriteoIterableDataset
from dqrm_lightning.data.hashing import hash_bytes
from dqrm_lightning.data.prepare import shard_paths, truth_file
from dqrm_lightning.data.tabular import TabularFormatError, column_names, file_format, read_file
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import load_schema

ROWS = 23
GENRES = ["drama", "comedy", "noir", "42"]


def _schema(delimited_history: bool) -> dict:
    history = {"name": "history", "column": "watched", "table": "movies", "multi_hot": True}
    if delimited_history:
        history["delimiter"] = ";"
    return {
        "label": "clicked",
        "dense": [{"name": "row", "missing": None}, {"name": "price", "transform": "log1p", "missing": 0.0}],
        "sparse": [
            {"name": "user", "column": "user_id"},
            {"name": "movie", "column": "movie_id", "table": "movies"},
            history,
            {"name": "genres", "multi_hot": True, "delimiter": "|"},
        ],
        "tables": [
            {"name": "movies", "encoding": "vocab"},
            {"name": "t_user", "rows": 5},
            {"name": "t_genres", "rows": 3},
        ],
    }


def _columns(rows: int = ROWS) -> dict[str, list]:
    rng = np.random.default_rng(0)
    return {
        "clicked": [int(x) for x in rng.integers(0, 2, rows)],
        "row": list(range(rows)),  # a row id: which rows a batch holds
        "price": [None if r % 5 == 0 else float(r) / 2 for r in range(rows)],
        "user_id": [f"user{r % 4}" if r % 3 else str(r) for r in range(rows)],
        "movie_id": [int(100 + r % 6) for r in range(rows)],
        "watched": [[int(100 + (r + k) % 9) for k in range(r % 3)] for r in range(rows)],  # lengths 0, 1, 2
        "genres": ["|".join(GENRES[: r % 4]) for r in range(rows)],
    }


def write_parquet(path, rows: int = ROWS, row_group_size: int = 8):
    pq.write_table(pa.table(_columns(rows)), path, row_group_size=row_group_size)
    return path


def write_csv(path, rows: int = ROWS, sep: str = ","):
    columns = _columns(rows)
    names = list(columns)
    lines = [sep.join(names)]
    for r in range(rows):
        cells = []
        for name in names:
            value = columns[name][r]
            cells.append(";".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value))
        lines.append(sep.join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def _datamodule(tmp_path, train, delimited: bool, **kwargs) -> CriteoDataModule:
    options = {"batch_size": 4, "eval_batch_size": 4, "shuffle": True, "rows_per_shard": 7} | kwargs
    dm = CriteoDataModule(
        train_files=str(train), cache_dir=str(tmp_path / "cache"), schema=_schema(delimited), **options
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _same(a, b) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_parquet_and_csv_give_identical_batches(tmp_path):
    from_parquet = _datamodule(tmp_path, write_parquet(tmp_path / "d.parquet"), delimited=False)
    from_csv = _datamodule(tmp_path, write_csv(tmp_path / "d.csv"), delimited=True)
    from_tsv = _datamodule(tmp_path, write_csv(tmp_path / "d.tsv", sep="\t"), delimited=True)
    batches = list(from_parquet.train_dataloader())
    assert len(batches) == 6  # 23 rows, batches of 4
    for other in (from_csv, from_tsv):
        for a, b in zip(batches, list(other.train_dataloader()), strict=True):
            _same(a, b)
    assert from_parquet.resolved_schema().tables == from_csv.resolved_schema().tables


def test_batches_hold_the_rows_as_the_schema_says(tmp_path):
    dm = _datamodule(tmp_path, write_parquet(tmp_path / "d.parquet"), delimited=False, shuffle=False)
    batch = next(iter(dm.train_dataloader()))  # rows 0..3
    columns = _columns()
    kjt = batch.sparse_features
    assert kjt.keys() == ["user", "movie", "history", "genres"]
    assert batch.dense_features.dtype == torch.float32
    assert batch.dense_features.shape == (4, 2)
    assert batch.dense_features[:, 0].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(batch.dense_features[:, 1].numpy(), np.log1p([0.0, 0.5, 1.0, 1.5]), rtol=1e-6)
    assert batch.labels.tolist() == columns["clicked"][:4]
    assert kjt.lengths().dtype == torch.int32
    lengths = kjt.lengths().view(4, 4)  # (F, B) feature-major
    assert lengths[0].tolist() == [1, 1, 1, 1]
    assert lengths[1].tolist() == [1, 1, 1, 1]
    assert lengths[2].tolist() == [0, 1, 2, 0]  # multi-hot list column, an empty bag first
    assert lengths[3].tolist() == [0, 1, 2, 3]  # delimited text, "" an empty bag
    per_feature = kjt.to_dict()
    # hash: an integer text is the integer (row 0's user is "0", row 3's "3"); a string hashes its UTF-8 bytes
    users = per_feature["user"].values().tolist()
    text = b"user1"
    expected = int(hash_bytes(np.array([0, len(text)]), np.frombuffer(text, np.uint8)).view(np.int64)[0]) % 5
    assert users == [0, expected, users[2], 3]
    # the shared vocab table: one id space over movie and history, first seen in the data
    movies, history = per_feature["movie"].values().tolist(), per_feature["history"].values().tolist()
    assert movies == [0, 1, 2, 3]  # movie ids 100..103, first seen in this order
    assert history == [1, 2, 3]  # watched [101], [102, 103]: the same ids as the movies
    resolved = dm.resolved_schema()
    assert resolved.table("movies").rows == 9  # movie_id 100..105 and watched 100..108
    assert dm.table_sizes == [5, 9, 3]
    assert resolved.sized


def test_min_frequency_folds_rare_values_into_id_zero(tmp_path):
    schema = _schema(False)
    schema["tables"][0]["min_frequency"] = 5
    dm = CriteoDataModule(train_files=str(write_parquet(tmp_path / "d.parquet")), schema=schema, shuffle=False)
    dm.setup("fit")
    keys = np.concatenate([b.sparse_features.to_dict()["history"].values().numpy() for b in dm.train_dataloader()])
    # watched values 100..108 appear 1..5 times (with movie_id counts): rare ones share id 0
    assert dm.resolved_schema().table("movies").rows < 9
    assert (keys == 0).any()
    assert keys.max() < dm.resolved_schema().table("movies").rows


def test_resume_mid_epoch_gives_the_remaining_rows(tmp_path):
    dm = _datamodule(tmp_path, write_parquet(tmp_path / "d.parquet"), delimited=False)
    dataset = dm._datasets["train"]
    dataset.set_position(1, 0)
    full = list(dataset)
    dataset.set_position(1, 2)
    rest = list(dataset)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest, strict=True):
        _same(a, b)


def test_two_ranks_partition_the_rows(tmp_path):
    dm = _datamodule(tmp_path, write_parquet(tmp_path / "d.parquet"), delimited=False)
    shards = shard_paths(dm.prepared_dir, "train")
    seen = []
    for rank in (0, 1):
        dataset = CriteoIterableDataset(shards, dm.encoder(), 4, True, 0, rank, 2)
        seen.append([int(x) for b in dataset for x in b.dense_features[:, 0]])
    assert len(seen[0]) + len(seen[1]) == ROWS
    assert sorted(seen[0] + seen[1]) == list(range(ROWS))


def test_truth_beside_a_file_becomes_prob(tmp_path):
    path = write_parquet(tmp_path / "d.parquet")
    truth = np.linspace(0.1, 0.9, ROWS, dtype=np.float32)
    np.save(truth_file(path), truth)
    dm = _datamodule(tmp_path, path, delimited=False)
    assert dm.ensure_prepared()["has_prob"]
    prob = np.concatenate([np.load(f"{prefix}.prob.npy") for prefix, _ in shard_paths(dm.prepared_dir, "train")])
    np.testing.assert_array_equal(prob, truth)


def test_unlabeled_files_read_without_label_column(tmp_path):
    columns = _columns()
    del columns["clicked"]
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.table(columns), path)
    arrays = read_file(path, load_schema(_schema(False)))
    assert arrays["labels"].tolist() == [0] * ROWS
    assert column_names(path)[0] == "row"
    assert file_format(path) == "parquet"


def _bad_csv(tmp_path, column: str, value: str, row: int = 3):
    path = write_csv(tmp_path / "bad.csv")
    lines = path.read_text().splitlines()
    names = lines[0].split(",")
    cells = lines[row].split(",")
    cells[names.index(column)] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("price", "cheap", "expected a number, got 'cheap'"),
        ("row", "", "missing value"),
        ("clicked", "2", "label must be 0 or 1, got '2'"),
        ("user_id", "", "missing or empty value"),
        ("price", "-3", "negative value -3.0 with `transform: log1p`"),
        ("genres", "drama||noir", "missing or empty value"),
        ("row", "inf", "not a finite number"),
    ],
)
def test_a_bad_csv_value_names_file_line_and_column(tmp_path, column, value, message):
    path = _bad_csv(tmp_path, column, value, row=3)  # the 4th line: data row 3
    with pytest.raises(TabularFormatError, match="row") as info:
        read_file(path, load_schema(_schema(True)))
    assert str(info.value).startswith(f"{path}: row 3, line 4, column {column!r}: ")
    assert message in str(info.value)
    assert (info.value.row, info.value.line, info.value.column) == (3, 4, column)


def test_a_bad_parquet_value_names_file_row_and_column(tmp_path):
    columns = _columns()
    columns["row"][17] = None
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=8)
    with pytest.raises(TabularFormatError) as info:
        read_file(path, load_schema(_schema(False)))
    assert str(info.value) == (
        f"{path}: row 18, column 'row': missing value (the schema's `missing` is null: give a number to fill it)"
    )


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("user_id", [1.5] * ROWS, "holds integers or strings, this one holds double"),
        ("movie_id", [[1]] * ROWS, "set `multi_hot: true`"),
        ("clicked", [0.5] * ROWS, "label must be 0 or 1, got 0.5"),
        ("watched", ["1;2"] * ROWS, "needs `delimiter`"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_is_named(tmp_path, column, values, message):
    columns = _columns() | {column: values}
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(TabularFormatError, match="row 1, column") as info:
        read_file(path, load_schema(_schema(False)))
    assert f"column {column!r}" in str(info.value)
    assert message in str(info.value)


def test_a_missing_column_names_file_and_column(tmp_path):
    columns = _columns()
    del columns["genres"]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(TabularFormatError) as info:
        read_file(path, load_schema(_schema(False)))
    assert str(info.value) == f"{path}: column 'genres': the file has no such column"


def test_a_short_csv_line_is_named(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    lines = path.read_text().splitlines()
    lines[5] = "1,2"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TabularFormatError, match=r"row 5, line 6: expected 7 fields, found 2"):
        read_file(path, load_schema(_schema(True)))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("num_embeddings_per_feature", [10] * 26), ("categorical_encoding", "vocab"), ("min_frequency", 2)],
)
def test_criteo_settings_with_a_schema_are_refused(tmp_path, setting, value):
    with pytest.raises(ConfigError, match=f"`data.{setting}` is for raw Criteo files"):
        CriteoDataModule(train_files=str(tmp_path / "x.parquet"), schema=_schema(False), **{setting: value})


def test_a_hash_table_without_rows_is_refused(tmp_path):
    schema = _schema(False)
    schema["tables"][1]["rows"] = None
    with pytest.raises(ConfigError, match=r"\['t_user'\] use `encoding: hash` and need `rows`"):
        CriteoDataModule(train_files=str(tmp_path / "x.parquet"), schema=schema)


def test_a_vocabulary_larger_than_its_rows_is_refused(tmp_path):
    schema = _schema(False)
    schema["tables"][0]["rows"] = 4
    dm = CriteoDataModule(train_files=str(write_parquet(tmp_path / "d.parquet")), schema=schema)
    with pytest.raises(ValueError, match=r"vocabulary exceeds the `rows` of schema tables \(movies: 9 > 4\)"):
        dm.resolved_schema()


def test_criteo_resolved_schema_is_the_preset(tmp_path):
    from dqrm_lightning.schema import criteo_schema

    dm = CriteoDataModule(prepared_dir=str(tmp_path), num_embeddings_per_feature=[7] * 26)
    assert dm.resolved_schema() == criteo_schema([7] * 26)
