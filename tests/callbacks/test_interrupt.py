"""Ctrl-C (SIGINT) or SIGTERM during `dqrm fit`: the run saves a checkpoint at the step it stopped, says so in one line,
and `--ckpt_path last` continues it in the same log directory, metrics file and wandb run, ending exactly where an
uninterrupted run ends."""

import csv
import signal
from pathlib import Path

import pytest

from tests.helpers.cli import demo_args, dqrm, run_cli, summary_path, synth_demo

STOP_AT = 30  # the signal arrives as step 30 starts; the run saves after it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_demo(tmp_path_factory, "interrupt", 7500, 5)


def _args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        *demo_args(data, root),
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "5",
        "--qat.embedding_bits",
        "4",
        "--qat.scale_period",
        "10",
        *extra,
    ]


def _logged(run_dir: Path) -> list[tuple]:
    """(step, epoch, train loss, val AUC) of every metrics.csv row that holds one of them."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = ("step", "epoch", "train/loss", "val/auc")
    return sorted(tuple(row.get(k) or "" for k in keys) for row in rows if row.get("train/loss") or row.get("val/auc"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    _, summary = dqrm("fit", *_args(data, root))
    return summary


@pytest.mark.parametrize(
    ("signum", "parallel"),
    [
        pytest.param(signal.SIGINT, [], id="ctrl-c"),
        pytest.param(
            signal.SIGTERM,
            ["-c", "configs/parallel/data_parallel.yaml", "-c", "configs/parallel/int8_compression.yaml"],
            id="sigterm-to-rank-0-of-2",
            marks=[pytest.mark.multiprocess, pytest.mark.slow],  # ~25 s; ctrl-c (1 process) stays in the default run
        ),
    ],
)
def test_a_signal_saves_and_the_run_continues_in_place(data, tmp_path, straight, signum, parallel):
    if parallel:
        _, straight = dqrm("fit", *_args(data, tmp_path / "straight", *parallel))
    root = tmp_path / "run"
    stop = ["--trainer.callbacks+=tests.helpers.faults.SignalAtStep", f"--trainer.callbacks.step={STOP_AT}"]
    stop += [f"--trainer.callbacks.signum={int(signum)}"]
    args = _args(data, root, *parallel, "--wandb", "offline", *stop)
    stopped = run_cli("fit", *args)

    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    run_dir = root / "lightning_logs" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    epoch = STOP_AT // (straight["global_step"] // 2)
    expected = f"dqrm fit: stopped by {name} at step {STOP_AT + 1} (epoch {epoch}); saved {last.resolve()}"
    assert [line for line in stopped.stderr.splitlines() if line.startswith("dqrm fit:")] == [
        f"{expected}; continue with the same command and `--ckpt_path last`"
    ]
    assert "Traceback" not in stopped.stderr
    summary = summary_path(stopped.stdout)
    assert summary.parent == run_dir
    assert '"step": 31' in summary.read_text()

    _, resumed = dqrm("fit", *args, "--ckpt_path", "last")
    assert Path(resumed["_path"]).parent == run_dir  # the same version directory
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["speed"]["timed_steps"] < straight["speed"]["timed_steps"]  # continued, not restarted
    for key, value in straight["val"]["final"].items():
        assert resumed["val"]["final"][key] == pytest.approx(value, abs=1e-6), key
    # one metrics file with every row of an uninterrupted run, none twice
    assert _logged(run_dir) == _logged(Path(straight["_path"]).parent)
    # one wandb run: the continued run logs to the run the interrupted one created
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs
