"""A short check of TorchRecStrategy on one GPU with nccl: Kaggle-config DLRM (full 33.76M-row tables) on synthetic
Kaggle-format data, FP32 and whole-model INT4 QAT (P=200), training throughput of each (FP32 runs before and after
the QAT run; the ratio uses their mean step time).

    python benchmarks/gpu_check.py --steps 300 --batch-size 2048 [--out DIR]

Needs a CUDA build of torch with matching FBGEMM-GPU and TorchRec. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from _kaggle import ensure_data, fit_command


def versions() -> dict[str, str]:
    import fbgemm_gpu
    import torch
    import torchrec

    return {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "torchrec": getattr(torchrec, "__version__", "?"),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none",
    }


def run(data: Path, steps: int, batch: int, warmup: int, accelerator: str, *extra: str) -> dict:
    command = [
        *fit_command(data, steps, *extra),
        "--trainer.accelerator",
        accelerator,
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "torchrec",
        "--trainer.enable_progress_bar",
        "false",
        "--data.batch_size",
        str(batch),
        "--step_timer.warmup_steps",
        str(warmup),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", flush=True)
        raise SystemExit(f"dqrm fit failed with code {done.returncode}")
    summary = json.loads(Path(done.stdout.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    summary["wall_with_startup_s"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/tmp/dqrm_gpu_kaggle")
    parser.add_argument("--rows", type=int, default=600_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--accelerator", default="gpu", help="gpu (nccl); cpu only to try the script itself")
    args = parser.parse_args()
    info = versions()
    print(json.dumps(info), flush=True)
    data = Path(args.data)
    ensure_data(data, args.rows)
    results = {"versions": info, "machine": platform.machine(), "batch_size": args.batch_size, "steps": args.steps}
    qat = ["-c", "configs/qat/int4.yaml"]
    for name, extra in (("fp32", []), ("int4_qat_p200", qat), ("fp32_again", [])):  # FP32 on both sides of QAT
        summary = run(data, args.steps, args.batch_size, args.warmup, args.accelerator, *extra)
        speed = summary["speed"]
        results[name] = {
            "samples_per_s": speed["samples_per_s"],
            "loop_samples_per_s": speed["loop_samples_per_s"],
            "mean_step_ms": speed["mean_step_ms"],
            "world_size": summary["world_size"],
            "backend": summary.get("process_group_backend"),
            "wall_with_startup_s": summary["wall_with_startup_s"],
        }
        print(name, json.dumps(results[name]), flush=True)
    fp32_ms = (results["fp32"]["mean_step_ms"] + results["fp32_again"]["mean_step_ms"]) / 2
    ratio = results["int4_qat_p200"]["mean_step_ms"] / fp32_ms
    results["qat_over_fp32_step_time"] = ratio
    print(f"INT4 QAT (P=200) / FP32 step time on {info['gpu']}, batch {args.batch_size}: {ratio:.3f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
