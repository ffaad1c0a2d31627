"""Which quantizer to ship, chosen on validation only, and whether it matches FP32 on test.

Reads the ``summary.json`` of ``dqrm reproduce --seeds K`` runs (one per data set) and, per data set and size class,
picks the option with the best mean validation AUC (val-selected protocol: each seed's best-validation checkpoint),
then reports its test AUC difference against FP32 (mean over seeds, paired bootstrap 95% CI from the reproduce run)
against the goals:

* INT4 class (every quantized table at 4 bits, tables <= 0.1875 of their FP32 bytes): Δ test AUC >= 0 and the CI's
  lower bound >= -0.002;
* INT2 class (tables <= 0.125 of their FP32 bytes: INT2 tables, or a size budget of 0.125): Δ test AUC >= -0.005.

Table sizes are the stored tables (codes plus fp16 scales and biases, per table or per row) over their FP32 bytes,
computed with the product's own accounting (``quantized_table_ratio``) from each fit's table sizes and QAT settings.

    .venv/bin/python benchmarks/accuracy_goals.py runs/hard/summary.json runs/movielens/summary.json \
        --out benchmarks/results/accuracy_goals.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dqrm_lightning.export.size import quantized_table_ratio
from dqrm_lightning.quant.config import QATConfig

INT4_TABLES, INT2_TABLES = 0.1875, 0.125
_EPSILON = 1e-9


def fit_summary(reproduce_dir: Path, name: str, seed: int) -> dict[str, Any]:
    """The ``dqrm fit`` summary of one experiment and seed of a reproduce run."""
    for path in sorted((reproduce_dir / "runs" / name / f"seed_{seed}").glob("lightning_logs/version_*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("stage") == "fit":
            return summary
    raise FileNotFoundError(f"no fit summary of {name}, seed {seed}, under {reproduce_dir / 'runs'}")


def table_profile(fit: dict[str, Any]) -> tuple[float, set[int]] | None:
    """(stored tables / FP32 tables, the set of table bit widths) of a QAT fit; ``None`` for FP32."""
    qat = fit.get("qat")
    if not qat:
        return None
    config = QATConfig(**qat["config"])
    rows, dim = fit["data"]["table_sizes"], fit["config"]["model"]["embedding_dim"]
    return quantized_table_ratio(rows, dim, config), {b for b in qat["table_bits"].values() if b is not None}


def candidates(summary_path: Path) -> list[dict[str, Any]]:
    """Every trained quantized experiment of a reproduce run, with its sizes and figures."""
    summary = json.loads(summary_path.read_text())
    rows = []
    for name, result in summary["results"].items():
        if name == "fp32" or result["difference"] is None or not result["per_seed"][0]["curve"]:
            continue  # FP32 itself, and post-training quantization (no training run to choose on validation)
        profile = table_profile(fit_summary(summary_path.parent, name, result["seeds"][0]))
        if profile is None:
            continue
        rows.append(
            {
                "name": name,
                "label": result["label"],
                "seeds": len(result["seeds"]),
                "tables_ratio": profile[0],
                "bits": sorted(profile[1]),
                "model_ratio": result["bytes"] / summary["results"]["fp32"]["bytes"],
                "val_auc": result["val_auc"]["mean"],
                "test_auc": result["test_auc"]["mean"],
                "delta": result["difference"]["auc"],
            }
        )
    return rows


def choose(rows: list[dict[str, Any]], size_class: str) -> dict[str, Any] | None:
    """The option of a size class with the best mean validation AUC (``None`` when the class is empty)."""
    if size_class == "INT4":
        eligible = [r for r in rows if r["bits"] == [4] and r["tables_ratio"] <= INT4_TABLES + _EPSILON]
    else:
        eligible = [r for r in rows if r["tables_ratio"] <= INT2_TABLES + _EPSILON and min(r["bits"]) == 2]
    return max(eligible, key=lambda r: r["val_auc"], default=None)


def verdict(row: dict[str, Any], size_class: str) -> str:
    delta = row["delta"]
    if size_class == "INT4":
        met = delta["difference"] >= 0 and delta["low"] >= -0.002
        return f"{'met' if met else 'not met'} (goal: Δ >= 0 and CI low >= -0.002)"
    met = delta["difference"] >= -0.005
    return f"{'met' if met else 'not met'} (goal: Δ >= -0.005)"


def report(paths: list[Path]) -> str:
    lines = [
        "Options chosen on validation only (best mean validation AUC over seeds within a size class); test figures",
        "of the chosen option, val-selected protocol; Δ = option - FP32 on the same test rows, mean over seeds, with",
        "the paired bootstrap 95% CI. tables / FP32: stored tables (scales included) over FP32 tables.",
        "",
    ]
    for path in paths:
        rows = candidates(path)
        fp32 = json.loads(path.read_text())["results"]["fp32"]
        lines += [
            f"### {path.parent.name} (`{path}`)",
            "",
            f"FP32: val AUC {fp32['val_auc']['mean']:.4f}, test AUC {fp32['test_auc']['mean']:.4f} "
            f"({len(fp32['seeds'])} seeds).",
            "",
            "| option | seeds | bits | tables / FP32 | model / FP32 | val AUC | test AUC | Δ test AUC [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: -r["val_auc"]):
            d = r["delta"]
            lines.append(
                f"| {r['label']} | {r['seeds']} | {'/'.join(map(str, r['bits']))} | {r['tables_ratio']:.4f} | "
                f"{r['model_ratio']:.4f} | {r['val_auc']:.4f} | {r['test_auc']:.4f} | "
                f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] |"
            )
        lines.append("")
        for size_class in ("INT4", "INT2"):
            chosen = choose(rows, size_class)
            if chosen is None:
                lines.append(f"- {size_class}: no option of this class was run.")
                continue
            d = chosen["delta"]
            lines.append(
                f"- {size_class} (tables <= {INT4_TABLES if size_class == 'INT4' else INT2_TABLES} of FP32), "
                f"chosen on validation: **{chosen['label']}**: Δ test AUC {d['difference']:+.4f} "
                f"[{d['low']:+.4f}, {d['high']:+.4f}]: {verdict(chosen, size_class)}."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json of `dqrm reproduce --seeds K` runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args()
    text = report(args.summaries)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
