"""``dqrm reproduce``: the DQRM paper's tables on one data set over several seeds, as Markdown, JSON and plots.

Runs, for every seed (each a ``dqrm fit``, then ``dqrm predict`` of the labeled test split with the checkpoint of the
best validation AUC; same data for every seed, the model seed and the training-order seed change):

* Table 2 / Fig. 3a: FP32; embedding-only INT16, INT8, INT4, INT2 (MLP FP32, P = 200);
* Table 3: whole-model INT4 (tables and MLP weights) with P = 200 (DQRM) and P = 1 (naive), and post-training
  INT4 of the FP32 model (scales from the trained tables; and the reference code's init-scale variant);
* Table 5: whole-model INT4 with P in {1, 200, 500};
* further experiments given as QAT config files (``--experiment NAME=configs/qat/x.yaml``).

Two protocols, both in the output: *val-selected* (the checkpoint with the best validation AUC, tested once: what one
deploys) and *paper* (the best test AUC over all evaluations during training, as the DQRM reference code reports it:
model selection on the test split; the test split is scored at every validation for it). Differences against FP32
pair seed ``k`` with FP32's seed ``k`` on the same test rows, with a paired bootstrap confidence interval over the
test rows and the seeds (:mod:`dqrm_lightning.commands.compare`). Aggregation, tables and plots:
:mod:`dqrm_lightning.reproduce_tables`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqrm_lightning.commands.compare import score


@dataclass
class Experiment:
    name: str
    label: str
    tables: tuple[str, ...]
    qat: list[str] = field(default_factory=list)
    ptq: str | None = None  # "trained" or "init": export the FP32 run with post-training INT4


EXPERIMENTS = [
    Experiment("fp32", "FP32", ("t2", "t3", "extra")),
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
# the data arguments that give a run its data (after `--`); without one, a synthetic preset's data is generated
_DATA_ARGUMENTS = ("train_files", "val_files", "test_files", "kaggle_train_txt", "terabyte_dir", "prepared_dir")


@dataclass
class SeedResult:
    """One experiment trained (or post-training quantized) on one seed.

    ``curve``: one entry per evaluation during training, ``{"epoch", "step", "val_auc", "test_auc"}`` (``test_auc``
    ``None`` unless the test split was scored at every validation); empty for post-training quantization.
    """

    seed: int
    val_best: dict[str, float]
    val_final: dict[str, float]
    test: dict[str, float]  # test AUC and log loss of the val-selected model, from its predictions
    predictions: str
    bytes: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    ms_per_step: float | None = None
    minutes: float = 0.0
    fit: dict[str, Any] | None = None  # the fit's summary.json (not written to reproduce's summary)


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


def read_curve(metrics_csv: Path) -> list[dict[str, Any]]:
    """Every evaluation of a fit from its ``metrics.csv``: epoch, step, validation AUC and (when the test split was
    scored at each validation, ``data.evaluate_test_split``) test AUC."""
    with open(metrics_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/auc")]
    return [
        {
            "epoch": int(row["epoch"]),
            "step": int(row["step"]),
            "val_auc": float(row["val/auc"]),
            "test_auc": float(row["fit_test/auc"]) if row.get("fit_test/auc") else None,
        }
        for row in rows
    ]


def _predictions_path(summary: dict[str, Any]) -> str:
    """The predictions file of a ``dqrm predict`` summary (several ranks' files: their common prefix)."""
    entry = summary["predictions"]
    return re.sub(r"\.rank\d+$", "", entry["path"]) if "files" in entry else entry["path"]


def run(
    base: list[str], out: Path, experiments: list[Experiment], seeds: list[int], paper_protocol: bool = True
) -> dict[str, list[SeedResult]]:
    """Run ``experiments`` for every seed (all experiments of a seed, then the next seed); one result per experiment
    and seed. Post-training quantization rows quantize the same seed's FP32 model (skipped without one)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    results: dict[str, list[SeedResult]] = {exp.name: [] for exp in experiments}
    for seed in seeds:
        seeded = [*base, "--seed_everything", str(seed), "--data.seed", str(seed)]
        if paper_protocol:
            seeded += ["--data.evaluate_test_split", "true"]
        fp32: SeedResult | None = None
        for exp in experiments:
            root = ["--trainer.default_root_dir", str(out / "runs" / exp.name / f"seed_{seed}"), "--wandb", "disabled"]
            root += ["--trainer.enable_progress_bar", "false"]
            start = time.time()
            if exp.ptq:
                if fp32 is None:
                    continue
                artifact = out / "runs" / exp.name / f"seed_{seed}" / "artifact"
                result = _post_training(exp.ptq, fp32, seed, base, root, artifact, log)
            else:
                result = _trained(exp, seed, seeded, root, log)
                fp32 = result if exp.name == "fp32" else fp32
            result.minutes = (time.time() - start) / 60
            results[exp.name].append(result)
            print(
                f"{exp.label}, seed {seed}: val AUC best {result.val_best['val/auc']:.4f}, test AUC "
                f"{result.test['auc']:.4f} ({result.minutes:.1f} min)",
                flush=True,
            )
    return {name: runs for name, runs in results.items() if runs}


def _trained(exp: Experiment, seed: int, base: list[str], root: list[str], log: Path) -> SeedResult:
    """Train an experiment, then score the test split with its best-validation checkpoint."""
    fit = _dqrm(["fit", *base, *exp.qat, *root], log)
    best = fit["checkpoints"]["best"]
    predict = _dqrm(["predict", *base, *exp.qat, *root, "--ckpt_path", best], log)
    predictions = _predictions_path(predict)
    loop = (fit.get("speed") or {}).get("loop_samples_per_s")
    batch = fit["config"]["data"]["batch_size"]
    return SeedResult(
        seed=seed,
        val_best=fit["val"]["best"],
        val_final=fit["val"]["final"],
        test=score(predictions),
        predictions=predictions,
        bytes=fit["model_bytes"].get("quantized", fit["model_bytes"]["fp32"]),
        curve=read_curve(Path(fit["_path"]).with_name("metrics.csv")),
        ms_per_step=1000.0 * batch / loop if loop else None,
        fit=fit,
    )


def _post_training(
    scales: str, fp32: SeedResult, seed: int, base: list[str], root: list[str], artifact: Path, log: Path
) -> SeedResult:
    """Quantize the FP32 run's best checkpoint after training (INT4 tables and MLPs, ``scales``: ``trained`` or
    ``init``), then validate it and score the test split."""
    assert fp32.fit is not None  # a trained run
    best = fp32.fit["checkpoints"]["best"]
    export = ["export", "--ckpt", best, "--out", str(artifact), "--embedding-bits", "4", "--mlp-bits", "4"]
    _dqrm([*export, "--ptq-scales", scales], log)
    val = _dqrm(["validate", *base, *root, "--artifact", str(artifact)], log)
    predict = _dqrm(["predict", *base, *root, "--artifact", str(artifact)], log)
    manifest = json.loads((artifact / "manifest.json").read_text())
    predictions = _predictions_path(predict)
    return SeedResult(
        seed=seed,
        val_best=val["val"]["final"],
        val_final=val["val"]["final"],
        test=score(predictions),
        predictions=predictions,
        bytes=manifest["bytes"]["model"],  # what the artifact stores, scales included
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqrm reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        nargs="+",
        default=["demo"],
        help="configs of configs/ (configs/NAME.yaml), stacked in order: demo, kaggle, `demo hard`, `demo movielens`",
    )
    parser.add_argument("--out", required=True, help="output directory (results.md, summary.json, plots, runs/)")
    parser.add_argument(
        "--data",
        default=None,
        help="directory of the data's train*/val*/test* files; for a synthetic preset generated there when missing "
        "(default: OUT/data)",
    )
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic presets: rows to generate")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds: SEED_START, SEED_START + 1, ...")
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--seed-start", type=int, default=None, help="the first seed (default 1)")
    first.add_argument("--seed", type=int, default=None, help="the same as --seed-start (one seed unless --seeds)")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of generated data (default: the first seed)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these experiments (fp32 adds its PTQ rows)")
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME=CONFIG",
        help="also run a QAT config file as experiment NAME (repeatable), compared against FP32",
    )
    parser.add_argument(
        "--paper-protocol",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the test split at every validation for the paper's protocol (best test AUC over evaluations)",
    )
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap resamples (test rows and seeds)")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="train nothing: rewrite the tables, summary and plots of the finished run in --out from its summary.json "
        "and prediction files (e.g. with other --replicates)",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for every run, e.g. data paths")
    return parser


def _experiments(parser: argparse.ArgumentParser, only: list[str] | None, given: list[str]) -> list[Experiment]:
    """The built-in experiments selected by ``--only`` (all without it), then those of ``--experiment``."""
    known = [exp.name for exp in EXPERIMENTS]
    unknown = [name for name in only or [] if name not in known]
    if unknown:  # before any data is generated or run started
        parser.error(f"unknown experiment for --only: {', '.join(unknown)}; choose from {', '.join(known)}")
    selected = [e for e in EXPERIMENTS if not only or e.name in only or (e.ptq is not None and "fp32" in only)]
    for item in given:
        name, _, config = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not config:
            parser.error(f"--experiment takes NAME=CONFIG (a QAT config file), got {item!r}")
        if name in known or any(e.name == name for e in selected):
            parser.error(f"--experiment {item}: the name {name!r} is taken; choose another")
        if not Path(config).is_file():
            parser.error(f"--experiment {item}: no such config file {config!r}")
        selected.append(Experiment(name, name, ("extra",), ["-c", config]))
    return selected


def _preset_config(parser: argparse.ArgumentParser, preset: str) -> Path:
    config = Path("configs") / f"{preset}.yaml"
    if not config.is_file():
        names = sorted(path.stem for path in Path("configs").glob("*.yaml"))
        parser.error(f"--preset {preset}: no configs/{preset}.yaml; choose from {', '.join(names) or '(none here)'}")
    return config


def _data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The data of every run: the paths after ``--`` when given; else the train*/val*/test* files of ``--data``;
    else a synthetic preset's data, generated once into ``--data`` (default ``OUT/data``) with ``--data-seed``."""
    if any(a.split("=", 1)[0] in {f"--data.{key}" for key in _DATA_ARGUMENTS} for a in extra):
        return []
    data = Path(args.data or Path(args.out) / "data")
    if not glob.glob(str(data / "train*")):
        from dqrm_lightning.data.synthetic import PRESETS, synthesize

        synthetic = args.preset[-1]  # the last config names the data
        if synthetic not in PRESETS or not _config_reads_files(_preset_config(parser, synthetic)):
            parser.error(
                f"--preset {' '.join(args.preset)} reads data you give: pass --data DIR (train*/val*/test* files) or "
                f"its paths after `--` (e.g. `-- --data.kaggle_train_txt train.txt`)"
            )
        synthesize(synthetic, args.rows, args.data_seed, data)
    return [arg for split in ("train", "val", "test") for arg in (f"--data.{split}_files", f"{data}/{split}*")]


