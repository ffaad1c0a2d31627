"""Training throughput of Lightning `fit` (as `dqrm fit` runs it) vs a bare TorchRec loop, same model and data.

    python benchmarks/fit_vs_bare.py --data /tmp/dqrm_bench_kaggle --steps 800 --repeats 5

One process builds the Kaggle-config DLRM once (26 tables, 33,762,577 rows x 16, FP32; fused sparse SGD and dense SGD,
lr 0.1) and the data module once (synthetic Kaggle-format data, batch 128). It then alternates segments of `--steps`
training steps: A = `Trainer.fit` with the callbacks `dqrm fit` adds (step timer, run summary, CSV logger), B = a plain
loop (forward, BCE loss, backward, dense optimizer step) over the same DataLoader. Both train the very same model
object, so memory placement of the 2 GB of tables is identical for A and B (separate processes differed by up to 25 %
on this machine). Throughput = samples / seconds from the end of step `--warmup` to the end of the last step, data
loading included. Prints each pair and the median ratio A / B.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _kaggle import arguments, ensure_data, kaggle_config, model_kwargs, segment_trainer
from _kaggle import datamodule as kaggle_datamodule
from lightning.pytorch.loggers import CSVLogger

from dqrm_lightning.callbacks import RunSummary, StepTimer
from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.model import DLRMModule


def lightning_segment(module: DLRMModule, datamodule: CriteoDataModule, steps: int, warmup: int, root: str) -> float:
    timer = StepTimer(warmup_steps=warmup)
    trainer = segment_trainer(steps, [timer, RunSummary()], CSVLogger(root), log_every_n_steps=1024)
    trainer.fit(module, datamodule=datamodule)
    return float(timer.summary()["loop_samples_per_s"])


def bare_segment(module: DLRMModule, datamodule: CriteoDataModule, steps: int, warmup: int) -> float:
    model = module.model
    optimizer = module.configure_optimizers()
    model.train()
    start, samples = None, 0
    for step, batch in enumerate(datamodule.train_dataloader()):
        if step >= steps:
            break
        optimizer.zero_grad()
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        optimizer.step()
        if step + 1 == warmup:
            start = time.perf_counter()
        elif step + 1 > warmup:
            samples += batch.labels.numel()
    assert start is not None
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = arguments(steps=800, warmup=100, repeats=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = Path(args.data)
    ensure_data(data, args.rows)
    config = kaggle_config()
    datamodule = kaggle_datamodule(data, 128)
    datamodule.setup("fit")
    torch.manual_seed(0)
    module = DLRMModule(config["sizes"], **model_kwargs(config))
    module.configure_model()
    ratios = []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            a = lightning_segment(module, datamodule, args.steps, args.warmup, root)
            b = bare_segment(module, datamodule, args.steps, args.warmup)
            ratios.append(a / b)
            print(
                f"pair {i}: Lightning fit {a:,.0f} samples/s, bare TorchRec loop {b:,.0f} samples/s, "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} steps per segment "
        f"(warm-up {args.warmup}), batch 128, Kaggle-config DLRM FP32"
    )
    print(
        f"median ratio fit / bare loop: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
