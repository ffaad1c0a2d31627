"""Shared pieces of the Kaggle-scale benchmarks: synthetic data, the config, the `dqrm fit` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from dqrm_lightning.data.datamodule import CriteoDataModule

CONFIGS = ["-c", "configs/kaggle.yaml", "-c", "configs/data/synthetic_kaggle.yaml"]


def ensure_data(data: Path, rows: int = 1_000_000) -> None:
    """Synthetic Kaggle-format data (Kaggle cardinalities) in `data`, generated once."""
    if not (data / "truth.json").exists():
        from dqrm_lightning.data.synthetic import synthesize

        synthesize("kaggle", rows, 0, data, split_fractions=(0.98, 0.01, 0.01))


def kaggle_config() -> dict[str, Any]:
    """configs/kaggle.yaml as a dict; `["model"]` holds the DLRMModule arguments but the table sizes."""
    config = yaml.safe_load(Path("configs/kaggle.yaml").read_text())
    config["sizes"] = config["data"]["num_embeddings_per_feature"]
    return config


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config["model"].items() if k != "num_embeddings_per_feature"}


def datamodule(data: Path, batch_size: int, eval_batch_size: int = 2048) -> CriteoDataModule:
    return CriteoDataModule(
        train_files=f"{data}/train*",
        val_files=f"{data}/val*",
        test_files=f"{data}/test*",
        categorical_encoding="hash",
        num_embeddings_per_feature=kaggle_config()["sizes"],
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
    )


def fit_command(data: Path, steps: int, *extra: str) -> list[str]:
    """`dqrm fit` of the Kaggle config on the synthetic data for `steps` steps, no validation, no checkpoints."""
    return [
        sys.executable,
        "-m",
        "dqrm_lightning.cli",
        "fit",
        *CONFIGS,
        *extra,
        *(x for s in ("train", "val", "test") for x in (f"--data.{s}_files", f"{data}/{s}*")),
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--wandb",
        "disabled",
        "--trainer.default_root_dir",
        str(data / "runs"),
    ]


def run_summary(command: list[str]) -> dict[str, Any]:
    """Run a `dqrm` command line; the summary.json it names on its last line."""
    import json
    import subprocess

    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(Path(out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())


def arguments(steps: int, warmup: int, repeats: int) -> argparse.ArgumentParser:
    """The command-line options every Kaggle-scale benchmark shares."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/tmp/dqrm_bench_kaggle", help="synthetic Kaggle-format data (made once)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate when the data is missing")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def segment_trainer(steps: int, callbacks: list, logger: object = False) -> object:
    """A Trainer for a timed training segment: no validation, checkpoints, progress bar or model summary."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        log_every_n_steps=1024,
        callbacks=callbacks,
    )
