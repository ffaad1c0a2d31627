"""Tests of synthetic Parquet data of any feature schema (``dqrm data synth --schema``) and its click model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dqrm_lightning.commands.data import main as data_main
from dqrm_lightning.data.prepare import SPLITS, truth_file
from dqrm_lightning.data.synthetic.parquet import synthesize_schema
from dqrm_lightning.data.synthetic.plan import split_counts
from dqrm_lightning.data.synthetic.schema_truth import SchemaGroundTruth, SchemaSynthOptions
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import load_schema
from dqrm_lightning.stats import weighted_auc

SCHEMA = Path(__file__).parents[2] / "configs" / "schemas" / "synthetic_multihot.yaml"
ROWS = 6_000
SEED = 3
MAX_BAG = 6


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("multihot")
    summary = synthesize_schema(SCHEMA, ROWS, SEED, out, options=SchemaSynthOptions(max_bag=MAX_BAG))
    return out, summary


def read_split(out: Path, split: str) -> pa.Table:
    return pq.read_table(out / f"{split}.parquet")


def bags(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(lengths, ids)`` of each sparse column of the example schema (tags parsed from their "|"-joined text)."""
    out = {name: (np.ones(table.num_rows, dtype=np.int64), table[name].to_numpy()) for name in ("user", "item")}
    history = table["history"].combine_chunks()
    out["history"] = (np.diff(history.offsets.to_numpy()), history.values.to_numpy())
    texts = table["tags"].to_pylist()
    parsed = [[int(v) for v in text.split("|")] if text else [] for text in texts]
    out["tags"] = (np.array([len(p) for p in parsed]), np.array([v for p in parsed for v in p], dtype=np.int64))
    return out


def test_files_types_and_shapes(written: tuple[Path, dict]) -> None:
    out, summary = written
    counts = split_counts(ROWS, (0.8, 0.1, 0.1))
    expected = pa.schema(
        [
            pa.field("label", pa.uint8(), nullable=False),
            *(pa.field(name, pa.float32(), nullable=False) for name in ("price", "age", "score", "recency")),
            pa.field("user", pa.int64(), nullable=False),
            pa.field("item", pa.int64(), nullable=False),
            pa.field("history", pa.list_(pa.int64()), nullable=False),
            pa.field("tags", pa.string(), nullable=False),
        ]
    )
    for split, count in zip(SPLITS, counts, strict=True):
        table = read_split(out, split)
        assert table.schema.remove_metadata().equals(expected), table.schema
        assert table.num_rows == count == summary["rows_per_split"][split]
        truth = np.load(truth_file(out / f"{split}.parquet"))
        assert truth.dtype == np.float32
        assert truth.shape == (count,)
        assert ((truth > 0) & (truth < 1)).all()
        assert set(np.unique(table["label"].to_numpy())) == {0, 1}
        assert not (table["price"].to_numpy() < 0).any()
        assert not (table["age"].to_numpy() < 0).any()
    sized = load_schema(out / "schema.yaml")
    assert sized.sized
    assert sized.table_rows() == [20_000, 50_000, 10_000]
    assert load_schema(summary["schema"]) == sized


def test_truth_predicts_labels(written: tuple[Path, dict]) -> None:
    out, summary = written
    table = read_split(out, "train")
    truth = np.load(truth_file(out / "train.parquet"))
    labels = table["label"].to_numpy()
    auc = weighted_auc(labels, truth)
    assert auc > 0.7
    assert auc == pytest.approx(summary["splits"]["train"]["bayes_auc"], abs=1e-3)
    assert abs(labels.mean() - 0.256) < 0.03


def test_bags_and_shared_table_ids(written: tuple[Path, dict]) -> None:
    out, _ = written
    table = pa.concat_tables([read_split(out, split) for split in SPLITS])
    parsed = bags(table)
    for name in ("history", "tags"):
        lengths, ids = parsed[name]
        assert lengths.min() == 0
        assert lengths.max() == MAX_BAG
        assert len(ids) == lengths.sum()
    limits = {"user": 20_000, "item": 50_000, "history": 50_000, "tags": 10_000}
    for name, limit in limits.items():
        ids = parsed[name][1]
        assert ids.min() >= 0, name
        assert ids.max() < limit, name
    # a shared table's popularity is shared: the most popular item is the most popular history entry too
    assert np.bincount(parsed["item"][1]).argmax() == np.bincount(parsed["history"][1]).argmax() == 0


