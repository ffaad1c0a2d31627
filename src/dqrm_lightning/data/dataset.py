"""Stream batches of prepared Criteo shards to every rank and dataloader worker.

Epoch order. Shards are visited in an order drawn from ``(seed, epoch)`` and the rows of each shard in an order drawn
from ``(seed, epoch, shard)`` (a block shuffle: no epoch-sized permutation is ever held in memory). With
``shuffle=False`` rows come in file order.

Partition. The epoch's row sequence is cut into rounds of ``world_size * batch_size`` rows; in each round rank ``r``
takes the ``r``-th slice of ``batch_size`` rows. The last, partial round is shared out as evenly as possible, so every
rank gets the same number of batches (DDP needs that) and every row is seen exactly once per epoch over all ranks.
Within a rank,
batch ``j`` goes to dataloader worker ``(j - start) % num_workers``, which is the order a ``DataLoader`` reads its
workers in, so the stream a rank sees does not depend on the number of workers.

Resume. ``set_position(epoch, start)`` makes the next iteration skip the first ``start`` batches of the epoch; the
data module stores that position in the checkpoint, so a resumed run sees exactly the remaining rows.

Shards of raw Criteo files (``cat``, a :class:`CategoricalEncoder`) give :func:`make_batch`'s one-hot batches; shards
of a schema's files (:mod:`dqrm_lightning.data.tabular`, a :class:`SchemaEncoder`) give :func:`make_schema_batch`'s,
multi-hot features with one length per sample. The order, partition and resume above are the same for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.data.encoding import CategoricalEncoder, SchemaEncoder
from dqrm_lightning.data.prepare import Ragged, shard_file
from dqrm_lightning.data.tabular import sparse_array


def make_batch(dense: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> Batch:
    """Build a torchrec :class:`Batch` from one-hot rows. B: batch size, F: 26 sparse features.

    Args:
        dense: ``(B, 13)`` float32 dense features.
        ids: ``(B, F)`` int64 embedding ids, one per feature.
        labels: ``(B,)`` labels.

    Returns:
        A ``Batch`` whose ``sparse_features`` is a KeyedJaggedTensor with one id per (feature, sample).
    """
    batch_size, features = ids.shape
    values = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1))  # (F * B,) feature-major
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(DEFAULT_CAT_NAMES[:features]),
        values=values,
        lengths=torch.ones(features * batch_size, dtype=torch.int32),
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=sparse,
        labels=torch.from_numpy(labels.astype(np.float32)),
    )


def make_schema_batch(
    encoder: SchemaEncoder, dense: np.ndarray, sparse: list[np.ndarray | Ragged], labels: np.ndarray
) -> Batch:
    """Build a torchrec :class:`Batch` from rows of a schema. B: batch size, F: sparse features, D: dense columns.

    Args:
        encoder: the schema and the keys -> ids map of its tables.
        dense: ``(B, D)`` float32 dense features.
        sparse: per sparse feature (schema order) its keys: ``(B,)`` int64 (one-hot) or a :class:`Ragged` of B rows
            (multi-hot).
        labels: ``(B,)`` labels.

    Returns:
        A ``Batch`` whose ``sparse_features`` is a KeyedJaggedTensor keyed by ``schema.feature_names``: values int64
        ids, lengths int32 ``(F * B,)`` feature-major (a multi-hot sample may have length 0).
    """
    batch_size = len(labels)
    values, lengths = [], []
    for feature, keys in zip(encoder.schema.feature_names, sparse, strict=True):
        if isinstance(keys, Ragged):
            values.append(encoder.encode(feature, keys.values))
            lengths.append(keys.lengths)
        else:
            values.append(encoder.encode(feature, keys))
            lengths.append(np.ones(batch_size, dtype=np.int32))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=encoder.schema.feature_names,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),  # (sum of lengths,)
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),  # (F * B,)
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),  # (B, D)
        sparse_features=kjt,
        labels=torch.from_numpy(labels.astype(np.float32)),
    )


def _open(prefix: Path, array: str, ragged: bool) -> Any:
    """A shard array, memory-mapped: an array, or ``(values, offsets)`` of a ragged one."""
    if ragged:
        return np.load(shard_file(prefix, f"{array}.values"), mmap_mode="r"), np.load(
            shard_file(prefix, f"{array}.offsets"), mmap_mode="r"
        )
    return np.load(shard_file(prefix, array), mmap_mode="r")


def _take(array: Any, index: np.ndarray | slice) -> np.ndarray | Ragged:
    """Rows ``index`` (sorted positions, or a slice) of an array opened by :func:`_open`."""
    if not isinstance(array, tuple):
        return np.asarray(array[index])
    values, offsets = array
    if isinstance(index, slice):
        bounds = np.asarray(offsets[index.start : index.stop + 1])
        return Ragged(np.asarray(values[bounds[0] : bounds[-1]]), np.diff(bounds))
    starts = np.asarray(offsets[index])
    lengths = np.asarray(offsets[index + 1]) - starts
    ends = np.cumsum(lengths)
    positions = np.repeat(starts - ends + lengths, lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
    return Ragged(np.asarray(values[positions]), lengths)


def rank_slices(total: int, batch_size: int, world_size: int, rank: int) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in the epoch sequence of each batch of ``rank``; equal batch count on all ranks.

    Rounds of ``world_size * batch_size`` rows give each rank ``batch_size`` rows. Leftover rows form one more round
    when there are at least ``world_size`` of them, else they join the last round; a short or long round is shared
    out as evenly as possible (batch sizes differ by at most one across ranks).
    """
    round_rows = batch_size * world_size
    full_rounds, tail = divmod(total, round_rows)
    rounds = [(k * round_rows, round_rows) for k in range(full_rounds)]
    if tail >= world_size or (tail and not rounds):
        rounds.append((full_rounds * round_rows, tail))
    elif tail:
        rounds[-1] = (rounds[-1][0], round_rows + tail)
    slices = []
    for offset, size in rounds:
        base, extra = divmod(size, world_size)
        start = offset + rank * base + min(rank, extra)
        slices.append((start, start + base + (1 if rank < extra else 0)))
    return slices


