"""fetch_rows: rows of a table sharded row-wise, column-wise or table-wise over 2 gloo ranks, fetched exactly."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.quant.row_fetch import fetch_rows

WORLD = 2
ROWS, DIM = 50, 6


def _table() -> torch.Tensor:
    return torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM) / 7 - 20


def _shards(layout: str, rank: int) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    table = _table()
    if layout == "row_wise":  # rows [0, 30) on rank 0, [30, 50) on rank 1
        return [(table[:30], (0, 0))] if rank == 0 else [(table[30:], (30, 0))]
    if layout == "column_wise":  # columns [0, 4) on rank 0, [4, 6) on rank 1
        return [(table[:, :4].clone(), (0, 0))] if rank == 0 else [(table[:, 4:].clone(), (0, 4))]
    return [(table, (0, 0))] if rank == 1 else []  # table-wise: rank 1 holds it all


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    results = {}
    for layout in ("row_wise", "column_wise", "table_wise"):
        ids = torch.tensor([3, 49, 3, 31, 0] if rank == 0 else [29, 30, 30])  # repeats, both sides of the cut
        results[layout] = fetch_rows(_shards(layout, rank), ids, DIM)
        results[f"{layout}_empty"] = fetch_rows(_shards(layout, rank), torch.zeros(0, dtype=torch.int64), DIM)
    try:
        fetch_rows(_shards("row_wise", rank), torch.tensor([ROWS + 1] if rank == 0 else [1]), DIM)
        results["error"] = ""
    except IndexError as err:
        results["error"] = str(err)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.multiprocess
def test_rows_fetched_exactly_for_every_layout(tmp_path: Path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    table = _table()
    for rank, ids in ((0, [3, 49, 3, 31, 0]), (1, [29, 30, 30])):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for layout in ("row_wise", "column_wise", "table_wise"):
            torch.testing.assert_close(results[layout], table[ids], rtol=0, atol=0)
            assert results[f"{layout}_empty"].shape == (0, DIM)
        assert ("51" in results["error"]) == (rank == 0)  # only the rank that asked for row 51 is told