def _config_reads_files(config: Path) -> bool:
    """Whether a preset's config reads train*/val*/test* files (a generated data set can stand in for them)."""
    import yaml

    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return bool(data.get("train_files"))


def main(argv: list[str]) -> str:
    """Run ``dqrm reproduce``; returns the path of the summary it wrote."""
    from dqrm_lightning import reproduce_tables

    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.replicates < 1:
        parser.error(f"--seeds and --replicates must be >= 1, got {args.seeds} and {args.replicates}")
    if args.tables_only:
        return _rewrite_tables(parser, Path(args.out), args.replicates)
    experiments = _experiments(parser, args.only, args.experiment)
    configs = [arg for name in args.preset for arg in ("-c", str(_preset_config(parser, name)))]
    start = args.seed_start if args.seed_start is not None else args.seed if args.seed is not None else 1
    seeds = list(range(start, start + args.seeds))
    args.data_seed = start if args.data_seed is None else args.data_seed
    extra = [a for a in args.extra if a != "--"]
    base = [*configs, *_data_arguments(parser, args, extra), *extra]
    out = Path(args.out)
    began = time.time()
    results = run(base, out, experiments, seeds, args.paper_protocol)
    command = "dqrm reproduce " + " ".join(argv)
    return reproduce_tables.write(results, experiments, out, command, args.replicates, time.time() - began)


def _rewrite_tables(parser: argparse.ArgumentParser, out: Path, replicates: int) -> str:
    """``--tables-only``: the finished run's per-seed results (its ``summary.json``) aggregated and written again."""
    from dqrm_lightning import reproduce_tables

    path = out / "summary.json"
    if not path.is_file():
        parser.error(f"--tables-only: no {path} (the summary of a finished `dqrm reproduce --out {out}`)")
    summary = json.loads(path.read_text())
    known = {exp.name: exp for exp in EXPERIMENTS}
    experiments = [
        known.get(name) or Experiment(name, row["label"], ("extra",)) for name, row in summary["results"].items()
    ]
    results = {name: [SeedResult(**seed) for seed in row["per_seed"]] for name, row in summary["results"].items()}
    return reproduce_tables.write(
        results, experiments, out, summary["command"], replicates, summary.get("wall_seconds"), summary.get("bayes")
    )
