"""``ShardedEmbeddingStrategy(pipeline=True)`` (TorchRec's sparse-dist pipeline under Lightning's loop) trains exactly
like the plain loop on 2 gloo processes: the same batches, the same losses at every step and the same weights, with
evaluation between training steps, FP32 and with INT4 QAT (tables and MLPs); a pipelined QAT run stopped and resumed
from its checkpoint continues exactly as the uninterrupted one."""

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dqrm_lightning.callbacks import QuantizationAwareTraining
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


def _fit(
    tmp_path: Path, pipeline: bool, qat: bool, max_steps: int = 12, resume: Path | None = None, save: Path | None = None
) -> dict:
    losses = _Losses()
    callbacks: list[Callback] = [losses]
    if save is not None:  # a checkpoint at the last step, written in the loop as `dqrm fit` writes them
        callbacks.append(ModelCheckpoint(dirpath=save, every_n_train_steps=max_steps, save_top_k=-1))
    if qat:  # INT4 tables and MLPs, scales refreshed every 3 steps: QAT's per-batch hooks see the trained batch
        callbacks.append(QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4, scale_period=3)))
    module = small_module()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=save is not None,
        callbacks=callbacks,
        strategy=ShardedEmbeddingStrategy(pipeline=pipeline),
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        limit_val_batches=2,
        val_check_interval=5,  # evaluation between training steps, on the original forwards
    )
    data = tmp_path / "data"  # each rank writes the same seeded files
    data.mkdir(parents=True)
    trainer.fit(module, datamodule=small_datamodule(data), ckpt_path=resume)
    used = trainer.strategy._pipeline
    pipelined = 0 if used is None else len(used._torchrec._pipelined_modules)  # the sharded EBC's forward rewritten
    return {"losses": losses.losses, "rows": losses.rows, "state": _local_state(module), "pipelined": pipelined}


def _join(rank: int, port: int) -> None:
    """This spawned process is ``rank`` of a 2-process run on 127.0.0.1 (Lightning launches no processes then)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank))


def _rank(rank: int, out: str, port: int, qat: bool) -> None:
    _join(rank, port)
    results = {p: _fit(Path(out) / f"r{rank}_{p}", p, qat) for p in (False, True)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _assert_same_state(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.multiprocess
@pytest.mark.slow  # ~45-50 s on shared cores: two 12-step fits on 2 processes
@pytest.mark.parametrize("qat", [False, True], ids=["fp32", "qat"])
def test_pipelined_training_equals_the_plain_loop_on_two_processes(tmp_path: Path, qat: bool):
    mp.start_processes(_rank, args=(str(tmp_path), 29731 + qat, qat), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        plain, piped = results[False], results[True]
        assert len(plain["losses"]) == 12
        assert (plain["pipelined"], piped["pipelined"]) == (0, 1)  # with QAT, the QAT sparse arch's tables too
        # with QAT, its state (the tables' scales) is compared too
        assert any("scale" in key for key in plain["state"]) == qat
        assert piped["rows"] == plain["rows"]
        assert piped["losses"] == plain["losses"]
        _assert_same_state(plain["state"], piped["state"])


def _resume_rank(rank: int, out: str, port: int) -> None:
    _join(rank, port)
    root = Path(out)
    whole = _fit(root / f"r{rank}_whole", True, True)
    first = _fit(root / f"r{rank}_first", True, True, max_steps=7, save=root / "ckpt")  # both ranks write it
    second = _fit(root / f"r{rank}_second", True, True, resume=next((root / "ckpt").glob("*step=7*")))
    torch.save({"whole": whole, "first": first, "second": second}, root / f"rank{rank}.pt")


@pytest.mark.multiprocess
@pytest.mark.slow  # ~60 s: three QAT fits on 2 processes
def test_pipelined_qat_resumes_mid_epoch_exactly(tmp_path: Path):
    mp.start_processes(_resume_rank, args=(str(tmp_path), 29733), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        whole, first, second = results["whole"], results["first"], results["second"]
        assert len(first["losses"]) == 7
        assert len(second["losses"]) == 5  # steps 8..12 after the resume
        assert first["losses"] + second["losses"] == whole["losses"]
        assert first["rows"] + second["rows"] == whole["rows"]  # the resumed run reads on from batch 8
        _assert_same_state(whole["state"], second["state"])


def test_pipeline_is_a_sharded_option():
    assert TorchRecStrategy(pipeline=True).pipeline
    with pytest.raises(ValueError, match="`pipeline`"):
        TorchRecStrategy(embeddings="replicated", pipeline=True)
