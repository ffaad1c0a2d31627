"""Training throughput with 2 processes (TorchRecStrategy, gloo) vs 1, Kaggle-config DLRM on synthetic data.

    python benchmarks/multiprocess_scaling.py --data /tmp/dqrm_bench_kaggle --steps 400 --repeats 2

Each process trains batch 128 (2 processes: global batch 256) with the 26 Kaggle-size tables placed table-wise
(each process holds about half of the 2.16 GB). Throughput = global samples per second of the training loop after
warm-up, from each run's summary.json; runs alternate 1, 2, 1, 2, ...
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from _kaggle import arguments, ensure_data, fit_command, run_summary


def run(data: Path, devices: int, steps: int, warmup: int) -> dict:
    extra = [
        "--trainer.devices",
        str(devices),
        "--trainer.strategy",
        "torchrec",
        "--step_timer.warmup_steps",
        str(warmup),
    ]
    return run_summary(fit_command(data, steps, *extra))


def main() -> None:
    parser = arguments(steps=400, warmup=50, repeats=2)
    args = parser.parse_args()
    data = Path(args.data)
    ensure_data(data, args.rows)
    rates: dict[int, list[float]] = {1: [], 2: []}
    comm = {}
    for i in range(args.repeats):
        for devices in (1, 2):
            summary = run(data, devices, args.steps, args.warmup)
            rates[devices].append(summary["speed"]["loop_samples_per_s"])
            comm[devices] = summary.get("communication", {}).get("bytes_per_iteration_per_rank", {})
            print(f"round {i}: {devices} process(es): {rates[devices][-1]:,.0f} samples/s", flush=True)
    ratio = statistics.median(rates[2]) / statistics.median(rates[1])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Kaggle config, batch 128 per process")
    print(
        f"median samples/s: 1 process {statistics.median(rates[1]):,.0f}, 2 processes "
        f"{statistics.median(rates[2]):,.0f}; 2 / 1 = {ratio:.3f}"
    )
    print("bytes per iteration and rank (2 processes, sampled):", json.dumps(comm[2]))


if __name__ == "__main__":
    main()
