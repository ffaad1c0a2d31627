"""QAT under a 2-process gloo TorchRec-sharded model: all ranks hold identical scales."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant import table_extrema
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import symmetric_scale
from tests.helpers.model import random_batch

ROWS = 64
WORLD = 2


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    table_extrema._SMALL_SHARD_BLOCKS = 0  # incremental refreshes keep per-block extrema of these small tables too
    torch.manual_seed(0)
    module = DLRMModule([ROWS] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    module.prepare_qat(QATConfig(embedding_bits=4, scale_period=2, scale_refresh="incremental"))
    quantizer = module.embedding_quantizer
    local_tables = sum(1 for f in quantizer.feature_names if quantizer.tables.local.get(f))
    optimizer = module.configure_optimizers()
    for step in range(5):
        quantizer.maybe_refresh(step)
        batch = random_batch(batch_size=16, rows=ROWS, seed=10 * step + rank)  # each rank its own samples
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()
    quantizer.refresh()
    local_absmax = []
    for feature in quantizer.feature_names:
        low, high = quantizer.tables.extrema(feature)
        local_absmax.append(float(torch.maximum(low.abs(), high.abs())) if torch.isfinite(high) else float("-inf"))
    torch.save(
        {
            "scale": quantizer.scale.clone(),
            "refreshes": int(quantizer.refreshes),
            "local_tables": local_tables,
            "local_absmax": torch.tensor(local_absmax),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()  # both ranks are done with every collective before the group goes away
    dist.destroy_process_group()
    # Leave without running C++ static destructors: FBGEMM/gloo threads racing them at interpreter exit were seen to
    # abort a worker now and then after its results were written.
    os._exit(0)


@pytest.mark.multiprocess
def test_two_ranks_hold_identical_scales_from_all_shards(tmp_path: Path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(r["local_tables"] == 13 for r in results)  # table-wise: the 26 tables are split over the 2 ranks
    torch.testing.assert_close(results[0]["scale"], results[1]["scale"], rtol=0, atol=0)
    assert results[0]["refreshes"] == results[1]["refreshes"] == 4  # steps 0, 2, 4 and the explicit one
    global_absmax = torch.maximum(results[0]["local_absmax"], results[1]["local_absmax"])
    torch.testing.assert_close(results[0]["scale"], symmetric_scale(global_absmax, 4), rtol=0, atol=0)


def _lsq_rank(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    module = DLRMModule([ROWS] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    module.prepare_qat(QATConfig(embedding_bits=4, embedding_mode="asymmetric", scale_learning="lsq"))
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    grads = []
    for step in range(3):
        quantizer.maybe_refresh(step)
        if step == 0:
            initial = quantizer.scale.detach().clone()
        batch = random_batch(batch_size=16, rows=ROWS, seed=10 * step + rank)  # each rank its own samples
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        local = quantizer.scale.grad.clone()
        module.on_after_backward()  # as the Trainer calls it: averages the learned scales' gradients
        grads.append((local, quantizer.scale.grad.clone()))
        optimizer.step()
    result = {
        "initial": initial,
        "scale": quantizer.scale.detach().clone(),
        "offset": quantizer.offset.detach().clone(),
    }
    result |= {"local_grad": grads[0][0], "averaged_grad": grads[0][1]}
    torch.save(result, os.path.join(out_dir, f"lsq{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as _rank


@pytest.mark.multiprocess
def test_two_ranks_learn_identical_scales_from_averaged_gradients(tmp_path: Path):
    mp.start_processes(_lsq_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"lsq{r}.pt", weights_only=True) for r in range(WORLD)]
    assert not torch.equal(results[0]["local_grad"], results[1]["local_grad"])  # each rank's own batch
    mean = (results[0]["local_grad"] + results[1]["local_grad"]) / 2
    for r in results:
        torch.testing.assert_close(r["averaged_grad"], mean, rtol=1e-6, atol=0)
    for key in ("scale", "offset"):
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=0)
    assert not torch.equal(results[0]["scale"], results[0]["initial"])  # learned