class CriteoIterableDataset(IterableDataset):
    """Batches of a prepared split for one rank.

    Args:
        shards: ``(path prefix, rows)`` per shard, in file order.
        encoder: maps raw categorical values to embedding ids (a :class:`SchemaEncoder`: shards of a schema).
        batch_size: rows per batch (per rank).
        shuffle: block-shuffle rows every epoch.
        seed: base seed of the shuffle.
        rank: this process's rank.
        world_size: number of ranks.
        labeled: whether the rows have labels (unlabeled rows, from 39-field files, carry label 0).
    """

    def __init__(
        self,
        shards: list[tuple[Path, int]],
        encoder: CategoricalEncoder | SchemaEncoder,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        labeled: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        self.shards = shards
        self.encoder = encoder
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.labeled = labeled
        self.epoch = 0
        self.start = 0
        self.total_rows = sum(rows for _, rows in shards)
        if 0 < self.total_rows < world_size:
            raise ValueError(f"{self.total_rows} rows cannot be shared by {world_size} ranks")

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` next, skipping its first ``start`` batches."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return len(rank_slices(self.total_rows, self.batch_size, self.world_size, self.rank))

    def batch_positions(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each batch of this rank in the epoch's row sequence; without ``shuffle`` these are
        the rows' 0-based positions in the split (its files in order, each file's rows in line order)."""
        return rank_slices(self.total_rows, self.batch_size, self.world_size, self.rank)

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _row_order(self, shard: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, self.epoch, shard]).permutation(self.shards[shard][1])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slices = rank_slices(self.total_rows, self.batch_size, self.world_size, self.rank)
        order = self._shard_order()
        sizes = np.array([self.shards[s][1] for s in order], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        cache: dict[int, tuple[np.ndarray | None, dict[str, Any]]] = {}
        for j in range(self.start, len(slices)):
            if (j - self.start) % workers != worker:
                continue
            start, stop = slices[j]
            yield self._gather(start, stop, order, bounds, cache)

    def _gather(
        self,
        start: int,
        stop: int,
        order: np.ndarray,
        bounds: np.ndarray,
        cache: dict[int, tuple[np.ndarray | None, dict[str, Any]]],
    ) -> Batch:
        columns = self._columns()
        parts: dict[str, list[Any]] = {key: [] for key in columns}
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        position = first
        while start < stop:
            shard = int(order[position])
            if shard not in cache:
                cache.clear()  # keep one shard's arrays open at a time
                prefix = self.shards[shard][0]
                arrays = {k: _open(prefix, k, ragged) for k, ragged in columns.items()}
                cache[shard] = (self._row_order(shard), arrays)
            rows, arrays = cache[shard]
            lo = start - int(bounds[position])
            hi = min(stop, int(bounds[position + 1])) - int(bounds[position])
            # sorted: sequential reads; the batch's row order does not matter
            index: np.ndarray | slice = np.sort(rows[lo:hi]) if rows is not None else slice(lo, hi)
            for key in parts:
                parts[key].append(_take(arrays[key], index))
            start += hi - lo
            position += 1
        if isinstance(self.encoder, CategoricalEncoder):
            labels, dense, cat = (np.concatenate(parts[k]) for k in ("labels", "dense", "cat"))
            return make_batch(dense, self.encoder.encode(cat), labels)
        sparse = [
            Ragged.concat(parts[key]) if columns[key] else np.concatenate(parts[key])
            for key in list(columns)[2:]  # after labels and dense
        ]
        return make_schema_batch(self.encoder, np.concatenate(parts["dense"]), sparse, np.concatenate(parts["labels"]))

    def _columns(self) -> dict[str, bool]:
        """The shard arrays a batch reads, and whether each is ragged (multi-hot)."""
        if isinstance(self.encoder, CategoricalEncoder):
            return {"labels": False, "dense": False, "cat": False}
        sparse = {sparse_array(i): s.multi_hot for i, s in enumerate(self.encoder.schema.sparse)}
        return {"labels": False, "dense": False} | sparse
