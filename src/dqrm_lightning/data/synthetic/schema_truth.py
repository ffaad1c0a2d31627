"""The ground-truth click model of synthetic data for any :class:`~dqrm_lightning.schema.FeatureSchema`
(:class:`SchemaGroundTruth`), fully determined by the schema, the options and a seed.

The same ideas as the Criteo click model (:mod:`.truth`), per table instead of per Criteo field:

* **Ids.** Every table ``t`` has ``N_t`` ids: its ``rows``, or :attr:`SchemaSynthOptions.default_rows` when ``rows``
  is null. An id is a popularity rank drawn from the rank-Zipf law of :class:`.zipf.ZipfSampler` on ``[0, N_t)``
  (id 0 is the most popular). A one-hot feature draws one id per row. A multi-hot feature draws a bag: its length is
  uniform on ``0..max_bag`` (empty bags included), its ids independent draws from its table's law (repeats allowed).
  Features sharing a table share its ids and their popularity.
* **Per-id effects.** Every id of table ``t`` has one effect ``effect_scale * Normal(0, 1)`` from a counter-based hash
  of ``(seed, t, id)`` (:func:`~dqrm_lightning.data.hashing.hashed_normal`), shared by every feature of the table.
  A feature adds the pooled effects of its ids: their mean (table pooling ``mean``) or sum (``sum``); an empty bag
  adds 0.
* **Dense.** A ``transform: none`` column is ``Normal(0, 1)``; a ``log1p`` column is ``expm1(max(Normal(1, 1), 0))``
  (non-negative, ``log1p`` of it is a clipped normal). Column ``j`` adds ``w_j * transform(x_j)`` with a weight
  ``w_j ~ Normal(0, dense_scale)`` drawn from the seed, computed on the float32 value written.
* **Label.** ``logit = bias + all effects``, ``label ~ Bernoulli(sigmoid(logit))``; the bias is calibrated (on a
  fixed calibration sample) so that the mean click probability is ``target_ctr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dqrm_lightning.data.hashing import derive_key, hashed_normal
from dqrm_lightning.data.synthetic.truth import _check_seed, calibrate_bias, sigmoid
from dqrm_lightning.data.synthetic.zipf import ZipfSampler
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import FeatureSchema, load_schema

__all__ = ["SchemaGroundTruth", "SchemaRows", "SchemaSynthOptions"]

_CALIBRATION_ROWS = 1 << 15
# Key and stream tags (distinct from the Criteo model's, so the two never share random numbers).
_TAG_TABLE_EFFECT, _TAG_DENSE_WEIGHT, _TAG_CALIBRATION = 101, 102, 103
_LOG1P_MEAN = 1.0  # location of log1p of a `log1p` dense column


@dataclass(frozen=True)
class SchemaSynthOptions:
    """The knobs of the click model of a schema.

    Attributes:
        default_rows: Ids of a table whose ``rows`` is null.
        max_bag: Multi-hot bag lengths are uniform on ``0..max_bag``.
        zipf_exponent: Popularity law of ids, ``p(rank k) ~ (k + 1) ** -zipf_exponent``.
        effect_scale: Standard deviation of the per-id effects.
        dense_scale: Standard deviation of the dense weights.
        target_ctr: Mean click probability the bias is calibrated to.
    """

    default_rows: int = 10_000
    max_bag: int = 10
    zipf_exponent: float = 1.05
    effect_scale: float = 0.8
    dense_scale: float = 0.3
    target_ctr: float = 0.256

    def __post_init__(self) -> None:
        for name in ("default_rows", "max_bag"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (name == "default_rows"):
                raise ConfigError(f"`{name}` must be an integer >= {int(name == 'default_rows')}, got {value!r}")
        if not self.zipf_exponent > 0:
            raise ConfigError(f"`zipf_exponent` must be positive, got {self.zipf_exponent!r}")
        if self.effect_scale < 0 or self.dense_scale < 0:
            raise ConfigError("`effect_scale` and `dense_scale` must be non-negative")
        if not 0.0 < self.target_ctr < 1.0:
            raise ConfigError(f"`target_ctr` must lie in (0, 1), got {self.target_ctr!r}")


@dataclass(frozen=True, eq=False)
class SchemaRows:
    """A block of synthetic rows of a schema with their true click model values.

    Attributes:
        labels: ``(n,)`` uint8 sampled clicks.
        dense: ``(n, len(schema.dense))`` float32 values.
        lengths: per sparse feature (schema order), ``(n,)`` int32 ids per row (1 for one-hot features).
        values: per sparse feature, its ids (int64) concatenated row by row.
        logit: ``(n,)`` float64 true logit.
        prob: ``(n,)`` float64 true click probability ``sigmoid(logit)``.
    """

    labels: np.ndarray
    dense: np.ndarray
    lengths: list[np.ndarray]
    values: list[np.ndarray]
    logit: np.ndarray
    prob: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> SchemaRows:
        """Rows ``start:stop``."""
        values = []
        for lengths, ids in zip(self.lengths, self.values, strict=True):
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            values.append(ids[offsets[start] : offsets[stop]])
        return SchemaRows(
            self.labels[start:stop],
            self.dense[start:stop],
            [lengths[start:stop] for lengths in self.lengths],
            values,
            self.logit[start:stop],
            self.prob[start:stop],
        )


class SchemaGroundTruth:
    """The hidden click model of a schema, options and seed: samples rows and gives their true click probabilities.

    Args:
        schema: The feature schema (or a mapping or YAML path of one).
        seed: Non-negative integer.
        options: The knobs (default: :class:`SchemaSynthOptions`).

    Attributes:
        schema: The schema with every table sized (``rows`` null -> ``options.default_rows``).
        bias: The calibrated intercept of the logit.
    """

    def __init__(self, schema: FeatureSchema | str, seed: int, options: SchemaSynthOptions | None = None) -> None:
        self.options = options or SchemaSynthOptions()
        self.seed = _check_seed(seed)
        resolved = load_schema(schema)
        unsized = {t.name: self.options.default_rows for t in resolved.tables if t.rows is None}
        self.schema = resolved.with_rows(unsized)
        rows = self.schema.table_rows()
        self._samplers = [ZipfSampler(n, self.options.zipf_exponent) for n in rows]
        self._keys = [derive_key(self.seed, _TAG_TABLE_EFFECT, t) for t in range(len(rows))]
        self._feature_table = [self.schema.table_names.index(s.table_name) for s in self.schema.sparse]
        weights = hashed_normal(np.arange(len(self.schema.dense)), derive_key(self.seed, _TAG_DENSE_WEIGHT))
        self.dense_weights = self.options.dense_scale * weights
        self._log1p = np.array([d.transform == "log1p" for d in self.schema.dense], dtype=bool)
        self.bias = 0.0
        calibration = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_TAG_CALIBRATION,)))
        self.bias = calibrate_bias(self._draw(_CALIBRATION_ROWS, calibration)[3], self.options.target_ctr)

    def table_effects(self, table: int, ids: np.ndarray) -> np.ndarray:
        """The true effects (float64) of ``ids`` of table number ``table`` (schema table order)."""
        return self.options.effect_scale * hashed_normal(ids, self._keys[table])

    def _draw(
        self, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Dense values, lengths and ids per sparse feature, and logits of ``n`` rows."""
        z = np.full(n, self.bias, dtype=np.float64)
        lengths, values = [], []
        for s, t in zip(self.schema.sparse, self._feature_table, strict=True):
            if s.multi_hot:
                length = rng.integers(0, self.options.max_bag + 1, size=n).astype(np.int32)
            else:
                length = np.ones(n, dtype=np.int32)
            ids = self._samplers[t].sample(rng.random(int(length.sum())))
            z += self._pool(t, length, ids)
            lengths.append(length)
            values.append(ids)
        dense = self._sample_dense(n, rng)
        z += self.dense_effects(dense)
        return dense, lengths, values, z

    def _pool(self, table: int, lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each row's pooled effect: sum or mean (the table's pooling) of its ids' effects; 0 for an empty bag."""
        rows = np.repeat(np.arange(len(lengths)), lengths)
        pooled = np.bincount(rows, weights=self.table_effects(table, ids), minlength=len(lengths))
        if self.schema.tables[table].pooling == "mean":
            return pooled / np.maximum(lengths, 1)
        return pooled

    def _sample_dense(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((n, len(self.schema.dense)))
        logs = np.maximum(x + _LOG1P_MEAN, 0.0)
        return np.where(self._log1p, np.expm1(logs), x).astype(np.float32)

    def dense_effects(self, dense: np.ndarray) -> np.ndarray:
        """``sum_j w_j * transform(x_j)`` of ``(n, len(schema.dense))`` values (float64)."""
        x = dense.astype(np.float64)
        x = np.where(self._log1p, np.log1p(np.maximum(x, 0.0)), x)
        return x @ self.dense_weights

    def sample_rows(self, n: int, rng: np.random.Generator) -> SchemaRows:
        """Draw ``n`` rows: features, true logits and probabilities, and labels."""
        dense, lengths, values, logit = self._draw(n, rng)
        prob = sigmoid(logit)
        labels = (rng.random(n) < prob).astype(np.uint8)
        return SchemaRows(labels, dense, lengths, values, logit, prob)

    def logit(self, dense: np.ndarray, lengths: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
        """True logits of rows given by their dense values and, per sparse feature, lengths and ids."""
        z = self.bias + self.dense_effects(np.asarray(dense, dtype=np.float32))
        for t, length, ids in zip(self._feature_table, lengths, values, strict=True):
            z += self._pool(t, np.asarray(length), np.asarray(ids, dtype=np.int64))
        return z
