"""TorchRecStrategy under the launchers users run it with besides Lightning's own: torchrun, and SLURM (two processes
started with the environment srun gives each task)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import process
from tests.helpers.cli import demo_args, summary_path, synth_demo

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "launch", 6000, 4)


def _args(data: Path, root: Path) -> list[str]:
    return [
        *demo_args(data, root),
        "--trainer.max_epochs",
        "1",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "torchrec",
    ]


def _summary(output: str) -> dict:
    return json.loads(summary_path(output).read_text())


def test_torchrun(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(process.free_port()),
        "-m",
        "dqrm_lightning.cli",
    ]
    done = process.run([*command, "fit", *_args(data, tmp_path)], 240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert summary["world_size"] == 2
    assert summary["cluster_environment"] == "TorchElasticEnvironment"
    assert "val/auc" in summary["val"]["final"]


def test_slurm_environment(data, tmp_path):
    port = str(process.free_port())
    with contextlib.ExitStack() as stack:
        processes = []
        for rank in range(2):
            env = os.environ | {
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": "dqrm",
                "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_NNODES": "1",
                "SLURM_NODEID": "0",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NODELIST": "localhost",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            command = [sys.executable, "-m", "dqrm_lightning.cli", "fit", *_args(data, tmp_path)]
            processes.append(
                stack.enter_context(
                    process.session(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                )
            )
        outputs = [p.communicate(timeout=240) for p in processes]
    for rank_process, (_, err) in zip(processes, outputs, strict=True):
        assert rank_process.returncode == 0, err[-3000:]
    summary = _summary(outputs[0][0])  # rank 0 prints the summary
    assert summary["world_size"] == 2
    assert summary["cluster_environment"] == "SLURMEnvironment"
    # two ranks share this machine: each sizes its thread pools to its half of the cores
    assert summary["threads"]["local_processes"] == 2
    assert summary["threads"]["intra_op"] == max(1, len(os.sched_getaffinity(0)) // 2 - 1)
    assert "val/auc" in summary["val"]["final"]
