"""The ground-truth click model of synthetic data (:class:`GroundTruth`), fully determined by a preset and a seed.

* **Categorical ids.** For feature ``f`` with ``N_f`` ids, the popularity rank ``k`` of the id in a row follows a
  rank-Zipf law ``p(k) ~ (k + 1) ** -a`` on ``[0, N_f)`` (exactly for the 1,024 most popular ids, and through the
  integral of the same power law over ``[k + 0.5, k + 1.5]`` beyond them, a relative difference below 1e-6). A
  feature is missing (an empty field) with a per-feature rate; "missing" is a value of its own with its own effect.
  The written 32-bit value is a per-feature bijective scramble of the rank (:meth:`GroundTruth.encode`,
  inverted by :meth:`GroundTruth.decode`), so popular ids do not look popular in the file.
* **Per-id effects.** Every id of every feature has an effect ``~ Normal(0, sigma_f)`` drawn from a counter-based
  hash of ``(seed, feature, id)`` (splitmix64 + Box-Muller), so no table of size ``N_f`` is ever needed. Rare ids
  have effects too, optionally larger ones (``tail_effect_boost``): a model that memorises rare ids fits their
  few noisy clicks, which is what makes an over-parameterised DLRM overfit.
* **Pairwise interactions.** For a few feature pairs ``(a, b)`` a low-rank term
  ``scale * u_a(id_a) . v_b(id_b) / sqrt(rank)`` with hashed Gaussian vectors ``u``, ``v`` (learnable by a
  dot-product interaction).
* **Dense counts.** ``I_j = max(floor(expm1(m_j + s_j * z)), 0)`` with ``z ~ Normal(0, 1)``, per-feature missing
  rates like Criteo's, and a few ``-1`` / ``-2`` / ``-3`` values in ``I2``. The effect is
  ``w_j * (log1p(max(I_j, 0)) - c_j)`` on present values (``c_j`` centres it), none on missing ones.
* **Label.** ``logit = bias + all effects``, ``label ~ Bernoulli(sigmoid(logit))``; the bias is calibrated by
  bisection on a fixed calibration sample (its own seeded stream) so that the mean click probability is the
  preset's ``target_ctr`` (0.256, the positive rate of Criteo Kaggle).

Every random quantity has its own key or stream derived from the seed and a tag; the rows of data block ``i`` come
from :func:`data_rng` ``(seed, i)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from dqrm_lightning.data.hashing import derive_key, hashed_normal
from dqrm_lightning.data.synthetic.presets import SyntheticPreset, get_preset
from dqrm_lightning.data.synthetic.zipf import ZipfSampler

__all__ = ["GroundTruth", "SyntheticRows", "calibrate_bias", "data_rng", "sigmoid"]

_DENSE_MAX = 999_999_999  # dense counts are clipped to 9 digits
_NEGATIVE_FEATURE = 1  # I2 carries the negative values, as in Criteo
_M32 = (1 << 32) - 1
_MISSING_ID = 1 << 32  # the id of "missing" inside the click model (outside every feature's id range)
_CACHE_IDS = 1 << 18  # hashed vectors of the most popular ids are precomputed per feature
_CALIBRATION_ROWS = 1 << 17

# Stream and key tags: every random quantity has its own derived key.
_TAG_DATA, _TAG_CALIBRATION, _TAG_EFFECT, _TAG_INTERACTION, _TAG_SCRAMBLE = 1, 2, 3, 4, 5


def data_rng(seed: int, block: int) -> np.random.Generator:
    """The random stream that the rows of data block ``block`` are drawn from."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TAG_DATA, block)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def calibrate_bias(z: np.ndarray, target_ctr: float) -> float:
    """The intercept ``b`` with ``mean(sigmoid(z + b)) = target_ctr`` (bisection on [-30, 30], 64 steps).

    Args:
        z: float64 logits of a calibration sample, without intercept.
        target_ctr: the wanted mean click probability, in (0, 1).
    """
    lo, hi = -30.0, 30.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if sigmoid(z + mid).mean() < target_ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _HashedVectors:
    """Gaussian vectors attached to the ids of one feature by hashing; the most popular ids are precomputed.

    The vector of an id only depends on the keys, the id and the scale law, never on whether it was cached.
    """

    def __init__(self, keys: Sequence[int], n_ids: int, sigma: float, tail_boost: float) -> None:
        self.keys = tuple(keys)
        self.n_ids = n_ids
        self.sigma = sigma
        self.tail_boost = tail_boost
        self._cache = self._compute(np.arange(min(n_ids, _CACHE_IDS), dtype=np.int64))

    def _scale(self, ids: np.ndarray) -> np.ndarray | float:
        if self.tail_boost == 0.0 or self.n_ids < 3:
            return self.sigma
        ranks = np.where(ids == _MISSING_ID, 0, ids).astype(np.float64)
        return self.sigma * (1.0 + self.tail_boost * np.log1p(ranks) / math.log1p(self.n_ids - 1))

    def _compute(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(self.keys), len(ids)), dtype=np.float64)
        for c, key in enumerate(self.keys):
            out[c] = hashed_normal(ids, key)
        out *= self._scale(ids)
        return out.astype(np.float32)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` (int64, ``_MISSING_ID`` allowed) as a ``(len(keys), len(ids))`` float32 array."""
        cached = self._cache.shape[1]
        slots = np.minimum(ids, cached - 1)
        out = np.empty((len(self.keys), len(ids)), dtype=np.float32)
        for c in range(len(self.keys)):
            np.take(self._cache[c], slots, out=out[c])
        far = np.flatnonzero(ids >= cached)
        if len(far):
            out[:, far] = self._compute(ids[far])
        return out


# ----------------------------------------------------------------------------------------------- ground truth
@dataclass(frozen=True, eq=False)
class SyntheticRows:
    """A block of synthetic rows with their true click model values.

    Attributes:
        labels: ``(n,)`` uint8 sampled clicks.
        dense: ``(n, 13)`` int64 counts ``I1..I13`` (0 where missing).
        dense_missing: ``(n, 13)`` bool, true where a dense value is missing.
        cat: ``(n, 26)`` uint32 written categorical values ``C1..C26`` (0 where missing).
        cat_missing: ``(n, 26)`` bool, true where a categorical value is missing.
        ids: ``(n, 26)`` int64 popularity rank of each categorical id (0 = most popular), -1 where missing.
        logit: ``(n,)`` float64 true logit.
        prob: ``(n,)`` float64 true click probability ``sigmoid(logit)``.
    """

    labels: np.ndarray
    dense: np.ndarray
    dense_missing: np.ndarray
    cat: np.ndarray
    cat_missing: np.ndarray
    ids: np.ndarray
    logit: np.ndarray
    prob: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> SyntheticRows:
        """Rows ``start:stop`` (views, no copy)."""
        return SyntheticRows(**{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)})


class GroundTruth:
    """The hidden click model of a preset and seed: samples rows and gives their true click probabilities.

    Args:
        preset: The model's knobs, or the name of an entry of :data:`PRESETS`.
        seed: Non-negative integer; the whole model (effects, scrambles, bias) is a function of preset and seed.

    Attributes:
        preset: The resolved preset.
        seed: The seed.
        bias: The calibrated intercept of the logit.
    """

    def __init__(self, preset: str | SyntheticPreset, seed: int) -> None:
        self.preset = get_preset(preset)
        self.seed = _check_seed(seed)
        p = self.preset
        self._samplers = [ZipfSampler(int(n), p.zipf_exponent) for n in p.cardinalities]
        self._effects = [
            _HashedVectors([derive_key(seed, _TAG_EFFECT, f)], int(n), p.effect_scale * s, p.tail_effect_boost)
            for f, (n, s) in enumerate(zip(p.cardinalities, p.cat_effect_scales, strict=True))
        ]
        self._interactions = [self._pair_vectors(i, a, b) for i, (a, b) in enumerate(p.interaction_pairs)]
        self._scramble = [self._scramble_keys(f) for f in range(CAT_FEATURE_COUNT)]
        self._cat_missing = np.asarray(p.cat_missing_rates, dtype=np.float64)[:, None]
        self._dense_missing = np.asarray(p.dense_missing_rates, dtype=np.float64)[:, None]
        self._dense_mean = np.asarray(p.dense_log_means, dtype=np.float64)[:, None]
        self._dense_std = np.asarray(p.dense_log_stds, dtype=np.float64)[:, None]
        self._dense_weight = p.effect_scale * np.asarray(p.dense_weights, dtype=np.float64)[:, None]
        self._dense_centre = np.zeros((INT_FEATURE_COUNT, 1))
        self.bias = 0.0
        self._calibrate()

    # -- construction
    def _pair_vectors(self, index: int, a: int, b: int) -> tuple[int, int, _HashedVectors, _HashedVectors]:
        p = self.preset
        keys = [
            [derive_key(self.seed, _TAG_INTERACTION, index, side, c) for c in range(p.interaction_rank)]
            for side in (0, 1)
        ]
        u = _HashedVectors(keys[0], int(p.cardinalities[a]), 1.0, 0.0)
        v = _HashedVectors(keys[1], int(p.cardinalities[b]), 1.0, 0.0)
        return a, b, u, v

    def _scramble_keys(self, feature: int) -> tuple[int, int, int, int, int]:
        k = [derive_key(self.seed, _TAG_SCRAMBLE, feature, i) for i in range(3)]
        m1, m2, xor = (k[0] & _M32) | 1, (k[1] & _M32) | 1, k[2] & _M32
        return m1, m2, xor, pow(m1, -1, 1 << 32), pow(m2, -1, 1 << 32)

    def _calibrate(self) -> None:
        """Centre the dense effects and find the bias giving a mean probability of ``target_ctr``."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_TAG_CALIBRATION,)))
        ids, _ = self._sample_ids(_CALIBRATION_ROWS, rng)
        dense, dense_missing = self._sample_dense(_CALIBRATION_ROWS, rng)
        present = ~dense_missing
        logs = np.log1p(np.maximum(dense, 0))
        counts = np.maximum(present.sum(axis=1, keepdims=True), 1)
        self._dense_centre = (logs * present).sum(axis=1, keepdims=True) / counts
        self.bias = calibrate_bias(self._logit_t(ids, dense, dense_missing), self.preset.target_ctr)

    # -- sampling
    def _sample_ids(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Feature-major ``(26, n)`` ranks (``_MISSING_ID`` where missing) and missing mask."""
        u = rng.random((CAT_FEATURE_COUNT, n))
        missing = rng.random((CAT_FEATURE_COUNT, n)) < self._cat_missing
        ids = np.empty((CAT_FEATURE_COUNT, n), dtype=np.int64)
        for f, sampler in enumerate(self._samplers):
            ids[f] = sampler.sample(u[f])
        ids[missing] = _MISSING_ID
        return ids, missing

    def _sample_dense(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Feature-major ``(13, n)`` counts (0 where missing) and missing mask."""
        logs = rng.standard_normal((INT_FEATURE_COUNT, n))
        logs *= self._dense_std
        logs += self._dense_mean
        counts = np.floor(np.expm1(np.minimum(logs, math.log(_DENSE_MAX))))
        dense = np.clip(counts, 0, _DENSE_MAX).astype(np.int64)
        rate = self.preset.negative_rate
        u = rng.random(n)
        negative = u < rate
        v = u[negative] / rate if rate else u[negative]
        # -1 for 70% of the negative values, -2 for 20%, -3 for 10%
        dense[_NEGATIVE_FEATURE, negative] = -1 - (v < 0.3) - (v < 0.1)
        missing = rng.random((INT_FEATURE_COUNT, n)) < self._dense_missing
        dense[missing] = 0
        return dense, missing

    def sample_rows(self, n: int, rng: np.random.Generator) -> SyntheticRows:
        """Draw ``n`` rows: features, true logits and probabilities, and labels.

        Args:
            n: Number of rows (>= 0).
            rng: The random stream to draw from.

        Returns:
            The rows; 2-D arrays are ``(n, features)`` views of feature-major arrays.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        ids, cat_missing = self._sample_ids(n, rng)
        dense, dense_missing = self._sample_dense(n, rng)
        logit = self._logit_t(ids, dense, dense_missing)
        prob = sigmoid(logit)
        labels = (rng.random(n) < prob).astype(np.uint8)
        cat = np.empty((CAT_FEATURE_COUNT, n), dtype=np.uint32)
        for f in range(CAT_FEATURE_COUNT):
            cat[f] = self.encode(f, np.where(cat_missing[f], 0, ids[f]))
        cat[cat_missing] = 0
        public_ids = np.where(cat_missing, -1, ids)
        return SyntheticRows(labels, dense.T, dense_missing.T, cat.T, cat_missing.T, public_ids.T, logit, prob)

    # -- the click model
    def _logit_t(self, ids: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray) -> np.ndarray:
        """Logits from feature-major ids ``(26, n)`` (``_MISSING_ID`` for missing) and dense ``(13, n)``."""
        z = np.full(ids.shape[1], self.bias, dtype=np.float64)
        for f, effects in enumerate(self._effects):
            z += effects(ids[f])[0]
        scale = self.preset.effect_scale * self.preset.interaction_scale / math.sqrt(self.preset.interaction_rank)
        if scale:
            for a, b, u, v in self._interactions:
                z += scale * np.einsum("ij,ij->j", u(ids[a]), v(ids[b]), dtype=np.float64)
        centred = np.log1p(np.maximum(dense, 0)) - self._dense_centre
        centred[dense_missing] = 0.0
        z += (self._dense_weight * centred).sum(axis=0)
        return z

    def logit(self, ids: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray) -> np.ndarray:
        """True logits of rows given by popularity ranks and dense counts.

        Args:
            ids: ``(n, 26)`` integer ranks, -1 where missing (as in :attr:`SyntheticRows.ids`).
            dense: ``(n, 13)`` integer counts.
            dense_missing: ``(n, 13)`` bool, true where a dense value is missing.

        Returns:
            ``(n,)`` float64 logits; their logistic function is the true click probability.
        """
        ids_t = np.asarray(ids, dtype=np.int64).T
        self._check_ranks(ids_t)
        ids_t = np.where(ids_t < 0, _MISSING_ID, ids_t)
        dense_t = np.asarray(dense, dtype=np.int64).T
        return self._logit_t(ids_t, dense_t, np.asarray(dense_missing, dtype=bool).T)

    def probability(self, ids: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray) -> np.ndarray:
        """True click probabilities; same arguments as :meth:`logit`."""
        return sigmoid(self.logit(ids, dense, dense_missing))

    def _check_ranks(self, ids_t: np.ndarray) -> None:
        if ids_t.shape[0] != CAT_FEATURE_COUNT:
            raise ValueError(f"ids need {CAT_FEATURE_COUNT} columns, got shape {ids_t.T.shape}")
        limits = np.asarray(self.preset.cardinalities, dtype=np.int64)[:, None]
        if ids_t.size and ((ids_t < -1) | (ids_t >= limits)).any():
            raise ValueError("ids must be -1 (missing) or a rank below the feature's cardinality")

    def id_probability(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """Probability that a present value of ``feature`` is each of ``ids`` (the Zipf law actually sampled)."""
        return self._samplers[feature].pmf(ids)

    # -- the written values
    def encode(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """Scramble popularity ranks of ``feature`` into the 32-bit values written to the file (a bijection)."""
        m1, m2, xor, _, _ = self._scramble[feature]
        v = np.asarray(ids).astype(np.uint32)
        v *= np.uint32(m1)
        v ^= v >> np.uint32(16)
        v *= np.uint32(m2)
        v ^= np.uint32(xor)
        return v

    def decode(self, feature: int, values: np.ndarray) -> np.ndarray:
        """Invert :meth:`encode`: the popularity ranks (int64) of written 32-bit values of ``feature``."""
        _, _, xor, m1_inv, m2_inv = self._scramble[feature]
        v = np.asarray(values).astype(np.uint32)
        v ^= np.uint32(xor)
        v *= np.uint32(m2_inv)
        v ^= v >> np.uint32(16)
        v *= np.uint32(m1_inv)
        return v.astype(np.int64)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)
