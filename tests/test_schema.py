"""FeatureSchema: reading (mappings, YAML files, bare names), the defaults it fills in, lookups, and one clear error
per bad entry."""

from __future__ import annotations

import pytest

from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import FeatureSchema, criteo_schema, load_schema, schema_of

MAPPING = {
    "label": "clicked",
    "dense": ["age", {"name": "price", "transform": "log1p", "missing": 0.0}],
    "sparse": [
        {"name": "user", "column": "user_id"},
        {"name": "tags", "multi_hot": True, "delimiter": "|"},
        {"name": "item", "table": "catalog"},
        {"name": "history", "table": "catalog", "multi_hot": True},
    ],
    "tables": [{"name": "catalog", "rows": 500, "pooling": "mean"}, {"name": "t_user", "rows": 100, "dim": 8}],
}


def test_defaults_lookups_and_round_trip():
    schema = FeatureSchema.from_dict(MAPPING)
    assert schema.feature_names == ["user", "tags", "item", "history"]
    assert schema.table_names == ["t_user", "t_tags", "catalog"]  # first-use order; `t_tags` implicit
    assert schema.features_of("catalog") == ["item", "history"]
    assert schema.pooled_feature_names == ["user", "tags", "item", "history"]
    assert schema.table_of("history").pooling == "mean"
    assert schema.dim_of("t_user", 16) == 8
    assert schema.dim_of("catalog", 16) == 16
    assert schema.sparse[0].source == "user_id"
    assert schema.dense[0].source == "age"
    assert schema.shared_tables
    assert schema.multi_hot
    assert not schema.sized  # t_tags has no rows
    with pytest.raises(ConfigError, match=r"tables \['t_tags'\] have no `rows`"):
        schema.table_rows()
    sized = schema.with_rows({"t_tags": 50})
    assert sized.table_rows() == [100, 50, 500]
    assert FeatureSchema.from_dict(sized.to_dict()) == sized
    assert schema_of({"schema": sized.to_dict()}) == sized


def test_pooled_order_groups_the_features_of_a_table():
    schema = FeatureSchema.from_dict(
        {"dense": ["x"], "sparse": [{"name": "a", "table": "t"}, "b", {"name": "c", "table": "t"}]}
    )
    assert schema.feature_names == ["a", "b", "c"]
    assert schema.pooled_feature_names == ["a", "c", "b"]  # TorchRec's SparseArch: table by table


def test_criteo_preset():
    schema = criteo_schema([7] * 26)
    assert schema.feature_names == [f"C{i}" for i in range(1, 27)]
    assert schema.table_names == [f"t_C{i}" for i in range(1, 27)]
    assert [d.name for d in schema.dense] == [f"I{i}" for i in range(1, 14)]
    assert all(d.transform == "log1p" and d.missing == 0.0 for d in schema.dense)
    assert schema_of({"num_embeddings_per_feature": [7] * 26, "schema": None}) == schema
    with pytest.raises(ConfigError, match="needs 26 sizes, got 3"):
        criteo_schema([1, 2, 3])


def test_yaml_files_at_the_top_level_or_under_data(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("dense: [x]\nsparse: [a]\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("trainer: {max_epochs: 1}\ndata:\n  schema:\n    dense: [x]\n    sparse: [a]\n")
    assert load_schema(top) == load_schema(str(nested))
    assert load_schema(top).table_names == ["t_a"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparse: [{name: a, pooling: max}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: `schema.sparse\[0\]` has unknown keys \['pooling'\]"):
        load_schema(bad)
    with pytest.raises(ConfigError, match=r"schema file .*missing\.yaml does not exist"):
        load_schema(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sparse": []}, "needs at least one sparse feature"),
        ({"sparse": ["a", "a"]}, "`schema.sparse` names 'a' twice"),
        ({"sparse": [{"table": "t"}]}, r"`schema.sparse\[0\]` needs a `name`"),
        ({"sparse": [3]}, r"`schema.sparse\[0\]` must be a mapping or a name"),
        ({"sparse": [{"name": "a", "delimiter": ","}]}, "`delimiter` is for multi-hot features only"),
        ({"dense": [{"name": "x", "transform": "log"}]}, "`transform` must be one of"),
        ({"tables": [{"name": "unused"}]}, r"lists tables no sparse feature uses: \['unused'\]"),
        ({"tables": [{"name": "t_a", "rows": 0}]}, "`rows` must be a positive integer or null, got 0"),
        ({"tables": [{"name": "t_a", "dim": True}]}, "`dim` must be a positive integer or null"),
        ({"tables": [{"name": "t_a", "pooling": "max"}]}, "`pooling` must be one of"),
        ({"tables": [{"name": "t_a", "encoding": "bloom"}]}, "`encoding` must be one of"),
        ({"tables": [{"name": "t_a", "min_frequency": 3}]}, "`min_frequency` needs `encoding: vocab`"),
        ({"labels": "y"}, r"`schema` has unknown keys \['labels'\]"),
    ],
)
def test_each_bad_entry_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        FeatureSchema.from_dict({"dense": ["x"], "sparse": ["a"]} | change)
