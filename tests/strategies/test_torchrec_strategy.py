"""TorchRecStrategy through the CLI with 2 gloo processes: training, distributed checkpoints, 2 -> 1 and 1 -> 2."""

import shutil
from pathlib import Path

import pytest
import torch

from dqrm_lightning.export.exporter import read_checkpoint
from dqrm_lightning.names import table_key
from tests.helpers import process
from tests.helpers.cli import REPO, demo_args, dqrm, run_cli, synth_demo


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "mp", 12000, 3)


@pytest.mark.multiprocess
@pytest.mark.slow  # ~60 s on idle cores; the default run keeps test_single_process_checkpoint_loads_on_two_processes
def test_two_processes_train_and_checkpoints_load_on_any_world_size(data, tmp_path):
    common = demo_args(data, tmp_path / "r")
    _, fit = dqrm(
        "fit", *common, "--trainer.devices", "2", "--trainer.strategy", "torchrec", "--trainer.max_epochs", "1",
        "--trainer.log_every_n_steps", "5",  # sampled on full batches (the epoch's last one is short)
    )  # fmt: skip
    assert fit["world_size"] == 2
    comm = fit["communication"]["bytes_per_iteration_per_rank"]
    assert comm["sparse_fp32"] < comm["dense"]
    assert fit["communication"]["sparse_fp32_over_sparse_int8"] > 3.5
    assert comm["model_parallel_a2a"] == 2 * 4 * 128 * 26 * 16 // 2  # half of the pooled embeddings travel
    best = Path(fit["checkpoints"]["best"])
    assert best.is_dir()
    assert len(list(best.glob("*.distcp"))) == 2
    assert (best / "digests.json").is_file()  # every file's sha256, checked on load
    expected = fit["val"]["final"]["val/auc"]
    for devices in ("2", "1"):
        _, val = dqrm(
            "validate",
            *common,
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "torchrec",
            "--ckpt_path",
            str(best),
        )
        assert val["world_size"] == int(devices)
        assert val["val"]["final"]["val/auc"] == pytest.approx(expected, abs=1e-6)
    damaged = tmp_path / "damaged.ckpt"
    shutil.copytree(best, damaged)
    shard = next(damaged.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    strategy = ["--trainer.strategy", "torchrec"]
    result = run_cli("validate", *common, *strategy, "--ckpt_path", str(damaged))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"dqrm validate: error: {shard}: corrupt checkpoint")
    _, export = dqrm("export", "--ckpt", str(best), "--out", str(tmp_path / "art"), "--embedding-bits", "4")
    assert export["quantization"] == "ptq (trained scales)"  # the sharded FP32 checkpoint, gathered and quantized
    _, val = dqrm("validate", *common, "--artifact", str(tmp_path / "art"))
    assert abs(val["val"]["final"]["val/auc"] - expected) < 0.02


@pytest.mark.multiprocess
def test_single_process_checkpoint_loads_on_two_processes(data, tmp_path):
    common = demo_args(data, tmp_path / "r")
    _, fit = dqrm("fit", *common, "--trainer.max_epochs", "1")
    _, val = dqrm(
        "validate",
        *common,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "torchrec",
        "--ckpt_path",
        fit["checkpoints"]["best"],
    )
    assert val["world_size"] == 2
    assert val["val"]["final"]["val/auc"] == pytest.approx(fit["val"]["best"]["val/auc"], abs=1e-6)


