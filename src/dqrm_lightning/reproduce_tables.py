"""The results of ``dqrm reproduce`` over seeds: per experiment the mean and spread of each figure, the paired
difference against FP32 with its confidence interval, the paper's best-over-evaluations figure; as Markdown tables,
``summary.json`` and plots."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dqrm_lightning.commands.compare import compare
from dqrm_lightning.reproduce import Experiment, SeedResult
from dqrm_lightning.stats import format_spread, spread

TABLES = {
    "t2": "Table 2 / Fig. 3a: embedding bit width (MLP FP32)",
    "t3": "Table 3: whole-model INT4 (tables + MLP weights) vs FP32, naive QAT and PTQ",
    "t5": "Table 5: scale refresh period P (whole-model INT4)",
    "extra": "Further experiments (`--experiment`)",
}
PROTOCOLS = (
    "Protocols. *val-selected* (what one deploys): each run is tested once, with the checkpoint of its best "
    "validation AUC. *paper* (the DQRM reference code's report): the best test AUC over all evaluations during "
    "training, which selects the model on the test split; shown to compare with the paper, not to deploy. "
    "Every seed trains on the same data (seed k sets the model's initialization and the training order); "
    "mean ± std over seeds. Δ = model - FP32 on the same test rows, mean over seeds (seed k paired with FP32's "
    "seed k), with the {level}% paired bootstrap confidence interval, resampling the test rows and the seed pairs "
    "({replicates} resamples: test-row noise and seed-to-seed spread). "
    "Post-training quantization quantizes the same seed's FP32 model (one evaluation: no paper figure)."
)


def paper_protocol(curve: list[dict[str, Any]]) -> tuple[float, int] | None:
    """The paper's figure of one run: the best test AUC over its evaluations and the epoch (1-based, the first on
    ties) it was reached in; ``None`` when the test split was not scored during training."""
    scored = [point for point in curve if point.get("test_auc") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda point: point["test_auc"])  # max keeps the first of equal values
    return float(best["test_auc"]), int(best["epoch"]) + 1  # metrics.csv counts epochs from 0


def aggregate(
    results: dict[str, list[SeedResult]], replicates: int = 1000, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Per experiment: seeds, mean/std of validation AUC (best), test AUC and log loss (val-selected) and the paper's
    test AUC, and the paired difference against FP32 (``None`` without FP32 on the same seeds)."""
    fp32 = results.get("fp32", [])
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        paper = [paper_protocol(run.curve) for run in runs]
        row: dict[str, Any] = {
            "seeds": [run.seed for run in runs],
            "val_auc": spread([run.val_best["val/auc"] for run in runs]),
            "test_auc": spread([run.test["auc"] for run in runs]),
            "test_log_loss": spread([run.test["log_loss"] for run in runs]),
            "paper_test_auc": spread([p[0] for p in paper if p]) if all(paper) else None,
            "paper_epochs": [p[1] for p in paper if p] if all(paper) else None,
            "bytes": runs[0].bytes,
            "ms_per_step": spread([r.ms_per_step for r in runs if r.ms_per_step]) if runs[0].ms_per_step else None,
            "difference": None,
        }
        if name != "fp32" and [run.seed for run in fp32] == row["seeds"]:
            baseline, candidate = [run.predictions for run in fp32], [run.predictions for run in runs]
            row["difference"] = compare(baseline, candidate, replicates, level)["difference"]
        rows[name] = row
    return rows


