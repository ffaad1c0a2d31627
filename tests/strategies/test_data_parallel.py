"""The paper's data-parallel mode through the CLI with 2 gloo processes: replicated tables, sparse gradients, DQRM's
INT8 gradient compression with error compensation as a DDP hook, its residuals in the checkpoint."""

from pathlib import Path

import pytest
import torch

from dqrm_lightning.comms.compression import GradientCompressionConfig
from dqrm_lightning.export.exporter import read_checkpoint
from dqrm_lightning.names import table_key
from dqrm_lightning.strategies import TorchRecStrategy
from dqrm_lightning.strategies.base import META_FILE
from tests.helpers.cli import demo_args, dqrm, synth_demo

DP = ["-c", "configs/parallel/data_parallel.yaml"]
INT8 = [*DP, "-c", "configs/parallel/int8_compression.yaml"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "dp", 50000, 5)


@pytest.mark.multiprocess
def test_int8_with_error_compensation_matches_fp32_data_parallel(data, tmp_path):
    common = [*demo_args(data, tmp_path / "r"), "--trainer.max_epochs", "2"]
    _, fp32 = dqrm("fit", *common, *DP)
    _, int8 = dqrm("fit", *common, *INT8)
    assert fp32["world_size"] == int8["world_size"] == 2
    auc_fp32, auc_int8 = fp32["val"]["final"]["val/auc"], int8["val"]["final"]["val/auc"]
    assert auc_fp32 > 0.6  # it learned something
    assert abs(auc_int8 - auc_fp32) <= 0.005
    # the hook ran on every iteration and compressed every table and MLP tensor (Lightning alone would not register
    # a DDP hook on the CPU)
    hook, hook_fp32 = int8["communication"]["hook"], fp32["communication"]["hook"]
    assert hook["bits"] == 8
    assert hook_fp32["bits"] == 32
    assert hook["iterations"] == int8["global_step"]
    assert hook["tables_compressed"] == 26 * hook["iterations"]
    assert hook["mlp_tensors_compressed"] == 12 * hook["iterations"]  # 6 Linear layers: weight and bias
    assert hook_fp32["bytes_per_iteration_per_rank"] / hook["bytes_per_iteration_per_rank"] > 3.8

    # per-rank error-feedback residuals are in the checkpoint
    state = torch.load(Path(int8["checkpoints"]["last"]) / META_FILE, weights_only=True)["gradient_compression"]
    assert state["world_size"] == 2
    residuals = state["residuals"]
    assert len(residuals) == 12
    weight = next(v for k, v in residuals.items() if k.endswith("weight"))
    assert weight.shape[0] == 2
    assert weight.abs().sum() > 0
    assert not torch.equal(weight[0], weight[1])  # each rank feeds back its own quantization error
    # exact resume of this mode (residuals restored per rank): tests/test_fault_tolerance.py and
    # tests/callbacks/test_interrupt.py


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embeddings": "mirrored"}, "embeddings"),
        ({"sharding": "diagonal"}, "sharding"),
        ({"sharding": {"C1": "row_wise", "C1x": "bad"}}, "sharding"),
        ({"embeddings": "replicated", "sharding": "row_wise"}, "sharding"),
        ({"gradient_compression": GradientCompressionConfig()}, "gradient_compression"),
        ({"embeddings": "replicated", "qcomm_forward": "fp16"}, "qcomm"),
        ({"dense_embedding_gradients": True}, "dense_embedding_gradients"),
        ({"sharding": {"C1": "row_wise"}, "qcomm_backward": "int8"}, "int8 cannot quantize the reduce-scatter"),
    ],
)
def test_inconsistent_strategy_settings_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TorchRecStrategy(**kwargs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_replicated_float16_tables_train_on_two_processes(data, tmp_path):
    common = [*demo_args(data, tmp_path / "r"), "--trainer.max_epochs", "1", *DP]
    _, fp16 = dqrm("fit", *common, "-c", "configs/memory/fp16_tables.yaml")
    assert fp16["world_size"] == 2
    assert fp16["val"]["final"]["val/auc"] > 0.6
    assert fp16["communication"]["hook"]["tables_compressed"] == 26 * fp16["global_step"]  # float16 sparse gradients
    tables = read_checkpoint(fp16["checkpoints"]["last"])["state_dict"]
    assert tables[table_key("C1")].dtype == torch.float16
