"""Print a run's results next to the Bayes-optimal ceiling: ``python -m dqrm_lightning.report RUN_ROOT``; given
several run roots (``python -m dqrm_lightning.report runs/demo/fp32 runs/demo/int4``), one comparison table with a row
per run. Everything comes from the runs' ``summary.json`` files (and an exported artifact's ``summary.json``)."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path

# Bootstrap standard error of the demo's test AUC (FP32 and INT4 predictions, 400 resamples of its 20,000 test rows:
# 0.0041 and 0.0040), scaled to other test sizes as 1/sqrt(rows); the paired FP32 - INT4 difference measured 0.0021.
_AUC_NOISE_AT_ONE_ROW = 0.0041 * 20_000**0.5


def latest_summaries(root: str | os.PathLike) -> dict[str, dict]:
    """The newest summary.json of each stage (fit, test, ...) under ``root``; a test of an exported artifact
    (``dqrm test --artifact``) is stage ``test:artifact``, beside the test of the trained checkpoint."""
    found: dict[str, tuple[float, dict]] = {}
    for path in glob.glob(os.path.join(root, "lightning_logs", "version_*", "summary.json")):
        summary = json.loads(Path(path).read_text())
        mtime = os.path.getmtime(path)
        stage = summary.get("stage", "?")
        if (summary.get("config") or {}).get("artifact"):
            stage += ":artifact"
        if stage not in found or mtime > found[stage][0]:
            found[stage] = (mtime, summary | {"path": path})
    return {stage: summary for stage, (_, summary) in found.items()}


def validation_curve(fit_summary: dict) -> list[tuple[int, float, float]]:
    """``(epoch, val AUC, val log loss)`` of each evaluation, from the run's ``metrics.csv``."""
    path = Path(fit_summary.get("path", "")).with_name("metrics.csv")
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/auc")]
    return [(int(r["epoch"]), float(r["val/auc"]), float(r["val/log_loss"])) for r in rows]


def format_report(summaries: dict[str, dict]) -> str:
    lines = []
    fit = summaries.get("fit", {})
    for epoch, auc, log_loss in validation_curve(fit):
        lines.append(f"epoch {epoch}: val AUC {auc:.4f}  log loss {log_loss:.4f}")
    test = summaries.get("test", {})
    bayes = (test or fit).get("bayes_optimal", {})
    if "val" in fit:
        final, best = fit["val"]["final"], fit["val"]["best"]
        lines.append(
            f"val  AUC final {final['val/auc']:.4f}  best {best['val/auc']:.4f}  "
            f"log loss final {final['val/log_loss']:.4f}  accuracy final {final['val/accuracy']:.4f}"
        )
    if "test" in test:
        t = test["test"]
        lines.append(
            f"test AUC {t['test/auc']:.4f}  log loss {t['test/log_loss']:.4f}  accuracy {t['test/accuracy']:.4f}"
        )
    artifact_test = summaries.get("test:artifact", {}).get("test")
    if artifact_test:
        lines.append(
            f"exported artifact {summaries['test:artifact']['config']['artifact']}: test AUC "
            f"{artifact_test['test/auc']:.4f}  log loss {artifact_test['test/log_loss']:.4f}"
        )
    for split in ("val", "test"):
        if split in bayes:
            lines.append(
                f"{split} Bayes-optimal AUC {bayes[split]['auc']:.4f}  log loss {bayes[split]['log_loss']:.4f} "
                "(true click model: no model can do better)"
            )
    speed = fit.get("speed") or {}
    if speed.get("samples_per_s"):
        lines.append(f"training: {speed['samples_per_s']:,.0f} samples/s, {speed['mean_step_ms']:.2f} ms/step")
    return "\n".join(lines)


