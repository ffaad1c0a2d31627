"""The `dqrm` command in a subprocess, as a user runs it, and the arguments tests run it with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import process

REPO = Path(__file__).resolve().parents[2]

FAST = ["--wandb", "disabled", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONE_EPOCH = ["--trainer.max_epochs", "1"]


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dqrm ARGS` in a subprocess; the process tree is killed if it outlives ``timeout`` or the test."""
    return process.run([sys.executable, "-m", "dqrm_lightning.cli", *args], timeout, cwd=REPO, env=env)


def on_sample(tmp_path: Path, criteo_sample: Path) -> list[str]:
    """Demo config with the real Criteo sample as train, val and test data (copied: the fixture dir stays clean)."""
    sample = tmp_path / "criteo_sample.tsv"
    sample.write_bytes(Path(criteo_sample).read_bytes())
    return [
        "-c",
        "configs/demo.yaml",
        *(x for s in ("train", "val", "test") for x in (f"--data.{s}_files", str(sample))),
    ]


def summary_path(output: str) -> Path:
    """The summary.json a `dqrm` run names on its last line."""
    last = output.strip().splitlines()[-1]
    assert last.startswith("summary: "), last
    return Path(last.removeprefix("summary: "))


def dqrm(*args: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run `dqrm ARGS`; return its output and the summary.json named on its last line."""
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = summary_path(result.stdout)
    return result.stdout, json.loads(path.read_text()) | {"_path": str(path)}


def synth_demo(tmp_path_factory, name: str, rows: int, seed: int) -> Path:
    """Synthetic demo-preset Criteo data (train/val/test) in a fresh temporary folder."""
    out = tmp_path_factory.mktemp(name) / "data"
    dqrm("data", "synth", "--preset", "demo", "--rows", str(rows), "--seed", str(seed), "--out", str(out))
    return out


def demo_args(data: Path, root: Path) -> list[str]:
    """The demo config on synthetic data in ``data`` (train*, val*, test*), runs under ``root``, quiet."""
    files = [x for s in ("train", "val", "test") for x in (f"--data.{s}_files", f"{data}/{s}*")]
    return ["-c", "configs/demo.yaml", *files, "--trainer.default_root_dir", str(root), *FAST]
