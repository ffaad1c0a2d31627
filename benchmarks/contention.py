"""Training throughput of the demo config when the cores are shared.

Measures `dqrm fit -c configs/demo.yaml` end-to-end training throughput (samples/s over the timed steps, data loading
included: summary.json `speed.loop_samples_per_s`):

  (a) alone;
  (b) while one other `dqrm fit` of the same config trains on the same machine;
  (c) while a pure-CPU busy loop runs;
  (d) 2 ranks (`--trainer.devices 2 --trainer.strategy torchrec`) vs 1 rank, alone (global samples/s).

each under the thread policy with configs/demo.yaml as it is ("policy"), as `dqrm` ran before the policy ("before":
torch's default pools as wide as the machine, `--threads <cores>`, and one loader worker), or with only the threads
as wide as the machine ("all-cores"), in the same run, repeats interleaved. Prints the medians and
the ratios (b)/(a), (c)/(a) and (d); goal (b)/(a) >= 0.40 and (c)/(a) >= 0.40 on 2 cores (ideal 0.5).

    .venv/bin/python benchmarks/contention.py --data data/demo --steps 600 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fit_command(data: Path, root: Path, steps: int, extra: list[str]) -> list[str]:
    files = [x for s in ("train", "val", "test") for x in (f"--data.{s}_files", f"{data}/{s}*")]
    return [
        sys.executable,
        "-m",
        "dqrm_lightning.cli",
        "fit",
        "-c",
        "configs/demo.yaml",
        *files,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--step_timer.warmup_steps",
        "20",
        "--wandb",
        "disabled",
        *extra,
    ]


def run_fit(data: Path, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run(fit_command(data, Path(root), steps, extra), cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        path = Path(done.stdout.strip().splitlines()[-1].removeprefix("summary: "))
        summary = json.loads(path.read_text())
    return {"samples_per_s": summary["speed"]["loop_samples_per_s"], "threads": summary.get("threads")}


class Competitor:
    """A background load: another `dqrm fit` (waits until it trains) or a busy loop."""

    def __init__(self, kind: str, data: Path, extra: list[str]) -> None:
        self.kind = kind
        self.root = tempfile.TemporaryDirectory()
        if kind == "busy":
            command = [sys.executable, "-c", "while True: pass"]
        else:
            command = fit_command(data, Path(self.root.name), 10**7, [*extra, "--progress_every_n_steps", "20"])
            command[command.index("--trainer.max_epochs") + 1] = "1000"
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
        )
        if kind == "fit":
            for line in self.process.stdout:  # its first progress line: it is training
                if line.startswith("epoch "):
                    break
            else:
                raise RuntimeError("the competing `dqrm fit` ended before training")
            # keep reading its output: a full pipe would block it and it would stop competing
            threading.Thread(target=self.process.stdout.read, daemon=True).start()
        else:
            time.sleep(1.0)

    def stop(self) -> None:
        os.killpg(self.process.pid, 9)
        self.process.wait()
        self.root.cleanup()


def measure(data: Path, steps: int, extra: list[str], load: str | None, ranks: int = 1) -> dict:
    competitor = Competitor(load, data, extra) if load else None
    try:
        parallel = ["--trainer.devices", str(ranks), "--trainer.strategy", "torchrec"] if ranks > 1 else []
        return run_fit(data, steps, [*extra, *parallel])
    finally:
        if competitor:
            competitor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="`dqrm data synth --preset demo`")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--before-steps", type=int, default=120, help="steps per run of `before` (it is slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="*", default=["policy", "before"], help="policy, before, all-cores")
    parser.add_argument("--scenarios", nargs="*", default=["a_alone", "b_fit", "c_busy", "d_2ranks"])
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = {
        "policy": [],
        "before": ["--threads", str(cores), "--data.num_workers", "1"],
        "all-cores": ["--threads", str(cores)],  # the policy's other choices, pools as wide as the machine
    }
    scenarios = {"a_alone": (None, 1), "b_fit": ("fit", 1), "c_busy": ("busy", 1), "d_2ranks": (None, 2)}
    scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios}
    print(
        f"machine: {platform.machine()}, {cores} cores usable; demo config, batch 128, {args.steps} steps per run "
        f"({args.before_steps} for `before`); throughput over the steps after the first 20"
    )
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in scenarios} for s in args.settings}
    for repeat in range(args.repeats):
        for name in args.settings:
            for scenario, (load, ranks) in scenarios.items():
                steps = args.before_steps if name == "before" else args.steps
                result = measure(args.data, steps, settings[name], load, ranks)
                results[name][scenario].append(result["samples_per_s"])
                threads = result["threads"] or {}
                print(
                    f"repeat {repeat} {name:13s} {scenario:9s} {result['samples_per_s']:9,.0f} samples/s "
                    f"(intra-op {threads.get('intra_op')}, from {threads.get('intra_op_from')})",
                    flush=True,
                )
    print("\nmedians (samples/s) and ratios")
    for name in args.settings:
        med = {k: statistics.median(v) for k, v in results[name].items()}
        parts = [f"{k} {v:8,.0f}" for k, v in med.items()]
        alone = med.get("a_alone")
        for key, label in (("b_fit", "(b)/(a)"), ("c_busy", "(c)/(a)"), ("d_2ranks", "2 ranks / 1 rank")):
            if alone and key in med:
                parts.append(f"{label} {med[key] / alone:.3f}")
        print(f"{name:10s} " + "  ".join(parts))


if __name__ == "__main__":
    main()
