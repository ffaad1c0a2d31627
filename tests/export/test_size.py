import pytest

from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.export.size import model_bytes, quantized_model_bytes, quantized_table_bytes, quantized_table_ratio
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.schema import FeatureSchema

TABLES_ONLY = ModelShape(table_rows=[1000] * 26, embedding_dim=16, mlp_layers=[])


@pytest.mark.parametrize(
    ("bits", "dim", "granularity", "ratio"),
    [
        (4, 16, "per_row", 0.1875),  # 8 bytes of codes + fp16 scale and bias = 12 of 64 bytes per row
        (4, 64, "per_row", 36 / 256),
        (2, 16, "per_row", 8 / 64),
        (8, 16, "per_row", 20 / 64),
        (4, 16, "per_table", (1000 * 8 + 4) / (1000 * 64)),  # one fp16 scale and offset per table
    ],
)
def test_tables_are_counted_as_stored(bits, dim, granularity, ratio):
    shape = ModelShape(table_rows=[1000] * 26, embedding_dim=dim, mlp_layers=[])
    config = QATConfig(embedding_bits=bits, embedding_granularity=granularity)
    assert quantized_model_bytes(shape, config) / model_bytes(shape) == ratio
    with_mlp = ModelShape(table_rows=[1000] * 26, embedding_dim=dim, mlp_layers=[(13, 8), (8, 1)])
    assert quantized_table_bytes(with_mlp.table_rows, dim, config) / (4 * 26_000 * dim) == ratio  # tables alone
    assert quantized_model_bytes(with_mlp, config) > quantized_table_bytes(with_mlp.table_rows, dim, config)


def test_a_size_budget_sets_the_counted_bits():
    config = QATConfig(size_budget=0.125)
    assert quantized_model_bytes(TABLES_ONLY, config) <= 0.125 * model_bytes(TABLES_ONLY)
    assert quantized_model_bytes(TABLES_ONLY, config) > quantized_model_bytes(TABLES_ONLY, QATConfig(embedding_bits=2))


def test_a_schema_counts_each_table_once_at_its_own_dimension():
    schema = FeatureSchema.from_dict(
        {
            "dense": [],
            "sparse": [{"name": "movie", "table": "movies"}, "user", {"name": "history", "table": "movies"}],
            "tables": [{"name": "movies", "rows": 100, "dim": 16}, {"name": "t_user", "rows": 50}],
        }
    )
    config = QATConfig(embedding_bits=4)
    # movies (shared by two features) once at D 16, t_user at the model's D 8; an fp16 scale and offset each
    assert quantized_table_bytes([100, 50], 8, config, schema) == (100 * 8 + 4) + (50 * 4 + 4)
    assert quantized_table_ratio([100, 50], 8, config, schema) == 1008 / (4 * (100 * 16 + 50 * 8))
    with pytest.raises(ValueError, match="3 table sizes for the 2 tables of the schema"):
        quantized_table_bytes([100, 50, 7], 8, config, schema)
