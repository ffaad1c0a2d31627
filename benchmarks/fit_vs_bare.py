"""Training throughput of `dqrm fit` (Lightning) vs a bare TorchRec loop on the same model and data.

    python benchmarks/fit_vs_bare.py --data /tmp/dqrm_bench_kaggle --steps 600 --repeats 3

Both sides train the Kaggle-config DLRM (26 tables, 33,762,577 rows x 16, FP32; SGD lr 0.1, fused sparse updates)
on the same prepared synthetic data with the same loader, batch 128. Each side runs in its own process, alternating
A B A B ...; throughput = samples / seconds between the end of step `warmup` and the end of the last step (data loading
included). Prints each pair and the median ratio fit / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

KAGGLE_CONFIGS = ["-c", "configs/kaggle.yaml", "-c", "configs/data/synthetic_kaggle.yaml"]


def ensure_data(directory: Path, rows: int) -> None:
    if not (directory / "truth.json").exists():
        from dqrm_lightning.data.synthetic import synthesize

        synthesize("kaggle", rows, 0, directory, split_fractions=(0.98, 0.01, 0.01))


def run_fit(data: Path, steps: int, warmup: int, root: Path) -> float:
    cmd = [sys.executable, "-m", "dqrm_lightning.cli", "fit", *KAGGLE_CONFIGS,
           "--data.train_files", f"{data}/train*", "--data.val_files", f"{data}/val*",
           "--data.test_files", f"{data}/test*", "--trainer.max_steps", str(steps),
           "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root), "--wandb", "disabled",
           "--step_timer.warmup_steps", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    summary = json.loads(Path(out.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    return float(summary["speed"]["loop_samples_per_s"])


def bare(data: Path, steps: int, warmup: int) -> float:
    """A plain TorchRec training loop: DLRM + fused sparse SGD under DistributedModelParallel, dense SGD."""
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.models.dlrm import DLRM
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from dqrm_lightning.data.datamodule import CriteoDataModule

    torch.manual_seed(0)
    import yaml

    config = yaml.safe_load(Path("configs/kaggle.yaml").read_text())
    sizes = config["data"]["num_embeddings_per_feature"]
    datamodule = CriteoDataModule(train_files=f"{data}/train*", val_files=f"{data}/val*", test_files=f"{data}/test*",
                                  categorical_encoding="hash", num_embeddings_per_feature=sizes, batch_size=128)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    tables = [EmbeddingBagConfig(name=f"t_C{i + 1}", embedding_dim=16, num_embeddings=n, feature_names=[f"C{i + 1}"])
              for i, n in enumerate(sizes)]
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                 dense_in_features=13, dense_arch_layer_sizes=[512, 256, 64, 16], over_arch_layer_sizes=[512, 256, 1],
                 dense_device=torch.device("cpu"))
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": 0.1})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ebc = model.sparse_arch.embedding_bag_collection
    plan = ShardingPlan({"sparse_arch.embedding_bag_collection": construct_module_sharding_plan(
        ebc, {t.name: table_wise(rank=0, compute_kernel="fused") for t in tables}, world_size=1, device_type="cpu")})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                   sharders=[EmbeddingBagCollectionSharder()])
    dense = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=0.1)
    start = None
    samples = 0
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        dense.zero_grad()
        logits = dmp(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        dense.step()
        if step + 1 == warmup:
            start = time.perf_counter()
        elif step + 1 > warmup:
            samples += batch.labels.numel()
    assert start is not None
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/tmp/dqrm_bench_kaggle")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = Path(args.data)
    if args.bare_only:
        print(bare(data, args.steps, args.warmup))
        return
    ensure_data(data, args.rows)
    ratios = []
    for i in range(args.repeats):
        fit = run_fit(data, args.steps, args.warmup, data / "runs")
        out = subprocess.run([sys.executable, __file__, "--data", str(data), "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--bare-only"], capture_output=True, text=True, check=True).stdout
        bare_rate = float(out.strip().splitlines()[-1])
        ratios.append(fit / bare_rate)
        print(f"pair {i}: dqrm fit {fit:,.0f} samples/s, bare TorchRec loop {bare_rate:,.0f} samples/s, "
              f"ratio {ratios[-1]:.3f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; steps {args.steps} (warm-up {args.warmup}), batch 128")
    print(f"median ratio dqrm fit / bare loop: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