def _delta(difference: dict[str, Any] | None, metric: str) -> str:
    if difference is None:
        return "-"
    d = difference[metric]
    return f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def _table_row(label: str, row: dict[str, Any], fp32_bytes: int | None) -> str:
    paper = "-"
    if row["paper_test_auc"] is not None:
        paper = f"{format_spread(row['paper_test_auc'])} (epoch {', '.join(str(e) for e in row['paper_epochs'])})"
    ratio = f"{row['bytes'] / fp32_bytes:.3f}" if fp32_bytes else "-"
    ms = f"{row['ms_per_step']['mean']:.2f}" if row["ms_per_step"] else "-"
    cells = [
        label,
        str(len(row["seeds"])),
        format_spread(row["val_auc"]),
        format_spread(row["test_auc"]),
        _delta(row["difference"], "auc"),
        format_spread(row["test_log_loss"]),
        _delta(row["difference"], "log_loss"),
        paper,
        ratio,
        ms,
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(
    rows: dict[str, dict[str, Any]],
    experiments: list[Experiment],
    command: str,
    bayes: dict[str, Any] | None = None,
    replicates: int = 1000,
    level: float = 0.95,
) -> str:
    """The results as Markdown: command, machine, protocols, then one table per paper table."""
    fp32_bytes = rows["fp32"]["bytes"] if "fp32" in rows else None
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    lines = [f"Command: `{command}`", "", f"Machine: {machine}.", ""]
    lines += [PROTOCOLS.format(level=round(100 * level), replicates=replicates), ""]
    if bayes:
        lines += [
            f"Bayes-optimal (true click model) AUC: val {bayes['val']['auc']:.4f}, test {bayes['test']['auc']:.4f}; "
            f"log loss: val {bayes['val']['log_loss']:.4f}, test {bayes['test']['log_loss']:.4f}.",
            "",
        ]
    header = (
        "| model | seeds | val AUC (best) | test AUC, val-selected | Δ AUC vs FP32 [CI] | test log loss, "
        "val-selected | Δ log loss vs FP32 [CI] | test AUC, paper protocol (epoch) | size / FP32 | ms/step |"
    )
    for key, title in TABLES.items():
        chosen = [e for e in experiments if key in e.tables and e.name in rows]
        if not any(e.name != "fp32" for e in chosen) and (key == "extra" or len(rows) > 1):
            continue  # a table of FP32 alone only when FP32 is all there is
        lines += [f"### {title}", "", header, "|" + "---|" * 10]
        lines += [_table_row(e.label, rows[e.name], fp32_bytes) for e in chosen]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, list[SeedResult]], experiments: list[Experiment], path: Path) -> None:
    """Validation AUC per evaluation for FP32, each embedding bit width, DQRM INT4 and further experiments: one thin
    line per seed, the mean over seeds bold in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 4.5))
    shown = [e for e in experiments if results.get(e.name) and results[e.name][0].curve]
    shown = [e for e in shown if {"t2", "extra"} & set(e.tables) or e.name == "int4_p200"]
    for index, exp in enumerate(shown):
        colour = plt.get_cmap("tab20")(index % 20)  # FP32 and ten further models stay distinct
        curves = [[point["val_auc"] for point in run.curve] for run in results[exp.name]]
        for curve in curves:
            axis.plot(range(1, len(curve) + 1), curve, color=colour, linewidth=0.7, alpha=0.45)
        length = min(len(curve) for curve in curves)
        mean = np.mean([curve[:length] for curve in curves], axis=0)
        axis.plot(range(1, length + 1), mean, color=colour, linewidth=2.2, marker="o", label=exp.label)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("evaluation (epoch end unless validating within epochs)")
    axis.set_ylabel("validation AUC")
    seeds = max((len(results[e.name]) for e in shown), default=0)
    axis.set_title(f"Validation AUC per evaluation ({seeds} seed(s): thin per seed, bold mean)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_differences(rows: dict[str, dict[str, Any]], experiments: list[Experiment], path: Path) -> bool:
    """Δ test AUC vs FP32 of each model with its confidence interval as an error bar; ``False`` (nothing drawn)
    when no model has a difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in experiments if e.name in rows and rows[e.name]["difference"] is not None]
    if not shown:
        return False
    diffs = [rows[e.name]["difference"]["auc"] for e in shown]
    centre = [d["difference"] for d in diffs]
    below = [d["difference"] - d["low"] for d in diffs]
    above = [d["high"] - d["difference"] for d in diffs]
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.6))
    positions = list(range(len(shown)))[::-1]
    axis.errorbar(centre, positions, xerr=[below, above], fmt="o", capsize=4, color="C0")
    axis.axvline(0.0, color="grey", linewidth=1)
    axis.set_yticks(positions, [e.label for e in shown], fontsize=8)
    axis.set_xlabel(f"Δ test AUC vs FP32 (val-selected), {round(100 * diffs[0]['level'])}% paired bootstrap CI")
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write(
    results: dict[str, list[SeedResult]],
    experiments: list[Experiment],
    out: Path,
    command: str,
    replicates: int = 1000,
    seconds: float | None = None,
    bayes: dict[str, Any] | None = None,
) -> str:
    """``results.md``, ``summary.json`` (per-seed values too), ``val_auc.png`` and ``delta_auc.png`` in ``out``;
    prints the Markdown and returns the summary's path."""
    rows = aggregate(results, replicates)
    fits = [run.fit for runs in results.values() for run in runs if run.fit]
    bayes = bayes or next((fit.get("bayes_optimal") for fit in fits if fit.get("bayes_optimal")), None)
    text = markdown(rows, experiments, command, bayes if bayes and "test" in bayes else None, replicates)
    if seconds is not None:
        text += f"\nWall time: {seconds / 60:.1f} min.\n"
    (out / "results.md").write_text(text + "\n")
    if any(run.curve for runs in results.values() for run in runs):
        plot(results, experiments, out / "val_auc.png")
    plot_differences(rows, experiments, out / "delta_auc.png")
    print(text, flush=True)
    per_seed = {
        name: [{k: v for k, v in asdict(run).items() if k != "fit"} for run in runs] for name, runs in results.items()
    }
    summary = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "protocols": PROTOCOLS.format(level=95, replicates=replicates),
        "wall_seconds": seconds,
        "bayes": bayes if bayes and "test" in bayes else None,
        "results": {
            name: {"label": _label(experiments, name), **rows[name], "per_seed": per_seed[name]} for name in rows
        },
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return str(path)


def _label(experiments: list[Experiment], name: str) -> str:
    return next(e.label for e in experiments if e.name == name)
