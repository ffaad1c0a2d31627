"""``dqrm reproduce``: the DQRM paper's tables on one data set and seed, as Markdown and a plot.

Runs (each a ``dqrm fit`` then ``dqrm test`` on the best checkpoint, same data, same seed):

* Table 2 / Fig. 3a: FP32; embedding-only INT16, INT8, INT4, INT2 (MLP FP32, P = 200);
* Table 3: whole-model INT4 (tables and MLP weights) with P = 200 (DQRM) and P = 1 (naive), and post-training
  INT4 of the FP32 model (scales from the trained tables; and the reference code's init-scale variant);
* Table 5: whole-model INT4 with P in {1, 200, 500}.

Protocol (stated in the output): validation AUC/accuracy/log loss after every epoch; "best" = best value of each
metric over those evaluations (the paper's protocol), "final" = last epoch; test metrics from the checkpoint with the
best validation AUC; ms/step = mean training step (loop, data included) after warm-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Experiment:
    name: str
    label: str
    tables: tuple[str, ...]
    qat: list[str] = field(default_factory=list)
    ptq: str | None = None  # "trained" or "init": export the FP32 run with post-training INT4


EXPERIMENTS = [
    Experiment("fp32", "FP32", ("t2", "t3")),
    Experiment("emb_int16", "embeddings INT16", ("t2",), ["-c", "configs/qat/emb_int16.yaml"]),
    Experiment("emb_int8", "embeddings INT8", ("t2",), ["-c", "configs/qat/emb_int8.yaml"]),
    Experiment("emb_int4", "embeddings INT4", ("t2",), ["-c", "configs/qat/emb_int4.yaml"]),
    Experiment("emb_int2", "embeddings INT2", ("t2",), ["-c", "configs/qat/emb_int2.yaml"]),
    Experiment("int4_p200", "DQRM INT4, P=200", ("t3", "t5"), ["-c", "configs/qat/int4.yaml"]),
    Experiment("int4_p1", "naive INT4, P=1", ("t3", "t5"), ["-c", "configs/qat/naive_p1.yaml"]),
    Experiment("int4_p500", "DQRM INT4, P=500", ("t5",), ["-c", "configs/qat/int4.yaml", "--qat.scale_period", "500"]),
    Experiment("ptq_int4", "PTQ INT4 (trained scales)", ("t3",), ptq="trained"),
    Experiment("ptq_int4_init", "PTQ INT4 (init scales, reference code)", ("t3",), ptq="init"),
]
TABLES = {
    "t2": "Table 2 / Fig. 3a: embedding bit width (MLP FP32)",
    "t3": "Table 3: whole-model INT4 (tables + MLP weights) vs FP32, naive QAT and PTQ",
    "t5": "Table 5: scale refresh period P (whole-model INT4)",
}


def _dqrm(args: list[str], log: Path) -> dict[str, Any]:
    with open(log, "a") as handle:
        handle.write(f"$ dqrm {' '.join(args)}\n")
        handle.flush()
        result = subprocess.run(
            [sys.executable, "-m", "dqrm_lightning.cli", *args], stdout=subprocess.PIPE, stderr=handle, text=True
        )
        handle.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"`dqrm {' '.join(args[:4])} ...` failed; see {log}")
    path = Path(result.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    return json.loads(path.read_text()) | {"_path": str(path)}


def _curve(fit: dict[str, Any]) -> list[float]:
    path = Path(fit["_path"]).with_name("metrics.csv")
    with open(path, newline="") as handle:
        return [float(row["val/auc"]) for row in csv.DictReader(handle) if row.get("val/auc")]


def run(base: list[str], out: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the experiments (all, or ``names``) with the base arguments; returns one result per experiment."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    results: list[dict[str, Any]] = []
    fp32: dict[str, Any] | None = None
    for exp in EXPERIMENTS:
        if names and exp.name not in names and not (exp.ptq and "fp32" in names):
            continue
        root = ["--trainer.default_root_dir", str(out / "runs" / exp.name), "--wandb", "disabled"]
        root += ["--trainer.enable_progress_bar", "false"]
        start = time.time()
        if exp.ptq:
            if fp32 is None:
                continue
            result = _post_training(exp, exp.ptq, fp32, base, root, out / "runs" / exp.name / "artifact", log)
        else:
            result = _trained(exp, base, root, log)
            if exp.name == "fp32":
                fp32 = result
        result["minutes"] = (time.time() - start) / 60
        results.append(result)
        print(
            f"{exp.label}: val AUC best {result['val_best']['val/auc']:.4f} "
            f"final {result['val_final']['val/auc']:.4f}, "
            f"test AUC {result['test']['test']['test/auc']:.4f} ({result['minutes']:.1f} min)",
            flush=True,
        )
    return results


def _trained(exp: Experiment, base: list[str], root: list[str], log: Path) -> dict[str, Any]:
    """Train an experiment, then test its best-validation checkpoint."""
    fit = _dqrm(["fit", *base, *exp.qat, *root], log)
    test = _dqrm(["test", *base, *exp.qat, *root, "--ckpt_path", fit["checkpoints"]["best"]], log)
    loop = (fit.get("speed") or {}).get("loop_samples_per_s")
    batch = fit["config"]["data"]["batch_size"]
    size = fit["model_bytes"].get("quantized", fit["model_bytes"]["fp32"])
    result = _result(exp, test, fit["val"]["final"], fit["val"]["best"], size)
    ms_per_step = 1000.0 * batch / loop if loop else None
    return result | {"fit": fit, "curve": _curve(fit), "ms_per_step": ms_per_step}


def _post_training(
    exp: Experiment, scales: str, fp32: dict[str, Any], base: list[str], root: list[str], artifact: Path, log: Path
) -> dict[str, Any]:
    """Quantize the FP32 run's best checkpoint after training (INT4 tables and MLPs, ``scales``: ``trained`` or
    ``init``), then validate and test it."""
    best = fp32["fit"]["checkpoints"]["best"]
    export = ["export", "--ckpt", best, "--out", str(artifact), "--embedding-bits", "4", "--mlp-bits", "4"]
    _dqrm([*export, "--ptq-scales", scales], log)
    val = _dqrm(["validate", *base, *root, "--artifact", str(artifact)], log)
    test = _dqrm(["test", *base, *root, "--artifact", str(artifact)], log)
    manifest = json.loads((artifact / "manifest.json").read_text())
    size = manifest["bytes"]["payload"] + 4 * len(manifest["tables"])  # + fp16 scale, offset per table
    return _result(exp, test, val["val"]["final"], val["val"]["final"], size)


def _result(
    exp: Experiment, test: dict[str, Any], val_final: dict[str, float], val_best: dict[str, float], size: int
) -> dict[str, Any]:
    """One experiment's row of the tables (no training curve or step time unless it trained)."""
    return {
        "exp": exp,
        "fit": None,
        "test": test,
        "val_final": val_final,
        "val_best": val_best,
        "curve": [],
        "bytes": size,
        "ms_per_step": None,
    }


