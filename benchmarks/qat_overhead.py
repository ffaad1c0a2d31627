"""Cost of DQRM QAT at Kaggle scale: step time and memory of INT4 QAT vs FP32, and INT4 vs FP32 inference.

    python benchmarks/qat_overhead.py --data /tmp/dqrm_bench_kaggle

Training (one process, one model, so the 2 GB of tables sit in the same memory for every variant): the Kaggle-config
DLRM (33,762,577 rows x 16) prepared for whole-model INT4 QAT (INT4 tables, INT4 per-row MLP weights) trains segments
of `--warmup` + `--steps` steps (the latter timed) through Lightning, alternating FP32 (quantization switched off), INT4 with the scale refreshed
every 200 steps (DQRM), INT4 refreshed every step (the paper's naive baseline), and INT4 with exact scale
tracking. Step time = loop time per step, data loading and scale refreshes included. Ratios are taken pair by pair;
medians are printed.

Memory: peak RSS of `dqrm fit` FP32 vs `dqrm fit -c configs/qat/int4.yaml`, separate processes, 300 steps.

`--variants` picks the training variants (first = the baseline of every ratio; ``p<P>``: refreshed every P steps,
incremental refresh; ``full<P>``: each refresh a full pass; ``exact``), `--batch-sizes` the batch sizes and `--parts`
what runs (``training``, ``refresh``: one scale refresh timed alone, full pass vs incremental, ``inference``, ``rss``);
the defaults are the full run but ``refresh``.

Inference (batch 2048): the trained model is exported twice, INT4 (QAT) and FP32, and both artifacts run on
TorchRec's quantized EmbeddingBagCollection (FBGEMM kernels), alternating; plain-torch INT4 is shown for reference.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _kaggle import arguments, ensure_data, fit_command, kaggle_config, model_kwargs, segment_trainer
from _kaggle import datamodule as kaggle_datamodule

from dqrm_lightning import threads
from dqrm_lightning.callbacks import QuantizationAwareTraining, StepTimer
from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import load_inference_model
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant import QATConfig, disable_fake_quant


class _FP32(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        disable_fake_quant(pl_module)


class _StepIntervals(pl.Callback):
    """Wall time from one training step's end to the next's, per step (data, hooks, refresh, forward, backward and
    optimizer step: everything the loop time holds)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.intervals: dict[int, float] = {}  # step -> seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.intervals[trainer.global_step - 1] = now - self.last
        self.last = now

    def robust_ms(self, warmup: int, period: int | None) -> float:
        """Milliseconds per step, robust to the machine's slow bursts: the median step, plus the median extra time of
        the refresh steps (steps P, 2P, ...) spread over P steps."""
        timed = {step: t for step, t in self.intervals.items() if step >= warmup}
        refresh = {step for step in timed if period and step % period == 0}
        median = statistics.median(t for step, t in timed.items() if step not in refresh)
        extra = statistics.median(timed[step] - median for step in refresh) / period if refresh and period else 0.0
        return 1000.0 * (median + extra)


def segment(
    module: DLRMModule, datamodule: CriteoDataModule, variant: str, steps: int, warmup: int
) -> tuple[float, float]:
    """Milliseconds per step of one training segment: ``warmup`` steps, then ``steps`` timed ones; the loop time, and
    the burst-robust estimate of :meth:`_StepIntervals.robust_ms`. The scale refreshes fall on steps 0, P, 2P, ... of
    each segment, so a timed window of a multiple of P steps holds exactly ``steps / P`` of them (a P=200 refresh is
    charged at its true rate)."""
    timer = StepTimer(warmup_steps=warmup)
    intervals = _StepIntervals()
    callbacks: list[pl.Callback] = [timer, intervals]
    period = None
    if variant == "fp32":
        callbacks.append(_FP32())
    elif variant == "exact":
        callbacks.append(QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4, scale_tracking="exact")))
    else:  # p<P>: refreshed every P steps (incremental); full<P>: each refresh a full pass over the tables
        refresh = "full" if variant.startswith("full") else "incremental"
        period = int(variant.removeprefix("full").removeprefix("p"))
        config = QATConfig(embedding_bits=4, mlp_bits=4, scale_period=period, scale_refresh=refresh)
        callbacks.append(QuantizationAwareTraining(config))
    trainer = segment_trainer(warmup + steps, callbacks, False)
    trainer.fit(module, datamodule=datamodule)
    loop = 1000.0 * datamodule.hparams.batch_size / float(timer.summary()["loop_samples_per_s"])
    return loop, intervals.robust_ms(warmup, period)


