"""Map raw 32-bit categorical values to embedding-table ids.

Two encodings, both from DLRM's Criteo preprocessing:

* ``hash``: ``id = (value % max_ind_range) % num_embeddings[f]`` — no pass over the data, table sizes are chosen.
* ``vocab``: one pass over every split of the prepared data assigns each distinct value (after ``% max_ind_range``)
  of a feature a dense id in first-seen order (train, then val, then test shards). With ``min_frequency > 1`` values
  seen fewer times share id 0 and frequent ones get ids from 1. Table sizes come from the data (on the real Kaggle
  ``train.txt`` they are DLRM's cardinalities, 33,762,577 rows in all). A value never seen (new data at predict
  time) maps to id 0.

The vocabulary is computed once per prepared directory and stored beside it as memory-mappable ``.npy`` files.

Data of a :class:`~dqrm_lightning.schema.FeatureSchema` (:mod:`dqrm_lightning.data.tabular`) is encoded per table by
:class:`SchemaEncoder`, with the same two encodings: ``hash`` is ``key % rows``; ``vocab`` gives first-seen ids over
the keys of every feature sharing the table (train, then val, then test shards; within a shard the features in schema
order), with ``min_frequency`` as above and unseen keys -> 0 (:func:`build_schema_vocab`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES
from dqrm_lightning.data.prepare import SPLITS, load_meta, shard_file, shard_paths
from dqrm_lightning.schema import FeatureSchema

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
            ids[:, f] = _lookup(values[:, f], known, known_ids)
        return ids


def _lookup(keys: np.ndarray, known: np.ndarray, known_ids: np.ndarray) -> np.ndarray:
    """The ids of ``keys`` in a vocabulary (``known`` sorted, ``known_ids`` theirs); an unknown key gets id 0."""
    pos = np.searchsorted(known, keys)
    pos = np.minimum(pos, len(known) - 1)
    found = known[pos] == keys
    return np.where(found, known_ids[pos], 0)


def _first_seen_ids(column: np.ndarray, min_frequency: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A vocabulary of ``column``: ``(sorted distinct values, their ids, table size)``; ids in first-seen order, and
    with ``min_frequency > 1`` values seen fewer times share id 0 (the others count from 1)."""
    values, first, counts = np.unique(column, return_index=True, return_counts=True)
    ids = np.empty(len(values), dtype=np.int64)
    order = np.argsort(first, kind="stable")  # first-seen order
    if min_frequency == 1:
        ids[order] = np.arange(len(values))
        return values, ids, len(values)
    frequent = counts[order] >= min_frequency
    ids[order] = np.where(frequent, np.cumsum(frequent), 0)
    return values, ids, int(frequent.sum()) + 1


def _save_vocab(out: Path, name: str, values: np.ndarray, ids: np.ndarray) -> None:
    for suffix, array in (("values", values), ("ids", ids)):
        tmp = out / f".{name}.{suffix}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, out / f"{name}.{suffix}.npy")


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
        values, ids, size = _first_seen_ids(column, min_frequency)
        _save_vocab(out, name, values, ids)
        sizes.append(int(size))
    sizes_file.write_text(json.dumps(sizes))
    return sizes


def schema_vocab_dir(prepared_dir: str | Path, schema: FeatureSchema) -> Path:
    """Where the vocabulary of a schema's ``vocab`` tables lives: named by what shapes it (each vocab table's
    features and ``min_frequency``), so schemas differing only in rows, dims or hash tables share it."""
    spec = [(t.name, schema.features_of(t.name), t.min_frequency) for t in schema.tables if t.encoding == "vocab"]
    digest = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]
    return Path(prepared_dir) / f"vocab-schema-{digest}"


def _table_file(schema: FeatureSchema, table: str) -> str:
    return f"table-{schema.table_names.index(table)}"


def build_schema_vocab(prepared_dir: str | Path, schema: FeatureSchema) -> dict[str, int]:
    """Compute (or read back) the vocabulary of every ``vocab`` table of a schema over a prepared directory's keys.

    Returns:
        Rows of each ``vocab`` table (its vocabulary's size), by table name.
    """
    from dqrm_lightning.data.tabular import sparse_array

    out = schema_vocab_dir(prepared_dir, schema)
    sizes_file = out / "sizes.json"
    if sizes_file.exists():
        return dict(json.loads(sizes_file.read_text()))
    meta = load_meta(prepared_dir)
    shards = [prefix for split in SPLITS for prefix, _ in shard_paths(prepared_dir, split, meta)]
    index = {s.name: i for i, s in enumerate(schema.sparse)}
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for table in schema.tables:
        if table.encoding != "vocab":
            continue
        keys = [
            np.load(path, mmap_mode="r")
            for prefix in shards
            for feature in schema.features_of(table.name)
            for path in _key_files(prefix, sparse_array(index[feature]))
        ]
        column = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        if not len(column):
            raise ValueError(f"{prepared_dir} holds no values of table {table.name!r} to build a vocabulary from")
        values, ids, size = _first_seen_ids(column, table.min_frequency)
        _save_vocab(out, _table_file(schema, table.name), values, ids)
        sizes[table.name] = size
    sizes_file.write_text(json.dumps(sizes))
    return sizes


def _key_files(prefix: Path, array: str) -> list[Path]:
    """The file of a sparse feature's keys in a shard: one-hot ``<array>.npy``, multi-hot ``<array>.values.npy``."""
    one_hot = shard_file(prefix, array)
    return [one_hot if one_hot.exists() else shard_file(prefix, f"{array}.values")]


@dataclass
class SchemaEncoder:
    """Encodes the 64-bit keys of a schema's sparse features into ids of their tables.

    Args:
        schema: the schema, every table sized (:meth:`CriteoDataModule.resolved_schema`).
        vocab_dir: the vocabulary (:func:`schema_vocab_dir`) when a table uses ``vocab`` encoding.
    """

    schema: FeatureSchema
    vocab_dir: str | None = None

    def __post_init__(self) -> None:
        self._rows = dict(zip(self.schema.table_names, self.schema.table_rows(), strict=True))
        self._vocab: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_vocab"] = {}  # memory maps are reopened in each worker process
        return state

    def encode(self, feature: str, keys: np.ndarray) -> np.ndarray:
        """int64 keys of ``feature`` -> int64 ids in ``[0, rows of its table)``."""
        table = self.schema.table_of(feature)
        if table.encoding == "hash":
            return np.mod(keys, self._rows[table.name])
        if table.name not in self._vocab:
            assert self.vocab_dir is not None, "vocab encoding needs the vocabulary"
            name = _table_file(self.schema, table.name)
            root = Path(self.vocab_dir)
            self._vocab[table.name] = (
                np.load(root / f"{name}.values.npy", mmap_mode="r"),
                np.load(root / f"{name}.ids.npy", mmap_mode="r"),
            )
        return _lookup(keys, *self._vocab[table.name])
