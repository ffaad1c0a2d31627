"""Multi-node runs on one machine: two "nodes" of one process each on 127.0.0.1 (gloo), started as a cluster starts
them: one torchrun per node (static rendezvous), or the environment SLURM's srun gives each task of a 2-node job.
Runs with `--threads 1` where results are compared: every rank then sums in the same order whatever the launcher."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dqrm_lightning.export.exporter import read_checkpoint
from tests.helpers import process
from tests.helpers.cli import REPO, demo_args, dqrm, summary_path, synth_demo

pytestmark = pytest.mark.multiprocess

TORCHRUN = Path(sys.executable).with_name("torchrun")
TWO_NODES = ["--trainer.num_nodes", "2", "--trainer.devices", "1"]
MODES = {
    "model_parallel": ["-c", "configs/parallel/model_parallel.yaml"],
    "int8": ["-c", "configs/parallel/data_parallel.yaml", "-c", "configs/parallel/int8_compression.yaml"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "nodes", 6000, 5)


def _node_command(node: int, port: int, *args: str) -> list[str]:
    """`torchrun` of node ``node`` of 2 (one process each), static rendezvous at 127.0.0.1:``port``."""
    return [
        str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "dqrm_lightning.cli", *args,
    ]  # fmt: skip


@contextlib.contextmanager
def _start_nodes(commands: list[list[str]], logs: Path, envs: list[dict[str, str]] | None = None):
    """One process session per node (killed with its children on exit), output in ``logs``/node<N>.{out,err}."""
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        nodes = []
        for node, command in enumerate(commands):
            out = stack.enter_context((logs / f"node{node}.out").open("w"))
            err = stack.enter_context((logs / f"node{node}.err").open("w"))
            env = envs[node] if envs else None
            nodes.append(stack.enter_context(process.session(command, stdout=out, stderr=err, cwd=REPO, env=env)))
        yield nodes


def _finish(nodes: list[subprocess.Popen], logs: Path, timeout: float = 300) -> list[str]:
    """Wait for every node; each must succeed. Returns their standard outputs."""
    deadline = time.monotonic() + timeout
    for node, running in enumerate(nodes):
        try:
            code = running.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {node} did not finish within {timeout} s") from None
        assert code == 0, f"node {node} exited {code}: " + (logs / f"node{node}.err").read_text()[-3000:]
    return [(logs / f"node{node}.out").read_text() for node in range(len(nodes))]


def _two_torchrun_nodes(tmp_path: Path, name: str, *args: str) -> dict:
    """`dqrm ARGS` on 2 torchrun nodes; the summary global rank 0 wrote (node 0 names it, node 1 prints none)."""
    port = process.free_port()
    logs = tmp_path / f"{name}-logs"
    with _start_nodes([_node_command(node, port, *args, *TWO_NODES) for node in range(2)], logs) as nodes:
        out0, out1 = _finish(nodes, logs)
    assert "summary:" not in out1  # global rank 0 alone reports (and writes summary.json)
    return json.loads(summary_path(out0).read_text())


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def _fit_args(data: Path, root: Path, mode: str, *extra: str, threads: bool = True) -> list[str]:
    one_thread = ["--threads", "1"] if threads else []
    return ["fit", *demo_args(data, root), *MODES[mode], "--trainer.max_epochs", "1", *one_thread, *extra]


def _state(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path)["state_dict"].items() if isinstance(v, torch.Tensor)}


def _assert_same_run(nodes: dict, single: dict) -> None:
    """Identical metrics, steps and final weights (bit for bit: the same ranks sum in the same order)."""
    assert nodes["global_step"] == single["global_step"]
    assert nodes["val"]["final"] == single["val"]["final"]
    expected = _state(single["checkpoints"]["last"])
    final = _state(nodes["checkpoints"]["last"])
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


@pytest.mark.slow  # ~25 s per mode: two 2-process runs
@pytest.mark.parametrize("mode", list(MODES))
def test_two_torchrun_nodes_train_exactly_like_two_processes_on_one_node(data, tmp_path, mode):
    nodes = _two_torchrun_nodes(tmp_path, "nodes", *_fit_args(data, tmp_path / "nodes", mode))
    assert (nodes["world_size"], nodes["num_nodes"]) == (2, 2)
    assert nodes["cluster_environment"] == "TorchElasticEnvironment"
    _, single = dqrm(*_fit_args(data, tmp_path / "single", mode), "--trainer.devices", "2")
    assert (single["world_size"], single["num_nodes"]) == (2, 1)
    _assert_same_run(nodes, single)


@pytest.mark.slow  # ~60 s: a 2-node fit, a 1-process fit and two resumed 2-process fits
@pytest.mark.timeout(600)
def test_checkpoints_move_between_two_nodes_and_one_process(data, tmp_path):
    nodes = _two_torchrun_nodes(tmp_path, "fit", *_fit_args(data, tmp_path / "nodes", "model_parallel"))
    last = nodes["checkpoints"]["last"]
    assert len(list(Path(last).glob("*.distcp"))) == 2  # each node wrote its rank's shards
    one = [*demo_args(data, tmp_path / "one"), "--trainer.strategy", "torchrec", "--ckpt_path", last]
    _, val = dqrm("validate", *one)
    assert val["world_size"] == 1
    assert val["val"]["final"] == nodes["val"]["final"]  # the last validation ran on the weights saved last
    _, test = dqrm("test", *one)
    assert "test/auc" in test["test"]
    # a 1-process checkpoint resumes on 2 nodes exactly as on 2 processes of one node
    _, first = dqrm("fit", *demo_args(data, tmp_path / "first"), "--trainer.max_epochs", "1", "--threads", "1")
    resume = [*_fit_args(data, tmp_path / "resumed", "model_parallel"), "--trainer.max_epochs", "2"]
    resume += ["--ckpt_path", first["checkpoints"]["last"]]
    resumed = _two_torchrun_nodes(tmp_path, "resumed", *resume)
    assert resumed["global_step"] > first["global_step"]
    _, single = dqrm(*resume, "--trainer.devices", "2", "--trainer.default_root_dir", str(tmp_path / "single"))
    _assert_same_run(resumed, single)


@pytest.mark.parametrize(
    ("signum", "extra", "bound"),
    [
        pytest.param(  # its connections close: the next collective fails
            signal.SIGKILL,
            [],
            60,
            id="killed",
            marks=pytest.mark.slow,  # ~15 s; the default run keeps a dying rank on one node (test_torchrec_strategy)
        ),
        pytest.param(  # a frozen node keeps its connections open: the process group's timeout ends the wait
            signal.SIGSTOP,
            ["--trainer.strategy.init_args.timeout", "0:00:40"],
            100,
            id="frozen",
            marks=pytest.mark.slow,  # ~50 s
        ),
    ],
)
def test_a_lost_node_stops_the_other_with_one_line_naming_it(data, tmp_path, signum, extra, bound):
    args = _fit_args(data, tmp_path, "model_parallel", "--checkpoint_every_n_steps", "3", "--trainer.max_epochs", "200")
    port = process.free_port()
    logs = tmp_path / "logs"
    commands = [_node_command(node, port, *args, *extra, *TWO_NODES) for node in range(2)]
    with _start_nodes(commands, logs) as (node0, node1):
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")):  # training is under way
            assert node0.poll() is None, (logs / "node0.err").read_text()[-3000:]
            assert node1.poll() is None, (logs / "node1.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.1)
        if signum == signal.SIGKILL:
            os.kill(node1.pid, signum)  # node 1's torchrun agent only: its rank, in a session of its own, dies with it
        else:
            for pid in [node1.pid, *_children(node1.pid)]:  # the whole node freezes
                os.kill(pid, signum)
        lost = time.monotonic()
        code = node0.wait(timeout=bound + 30)
        stopped_after = time.monotonic() - lost
    assert code != 0
    assert stopped_after < bound, stopped_after  # bounded: not Lightning's default 30-minute collective timeout
    assert "summary:" not in (logs / "node0.out").read_text()
    lines = (logs / "node0.err").read_text().splitlines()
    expected = (
        f"dqrm fit: error: rank 1 (node 1, host {socket.gethostname()}) stopped (its process ended or its node was "
        "lost); the run stopped"
    )
    assert lines.count(expected) == 1, "\n".join(lines[-40:])
    # the cause in one line, not rank 0's traceback (torchrun's agent reports its own failure after it)
    assert not any(line.lstrip().startswith('File "') and "dqrm_lightning" in line for line in lines)


def _slurm_env(node: int, port: int) -> dict[str, str]:
    """What srun gives task ``node`` of a job with 2 nodes x 1 task; both host names are this machine."""
    return {
        "SLURM_JOB_ID": "4243",
        "SLURM_JOB_NAME": "dqrm",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "127.0.0.1,localhost",  # Lightning takes the first as MASTER_ADDR
        "MASTER_PORT": str(port),
    }


def test_slurm_environment_two_nodes_one_task_each(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for name, value in _slurm_env(1, 12345).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    environment = SLURMEnvironment()
    environment.validate_settings(num_devices=1, num_nodes=2)
    ranks = (environment.global_rank(), environment.node_rank(), environment.local_rank(), environment.world_size())
    assert ranks == (1, 1, 0, 2)
    assert (environment.main_address, environment.main_port) == ("127.0.0.1", 12345)


def test_slurm_two_nodes_train_and_share_the_machine_s_cores(data, tmp_path):
    port = process.free_port()
    # the thread policy decides: it must see both ranks on this host
    args = _fit_args(data, tmp_path, "model_parallel", threads=False)
    command = [sys.executable, "-m", "dqrm_lightning.cli", *args, *TWO_NODES]
    envs = [os.environ | _slurm_env(node, port) for node in range(2)]
    logs = tmp_path / "logs"
    with _start_nodes([command, command], logs, envs) as nodes:
        out0, out1 = _finish(nodes, logs)
    assert "summary:" not in out1
    summary = json.loads(summary_path(out0).read_text())
    assert (summary["world_size"], summary["num_nodes"]) == (2, 2)
    assert summary["cluster_environment"] == "SLURMEnvironment"
    # each "node" is told it has the machine to itself (1 task per node); both are this host, so each takes half
    assert summary["threads"]["local_processes"] == 2
    assert summary["threads"]["intra_op"] == max(1, len(os.sched_getaffinity(0)) // 2 - 1)
    assert "val/auc" in summary["val"]["final"]
