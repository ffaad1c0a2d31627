"""Peak memory of checkpointing on the Kaggle-config DLRM (33,762,577 rows x 16), synthetic Kaggle data.

    python benchmarks/memory.py --data /work/exp/kaggle_data --steps 200

For each model variant (``VARIANTS``: a name and the extra `dqrm fit` arguments that make it), four commands run,
each in its own process, and the peak resident memory of each (its ``ru_maxrss``, from ``os.wait4``) is compared
with that of the first:

* ``fit``: `dqrm fit` for ``--steps`` steps, checkpointing off;
* ``fit+ckpt``: the same with checkpointing on (it saves ``last.ckpt`` at the end);
* ``export``: `dqrm export` of that checkpoint (the variant's export arguments, e.g. INT4 post-training quantization);
* ``resume``: `dqrm fit --ckpt_path` of that checkpoint, for ``--resume-steps`` more steps, checkpointing off.

The goal is at most 1.15x the ``fit`` peak for each. Then FP16 master tables under INT4 QAT against FP32 training
(``--compare``, default ``fp16-int4`` vs ``fp32``): ``--speed-repeats`` pairs of fits without checkpoints, the two
alternating, give the peak RSS ratio and the training step time ratio (loop time per step after the warm-up, from
each run's summary.json), pair by pair, medians printed; goals 0.60 and 1.00.
Results go to benchmarks/results/memory.txt (``--out``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _kaggle import arguments, ensure_data, fit_command

GOAL = 1.15  # peak of each step / peak of the fit without checkpoints


@dataclass(frozen=True)
class Variant:
    """A model to measure: ``fit_args`` added to every `dqrm fit`, ``export_args`` to `dqrm export`."""

    name: str
    fit_args: tuple[str, ...] = ()
    export_args: tuple[str, ...] = field(default=("--embedding-bits", "4"))


VARIANTS = [
    Variant("fp32"),
    Variant("fp16-int4", ("-c", "configs/qat/int4.yaml", "-c", "configs/memory/fp16_tables.yaml"), ()),
]
MEMORY_GOAL, SPEED_GOAL = 0.60, 1.00  # FP16-master INT4 QAT / FP32 training: peak RSS, step time


def peak_rss(command: list[str], log: Path) -> int:
    """Run ``command`` (output to ``log``) and return its peak resident memory in bytes; fails if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}); see {log}")
    return usage.ru_maxrss * 1024  # kB on Linux


def _checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no checkpoint written under {root}")
    return found[-1]


def measure(variant: Variant, data: Path, steps: int, resume_steps: int, work: Path) -> dict[str, int]:
    """Peak resident bytes of each step of ``variant``, in the order run."""
    root = work / variant.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fit = [*fit_command(data, steps, *variant.fit_args), "--trainer.default_root_dir", str(root)]
    peaks = {"fit": peak_rss(fit, root / "fit.log")}
    peaks["fit+ckpt"] = peak_rss([*fit, "--trainer.enable_checkpointing", "true"], root / "fit_ckpt.log")
    checkpoint = _checkpoint(root)
    export = [sys.executable, "-m", "dqrm_lightning.cli", "export", "--ckpt", str(checkpoint)]
    peaks["export"] = peak_rss([*export, "--out", str(root / "artifact"), *variant.export_args], root / "export.log")
    resume = [*fit_command(data, steps + resume_steps, *variant.fit_args), "--trainer.default_root_dir", str(root)]
    peaks["resume"] = peak_rss([*resume, "--ckpt_path", str(checkpoint)], root / "resume.log")
    return peaks


def report(variant: Variant, peaks: dict[str, int]) -> list[str]:
    base = peaks["fit"]
    lines = []
    for step, peak in peaks.items():
        ratio = peak / base
        verdict = "" if step == "fit" else ("  ok" if ratio <= GOAL else f"  OVER the {GOAL}x goal")
        lines.append(f"{variant.name:8s} {step:9s} peak RSS {peak / 1e9:6.2f} GB  {ratio:5.2f}x fit{verdict}")
    return lines


def step_ms(log: Path) -> float:
    """Loop milliseconds per training step of the `dqrm fit` whose output is ``log`` (its summary.json)."""
    summary = json.loads(Path(log.read_text().strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    speed = summary["speed"]
    return 1000.0 * summary["config"]["data"]["batch_size"] / float(speed["loop_samples_per_s"])


def compare(candidate: Variant, baseline: Variant, data: Path, steps: int, repeats: int, work: Path) -> list[str]:
    """``repeats`` alternating fits of each (checkpointing off): peak RSS and step time ratios, pair by pair."""
    memory, speed = [], []
    lines = []
    for repeat in range(repeats):
        result = {}
        for variant in (baseline, candidate):
            root = work / "compare" / variant.name / str(repeat)
            shutil.rmtree(root, ignore_errors=True)
            command = [*fit_command(data, steps, *variant.fit_args), "--trainer.default_root_dir", str(root)]
            result[variant.name] = (peak_rss(command, root / "fit.log"), step_ms(root / "fit.log"))
        (base_rss, base_ms), (rss, ms) = result[baseline.name], result[candidate.name]
        memory.append(rss / base_rss)
        speed.append(ms / base_ms)
        lines.append(
            f"pair {repeat}: {baseline.name} {base_rss / 1e9:.2f} GB {base_ms:.2f} ms/step, "
            f"{candidate.name} {rss / 1e9:.2f} GB {ms:.2f} ms/step"
        )
    for name, ratios, goal in (("peak RSS", memory, MEMORY_GOAL), ("step time", speed, SPEED_GOAL)):
        verdict = "met" if statistics.median(ratios) <= goal else "NOT met"
        lines.append(
            f"{candidate.name} / {baseline.name} {name}: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); goal <= {goal:.2f}: {verdict}"
        )
    return lines


def main() -> None:
    parser = arguments(steps=200, warmup=0, repeats=1)
    parser.add_argument("--resume-steps", type=int, default=50, help="steps trained after resuming")
    parser.add_argument("--work", default=None, help="run directories (default: DATA/memory_runs)")
    parser.add_argument("--out", default="benchmarks/results/memory.txt")
    parser.add_argument("--variants", nargs="*", default=None, help=f"names out of {[v.name for v in VARIANTS]}")
    parser.add_argument("--compare", nargs=2, default=["fp16-int4", "fp32"], metavar=("CANDIDATE", "BASELINE"))
    parser.add_argument("--speed-repeats", type=int, default=3, help="alternating fit pairs of --compare (0: none)")
    args = parser.parse_args()
    data = Path(args.data)
    ensure_data(data, args.rows)
    chosen = [v for v in VARIANTS if args.variants is None or v.name in args.variants]
    work = Path(args.work or data / "memory_runs")
    lines = [
        f"command: python {shlex.join(sys.argv)}",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory, no GPU; "
        f"Kaggle config, {args.steps} steps (+{args.resume_steps} resumed), peak RSS = ru_maxrss of each process",
    ]
    print("\n".join(lines), flush=True)
    for variant in chosen:
        for line in report(variant, measure(variant, data, args.steps, args.resume_steps, work)):
            print(line, flush=True)
            lines.append(line)
    if args.speed_repeats:
        by_name = {v.name: v for v in VARIANTS}
        candidate, baseline = (by_name[name] for name in args.compare)
        for line in compare(candidate, baseline, data, args.steps, args.speed_repeats, work):
            print(line, flush=True)
            lines.append(line)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
