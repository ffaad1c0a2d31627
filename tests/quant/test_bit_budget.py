import pytest

from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.quant.config import QATConfig, stored_table_bytes
from tests.helpers.model import KAGGLE, qat_module

SMALL = {"C1": 1000, "C2": 100, "C3": 10}  # FP32 at D=16: 64,000 + 6,400 + 640 = 71,040 bytes
KAGGLE_ROWS = dict(zip(DEFAULT_CAT_NAMES, KAGGLE, strict=True))


def _fraction(config: QATConfig, rows: dict[str, int], dim: int) -> float:
    bits = config.assign_bits(rows, dim)
    stored = sum(stored_table_bytes(rows[f], dim, bits[f], config.embedding_granularity) for f in rows)
    return stored / sum(stored_table_bytes(rows[f], dim, None, "per_table") for f in rows)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (0.26, {"C1": 8, "C2": 8, "C3": 8}),  # all INT8: 17,772 bytes = 0.2502
        (0.25, {"C1": 4, "C2": 8, "C3": 8}),  # the step that saves most (C1 8 -> 4, 8,000 bytes) suffices
        (0.1, {"C1": 2, "C2": 8, "C3": 8}),  # then C1 4 -> 2 (4,000 bytes) before C2 8 -> 4 (800)
        (0.07, {"C1": 2, "C2": 4, "C3": 8}),  # C2 8 -> 4: 4,972 bytes = 0.06999
        (0.065, {"C1": 2, "C2": 2, "C3": 8}),  # C2 4 -> 2 (400) before C3 8 -> 4 (80): 4,572 bytes = 0.0644
    ],
)
def test_greedy_policy_lowers_the_table_that_saves_most_until_the_budget_fits(budget, expected):
    config = QATConfig(size_budget=budget)
    assert config.assign_bits(SMALL, 16) == expected
    assert _fraction(config, SMALL, 16) <= budget


def test_an_unreachable_budget_names_itself_and_the_smallest_reachable_fraction():
    with pytest.raises(ValueError, match=r"^`size_budget` 0.05 is unreachable: .* take 0.0627 of their FP32 bytes"):
        QATConfig(size_budget=0.05).assign_bits(SMALL, 16)  # all INT2: 4,452 bytes = 0.0627
    QATConfig(size_budget=0.0627).assign_bits(SMALL, 16)  # just reachable


def test_per_row_scales_and_biases_count_in_the_budget():
    one = {"C1": 1000}
    assert QATConfig(size_budget=0.1875, embedding_granularity="per_row").assign_bits(one, 16) == {"C1": 4}  # 12/64
    assert QATConfig(size_budget=0.18, embedding_granularity="per_row").assign_bits(one, 16) == {"C1": 2}
    assert QATConfig(size_budget=0.18).assign_bits(one, 16) == {"C1": 4}  # per table: 8,004 bytes = 0.125


@pytest.mark.parametrize(
    ("granularity", "budgets"),
    [("per_table", (0.3, 0.25, 0.2, 0.15, 0.125, 0.1, 0.07)), ("per_row", (0.3, 0.25, 0.2, 0.15, 0.13))],
)  # per row at D = 16, INT2 takes (4 + 4) / 64 = 0.125
def test_budget_is_met_monotone_and_deterministic_on_kaggle_tables(granularity, budgets):
    previous = None
    for budget in budgets:
        config = QATConfig(size_budget=budget, embedding_granularity=granularity)
        bits = config.assign_bits(KAGGLE_ROWS, 16)
        assert bits == config.assign_bits(dict(reversed(KAGGLE_ROWS.items())), 16)  # not the order of the dict
        assert _fraction(config, KAGGLE_ROWS, 16) <= budget
        if previous is not None:  # a smaller budget never gives a table more bits
            assert all(bits[f] <= previous[f] for f in bits)
        previous = bits
    assert len(set(previous.values())) > 1  # mixed precision, not one width for all


def test_pinned_tables_keep_their_bits_and_the_start_is_embedding_bits():
    config = QATConfig(size_budget=0.1, embedding_bits=4, embedding_bits_per_table={"C1": 8})
    bits = config.assign_bits(KAGGLE_ROWS, 16)
    assert bits["C1"] == 8
    assert all(b in (2, 4) for f, b in bits.items() if f != "C1")
    assert _fraction(config, KAGGLE_ROWS, 16) <= 0.1


def test_the_quantizer_takes_the_budget_bits_and_a_checkpoint_restores_them():
    config = QATConfig(size_budget=0.2)
    module = qat_module(config, rows=40)  # D = 8: INT8 per table is 0.25 + scales, so some tables go lower
    quantizer = module.embedding_quantizer
    assert quantizer.table_bits() == config.assign_bits(dict.fromkeys(DEFAULT_CAT_NAMES, 40), 8)
    assert {2, 4, 8} >= set(quantizer.table_bits().values())
    assert len(set(quantizer.table_bits().values())) > 1
    assert [int(q) for q in quantizer.qmax] == [2 ** int(b) // 2 - 1 for b in quantizer.bits]
    restored = qat_module(config, rows=40).embedding_quantizer
    restored.bits.zero_()
    restored.load_state_dict(quantizer.state_dict())
    assert restored.table_bits() == quantizer.table_bits()