def peak_rss_gb(data: Path, extra: list[str], steps: int) -> float:
    cmd = ["/usr/bin/time", "-f", "%M", *fit_command(data, steps, *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stderr.strip().splitlines()[-1]) / 1e6


def inference(module: DLRMModule, datamodule: CriteoDataModule, work: Path, repeats: int) -> None:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, work / "qat.ckpt")
    del checkpoint["qat_config"]
    torch.save(checkpoint, work / "fp32.ckpt")
    int4 = export_checkpoint(work / "qat.ckpt", work / "int4")
    export_checkpoint(work / "fp32.ckpt", work / "fp32", embedding_bits=32)
    print(
        f"artifact: INT4 {int4['bytes']['payload']:,} bytes = {int4['bytes']['ratio']:.4f} x FP32 model "
        f"({int4['bytes']['fp32_model']:,} bytes)"
    )
    engines = {
        "fp32": load_inference_model(work / "fp32"),
        "int4": load_inference_model(work / "int4"),
        "int4-plain": load_inference_model(work / "int4", "plain"),
    }
    batches = []
    for batch in datamodule.test_dataloader():
        batches.append(batch)
        if len(batches) == 4:
            break
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, model in engines.items():
            model(batches[0].dense_features, batches[0].sparse_features)  # warm-up
            start = time.perf_counter()
            rows = 0
            for _ in range(5):
                for batch in batches:
                    model(batch.dense_features, batch.sparse_features)
                    rows += batch.labels.numel()
            rates[name].append(rows / (time.perf_counter() - start))
    ratios = [a / b for a, b in zip(rates["int4"], rates["fp32"], strict=True)]
    for name, values in rates.items():
        print(f"inference {name:10s}: median {statistics.median(values):,.0f} samples/s (batch 2048)")
    print(
        f"inference INT4 / FP32 throughput (TorchRec/FBGEMM), median of {repeats}: {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def refresh_cost(module: DLRMModule, datamodule: CriteoDataModule, period: int, repeats: int) -> None:
    """Milliseconds of one scale refresh of every table: a full pass (``scale_refresh: full``) vs an incremental one
    (``scale_refresh: incremental``) after ``period`` training batches' lookups (the same batches each time), and
    both spread over the ``period`` steps they serve; medians of ``repeats``, alternating."""
    quantizer = module.embedding_quantizer
    assert quantizer is not None
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), period))
    blocks = quantizer.block_extrema
    blocks.refresh()  # the first refresh scans every block
    full: list[float] = []
    incremental: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for table in quantizer.table_names:
            quantizer.tables.extrema(table)
        full.append(1000.0 * (time.perf_counter() - start))
        start = time.perf_counter()
        for batch in batches:
            blocks.record(batch.sparse_features)
        blocks.refresh()
        incremental.append(1000.0 * (time.perf_counter() - start))
    f, i = statistics.median(full), statistics.median(incremental)
    print(
        f"scale refresh of all tables, batch {datamodule.hparams['batch_size']}, P = {period}, median of {repeats}: "
        f"full pass {f:.1f} ms ({f / period:.3f} ms/step), incremental {i:.1f} ms incl. recording the lookups "
        f"({i / period:.3f} ms/step); incremental / full {i / f:.3f}"
    )


def main() -> None:
    parser = arguments(steps=600, warmup=50, repeats=3)
    parser.add_argument("--rss-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the thread policy)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "p200", "p1", "exact"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 2048])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("training", "refresh", "inference", "rss"),
        default=["training", "inference", "rss"],
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    settings = threads.resolve(args.threads)  # as `dqrm fit` sizes its pools
    threads.apply(settings)
    data = Path(args.data)
    ensure_data(data, args.rows)
    config = kaggle_config()
    sizes = config["sizes"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {settings.intra_op} intra-op threads "
        f"({settings.intra_op_from}); Kaggle-config DLRM, tables 33,762,577 x 16"
    )
    torch.manual_seed(0)
    module = DLRMModule(sizes, **model_kwargs(config))
    module.prepare_qat(QATConfig(embedding_bits=4, mlp_bits=4))  # FP32 segments switch quantization off
    for batch_size in args.batch_sizes if "training" in args.parts else []:
        datamodule = kaggle_datamodule(data, batch_size)
        steps = args.steps if batch_size == 128 else max(args.steps // 3, 200)  # at least one P=200 period
        warmup = args.warmup if batch_size == 128 else args.warmup // 5
        times: dict[str, list[float]] = {variant: [] for variant in args.variants}
        robust: dict[str, list[float]] = {variant: [] for variant in args.variants}
        for i in range(args.repeats):
            for variant in times:
                loop, steady = segment(module, datamodule, variant, steps, warmup)
                times[variant].append(loop)
                robust[variant].append(steady)
            print(
                f"batch {batch_size} pair {i}: "
                + ", ".join(f"{v} {t[-1]:.2f} ms/step (robust {robust[v][-1]:.2f})" for v, t in times.items()),
                flush=True,
            )
        base = args.variants[0]
        for variant in args.variants[1:]:
            for label, values in (("step time", times), ("robust step time", robust)):
                ratios = [a / b for a, b in zip(values[variant], values[base], strict=True)]
                print(
                    f"batch {batch_size}: {variant} / {base} {label}: median {statistics.median(ratios):.3f} "
                    f"(min {min(ratios):.3f}, max {max(ratios):.3f})",
                    flush=True,
                )
    if "refresh" in args.parts:
        refresh_cost(module, kaggle_datamodule(data, 128), 200, args.repeats)
    if "inference" in args.parts:
        datamodule = kaggle_datamodule(data, 2048)
        with tempfile.TemporaryDirectory() as work:
            inference(module, datamodule, Path(work), args.repeats)
    del module
    if "rss" not in args.parts:
        return
    fp32_rss = peak_rss_gb(data, [], args.rss_steps)
    qat_rss = peak_rss_gb(data, ["-c", "configs/qat/int4.yaml"], args.rss_steps)
    print(
        f"peak RSS (dqrm fit, batch 128, {args.rss_steps} steps): FP32 {fp32_rss:.2f} GB, INT4 QAT {qat_rss:.2f} GB, "
        f"ratio {qat_rss / fp32_rss:.3f}"
    )


if __name__ == "__main__":
    main()
