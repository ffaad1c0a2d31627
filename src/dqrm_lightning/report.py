"""Print a run's results next to the Bayes-optimal ceiling: ``python -m dqrm_lightning.report RUN_ROOT``."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path


def latest_summaries(root: str | os.PathLike) -> dict[str, dict]:
    """The newest summary.json of each stage (fit, test, ...) under ``root``."""
    found: dict[str, tuple[float, dict]] = {}
    for path in glob.glob(os.path.join(root, "lightning_logs", "version_*", "summary.json")):
        summary = json.loads(Path(path).read_text())
        mtime = os.path.getmtime(path)
        stage = summary.get("stage", "?")
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m dqrm_lightning.report RUN_ROOT")
    summaries = latest_summaries(argv[0])
    if not summaries:
        raise SystemExit(f"no summary.json under {argv[0]}/lightning_logs")
    print(format_report(summaries))


if __name__ == "__main__":
    main()
