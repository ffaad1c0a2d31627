"""``ShardedEmbeddingStrategy(pipeline=True)`` (TorchRec's sparse-dist pipeline under Lightning's loop) trains exactly
like the plain loop on 2 gloo processes: the same batches, the same losses at every step and the same weights, with
evaluation between training steps."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback

from dqrm_lightning.callbacks import QuantizationAwareTraining
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.quant import QATConfig
from dqrm_lightning.strategies import ShardedEmbeddingStrategy, TorchRecStrategy
from tests.helpers.training import small_datamodule, small_module


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rows: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.rows.append(int(batch.dense_features[0, 0].mul(1e6).round()))  # which batch trained (a row's marker)


def _local_state(module) -> dict[str, torch.Tensor]:
    """This rank's weights: its shards of the sharded tables, and the dense parameters."""
    state = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "local_shards"):
            state |= {f"{key}[{i}]": s.tensor.detach().clone() for i, s in enumerate(value.local_shards())}
        elif isinstance(value, torch.Tensor):
            state[key] = value.detach().clone()
    return state


def _fit(tmp_path: Path, pipeline: bool, qat: bool) -> dict | str:
    losses = _Losses()
    callbacks: list[Callback] = [losses]
    if qat:  # INT4 tables and MLPs, scales refreshed every 3 steps: QAT's per-batch hooks see the trained batch
        callbacks.append(QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4, scale_period=3)))
    module = small_module()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        strategy=ShardedEmbeddingStrategy(pipeline=pipeline),
        accelerator="cpu",
        devices=2,
        max_steps=12,
        limit_val_batches=2,
        val_check_interval=5,  # evaluation between training steps, on the original forwards
    )
    data = tmp_path / f"data_{pipeline}"  # each rank writes the same seeded files
    data.mkdir(parents=True)
    try:
        trainer.fit(module, datamodule=small_datamodule(data))
    except ConfigError as err:
        return str(err)
    used = trainer.strategy._pipeline
    pipelined = 0 if used is None else len(used._torchrec._pipelined_modules)  # the sharded EBC's forward rewritten
    return {"losses": losses.losses, "rows": losses.rows, "state": _local_state(module), "pipelined": pipelined}


def _rank(rank: int, out: str, port: int, qat: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank))  # processes made here: Lightning launches none
    results = {p: _fit(Path(out) / f"r{rank}", p, qat) for p in (False, True)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.multiprocess
@pytest.mark.slow  # ~45 s on shared cores: two 12-step fits on 2 processes
def test_pipelined_training_equals_the_plain_loop_on_two_processes(tmp_path: Path):
    mp.start_processes(_rank, args=(str(tmp_path), 29731, False), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        plain, piped = results[False], results[True]
        assert len(plain["losses"]) == 12
        assert (plain["pipelined"], piped["pipelined"]) == (0, 1)
        assert piped["rows"] == plain["rows"]
        assert piped["losses"] == plain["losses"]
        assert plain["state"].keys() == piped["state"].keys()
        for key, value in plain["state"].items():
            torch.testing.assert_close(piped["state"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.multiprocess
@pytest.mark.slow  # ~35 s: a 2-process QAT fit on the plain loop first
def test_embedding_qat_with_the_pipeline_is_refused_in_one_line(tmp_path: Path):
    mp.start_processes(_rank, args=(str(tmp_path), 29732, True), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(results[False]["losses"]) == 12  # QAT trains on the plain loop
        assert "does not run with embedding QAT yet" in results[True]


def test_pipeline_is_a_sharded_option():
    assert TorchRecStrategy(pipeline=True).pipeline
    with pytest.raises(ValueError, match="`pipeline`"):
        TorchRecStrategy(embeddings="replicated", pipeline=True)
