"""Rows of a table sharded over the ranks, fetched by id: what multi-hot QAT needs under model parallelism.

Multi-hot QAT quantizes each looked-up row before pooling (:mod:`dqrm_lightning.quant.embedding`): it needs the FP32
rows behind every bag of this rank's batch. Under TorchRec's model-parallel sharding those rows live on other ranks
(table-wise: one rank holds the table; row-wise: each holds a range of rows; column-wise: each holds a range of
columns). :func:`fetch_rows` is one collective that brings them over:

1. every rank's distinct requested ids are all-gathered (their counts first, then the ids padded to the longest);
2. each rank writes the part of every requested row that its own shards hold (its rows' column range) into a
   ``(all requests, D)`` buffer of zeros;
3. the buffer is all-reduced (sum): every element is held by exactly one shard, so the sum is that element, exactly;
4. each rank takes its own requests' rows back and expands them to its ids.

Traffic per call: ``world * max distinct ids`` ids and ``(sum of distinct ids) * D`` floats all-reduced, a few
hundred KB per step at the sizes multi-hot features have on CPU; an all-to-all of rows to their requesters only would
move less on many ranks. Every rank must call it for the same tables in the same order (it is a collective), with its
own (possibly empty) ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["fetch_rows"]

Shard = tuple[torch.Tensor, tuple[int, ...]]  # a local shard and its (row, column) offsets in the full table


@torch.no_grad()
def fetch_rows(shards: Sequence[Shard], ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``ids`` (N,) of a table whose shards are spread over the ranks, as (N, ``dim``) float32; ``shards`` are
    this rank's (possibly none). A collective over the default process group.

    Raises:
        IndexError: an id outside the table (no shard of any rank holds it).
    """
    unique, inverse = torch.unique(ids.long(), return_inverse=True)
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = _all_gather_counts(len(unique), world)
    wanted = _all_gather_ids(unique, counts)
    rows = torch.zeros(len(wanted), dim)
    held = torch.zeros(len(wanted), dtype=torch.int32)  # columns of each request held here (checks the cover)
    for tensor, offsets in shards:
        first_row, first_col = int(offsets[0]), int(offsets[1]) if len(offsets) > 1 else 0
        count, cols = tensor.shape
        mask = (wanted >= first_row) & (wanted < first_row + count)
        if bool(mask.any()):
            rows[mask, first_col : first_col + cols] = tensor.detach()[wanted[mask] - first_row].float()
            held[mask] += cols
    dist.all_reduce(rows)
    dist.all_reduce(held)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    if bool((held[mine] != dim).any()):
        missing = unique[held[mine] != dim][:5].tolist()
        raise IndexError(f"ids {missing} are not rows of the table (no shard holds all their {dim} columns)")
    return rows[mine][inverse]


def _all_gather_counts(count: int, world: int) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64))
    return [int(c) for c in counts]


def _all_gather_ids(unique: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's requested ids, rank after rank (padding dropped)."""
    longest = max(counts)
    padded = torch.full((longest,), -1, dtype=torch.int64)
    padded[: len(unique)] = unique
    gathered = [torch.empty(longest, dtype=torch.int64) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])
