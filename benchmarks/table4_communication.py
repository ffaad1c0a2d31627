"""The structure of DQRM paper Table 4 on the Kaggle config with 2 processes: bytes per iteration and rank of each
communication mode, with the validation AUC of each mode from the same runs.

    python benchmarks/table4_communication.py --data /tmp/dqrm_bench_kaggle --steps 3000

Runs (each `dqrm fit` with `--trainer.devices 2`, batch 128 per process, the same synthetic Kaggle-format data, then
validation on its validation split):

* model parallel: TorchRec table-wise sharding (pooled-embedding all-to-all);
* data parallel, sparse FP32: replicated tables, only touched rows travel (``configs/parallel/data_parallel.yaml``);
* data parallel, sparse + INT8: the same with DQRM's compression and error compensation (``+ int8_compression.yaml``).

"dense" (plain data parallelism, every table gradient whole: 2.16 GB per iteration) is computed analytically; its
averaged gradients are those of sparse FP32, so it trains identically (tested on small models:
``dense_embedding_gradients``). Bytes: the analytic accounting from each run's real batches
(``comm/*_bytes``) and, for the data-parallel runs, what the communication hook itself counted.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from _kaggle import arguments, ensure_data, fit_command, run_summary

MODES = {
    "model parallel (table-wise)": ["-c", "configs/parallel/model_parallel.yaml"],
    "data parallel, sparse FP32": ["-c", "configs/parallel/data_parallel.yaml"],
    "data parallel, sparse + INT8 (EC)": [
        "-c",
        "configs/parallel/data_parallel.yaml",
        "-c",
        "configs/parallel/int8_compression.yaml",
    ],
}


def run(data: Path, steps: int, warmup: int, extra: list[str]) -> dict:
    command = [
        *fit_command(data, steps, *extra, "--step_timer.warmup_steps", str(warmup)),
        "--trainer.limit_val_batches",
        "1.0",
        "--trainer.val_check_interval",
        str(steps),  # one validation, after the last step
    ]
    return run_summary(command)


def main() -> None:
    parser = arguments(steps=3000, warmup=50, repeats=1)
    args = parser.parse_args()
    data = Path(args.data)
    ensure_data(data, args.rows)
    rows = []
    accounting = {}
    for name, extra in MODES.items():
        summary = run(data, args.steps, args.warmup, extra)
        comm = summary["communication"]
        accounting = comm["bytes_per_iteration_per_rank"]
        hook = comm.get("hook", {}).get("bytes_per_iteration_per_rank")
        rows.append(
            (name, summary["val"]["final"]["val/auc"], summary["speed"]["mean_step_ms"], hook, summary["global_step"])
        )
        print(f"{name}: {json.dumps(rows[-1][1:])}", flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Kaggle config, 2 processes (gloo), batch 128 each")
    print(f"{args.steps} steps per run on synthetic Kaggle-format data ({args.rows:,} rows generated)")
    print()
    print("| mode | bytes / iteration / rank (accounting) | bytes counted by the hook | val AUC | ms / step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| dense (analytic) | {accounting['dense']:,.0f} | - | as sparse FP32 | - |")
    keys = ["model_parallel_a2a", "sparse_fp32", "sparse_int8"]
    for (name, auc, ms, hook, _), key in zip(rows, keys, strict=True):
        counted = f"{hook:,.0f}" if hook is not None else "-"
        print(f"| {name} | {accounting[key]:,.0f} | {counted} | {auc:.4f} | {ms:.1f} |")
    print()
    print(f"sparse FP32 / sparse INT8 (accounting): {accounting['sparse_fp32'] / accounting['sparse_int8']:.2f}x")
    if rows[1][3] and rows[2][3]:
        print(f"sparse FP32 / sparse INT8 (hook): {rows[1][3] / rows[2][3]:.2f}x")
    print(f"dense / sparse INT8: {accounting['dense'] / accounting['sparse_int8']:,.0f}x")
    print(f"AUC: sparse INT8 - sparse FP32 = {rows[2][1] - rows[1][1]:+.4f}")


if __name__ == "__main__":
    main()