def _export_summary(artifact_test: dict) -> dict:
    """The ``summary.json`` that ``dqrm export`` wrote in the artifact a test ran on (``{}`` when not found)."""
    artifact = (artifact_test.get("config") or {}).get("artifact")
    path = Path(artifact) / "summary.json" if artifact else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def comparison_row(name: str, summaries: dict[str, dict]) -> dict:
    """One run's figures for the comparison table; ``None`` where the run has no such figure."""
    fit, test, artifact_test = (summaries.get(k, {}) for k in ("fit", "test", "test:artifact"))
    curve = validation_curve(fit)
    best_val = (fit.get("val") or {}).get("best", {}).get("val/auc")
    best_epoch = max(curve, key=lambda point: point[1])[0] if curve else None
    sizes = fit.get("model_bytes") or test.get("model_bytes") or {}
    exported = _export_summary(artifact_test).get("bytes") or {}
    fp32_bytes = exported.get("fp32_model") or sizes.get("fp32")
    # the deployed artifact's size when the run was exported, else the analytic INT-N size (QAT) or FP32 size
    model_bytes = exported.get("payload") or sizes.get("quantized") or sizes.get("fp32")
    speed = fit.get("speed") or {}
    seed = (fit.get("config") or test.get("config") or {}).get("seed_everything")
    return {
        "run": name,
        "val_auc_curve": [auc for _, auc, _ in curve],
        "best_val_auc": best_val,
        "best_epoch": best_epoch,
        "test_auc": (test.get("test") or {}).get("test/auc"),
        "test_log_loss": (test.get("test") or {}).get("test/log_loss"),
        "artifact_test_auc": (artifact_test.get("test") or {}).get("test/auc"),
        "model_bytes": model_bytes,
        "ratio": model_bytes / fp32_bytes if model_bytes and fp32_bytes else None,
        "samples_per_s": speed.get("loop_samples_per_s") or speed.get("samples_per_s"),
        "seed": seed,
        "test_rows": ((test or artifact_test).get("data") or {}).get("rows", {}).get("test"),
        "bayes_optimal": (test or fit).get("bayes_optimal", {}).get("test"),
    }


def _cell(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_comparison(rows: list[dict]) -> str:
    """The comparison table (Markdown), the Bayes-optimal ceiling and the caveat on single-seed differences."""
    lines = [
        f"{row['run']} val AUC by epoch: " + " ".join(f"{auc:.4f}" for auc in row["val_auc_curve"])
        for row in rows
        if row["val_auc_curve"]
    ]
    if lines:
        lines.append("")
    lines += [
        "| run | best val AUC (epoch) | test AUC | test log loss | exported artifact test AUC | model bytes | "
        "size / FP32 | training samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best = _cell(row["best_val_auc"], ".4f")
        if row["best_val_auc"] is not None and row["best_epoch"] is not None:
            best += f" ({row['best_epoch']})"
        cells = [
            row["run"],
            best,
            _cell(row["test_auc"], ".4f"),
            _cell(row["test_log_loss"], ".4f"),
            _cell(row["artifact_test_auc"], ".4f"),
            _cell(row["model_bytes"], ","),
            _cell(row["ratio"], ".3f"),
            _cell(row["samples_per_s"], ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "test AUC / log loss: each run's best-validation checkpoint; model bytes: the exported artifact where there "
        "is one; samples/s: training, data loading included"
    )
    bayes = next((row["bayes_optimal"] for row in rows if row["bayes_optimal"]), None)
    if bayes:
        lines.append(
            f"test Bayes-optimal AUC {bayes['auc']:.4f}  log loss {bayes['log_loss']:.4f} "
            "(true click model: no model can do better)"
        )
    lines.append(_caveat(rows))
    return "\n".join(lines)


def _caveat(rows: list[dict]) -> str:
    seeds = {row["seed"] for row in rows}
    seed = f"a single training seed ({seeds.pop()})" if len(seeds) == 1 and None not in seeds else "one seed per run"
    models = "the two models" if len(rows) == 2 else "these models"
    sizes = {row["test_rows"] for row in rows if row["test_rows"]}
    if len(sizes) != 1:
        return f"Caveat: {seed}; test AUC has sampling noise, so small differences do not rank {models}."
    test_rows = sizes.pop()
    noise = _AUC_NOISE_AT_ONE_ROW / test_rows**0.5
    return (
        f"Caveat: {seed}; AUC on this test split ({test_rows:,} rows) has sampling noise of about {noise:.2g}, "
        f"so differences smaller than that do not rank {models}."
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m dqrm_lightning.report RUN_ROOT [RUN_ROOT ...]")
    runs = {root: latest_summaries(root) for root in argv}
    for root, summaries in runs.items():
        if not summaries:
            raise SystemExit(f"no summary.json under {root}/lightning_logs")
    if len(argv) == 1:
        print(format_report(runs[argv[0]]))
        return
    names = [Path(root).name for root in argv]
    if len(set(names)) < len(names):  # runs/a/fp32 and runs/b/fp32: name them by path
        names = [str(root) for root in argv]
    print(format_comparison([comparison_row(n, runs[root]) for n, root in zip(names, argv, strict=True)]))


if __name__ == "__main__":
    main()
