"""Map raw 32-bit categorical values to embedding-table ids.

Two encodings, both from DLRM's Criteo preprocessing:

* ``hash``: ``id = (value % max_ind_range) % num_embeddings[f]`` — no pass over the data, table sizes are chosen.
* ``vocab``: one pass over every split of the prepared data assigns each distinct value (after ``% max_ind_range``)
  of a feature a dense id in first-seen order (train, then val, then test shards). With ``min_frequency > 1`` values
  seen fewer times share id 0 and frequent ones get ids from 1. Table sizes come from the data (on the real Kaggle
  ``train.txt`` they are DLRM's cardinalities, 33,762,577 rows in all). A value never seen (new data at predict
  time) maps to id 0.

The vocabulary is computed once per prepared directory and stored beside it as memory-mappable ``.npy`` files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES
from dqrm_lightning.data.prepare import SPLITS, load_meta, shard_file, shard_paths

EncodingMode = Literal["hash", "vocab"]


@dataclass
class CategoricalEncoder:
    """Encodes ``(N, 26)`` uint32 raw values into ``(N, 26)`` int64 ids, one table per feature.

    Args:
        mode: ``"hash"`` or ``"vocab"``.
        num_embeddings: table size per feature (26 entries).
        max_ind_range: modulus applied to raw values first (DLRM's ``--max-ind-range``), or ``None``.
        vocab_dir: directory of the vocabulary (``vocab`` mode).
    """

    mode: EncodingMode
    num_embeddings: list[int]
    max_ind_range: int | None = None
    vocab_dir: str | None = None

    def __post_init__(self) -> None:
        if len(self.num_embeddings) != CAT_FEATURE_COUNT:
            raise ValueError(
                f"`num_embeddings_per_feature` needs {CAT_FEATURE_COUNT} sizes, got {len(self.num_embeddings)}"
            )
        if any(n <= 0 for n in self.num_embeddings):
            raise ValueError(f"`num_embeddings_per_feature` must be positive, got {self.num_embeddings}")
        self._vocab: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _load_vocab(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._vocab is None:
            assert self.vocab_dir is not None
            root = Path(self.vocab_dir)
            self._vocab = [
                (np.load(root / f"{name}.values.npy", mmap_mode="r"), np.load(root / f"{name}.ids.npy", mmap_mode="r"))
                for name in DEFAULT_CAT_NAMES
            ]
        return self._vocab

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_vocab"] = None  # memory maps are reopened in each worker process
        return state

    def encode(self, cat: np.ndarray) -> np.ndarray:
        """``(N, 26)`` uint32 raw values -> ``(N, 26)`` int64 ids."""
        values = cat.astype(np.int64)
        if self.max_ind_range:
            values %= self.max_ind_range
        if self.mode == "hash":
            return values % np.asarray(self.num_embeddings, dtype=np.int64)
        ids = np.empty_like(values)
        for f, (known, known_ids) in enumerate(self._load_vocab()):
            column = values[:, f]
            pos = np.searchsorted(known, column)
            pos = np.minimum(pos, len(known) - 1)
            found = known[pos] == column
            ids[:, f] = np.where(found, known_ids[pos], 0)
        return ids


def vocab_dir_for(prepared_dir: str | Path, max_ind_range: int | None, min_frequency: int) -> Path:
    return Path(prepared_dir) / f"vocab-r{max_ind_range or 0}-f{min_frequency}"


def build_vocab(prepared_dir: str | Path, max_ind_range: int | None = None, min_frequency: int = 1) -> list[int]:
    """Compute (or read back) the vocabulary of a prepared directory; returns the table size per feature."""
    if min_frequency < 1:
        raise ValueError(f"`min_frequency` must be >= 1, got {min_frequency}")
    out = vocab_dir_for(prepared_dir, max_ind_range, min_frequency)
    sizes_file = out / "sizes.json"
    if sizes_file.exists():
        return json.loads(sizes_file.read_text())
    meta = load_meta(prepared_dir)
    shards = [prefix for split in SPLITS for prefix, _ in shard_paths(prepared_dir, split, meta)]
    if not shards:
        raise ValueError(f"{prepared_dir} holds no rows to build a vocabulary from")
    out.mkdir(parents=True, exist_ok=True)
    sizes = []
    for f, name in enumerate(DEFAULT_CAT_NAMES):
        column = np.concatenate([np.load(shard_file(p, "cat"), mmap_mode="r")[:, f] for p in shards]).astype(np.int64)
        if max_ind_range:
            column %= max_ind_range
        values, first, counts = np.unique(column, return_index=True, return_counts=True)
        ids = np.empty(len(values), dtype=np.int64)
        order = np.argsort(first, kind="stable")  # first-seen order
        if min_frequency == 1:
            ids[order] = np.arange(len(values))
            size = len(values)
        else:
            frequent = counts[order] >= min_frequency
            ids[order] = np.where(frequent, np.cumsum(frequent), 0)
            size = int(frequent.sum()) + 1
        for suffix, array in (("values", values), ("ids", ids)):
            tmp = out / f".{name}.{suffix}.tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, out / f"{name}.{suffix}.npy")
        sizes.append(int(size))
    sizes_file.write_text(json.dumps(sizes))
    return sizes
