"""Inference throughput of the exported INT4 artifact against the FP32 one, Kaggle config, batch 2048, on CPU.

    python benchmarks/inference_speed.py --data /tmp/dqrm_bench_kaggle [--auc_checkpoint runs/demo/int4/.../best.ckpt]

The Kaggle-config DLRM (33,762,577 rows x 16, MLPs [512,256,64,16] / [512,256,1]) is built with random tables,
prepared for whole-model INT4 QAT (INT4 tables and INT4 per-row MLP weights) and exported twice: INT4 (its QAT
grids) and FP32 (tables and MLPs in FP32); speed does not depend on training. Both artifacts run on TorchRec's
quantized EmbeddingBagCollection (FBGEMM kernels), on batches of the synthetic Kaggle-format test split, with the
thread count of the thread policy (``dqrm_lightning.threads``; ``--threads`` overrides). The variants take turns
batch by batch (rotating order) so that the load of a shared machine falls on all alike; ratios are taken within a
repeat and their medians printed:

* ``fp32``: the FP32 artifact, float32 MLPs (the baseline);
* ``int4``: the INT4 artifact, float32 MLPs (default: predictions equal the QAT model's);
* ``int4-bf16`` / ``fp32-bf16``: MLP products in bfloat16 (``mlp_precision="bf16"``).

One batch's forward is also split into its parts (dense MLP, table lookups, interaction, over MLP; medians).
``--auc_checkpoint`` (a trained QAT checkpoint) and ``--auc_args`` (the ``dqrm test`` options of its data and
model) add the test AUC of that model's artifact with each MLP precision.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _kaggle import arguments, ensure_data, kaggle_config, model_kwargs, run_summary
from _kaggle import datamodule as kaggle_datamodule

from dqrm_lightning import threads
from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import ArtifactDLRM, dot_interaction, load_inference_model
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant import QATConfig

VARIANTS = {  # name: (artifact, MLP precision)
    "fp32": ("fp32", "fp32"),
    "int4": ("int4", "fp32"),
    "int4-bf16": ("int4", "bf16"),
    "fp32-bf16": ("fp32", "bf16"),
}


def build_artifacts(work: Path) -> None:
    """Export the random Kaggle-config model as ``work/int4`` and ``work/fp32`` (once; about 4 GB of checkpoints on
    the way, removed after)."""
    if (work / "int4" / "manifest.json").exists() and (work / "fp32" / "manifest.json").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    config = kaggle_config()
    torch.manual_seed(0)
    module = DLRMModule(config["sizes"], **model_kwargs(config))
    module.prepare_qat(QATConfig(embedding_bits=4, mlp_bits=4))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    del module
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        torch.save(checkpoint, Path(tmp) / "qat.ckpt")
        del checkpoint["qat_config"]
        torch.save(checkpoint, Path(tmp) / "fp32.ckpt")
        del checkpoint
        export_checkpoint(Path(tmp) / "qat.ckpt", work / "int4", force=True)
        export_checkpoint(Path(tmp) / "fp32.ckpt", work / "fp32", embedding_bits=32, force=True)


def test_batches(datamodule: CriteoDataModule, count: int) -> list[Any]:
    """The first ``count`` batches of the test split."""
    datamodule.setup("test")
    batches = []
    for batch in datamodule.test_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def interleaved_rates(models: dict[str, ArtifactDLRM], batches: list[Any], passes: int) -> dict[str, float]:
    """Samples/s of each model over ``passes`` passes of ``batches``, the models taking turns batch by batch (in a
    rotating order), so that a change of the machine's load falls on all of them alike."""
    seconds = dict.fromkeys(models, 0.0)
    names = list(models)
    for step, batch in enumerate(batch for _ in range(passes) for batch in batches):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            start = time.perf_counter()
            models[name](batch.dense_features, batch.sparse_features)
            seconds[name] += time.perf_counter() - start
    samples = passes * sum(b.labels.numel() for b in batches)
    return {name: samples / s for name, s in seconds.items()}


