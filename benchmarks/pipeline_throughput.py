"""Training throughput on 2 processes (sharded tables, gloo) with and without the sparse-dist pipeline.

    python benchmarks/pipeline_throughput.py --data /work/main/data/demo --steps 300 --repeats 2 [--qat]

``--trainer.strategy.pipeline true`` starts each batch's embedding input all-to-all one step early
(:mod:`dqrm_lightning.strategies.pipeline`). The demo config (batch ``data.batch_size`` per process, tables table-wise
over the 2 processes); throughput = global samples per second of the training loop after warm-up, from each run's
summary.json; runs alternate plain, pipeline, plain, ... ``--qat`` trains whole-model INT4 QAT
(``configs/qat/int4.yaml``) in both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

from _kaggle import run_summary

MODES = {"plain": "false", "pipeline": "true"}


def fit_command(data: Path, work: Path, steps: int, warmup: int, pipeline: str, qat: bool = False) -> list[str]:
    """`dqrm fit` of the demo config (with ``qat``: whole-model INT4 QAT) on 2 processes, no validation or
    checkpoints."""
    return [
        sys.executable,
        "-m",
        "dqrm_lightning.cli",
        "fit",
        "-c",
        "configs/demo.yaml",
        *(("-c", "configs/qat/int4.yaml") if qat else ()),
        *(x for s in ("train", "val", "test") for x in (f"--data.{s}_files", f"{data}/{s}*")),
        "--data.prepared_dir",
        str(work / "prepared"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "dqrm_lightning.strategies.TorchRecStrategy",
        "--trainer.strategy.pipeline",
        pipeline,
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_epochs",
        "-1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--step_timer.warmup_steps",
        str(warmup),
        "--wandb",
        "disabled",
        "--trainer.default_root_dir",
        str(work / "runs"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/main/data/demo", help="folder of train*/val*/test* TSV files")
    parser.add_argument("--work", default="/tmp/dqrm_bench_pipeline", help="prepared data and runs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--qat", action="store_true", help="whole-model INT4 QAT in both modes")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.repeats):
        for mode, flag in MODES.items():
            command = fit_command(Path(args.data), Path(args.work), args.steps, args.warmup, flag, args.qat)
            summary = run_summary(command)
            rates[mode].append(summary["speed"]["loop_samples_per_s"])
            print(f"round {i}: {mode:8s} {rates[mode][-1]:10,.0f} samples/s", flush=True)
    plain, piped = (statistics.median(rates[m]) for m in MODES)
    model = "demo config, whole-model INT4 QAT" if args.qat else "demo config"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared); {model}, 2 gloo processes")
    print(f"{'':10s}{'plain':>12s}{'pipeline':>12s}")
    for i in range(args.repeats):
        print(f"round {i:<4d}{rates['plain'][i]:12,.0f}{rates['pipeline'][i]:12,.0f}")
    print(f"{'median':10s}{plain:12,.0f}{piped:12,.0f}   pipeline / plain = {piped / plain:.3f}")


if __name__ == "__main__":
    main()
