"""INT8 gradient compression across 2 gloo processes against a brute-force computation of the same math."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.comms.compression import (
    GradientCompressionConfig,
    compress_dense,
    compress_gradients,
    compress_sparse_rows,
)

WORLD = 2


def _inputs(rank: int):
    g = torch.Generator().manual_seed(rank)
    sparse = torch.sparse_coo_tensor(torch.tensor([[rank, 5, 5]]), torch.randn(3, 4, generator=g) * (rank + 1), (10, 4))
    dense = torch.randn(3, 6, generator=g) * (1 + rank)
    error = torch.randn(3, 6, generator=g) * 0.01
    return sparse, dense, error


def _rank(rank: int, store_path: str, out_dir: str, agreement: str, compensation: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    config = GradientCompressionConfig(scale_agreement=agreement, error_compensation=compensation)
    sparse, dense, error = _inputs(rank)
    avg_sparse = compress_sparse_rows(sparse, config)
    avg_dense, new_error = compress_dense(dense, error, config)
    # the batched form (what the DDP hook uses): two tables stacked in one sparse all-reduce, two dense tensors
    other = torch.sparse_coo_tensor(torch.tensor([[3 - rank, 1]]), torch.full((2, 4), 0.3 * (rank + 1)), (7, 4))
    bias = torch.linspace(-1.0, 1.0, 5) * (rank + 1)
    batched = compress_gradients([sparse, other], [dense, bias], [error, None], config)
    alone = [compress_sparse_rows(other, config).to_dense(), *compress_dense(bias, None, config)]
    fp32 = compress_gradients([sparse], [dense], [None], None)  # no compression: plain float32 averages
    torch.save(
        {
            "sparse": avg_sparse.to_dense(),
            "dense": avg_dense,
            "error": new_error,
            "batched": [t.to_dense() for t in batched[0]] + batched[1] + batched[2],
            "alone": [avg_sparse.to_dense(), alone[0], avg_dense, alone[1], new_error, alone[2]],
            "fp32": [fp32[0][0].to_dense(), fp32[1][0]],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _brute_force(agreement: str, compensation: str):
    inputs = [_inputs(r) for r in range(WORLD)]
    reduce = (lambda xs: torch.stack(xs).amax(0)) if agreement == "max" else (lambda xs: torch.stack(xs).mean(0))
    values = [s.coalesce().to_dense() for s, _, _ in inputs]
    scale = reduce([v.abs().max() / 127 for v in values])
    sparse = sum(torch.clamp(torch.round(v / scale), -128, 127) for v in values) * scale / WORLD
    z = [d + e for _, d, e in inputs]
    row_scale = reduce([x.abs().amax(1, keepdim=True) / 127 for x in z])
    codes = [torch.clamp(torch.round(x / row_scale), -128, 127) for x in z]
    dense = sum(codes) / WORLD * row_scale
    errors = [x - c * row_scale if compensation == "local" else x - dense for x, c in zip(z, codes, strict=True)]
    return sparse, dense, errors


@pytest.mark.parametrize(("agreement", "compensation"), [("max", "local"), ("mean", "reference")])
@pytest.mark.multiprocess
def test_two_ranks_match_brute_force(tmp_path: Path, agreement, compensation):
    mp.start_processes(
        _rank,
        args=(str(tmp_path / "store"), str(tmp_path), agreement, compensation),
        nprocs=WORLD,
        start_method="spawn",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    sparse, dense, errors = _brute_force(agreement, compensation)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["sparse"], sparse, rtol=0, atol=1e-6)
        torch.testing.assert_close(result["dense"], dense, rtol=0, atol=1e-6)
        torch.testing.assert_close(result["error"], errors[rank], rtol=0, atol=1e-6)
    assert int((results[0]["sparse"].abs().sum(1) > 0).sum()) == 3  # only rows 0, 1 and 5 were touched
    for result in results:  # batching changes the number of collectives, not the values
        for batched, alone in zip(result["batched"], result["alone"], strict=True):
            torch.testing.assert_close(batched, alone, rtol=0, atol=0)
    fp32_sparse = sum(_inputs(r)[0].to_dense() for r in range(WORLD)) / WORLD
    fp32_dense = sum(_inputs(r)[1] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(results[0]["fp32"][0], fp32_sparse)
    torch.testing.assert_close(results[0]["fp32"][1], fp32_dense)


def test_single_process_is_plain_quantization():
    config = GradientCompressionConfig()
    grad = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
    average, error = compress_dense(grad, torch.zeros_like(grad), config)
    scale = torch.tensor([[1.0], [0.25]]) / 127
    torch.testing.assert_close(average, torch.round(grad / scale) * scale)
    torch.testing.assert_close(error, grad - average)
    with pytest.raises(ValueError, match="scale_agreement"):
        GradientCompressionConfig(scale_agreement="median")