def parts_ms(model: ArtifactDLRM, batch: Any) -> dict[str, float]:
    """Milliseconds of each part of one forward (each part timed alone, on the input the forward gives it)."""
    dense = model.dense_arch(batch.dense_features)  # (B, D)
    sparse = model.embed(batch.sparse_features)  # (B, F, D)
    interaction = dot_interaction(dense, sparse)
    parts: dict[str, Callable[[], object]] = {
        "dense MLP": lambda: model.dense_arch(batch.dense_features),
        "tables": lambda: model.embed(batch.sparse_features),
        "interaction": lambda: dot_interaction(dense, sparse),
        "over MLP": lambda: model.over_arch(interaction),
        "forward": lambda: model(batch.dense_features, batch.sparse_features),
    }
    out = {}
    for name, part in parts.items():
        part()
        start = time.perf_counter()
        for _ in range(5):
            part()
        out[name] = 1000 * (time.perf_counter() - start) / 5
    return out


def speed(work: Path, batches: list[Any], repeats: int, passes: int) -> None:
    models = {name: load_inference_model(work / art, mlp_precision=p) for name, (art, p) in VARIANTS.items()}
    rates: dict[str, list[float]] = {name: [] for name in models}
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(batches[0].dense_features, batches[0].sparse_features)
        for i in range(repeats):
            for name, rate in interleaved_rates(models, batches, passes).items():
                rates[name].append(rate)
            for name, model in models.items():
                for part, ms in parts_ms(model, batches[i % len(batches)]).items():
                    parts[name].setdefault(part, []).append(ms)
            print(f"repeat {i}: " + ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items()) + " samples/s", flush=True)
    for name, values in rates.items():
        split = ", ".join(f"{part} {statistics.median(ms):.2f}" for part, ms in parts[name].items())
        print(f"{name:10s}: median {statistics.median(values):,.0f} samples/s; one batch, ms: {split}")
    for name in ("int4", "int4-bf16", "fp32-bf16"):
        ratios = [a / b for a, b in zip(rates[name], rates["fp32"], strict=True)]
        print(
            f"throughput {name} / fp32 (batch {batches[0].labels.numel()}), median of {repeats}: "
            f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


def auc_change(checkpoint: Path, cli_args: list[str]) -> None:
    """Test AUC of a trained QAT checkpoint's artifact with float32 and with bfloat16 MLP products (`dqrm test`)."""
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "art"
        export_checkpoint(checkpoint, artifact)
        auc = {}
        for precision in ("fp32", "bf16"):
            command = [sys.executable, "-m", "dqrm_lightning.cli", "test", *cli_args, "--artifact", str(artifact)]
            command += ["--mlp_precision", precision, "--wandb", "disabled", "--trainer.default_root_dir", tmp]
            auc[precision] = run_summary(command)["test"]["test/auc"]
    print(
        f"test AUC of {checkpoint} ({' '.join(cli_args)}): fp32 MLP {auc['fp32']:.6f}, bf16 MLP {auc['bf16']:.6f}, "
        f"change {auc['bf16'] - auc['fp32']:+.6f}"
    )


def main() -> None:
    parser = arguments(steps=0, warmup=0, repeats=7)
    parser.add_argument("--work", default="/tmp/dqrm_inference_speed", help="where the two artifacts are kept")
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--passes", type=int, default=3, help="passes over the batches per timing")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the thread policy)")
    parser.add_argument("--auc_checkpoint", default=None, help="a trained QAT checkpoint for the AUC change")
    parser.add_argument(
        "--auc_args",
        default="-c configs/demo.yaml",
        help="`dqrm test` options giving the data and model of --auc_checkpoint",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    settings = threads.resolve(args.threads)
    threads.apply(settings)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {settings.intra_op} intra-op threads "
        f"({settings.intra_op_from}); CPU capability {torch.backends.cpu.get_cpu_capability()}; Kaggle-config DLRM"
    )
    if args.auc_checkpoint:
        auc_change(Path(args.auc_checkpoint), shlex.split(args.auc_args))
    data = Path(args.data)
    ensure_data(data, args.rows)
    build_artifacts(Path(args.work))
    batches = test_batches(kaggle_datamodule(data, args.batch_size, args.batch_size), args.batches)
    speed(Path(args.work), batches, args.repeats, args.passes)


if __name__ == "__main__":
    main()