def test_truth_is_the_documented_function_of_the_written_row(written: tuple[Path, dict]) -> None:
    """bias + dense weights + one shared effect per `items` id (mean-pooled in history) + mean tag effects."""
    out, summary = written
    model = SchemaGroundTruth(SCHEMA, SEED, SchemaSynthOptions(max_bag=MAX_BAG))
    table = read_split(out, "val")
    parsed = bags(table)
    dense = np.stack([table[c].to_numpy() for c in ("price", "age", "score", "recency")], axis=1)
    x = np.concatenate([np.log1p(dense[:, :2].astype(np.float64)), dense[:, 2:].astype(np.float64)], axis=1)
    z = summary["bias"] + x @ np.array(summary["dense_weights"])
    z += model.table_effects(0, parsed["user"][1]) + model.table_effects(1, parsed["item"][1])
    for name, table_index in (("history", 1), ("tags", 2)):
        lengths, ids = parsed[name]
        rows = np.repeat(np.arange(len(lengths)), lengths)
        z += np.bincount(rows, model.table_effects(table_index, ids), len(lengths)) / np.maximum(lengths, 1)
    truth = np.load(truth_file(out / "val.parquet"))
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), truth, rtol=1e-5, atol=1e-6)


def test_deterministic_and_a_prefix_of_a_longer_run(tmp_path: Path, written: tuple[Path, dict]) -> None:
    out, _ = written
    again = synthesize_schema(SCHEMA, ROWS, SEED, tmp_path / "a", options=SchemaSynthOptions(max_bag=MAX_BAG))
    assert again["splits"] == json.loads((out / "truth.json").read_text())["splits"]
    for split in SPLITS:
        assert read_split(tmp_path / "a", split).equals(read_split(out, split))
    other = synthesize_schema(SCHEMA, ROWS, SEED + 1, tmp_path / "b", options=SchemaSynthOptions(max_bag=MAX_BAG))
    assert other["splits"]["train"]["positives"] != again["splits"]["train"]["positives"]
    longer = synthesize_schema(SCHEMA, 70_000, SEED, tmp_path / "c", split_fractions=(1, 0, 0), rows_per_file=40_000)
    assert [p.name for p in sorted((tmp_path / "c").glob("train*.parquet"))] == [
        "train-00000.parquet",
        "train-00001.parquet",
    ]
    first = read_split(tmp_path / "c", "train-00000").slice(0, ROWS)
    shorter = synthesize_schema(SCHEMA, ROWS, SEED, tmp_path / "d", split_fractions=(1, 0, 0))
    assert shorter["rows_per_split"]["train"] == ROWS
    assert read_split(tmp_path / "d", "train").equals(first)
    assert longer["rows"] == 70_000


def test_cli(tmp_path: Path) -> None:
    summary = Path(
        data_main(["synth", "--schema", str(SCHEMA), "--rows", "2000", "--out", str(tmp_path), "--max-bag", "3"])
    )
    result = json.loads(summary.read_text())
    assert result["command"] == "data synth"
    assert result["format"] == "parquet"
    assert result["options"]["max_bag"] == 3
    assert pq.read_table(tmp_path / "train.parquet").num_rows == 1600
    with pytest.raises(SystemExit, match="not both"):
        data_main(["synth", "--schema", str(SCHEMA), "--preset", "demo", "--rows", "10", "--out", str(tmp_path)])


def test_bad_schemas_are_named(tmp_path: Path) -> None:
    no_label = {"label": None, "dense": ["a"], "sparse": ["b"]}
    with pytest.raises(ConfigError, match="label"):
        synthesize_schema(load_schema(no_label), 100, 0, tmp_path)
    same_column = {"dense": ["a"], "sparse": [{"name": "b", "column": "a"}], "tables": [{"name": "t_b", "rows": 5}]}
    with pytest.raises(ConfigError, match="'a' is written by two fields"):
        synthesize_schema(load_schema(same_column), 100, 0, tmp_path)
    with pytest.raises(ConfigError, match="max_bag"):
        SchemaSynthOptions(max_bag=-1)
    written = yaml.safe_dump({"data": {"schema": {"dense": [], "sparse": ["x"]}}})
    (tmp_path / "s.yaml").write_text(written)
    summary = synthesize_schema(
        tmp_path / "s.yaml", 100, 0, tmp_path / "out", options=SchemaSynthOptions(default_rows=7)
    )
    assert summary["schema"]["tables"][0]["rows"] == 7
    assert pq.read_table(tmp_path / "out" / "train.parquet")["x"].to_numpy().max() < 7
