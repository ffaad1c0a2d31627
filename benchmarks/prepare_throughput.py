"""Rows per second of `dqrm data prepare` (raw Criteo TSV -> shards) on synthetic Kaggle-format data.

    python benchmarks/prepare_throughput.py --rows 2000000 --work /tmp/bench_prepare

Writes the raw file once (synthetic, Kaggle cardinalities), then times the preparation (parse + hex decode + log
transform + shard writes) three times into fresh directories and prints rows/s per run and the median. Also times
the same input gzip-compressed once.
"""

from __future__ import annotations

import argparse
import gzip
import platform
import shutil
import statistics
import time
from pathlib import Path

from dqrm_lightning.data.prepare import PrepareOptions, explicit_jobs, prepare
from dqrm_lightning.data.synthetic import synthesize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--work", default="/tmp/dqrm_bench_prepare")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    raw_dir = work / "raw"
    if not (raw_dir / "truth.json").exists():
        synthesize("kaggle", args.rows, 0, raw_dir, split_fractions=(1.0, 0.0, 0.0))
    raw = raw_dir / "train.tsv"
    (raw_dir / "train.tsv.truth.npy").unlink(missing_ok=True)  # real Criteo files carry no true probabilities
    size = raw.stat().st_size
    rates = []
    for i in range(args.repeats):
        out = work / f"prepared-{i}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        meta = prepare(explicit_jobs({"train": [str(raw)]}), out, PrepareOptions())
        seconds = time.perf_counter() - start
        rates.append(meta["rows"] / seconds)
        print(
            f"run {i}: {meta['rows']:,} rows in {seconds:.2f} s = {rates[-1]:,.0f} rows/s "
            f"({size / seconds / 1e6:.0f} MB/s)"
        )
        shutil.rmtree(out, ignore_errors=True)
    gz = work / "train.tsv.gz"
    if not gz.exists():
        with open(raw, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 64 << 20)
    out = work / "prepared-gz"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    meta = prepare(explicit_jobs({"train": [str(gz)]}), out, PrepareOptions())
    gz_rate = meta["rows"] / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}")
    print(
        f"plain TSV: median {statistics.median(rates):,.0f} rows/s over {args.repeats} runs "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}); gzip TSV: {gz_rate:,.0f} rows/s"
    )


if __name__ == "__main__":
    main()
