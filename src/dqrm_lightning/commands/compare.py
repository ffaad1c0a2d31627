"""``dqrm compare``: test AUC and log loss of finished runs, mean and spread over seeds, and the paired bootstrap
confidence interval of the difference against a baseline on the same test rows.

Each model is given as the ``predictions.tsv`` files of ``dqrm predict`` (columns ``row``, ``probability``,
``label``), one per seed; several ranks' files of one run (``predictions.tsv.rank*``) are merged by ``row``. Seed
``k`` of the candidate is paired with seed ``k`` of the baseline; the interval resamples both the test rows and the
seed pairs (:func:`dqrm_lightning.stats.paired_bootstrap`). Writes ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np

from dqrm_lightning.stats import format_spread, paired_bootstrap, spread, weighted_auc, weighted_log_loss


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dqrm compare",
        description="Compare models on the same test rows: mean and std over seeds, paired bootstrap CI of the "
        "difference (candidate - baseline)",
    )
    parser.add_argument("--baseline", nargs="+", required=True, help="predictions of the baseline, one file per seed")
    parser.add_argument("--candidate", nargs="+", required=True, help="predictions of the candidate, same seed order")
    parser.add_argument("--out", required=True, help="directory for summary.json")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap resamples (test rows and seeds)")
    parser.add_argument("--level", type=float, default=0.95, help="coverage of the confidence interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    return parser


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, probabilities, labels)`` of one run's prediction file(s), sorted by row.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file without the ``row``, ``probability`` and ``label`` columns, or rows given twice.
    """
    files = sorted(glob.glob(f"{path}.rank*")) if not Path(path).exists() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no such prediction file (nor {path}.rank*)")
    parts = []
    for file in files:
        with open(file) as handle:
            header = handle.readline().rstrip("\n").split("\t")
        if header != ["row", "probability", "label"]:
            raise ValueError(
                f"{file}: expected the columns row, probability, label of `dqrm predict` on labeled rows, got {header}"
            )
        parts.append(np.loadtxt(file, delimiter="\t", skiprows=1, ndmin=2))
    table = np.concatenate(parts)
    table = table[np.argsort(table[:, 0], kind="stable")]
    rows = table[:, 0].astype(np.int64)
    if len(np.unique(rows)) != len(rows):
        raise ValueError(f"{path}: a row id appears twice")
    return rows, table[:, 1], table[:, 2].astype(np.int64)


def score(path: str) -> dict[str, float]:
    """Test AUC and log loss of one run's prediction file(s) (as :func:`compare` computes them)."""
    _, probs, labels = read_predictions(path)
    return {"auc": weighted_auc(labels, probs), "log_loss": weighted_log_loss(labels, probs)}


def compare(
    baseline: list[str], candidate: list[str], replicates: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """The comparison as a JSON-friendly dict (see the module docstring)."""
    if len(baseline) != len(candidate):
        raise ValueError(f"give one candidate file per baseline seed: {len(baseline)} and {len(candidate)}")
    paths = {"baseline": baseline, "candidate": candidate}
    loaded = {name: [read_predictions(path) for path in files] for name, files in paths.items()}
    rows, _, labels = loaded["baseline"][0]
    for name, runs in loaded.items():
        for path, (other_rows, _, other_labels) in zip(paths[name], runs, strict=True):
            if not (np.array_equal(other_rows, rows) and np.array_equal(other_labels, labels)):
                raise ValueError(f"{path}: not the same test rows and labels as {baseline[0]}")
    models: dict[str, Any] = {}
    for name, runs in loaded.items():
        aucs = [weighted_auc(labels, probs) for _, probs, _ in runs]
        losses = [weighted_log_loss(labels, probs) for _, probs, _ in runs]
        models[name] = {
            "seeds": len(runs),
            "auc": spread(aucs),
            "log_loss": spread(losses),
            "per_seed": {"auc": aucs, "log_loss": losses},
        }
    base = [probs for _, probs, _ in loaded["baseline"]]
    cand = [probs for _, probs, _ in loaded["candidate"]]
    differences = {
        metric: paired_bootstrap(labels, base, cand, metric, replicates, level, seed).as_dict()
        for metric in ("auc", "log_loss")
    }
    return {"rows": len(rows), "models": models, "difference": differences, "replicates": replicates}


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per model, then the differences with their intervals."""
    lines = ["| model | seeds | test AUC (mean ± std) | test log loss (mean ± std) |", "|---|---|---|---|"]
    for name, model in result["models"].items():
        auc, loss = model["auc"], model["log_loss"]
        lines.append(f"| {name} | {model['seeds']} | {format_spread(auc)} | {format_spread(loss)} |")
    for metric, label in (("auc", "AUC"), ("log_loss", "log loss")):
        d = result["difference"][metric]
        lines.append(
            f"candidate - baseline {label}: {d['difference']:+.4f}, {100 * d['level']:.0f}% CI "
            f"[{d['low']:+.4f}, {d['high']:+.4f}] (paired bootstrap over {result['rows']:,} test rows and "
            f"{result['models']['baseline']['seeds']} seed(s), {result['replicates']} resamples)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> str:
    """Run ``dqrm compare``; returns the path of the summary it wrote."""
    args = _parser().parse_args(argv)
    if args.replicates < 1 or not 0.0 < args.level < 1.0:
        raise ValueError(f"`--replicates` must be >= 1 and `--level` in (0, 1), got {args.replicates}, {args.level}")
    result = compare(args.baseline, args.candidate, args.replicates, args.level, args.seed)
    print(format_table(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(
        json.dumps({"command": "compare", "baseline": args.baseline, "candidate": args.candidate, **result}, indent=2)
    )
    return str(path)
