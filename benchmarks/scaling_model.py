"""Analytic scaling model of communication: bytes per iteration and rank of each mode at world size W = 2 .. 256.

    python benchmarks/scaling_model.py > benchmarks/results/scaling_model.txt

No training and no timing: every number comes from :func:`dqrm_lightning.comms.accounting.bytes_at_scale` on the
model shapes of configs/kaggle.yaml and configs/terabyte.yaml (``model_shape``, the same code that logs
``comm/*_bytes`` in every run), under weak scaling (fixed local batch, global batch W x local batch, as DLRM runs).
Touched rows per rank and table: the paper's upper bound ``min(rows_t, local batch)``, and the expected distinct ids
of the synthetic presets' Zipf law (exponent 1.1). Crossovers are found by checking every integer W from 2 to 256.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from dqrm_lightning.comms.accounting import (
    ModelShape,
    busiest_rank_tables,
    bytes_at_scale,
    expected_unique_ids,
    touched_rows_upper_bound,
)
from dqrm_lightning.data.synthetic.presets import PRESETS
from dqrm_lightning.model import model_shape

CONFIGS = {"kaggle": "configs/kaggle.yaml", "terabyte": "configs/terabyte.yaml"}
WORLDS = [2**k for k in range(1, 9)]  # 2 .. 256
MODES = ("dense", "sparse_fp32", "sparse_int8", "model_parallel")
Cost = Callable[[int], float]


def config_shape(name: str) -> tuple[ModelShape, int]:
    """The model shape and local batch of ``configs/<name>.yaml`` (tables from the synthetic preset of that name)."""
    config = yaml.safe_load(Path(CONFIGS[name]).read_text())
    hparams = dict(config["model"], num_embeddings_per_feature=list(PRESETS[name].cardinalities))
    return model_shape(hparams), int(config["data"]["batch_size"])


def costs(shape: ModelShape, local_batch: int, rows: Sequence[float]) -> dict[str, Cost]:
    """Bytes per iteration and rank of each mode as a function of W (model parallel: mean and busiest rank)."""

    def cost(mode: str, busiest: bool = False) -> Cost:
        def bytes_at(w: int) -> float:
            tables = busiest_rank_tables(shape, w) if busiest else None
            return bytes_at_scale(shape, mode, w, local_batch, rows, tables_on_rank=tables)

        return bytes_at

    out = {mode: cost(mode) for mode in MODES}
    out["model_parallel_busiest"] = cost("model_parallel", busiest=True)
    return out


def cheapest_ranges(cost: dict[str, Cost], worlds: range) -> list[tuple[str, int, int]]:
    """``(mode, first W, last W)`` runs of the cheapest of :data:`MODES` (mean rank for model parallelism)."""
    runs: list[tuple[str, int, int]] = []
    for w in worlds:
        best = min(MODES, key=lambda mode: cost[mode](w))
        if runs and runs[-1][0] == best:
            runs[-1] = (best, runs[-1][1], w)
        else:
            runs.append((best, w, w))
    return runs


def first_cheaper(cost: dict[str, Cost], mode: str, than: str, worlds: range) -> int | None:
    """The first W from which ``mode`` stays cheaper than ``than`` (None: never within ``worlds``)."""
    cheaper = [cost[mode](w) < cost[than](w) for w in worlds]
    if not cheaper[-1]:
        return None
    last_not = max((i for i, c in enumerate(cheaper) if not c), default=-1)
    return worlds[last_not + 1]


def report(title: str, shape: ModelShape, local_batch: int, rows: dict[str, Sequence[float]]) -> None:
    mlp = shape.mlp_weights + shape.mlp_biases + shape.cross_parameters
    touched = ", ".join(f"{k} {sum(v):,.0f}" for k, v in rows.items())
    print(f"### {title}: local batch {local_batch}, D = {shape.embedding_dim}, {len(shape.table_rows)} tables")
    print(f"{mlp:,} dense parameters; touched rows per rank (all tables): {touched}")
    print()
    per_rows = {key: costs(shape, local_batch, value) for key, value in rows.items()}
    first = per_rows[next(iter(rows))]
    head = ["W", "global batch", "dense"] + [f"sparse {b} ({k})" for k in rows for b in ("FP32", "INT8")]
    print("| " + " | ".join([*head, "model parallel (mean rank)", "model parallel (busiest rank)"]) + " |")
    print("| --- " + "| ---: " * (len(head) + 1) + "|")
    for w in WORLDS:
        sparse = [c[m](w) for c in per_rows.values() for m in ("sparse_fp32", "sparse_int8")]
        cells = [first["dense"](w), *sparse, first["model_parallel"](w), first["model_parallel_busiest"](w)]
        print(f"| {w} | {w * local_batch:,} | " + " | ".join(f"{c / 1e6:,.3f}" for c in cells) + " |")
    print()
    worlds = range(2, max(WORLDS) + 1)
    for key, cost in per_rows.items():
        runs = ", ".join(f"{mode} for W = {lo}..{hi}" for mode, lo, hi in cheapest_ranges(cost, worlds))
        print(f"cheapest ({key} rows): {runs}")
        for mode, than in (
            ("model_parallel", "sparse_int8"),
            ("model_parallel", "sparse_fp32"),
            ("model_parallel_busiest", "sparse_int8"),
        ):
            w = first_cheaper(cost, mode, than, worlds)
            print(f"  {mode} < {than} from W = {w if w is not None else 'never (<= 256)'}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 2048], help="local batches per rank")
    args = parser.parse_args()
    print("# python benchmarks/scaling_model.py (analytic: comms.accounting.bytes_at_scale; no machine timing)")
    print("# MB = 10^6 bytes one rank sends per iteration (ring all-reduce 2(W-1)/W of the buffer, sparse rows")
    print("# all-gathered: (W-1) x own rows, pooled all-to-all (W-1)/W); row indices, latency, overlap not counted.")
    print()
    for name in CONFIGS:
        shape, own = config_shape(name)
        exponent = PRESETS[name].zipf_exponent
        for batch in sorted({own, *args.batches}):
            rows: dict[str, Sequence[float]] = {
                "bound": touched_rows_upper_bound(shape, batch),
                f"Zipf {exponent}": [expected_unique_ids(n, batch, exponent) for n in shape.table_rows],
            }
            tag = " (the config's own)" if batch == own else ""
            report(f"{name}{tag}", shape, batch, rows)


if __name__ == "__main__":
    main()
