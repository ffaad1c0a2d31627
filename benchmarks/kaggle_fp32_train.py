"""FP32 training speed of the Kaggle-config DLRM on its full-size tables (33,762,577 rows x 16), synthetic data.

    python benchmarks/kaggle_fp32_train.py --data /tmp/dqrm_bench_kaggle --steps 1000

Runs `dqrm fit -c configs/kaggle.yaml -c configs/data/synthetic_kaggle.yaml` for a fixed number of steps at batch 128
and 2048, and prints from each run's summary.json: step time, samples/s of the step alone and of the whole loop
(data loading and logging included), and the process's peak resident memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path

from _kaggle import arguments, ensure_data, fit_command


def run(data: Path, batch: int, steps: int, warmup: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = fit_command(data, steps, "--data.batch_size", str(batch), "--step_timer.warmup_steps", str(warmup))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    summary = json.loads(Path(out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return summary["speed"] | {"peak_rss_gb": max(peak, before) / 1e6, "model_bytes": summary["model_bytes"]["fp32"]}


def main() -> None:
    parser = arguments(steps=1000, warmup=100, repeats=1)
    args = parser.parse_args()
    data = Path(args.data)
    ensure_data(data, args.rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Kaggle config, FP32, SGD lr 0.1, fused sparse SGD")
    for batch in (128, 2048):
        steps = args.steps if batch == 128 else max(args.steps // 8, args.warmup + 20)
        r = run(data, batch, steps, args.warmup if batch == 128 else args.warmup // 5)
        print(
            f"batch {batch:5d}: {r['mean_step_ms']:.2f} ms/step, {r['samples_per_s']:,.0f} samples/s (step), "
            f"{r['loop_samples_per_s']:,.0f} samples/s (loop), peak RSS {r['peak_rss_gb']:.2f} GB "
            f"(model {r['model_bytes'] / 1e9:.3f} GB), {r['timed_steps']} timed steps"
        )


if __name__ == "__main__":
    main()
