"""Where runs live: ``<root>/lightning_logs/version_N/`` holds a run's metrics, summary, checkpoints and wandb files.

A run continued from one of its own checkpoints (``--ckpt_path last``) continues in that directory: the version, the
metrics logged so far and the wandb run id are found here.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import shutil
from pathlib import Path


def run_version(checkpoint: str | None, root: str) -> int | None:
    """N when ``checkpoint`` is ``<root>/lightning_logs/version_N/checkpoints/*``: a run to continue in place."""
    if not checkpoint:
        return None
    path = Path(checkpoint).resolve()
    run_dir = path.parent.parent
    match = re.fullmatch(r"version_(\d+)", run_dir.name)
    if path.parent.name != "checkpoints" or match is None:
        return None
    return int(match.group(1)) if run_dir.parent == (Path(root) / "lightning_logs").resolve() else None


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` (column -> text); none when there is no file."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run under ``run_dir/wandb`` (directories ``[offline-]run-<time>-<id>``)."""
    runs = sorted(run_dir.glob("wandb/*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def find_checkpoint(root: str | os.PathLike, which: str) -> str:
    """The newest ``<root>/lightning_logs/version_*/checkpoints/<which>.ckpt``."""
    candidates = glob.glob(os.path.join(root, "lightning_logs", "version_*", "checkpoints", f"{which}.ckpt"))
    if not candidates:
        raise FileNotFoundError(f"no {which}.ckpt under {root}/lightning_logs/*/checkpoints; pass --ckpt_path PATH")
    return max(candidates, key=os.path.getmtime)


# ------------------------------------------------------------------------------------------------ dqrm data ...
def remove_if_unused(run_dir: Path) -> None:
    """Remove a run's log directory when the run logged and saved nothing (no metrics, summary or checkpoints)."""
    kept = ("metrics.csv", "summary.json", "checkpoints")
    if run_dir.is_dir() and not any((run_dir / name).exists() for name in kept):
        shutil.rmtree(run_dir, ignore_errors=True)