def markdown(results: list[dict[str, Any]], command: str, bayes: dict[str, Any] | None) -> str:
    """The results as Markdown tables, one per paper table."""
    fp32_bytes = next((r["bytes"] for r in results if r["exp"].name == "fp32"), None)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
        "Protocol: validation after every epoch; best = best value of each metric "
        "over the evaluations (the paper's protocol), final = last epoch; test = checkpoint with the best "
        "validation AUC; ms/step = training loop time per step after warm-up (data loading included).",
        "",
    ]
    if bayes:
        lines += [
            f"Bayes-optimal (true click model) AUC: val {bayes['val']['auc']:.4f}, test {bayes['test']['auc']:.4f}; "
            f"log loss: val {bayes['val']['log_loss']:.4f}, test {bayes['test']['log_loss']:.4f}.",
            "",
        ]
    for key, title in TABLES.items():
        rows = [r for r in results if key in r["exp"].tables]
        if not rows:
            continue
        lines += [
            f"### {title}",
            "",
            "| model | val AUC best | val AUC final | val acc best | val log loss best | "
            "test AUC | test acc | test log loss | size (MB) | size / FP32 | ms/step |",
            "|" + "---|" * 11,
        ]
        for r in rows:
            vb, vf, t = r["val_best"], r["val_final"], r["test"]["test"]
            ratio = f"{r['bytes'] / fp32_bytes:.3f}" if fp32_bytes else "-"
            ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else "-"
            lines.append(
                f"| {r['exp'].label} | {vb['val/auc']:.4f} | {vf['val/auc']:.4f} | {vb['val/accuracy']:.4f} | "
                f"{vb['val/log_loss']:.4f} | {t['test/auc']:.4f} | {t['test/accuracy']:.4f} | "
                f"{t['test/log_loss']:.4f} | {r['bytes'] / 1e6:.3f} | {ratio} | {ms} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Validation AUC per epoch for FP32 and each bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["curve"] and ("t2" in r["exp"].tables or r["exp"].name == "int4_p200"):
            axis.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["exp"].label)
    epochs = max((len(r["curve"]) for r in results), default=0)
    axis.set_xticks(range(1, epochs + 1))
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation AUC")
    axis.set_title("Validation AUC per epoch (DLRM, same data and seed)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="dqrm reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("demo", "kaggle"), default="demo")
    parser.add_argument("--out", required=True, help="output directory (results.md, val_auc.png, runs/)")
    parser.add_argument("--data", default=None, help="demo: directory of synthetic data (generated when missing)")
    parser.add_argument("--rows", type=int, default=200_000, help="demo: rows to generate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="run only these experiments")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for every fit, e.g. data paths")
    args = parser.parse_args(argv)
    known = [exp.name for exp in EXPERIMENTS]
    unknown = [name for name in args.only or [] if name not in known]
    if unknown:  # before any data is generated or run started
        parser.error(f"unknown experiment for --only: {', '.join(unknown)}; choose from {', '.join(known)}")
    out = Path(args.out)
    extra = [a for a in args.extra if a != "--"]
    base = ["-c", f"configs/{args.preset}.yaml", "--seed_everything", str(args.seed), *extra]
    if args.preset == "demo":
        data = Path(args.data or out / "data")
        if not (data / "truth.json").exists():
            from dqrm_lightning.data.synthetic import synthesize

            synthesize("demo", args.rows, args.seed, data)
        for split in ("train", "val", "test"):
            base += [f"--data.{split}_files", f"{data}/{split}*"]
    command = "dqrm reproduce " + " ".join(argv)
    results = run(base, out, args.only)
    fit_bayes = next((r["fit"].get("bayes_optimal") for r in results if r["fit"]), None)
    text = markdown(results, command, fit_bayes if fit_bayes and "test" in fit_bayes else None)
    (out / "results.md").write_text(text + "\n")
    if any(r["curve"] for r in results):
        plot(results, out / "val_auc.png")
    print(text)
    summary = {
        "command": command,
        "results": {
            r["exp"].name: {
                "val_best": r["val_best"],
                "val_final": r["val_final"],
                "test": r["test"]["test"],
                "bytes": r["bytes"],
                "ms_per_step": r["ms_per_step"],
                "val_auc_per_epoch": r["curve"],
            }
            for r in results
        },
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return str(path)
