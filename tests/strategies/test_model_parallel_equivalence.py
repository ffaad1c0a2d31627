"""Training on 2 processes equals 1-process training on the same global batches, for every table layout: TorchRec's
sharding types (through our fixed plan or TorchRec's planner, row-wise ones on the CPU included) and the replicated
tables of the paper's data-parallel mode (sparse gradients averaged by DDP). TorchRec's sharded embedding backward and
DDP both average over ranks, so N processes with batch B train like one with batch N x B."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.comms.ddp_hook import CompressionState, compression_hook
from dqrm_lightning.data.dataset import make_batch
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.strategies.sharding import EmbeddingLayout, EmbeddingPlacement, _shard_index, gather_full
from tests.helpers.model import random_batch

ROWS, GLOBAL_BATCH, STEPS = 50, 64, 6
LAYOUTS = {
    "table_wise": EmbeddingLayout(),
    "row_wise": EmbeddingLayout(sharding="row_wise"),
    "column_wise": EmbeddingLayout(sharding="column_wise"),
    "table_row_wise": EmbeddingLayout(sharding="table_row_wise"),
    "mixed": EmbeddingLayout(
        sharding={"C1": "row_wise", "C2": "column_wise", "C3": "data_parallel", "default": "table_wise"}
    ),
    "auto": EmbeddingLayout(sharding="auto"),
    "replicated": EmbeddingLayout(embeddings="replicated"),
    "replicated_dense": EmbeddingLayout(embeddings="replicated", dense_embedding_gradients=True),
    "replicated_batched_hook": EmbeddingLayout(embeddings="replicated"),  # our FP32 hook instead of DDP's buckets
}


def _module() -> DLRMModule:
    return DLRMModule([ROWS] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def _train(module: DLRMModule, rank: int, world: int, hook: bool = False) -> list[float]:
    optimizer = module.configure_optimizers()
    forward = module
    if module.placement.layout.embeddings == "replicated" and world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(module)  # sparse table gradients, averaged by DDP
        if hook:
            forward.register_comm_hook(CompressionState(None, list(module.named_parameters())), compression_hook)
    losses = []
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = random_batch(batch_size=GLOBAL_BATCH, rows=ROWS, seed=100 + step)  # the same global batch everywhere
        rows = slice(rank * local, (rank + 1) * local)  # this rank's slice, as CriteoIterableDataset hands it out
        ids = torch.stack([batch.sparse_features[f"C{i + 1}"].values()[rows] for i in range(26)], dim=1)
        part = make_batch(batch.dense_features[rows].numpy(), ids.numpy(), batch.labels[rows].numpy())
        optimizer.zero_grad()
        loss = module._loss(forward(part), part)
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses


def _state(module: DLRMModule) -> dict[str, torch.Tensor]:
    return {
        k: (gather_full(v) if hasattr(v, "local_shards") else v).detach().clone()
        for k, v in module.state_dict().items()
    }


def _rank(rank: int, store: str, out: str, init: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # one host (the planner's table-row-wise groups)
    results = {}
    for name, layout in LAYOUTS.items():
        module = _module()
        module.place_embeddings(EmbeddingPlacement(layout))
        module.load_state_dict(torch.load(init, weights_only=True))  # the same initial weights as the 1-process run
        losses = _train(module, rank, 2, hook=name.endswith("_hook"))
        pieces = []  # (key, index into the full table, local values)
        for key, value in module.state_dict().items():
            if not key.startswith("model.sparse_arch."):
                continue
            if hasattr(value, "local_shards"):
                pieces += [(key, _shard_index(s), s.tensor.detach().clone()) for s in value.local_shards()]
            else:
                pieces.append((key, (slice(None),), value.detach().clone()))
        results[name] = {"losses": losses, "pieces": pieces}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.multiprocess
def test_two_process_training_equals_one_process_for_every_table_layout(tmp_path: Path):
    torch.manual_seed(0)
    single = _module()
    single.configure_model()
    torch.save(_state(single), tmp_path / "init.pt")
    expected = _train(single, 0, 1)
    final = _state(single)
    dist.destroy_process_group()
    for attempt in range(2):
        # A rank of this test was seen to die of native heap corruption in a backward pass ("malloc(): unaligned
        # tcache chunk detected", then SIGABRT/SIGSEGV) in about one run in ten with torch 2.13 / fbgemm-gpu-cpu
        # 1.8.0; the cause is not found yet. One crash reruns the processes; a second crash, or any Python error,
        # fails the test.
        store = tmp_path / f"store{attempt}"
        try:
            mp.start_processes(
                _rank, args=(str(store), str(tmp_path), str(tmp_path / "init.pt")), nprocs=2, start_method="spawn"
            )
            break
        except mp.ProcessExitedException as crash:
            if attempt == 1 or crash.signal_name not in ("SIGSEGV", "SIGABRT"):
                raise
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in LAYOUTS:
        losses = torch.tensor(results[0][name]["losses"])
        torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-5, atol=1e-6, msg=name)
        covered = {}
        for key, index, value in results[0][name]["pieces"] + results[1][name]["pieces"]:
            torch.testing.assert_close(value, final[key][index], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
            covered[key] = covered.get(key, 0) + value.numel()
        assert len(covered) == 26, name
        assert all(n >= final[k].numel() for k, n in covered.items()), name  # every row of every table checked
