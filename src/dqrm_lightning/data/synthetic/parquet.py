"""Synthetic data of any feature schema as Parquet files with their true click probabilities:
:func:`synthesize_schema` (``dqrm data synth --schema S``).

Each split goes to ``<split>.parquet`` (or ``<split>-00000.parquet``, ... with ``rows_per_file``), one row group per
generated block piece, with these columns (named by each feature's ``column``, else its ``name``):

* the label (``schema.label``): uint8, 0 or 1;
* each dense feature: float32, never null;
* each one-hot sparse feature: int64, an id in ``[0, rows of its table)``;
* each multi-hot sparse feature: ``list<int64>`` of ids in ``[0, rows)``, or, when the feature has a ``delimiter``,
  a string of the ids in decimal joined by it (``""`` for an empty bag).

Beside each data file, ``<file>.truth.npy`` (float32) holds the true click probability of each row, in order;
``truth.json`` records the schema (every table sized), the options, the seed and per split the Bayes-optimal AUC and
log loss; ``schema.yaml`` holds the sized schema under ``data: schema:``, so that it stacks with ``-c``. The click
model is :class:`.schema_truth.SchemaGroundTruth`. Rows are generated in blocks of ``BLOCK_ROWS`` from the random
stream of ``(seed, block)``, so row ``r`` depends only on the schema, the options, the seed and ``r``: a larger
``rows`` extends the same row stream, and the output is the same on every rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from dqrm_lightning.data.prepare import SPLITS, truth_file
from dqrm_lightning.data.synthetic.bayes import BayesStats
from dqrm_lightning.data.synthetic.generate import _check_arguments
from dqrm_lightning.data.synthetic.plan import (
    BLOCK_ROWS,
    PlannedFile,
    block_pieces,
    plan_files,
    remove_stale,
    split_counts,
    split_summary,
)
from dqrm_lightning.data.synthetic.schema_truth import SchemaGroundTruth, SchemaRows, SchemaSynthOptions
from dqrm_lightning.data.synthetic.truth import data_rng
from dqrm_lightning.data.synthetic.writer import TruthWriter
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import FeatureSchema

__all__ = ["PARQUET_SUFFIX", "arrow_schema", "synthesize_schema", "to_arrow"]

PARQUET_SUFFIX = ".parquet"


def _check_columns(schema: FeatureSchema) -> None:
    if schema.label is None:
        raise ConfigError("`schema.label` is null: synthetic data needs a label column")
    columns = [schema.label, *(d.source for d in schema.dense), *(s.source for s in schema.sparse)]
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise ConfigError(f"`schema`: column {column!r} is written by two fields; give them distinct `column`s")
        seen.add(column)


def arrow_schema(schema: FeatureSchema) -> pa.Schema:
    """The Arrow schema of the Parquet files of ``schema`` (see the module docstring)."""
    assert schema.label is not None
    fields = [pa.field(schema.label, pa.uint8(), nullable=False)]
    fields += [pa.field(d.source, pa.float32(), nullable=False) for d in schema.dense]
    for s in schema.sparse:
        kind = pa.int64() if not s.multi_hot else pa.string() if s.delimiter is not None else pa.list_(pa.int64())
        fields.append(pa.field(s.source, kind, nullable=False))
    return pa.schema(fields)


def to_arrow(schema: FeatureSchema, rows: SchemaRows) -> pa.Table:
    """``rows`` as an Arrow table of :func:`arrow_schema`."""
    target = arrow_schema(schema)
    columns: list[pa.Array] = [pa.array(rows.labels, pa.uint8())]
    columns += [pa.array(np.ascontiguousarray(rows.dense[:, j])) for j in range(len(schema.dense))]
    for s, lengths, ids in zip(schema.sparse, rows.lengths, rows.values, strict=True):
        if not s.multi_hot:
            columns.append(pa.array(ids, pa.int64()))
            continue
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
        bags = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int64()))
        if s.delimiter is not None:
            bags = pc.binary_join(bags.cast(pa.list_(pa.string())), s.delimiter)
        columns.append(bags)
    return pa.Table.from_arrays(columns, schema=target)


class _ParquetFile:
    """One Parquet data file and its ``.truth.npy``, written under temporary names and renamed when complete."""

    def __init__(self, path: Path, rows: int, schema: pa.Schema) -> None:
        self.path = path
        self.rows = rows
        self._tmp = path.with_name(path.name + ".partial")
        self._writer = pq.ParquetWriter(self._tmp, schema)
        self._truth = TruthWriter(truth_file(path), rows)

    def write(self, table: pa.Table, prob: np.ndarray) -> None:
        self._writer.write_table(table)
        self._truth.write(prob)

    @property
    def done(self) -> bool:
        return self._truth.written == self.rows

    def commit(self) -> None:
        self._writer.close()
        self._truth.commit()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._truth.abort()
        self._tmp.unlink(missing_ok=True)


def synthesize_schema(
    schema: FeatureSchema | str | Path,
    rows: int,
    seed: int,
    out_dir: str | Path,
    *,
    options: SchemaSynthOptions | None = None,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    rows_per_file: int | None = None,
) -> dict:
    """Write synthetic Parquet train/val/test files of ``schema`` with the true click probability of every row.

    Args:
        schema: A :class:`~dqrm_lightning.schema.FeatureSchema`, or a YAML file of one (top level or ``data.schema``).
        rows: Total number of rows over the three splits.
        seed: Non-negative integer that fixes the click model and the sampled rows.
        out_dir: Output directory (created if needed).
        options: The click model's knobs (default: :class:`SchemaSynthOptions`).
        split_fractions: Fractions of the rows for train, val and test (the first rows train, then val, then test).
        rows_per_file: Largest number of rows in one data file, or None for one file per split.

    Returns:
        The content of ``truth.json``.

    Raises:
        ConfigError: a bad schema or option (naming it).
        ValueError: a bad ``rows``, ``split_fractions`` or ``rows_per_file``.
    """
    fractions = _check_arguments(rows, split_fractions, rows_per_file)
    truth = SchemaGroundTruth(schema if isinstance(schema, FeatureSchema) else str(schema), seed, options)
    _check_columns(truth.schema)
    rows = int(rows)
    plan = plan_files(split_counts(rows, fractions), rows_per_file, PARQUET_SUFFIX)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {split: BayesStats() for split in SPLITS}
    _write_all(truth, plan, rows, out, stats)
    remove_stale(out, plan, PARQUET_SUFFIX)
    summary = _summary(truth, plan, rows, fractions, rows_per_file, stats)
    _write_text(out / "schema.yaml", yaml.safe_dump({"data": {"schema": truth.schema.to_dict()}}, sort_keys=False))
    _write_text(out / "truth.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_all(
    truth: SchemaGroundTruth, plan: list[PlannedFile], rows: int, out: Path, stats: dict[str, BayesStats]
) -> None:
    target = arrow_schema(truth.schema)
    files = {i: _ParquetFile(out / p.name, p.rows, target) for i, p in enumerate(plan)}
    try:
        for block in range(-(-rows // BLOCK_ROWS)):
            generated = truth.sample_rows(BLOCK_ROWS, data_rng(truth.seed, block))  # full block: rows never shift
            for index, start, stop in block_pieces(plan, block, rows):
                part = generated.slice(start, stop)
                files[index].write(to_arrow(truth.schema, part), part.prob.astype(np.float32))
                stats[plan[index].split].update(part.labels, part.logit)
        for index in list(files):
            files.pop(index).commit()
    except BaseException:
        for file in files.values():
            file.abort()
        raise


def _summary(
    truth: SchemaGroundTruth,
    plan: list[PlannedFile],
    rows: int,
    fractions: tuple[float, ...],
    rows_per_file: int | None,
    stats: dict[str, BayesStats],
) -> dict:
    return {
        "format": "parquet",
        "schema": truth.schema.to_dict(),
        "seed": truth.seed,
        "bias": truth.bias,
        "dense_weights": [float(w) for w in truth.dense_weights],
        **split_summary(plan, rows, fractions, rows_per_file, stats),
        "options": dataclasses.asdict(truth.options),
    }
