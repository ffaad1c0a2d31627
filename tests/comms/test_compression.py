"""INT8 gradient compression across 2 gloo processes against a brute-force computation of the same math."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqrm_lightning.comms.compression import GradientCompressionConfig, compress_dense, compress_sparse_rows

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
    torch.save(
        {"sparse": avg_sparse.to_dense(), "dense": avg_dense, "error": new_error},
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


def test_single_process_is_plain_quantization():
    config = GradientCompressionConfig()
    grad = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
    average, error = compress_dense(grad, torch.zeros_like(grad), config)
    scale = torch.tensor([[1.0], [0.25]]) / 127
    torch.testing.assert_close(average, torch.round(grad / scale) * scale)
    torch.testing.assert_close(error, grad - average)
    with pytest.raises(ValueError, match="scale_agreement"):
        GradientCompressionConfig(scale_agreement="median")
