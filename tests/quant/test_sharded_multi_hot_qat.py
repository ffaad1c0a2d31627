"""Multi-hot QAT under a 2-process gloo TorchRec-sharded model: each bag's rows, held by either rank, are quantized
before pooling exactly as one process holding the whole tables would."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import fake_quantize
from tests.test_model_schema import SCHEMA, SIZES, schema_batch

WORLD = 2


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    module = DLRMModule(schema=SCHEMA.to_dict(), **SIZES)
    module.prepare_qat(QATConfig(embedding_bits=4, scale_period=2))
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    losses = []
    for step in range(4):
        quantizer.maybe_refresh(step)
        batch = schema_batch(batch_size=16, seed=10 * step + rank)  # each rank its own samples
        optimizer.zero_grad()
        loss = module._loss(module(batch), batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    probe = schema_batch(batch_size=16, seed=100 + rank)
    pooled = torch.zeros(16, len(quantizer.feature_names), SIZES["embedding_dim"])
    multi = torch.tensor([f in quantizer.multi_hot_features for f in quantizer.feature_names])
    correction = quantizer._multi_hot_correction(pooled, probe.sparse_features, multi)
    shards = {t: [(s.clone(), o) for s, o in quantizer.tables.local[t]] for t in quantizer.table_names}
    torch.save(
        {
            "losses": losses,
            "correction": correction,
            "values": probe.sparse_features.values(),
            "lengths": probe.sparse_features.lengths(),
            "scale": quantizer.scale.clone(),
            "spread": sorted(quantizer.tables.spread),
            "shards": shards,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # FBGEMM/gloo threads racing C++ static destructors at exit were seen to abort a worker now and then


def _full_tables(results: list[dict]) -> dict[str, torch.Tensor]:
    tables = {}
    for table in SCHEMA.table_names:
        full = torch.full((SCHEMA.table(table).rows, SIZES["embedding_dim"]), float("nan"))
        for result in results:
            for shard, (row, col) in result["shards"][table]:
                full[row : row + shard.shape[0], col : col + shard.shape[1]] = shard
        assert not full.isnan().any()
        tables[table] = full
    return tables


@pytest.mark.multiprocess
def test_sharded_multi_hot_bags_are_quantized_row_by_row(tmp_path: Path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    tables = _full_tables(results)
    assert results[0]["spread"] == results[1]["spread"]
    assert "movies" in results[0]["spread"]
    torch.testing.assert_close(results[0]["scale"], results[1]["scale"], rtol=0, atol=0)
    pooled_order = SCHEMA.pooled_feature_names
    for result in results:
        assert all(torch.isfinite(torch.tensor(result["losses"])))
        values = result["values"].split(result["lengths"].view(len(SCHEMA.sparse), -1).sum(dim=1).tolist())
        lengths = result["lengths"].view(len(SCHEMA.sparse), -1)
        for i, feature in enumerate(SCHEMA.sparse):
            f = pooled_order.index(feature.name)
            if not feature.multi_hot:
                assert not result["correction"][:, f].any()
                continue
            table = SCHEMA.table_of(feature.name)
            scale = result["scale"][SCHEMA.table_names.index(table.name)]
            rows = tables[table.name][values[i]]
            delta = fake_quantize(rows, scale, torch.tensor(-8.0), torch.tensor(7.0)) - rows
            bags = torch.repeat_interleave(torch.arange(16), lengths[i])
            expected = torch.zeros(16, SIZES["embedding_dim"]).index_add_(0, bags, delta)
            if table.pooling == "mean":
                expected /= lengths[i].clamp_min(1).unsqueeze(1)
            torch.testing.assert_close(result["correction"][:, f], expected, rtol=0, atol=1e-6)
