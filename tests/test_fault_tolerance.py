"""`kill -9` of `dqrm fit` at a random step, then `dqrm fit ... --ckpt_path last`: the run completes and ends exactly
where an uninterrupted run ends (periodic checkpoints hold the model, the optimizer, QAT scales and counters, the
gradient-compression residuals and the data loader's position; checkpoints are written atomically)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dqrm_lightning.export.exporter import read_checkpoint
from tests.helpers.cli import demo_args, dqrm, synth_demo

EVERY = "7"  # a periodic checkpoint every 7 steps (mid-epoch: 75 steps per epoch here)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "ft", 12000, 11)


def _args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        *demo_args(data, root),
        "--trainer.max_epochs",
        "2",
        "--checkpoint_every_n_steps",
        EVERY,
        "--qat.embedding_bits",
        "4",
        "--qat.mlp_bits",
        "4",
        "--qat.scale_period",
        "10",  # several scale refreshes per epoch
        *extra,
    ]


def _kill_at_random_step(args: list[str], root: Path, seed: int) -> int:
    """Start `dqrm fit`, SIGKILL its whole process group at a random moment after the first periodic checkpoint."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dqrm_lightning.cli", "fit", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list(root.glob("lightning_logs/version_*/checkpoints/last.ckpt")):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def _quantizer_state(summary: dict) -> dict[str, torch.Tensor]:
    state = read_checkpoint(summary["checkpoints"]["last"])["state_dict"]
    return {k: v for k, v in state.items() if "quantizer" in k or "over_arch" in k}


@pytest.mark.parametrize(
    "parallel",
    [
        pytest.param([], id="1-process"),
        pytest.param(
            ["-c", "configs/parallel/data_parallel.yaml", "-c", "configs/parallel/int8_compression.yaml"],
            id="2-process-int8",
            marks=[pytest.mark.multiprocess, pytest.mark.slow],  # ~30 s; the 2-process SIGTERM test stays default
        ),
    ],
)
def test_sigkill_then_resume_from_last_equals_the_uninterrupted_run(data, tmp_path, parallel):
    _, expected = dqrm("fit", *_args(data, tmp_path / "straight", *parallel))
    root = tmp_path / "killed"
    seed = random.randrange(1 << 30)
    code = _kill_at_random_step(_args(data, root, *parallel), root, seed)
    assert code == -signal.SIGKILL, f"the run was not killed mid-way (exit {code}; seed {seed})"
    _, resumed = dqrm("fit", *_args(data, root, *parallel), "--ckpt_path", "last")
    assert resumed["global_step"] == expected["global_step"]
    assert resumed["speed"]["timed_steps"] < expected["speed"]["timed_steps"]  # it resumed, not restarted
    for key, value in expected["val"]["final"].items():
        assert resumed["val"]["final"][key] == pytest.approx(value, abs=1e-6), f"{key} (seed {seed})"
    final, reference = _quantizer_state(resumed), _quantizer_state(expected)
    assert any("scale" in k for k in reference)
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=f"{key} (seed {seed})")


def test_fit_from_last_without_any_checkpoint_starts_from_scratch(data, tmp_path):
    args = [*demo_args(data, tmp_path / "fresh"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"]
    _, summary = dqrm("fit", *args, "--ckpt_path", "last")
    assert summary["global_step"] == 5
