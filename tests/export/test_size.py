import pytest

from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.export.size import model_bytes, quantized_model_bytes, quantized_table_bytes
from dqrm_lightning.quant.config import QATConfig

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
