import pytest

from dqrm_lightning.comms.accounting import ModelShape, bytes_per_iteration, touched_rows_upper_bound
from tests.helpers.model import KAGGLE

KAGGLE_SHAPE = ModelShape(KAGGLE, 16, [(13, 512), (512, 256), (256, 64), (64, 16), (367, 512), (512, 256), (256, 1)])


def test_kaggle_table4_structure():
    rows = touched_rows_upper_bound(KAGGLE_SHAPE, local_batch=128)
    dense = bytes_per_iteration(KAGGLE_SHAPE, "dense")
    sparse = bytes_per_iteration(KAGGLE_SHAPE, "sparse_fp32", rows)
    int8 = bytes_per_iteration(KAGGLE_SHAPE, "sparse_int8", rows)
    assert dense == pytest.approx(2.163e9, rel=1e-3)  # paper: 2.16 GB
    assert sparse == pytest.approx(2.06e6, rel=0.02)  # paper: 2.010 MB (its script left out biases)
    assert int8 == pytest.approx(0.52e6, rel=0.03)  # paper: 0.509 MB
    assert sparse / int8 >= 3.9  # issue goal


def test_measured_rows_and_errors():
    shape = ModelShape([10, 1000], 4, [(3, 2)])
    assert bytes_per_iteration(shape, "sparse_fp32", [3, 7]) == 4 * (6 + 2 + 10 * 4)
    assert bytes_per_iteration(shape, "sparse_int8", [3, 7], bits=8) == (6 + 2 + 40) + 4 * (2 + 2 + 1)
    with pytest.raises(ValueError, match="rows_per_table"):
        bytes_per_iteration(shape, "sparse_fp32")
    with pytest.raises(ValueError, match="unknown mode"):
        bytes_per_iteration(shape, "topk", [1, 1])