@pytest.mark.multiprocess
def test_a_dying_rank_stops_the_run_with_an_error_instead_of_a_hang(data, tmp_path):
    import sys
    import time

    args = [
        *demo_args(data, tmp_path / "r"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "torchrec",
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+=tests.helpers.faults.DieAtStep",
    ]
    start = time.monotonic()
    result = process.run([sys.executable, "-m", "dqrm_lightning.cli", "fit", *args], 240, cwd=REPO)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert "summary:" not in result.stdout
    assert "terminated with code 17" in result.stdout + result.stderr  # the launcher names the dead rank


@pytest.mark.multiprocess
@pytest.mark.slow  # ~35 s on idle cores; tests/comms covers the codecs against brute force in the default run
def test_two_processes_train_with_quantized_all_to_all(data, tmp_path):
    strategy = [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "dqrm_lightning.strategies.TorchRecStrategy",
        "--trainer.strategy.qcomm_forward",
        "fp16",
        "--trainer.strategy.qcomm_backward",
        "fp16",
    ]
    _, fit = dqrm("fit", *demo_args(data, tmp_path / "r"), *strategy, "--trainer.max_epochs", "1")
    assert fit["world_size"] == 2
    assert fit["config"]["trainer"]["strategy"]["init_args"]["qcomm_forward"] == "fp16"
    # the FP16 codecs really carry the all-to-all: the same run in FP32 ends (slightly) elsewhere
    _, fp32 = dqrm("fit", *demo_args(data, tmp_path / "f"), *strategy[:3], "torchrec", "--trainer.max_epochs", "1")
    quantized, exact = fit["val"]["final"]["val/log_loss"], fp32["val"]["final"]["val/log_loss"]
    assert quantized != exact
    assert abs(quantized - exact) < 0.01


@pytest.mark.parametrize(
    ("kwargs", "built", "layout"),
    [
        ({}, "ShardedEmbeddingStrategy", ("sharded", "table_wise", False)),
        ({"sharding": {"C1": "row_wise"}}, "ShardedEmbeddingStrategy", ("sharded", {"C1": "row_wise"}, False)),
        ({"embeddings": "replicated"}, "ReplicatedEmbeddingStrategy", ("replicated", "table_wise", False)),
        (
            {"embeddings": "replicated", "dense_embedding_gradients": True},
            "ReplicatedEmbeddingStrategy",
            ("replicated", "table_wise", True),
        ),
    ],
)
def test_torchrec_strategy_builds_the_strategy_of_the_table_layout(kwargs, built, layout):
    from dqrm_lightning.strategies import TorchRecStrategy

    strategy = TorchRecStrategy(process_group_backend="gloo", **kwargs)
    assert type(strategy).__name__ == built
    assert strategy.strategy_name == "torchrec"
    assert strategy._process_group_backend == "gloo"  # DDPStrategy's own arguments pass through
    placed = strategy.layout
    assert (placed.embeddings, placed.sharding, placed.dense_embedding_gradients) == layout


def test_the_sharded_strategy_hands_the_module_its_layout_and_probed_codecs():
    from lightning.pytorch.strategies import StrategyRegistry

    from dqrm_lightning.strategies import ShardedEmbeddingStrategy, TorchRecStrategy

    assert isinstance(StrategyRegistry.get("torchrec"), ShardedEmbeddingStrategy)
    strategy = TorchRecStrategy(sharding="column_wise", qcomm_forward="fp16", qcomm_backward="fp16")
    strategy.parallel_devices = [torch.device("cpu")]
    placement = strategy.embedding_placement()
    assert placement.layout.sharding == "column_wise"
    assert placement.qcomm_codecs_registry is not None
    assert placement.reduce_scatter_precision is None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_float16_tables_with_qat_checkpoint_and_export(data, tmp_path):
    common = [*demo_args(data, tmp_path / "r"), "-c", "configs/qat/int4.yaml", "-c", "configs/memory/fp16_tables.yaml"]
    two = ["--trainer.devices", "2", "--trainer.strategy", "torchrec"]
    _, fit = dqrm("fit", *common, *two, "--trainer.max_epochs", "1")
    assert fit["world_size"] == 2
    best = fit["checkpoints"]["best"]
    checkpoint = read_checkpoint(best)
    assert checkpoint["state_dict"][table_key("C1")].dtype == torch.float16  # both ranks' tables, gathered
    table_values = sum(checkpoint["hyper_parameters"]["num_embeddings_per_feature"]) * 16
    assert fit["model_bytes"]["fp32"] - fit["model_bytes"]["training"] == 2 * table_values  # 2 bytes a value saved
    expected = fit["val"]["final"]["val/auc"]
    one = ["--trainer.strategy", "torchrec"]  # the 2-process checkpoint on one process
    _, val = dqrm("validate", *common, *one, "--ckpt_path", best)
    assert val["val"]["final"]["val/auc"] == pytest.approx(expected, abs=1e-6)
    dqrm("export", "--ckpt", best, "--out", str(tmp_path / "art"))
    _, art = dqrm("validate", *common, "--artifact", str(tmp_path / "art"))
    assert art["val"]["final"]["val/auc"] == pytest.approx(expected, abs=1e-6)
