"""The knobs of the synthetic click model (:class:`SyntheticPreset`) and the named presets ``demo``, ``hard``,
``kaggle`` and ``terabyte``.

Default rates and dense-count laws follow Criteo Kaggle; :data:`PRESETS` sets table sizes and effect scales so that
the Bayes-optimal AUC is about 0.8 (``hard``: about 0.85), like the best published models on Criteo Kaggle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT

__all__ = [
    "CRITEO_CAT_MISSING_RATES",
    "CRITEO_CTR",
    "CRITEO_DENSE_MISSING_RATES",
    "DEMO_CARDINALITIES",
    "HARD_CARDINALITIES",
    "KAGGLE_CARDINALITIES",
    "PRESETS",
    "TERABYTE_CARDINALITIES",
    "SyntheticPreset",
    "get_preset",
]

CRITEO_CTR = 0.256
"""The positive rate of Criteo Kaggle."""

KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
"""Distinct values per categorical feature of Criteo Kaggle (sum 33,762,577)."""

TERABYTE_CARDINALITIES = (
    9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10,
    2208, 11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36,
)  # fmt: skip
"""Table sizes of DLRM's Criteo Terabyte model (``--max-ind-range=10000000``, negatives sub-sampled by 0.875; listed
in facebookresearch/dlrm's ``dlrm_s_pytorch.py``): 49,126,297 rows, 12.58 GB in FP32 at dimension 64."""

DEMO_CARDINALITIES = (
    1460, 583, 40000, 30000, 305, 24, 12517, 633, 3, 30000, 5683, 40000, 3194,
    27, 14992, 35000, 10, 5652, 2173, 4, 35000, 18, 15, 20000, 105, 20000,
)  # fmt: skip
"""Criteo's pattern of table sizes capped at 40,000 ids (sum 297,398), small enough to train a DLRM in minutes."""

HARD_CARDINALITIES = tuple(min(5 * c, 200_000) if c > 1000 else c for c in DEMO_CARDINALITIES)
"""The demo's tables with more than 1,000 ids made 5 times larger (sum 1,480,082): most ids are seen a few times at most
in 200,000 rows."""

CRITEO_CAT_MISSING_RATES = (
    0.0, 0.0, 0.034, 0.034, 0.0, 0.121, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0,
    0.0, 0.0, 0.034, 0.0, 0.0, 0.44, 0.44, 0.034, 0.763, 0.0, 0.034, 0.44, 0.44,
)  # fmt: skip
"""Approximate missing rates of ``C1..C26`` in Criteo Kaggle."""

CRITEO_DENSE_MISSING_RATES = (
    0.454, 0.0, 0.215, 0.217, 0.026, 0.224, 0.043, 0.0005, 0.043, 0.454, 0.043, 0.765, 0.217,
)  # fmt: skip
"""Approximate missing rates of ``I1..I13`` in Criteo Kaggle."""

_DENSE_LOG_MEANS = (0.7, 1.5, 2.0, 1.7, 7.5, 3.5, 1.5, 2.3, 3.8, 0.5, 1.1, 0.2, 1.8)
_DENSE_LOG_STDS = (1.0, 1.5, 1.3, 1.0, 2.0, 1.6, 1.4, 1.0, 1.2, 0.6, 0.9, 0.8, 1.1)
_DENSE_WEIGHTS = (0.25, -0.08, -0.06, 0.05, -0.1, -0.12, 0.2, 0.05, 0.06, 0.35, 0.3, 0.15, -0.1)


@dataclass(frozen=True)
class SyntheticPreset:
    """The knobs of a synthetic click model.

    Attributes:
        name: Preset name, recorded in ``truth.json``.
        cardinalities: Number of distinct ids of each of the 26 categorical features.
        zipf_exponent: Popularity law of ids, ``p(rank k) ~ (k + 1) ** -zipf_exponent``.
        cat_effect_scales: Standard deviation ``sigma_f`` of the per-id effects of each categorical feature.
        effect_scale: Multiplies every effect (categorical, interaction and dense): the main knob of the Bayes AUC.
        tail_effect_boost: Rare ids get larger effects: the standard deviation for the id of rank ``k`` is
            ``sigma_f * (1 + boost * log1p(k) / log1p(N_f - 1))`` (``sigma_f`` for the most popular id and for
            "missing", ``sigma_f * (1 + boost)`` for the rarest id).
        cat_missing_rates: Probability that each categorical feature is missing.
        interaction_pairs: Feature index pairs ``(a, b)`` (0-based, ``C1`` is 0) with a low-rank interaction term.
        interaction_rank: Dimension of the hashed vectors of the interaction terms.
        interaction_scale: Standard deviation of each interaction term.
        dense_missing_rates: Probability that each dense feature is missing.
        dense_log_means: Location ``m_j`` of ``log1p`` of each dense count.
        dense_log_stds: Spread ``s_j`` of ``log1p`` of each dense count.
        dense_weights: Weight ``w_j`` of the centred ``log1p`` of each dense count in the logit.
        negative_rate: Fraction of rows whose ``I2`` is negative (-1, -2 or -3), as in Criteo.
        target_ctr: Mean click probability the bias is calibrated to.
    """

    name: str
    cardinalities: tuple[int, ...]
    zipf_exponent: float
    cat_effect_scales: tuple[float, ...]
    effect_scale: float = 1.0
    tail_effect_boost: float = 0.0
    cat_missing_rates: tuple[float, ...] = CRITEO_CAT_MISSING_RATES
    interaction_pairs: tuple[tuple[int, int], ...] = ()
    interaction_rank: int = 4
    interaction_scale: float = 0.0
    dense_missing_rates: tuple[float, ...] = CRITEO_DENSE_MISSING_RATES
    dense_log_means: tuple[float, ...] = _DENSE_LOG_MEANS
    dense_log_stds: tuple[float, ...] = _DENSE_LOG_STDS
    dense_weights: tuple[float, ...] = _DENSE_WEIGHTS
    negative_rate: float = 0.015
    target_ctr: float = CRITEO_CTR

    def __post_init__(self) -> None:
        for name in (
            "cat_effect_scales",
            "cat_missing_rates",
            "dense_missing_rates",
            "dense_log_means",
            "dense_log_stds",
            "dense_weights",
        ):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in self.cardinalities))
        object.__setattr__(self, "interaction_pairs", tuple((int(a), int(b)) for a, b in self.interaction_pairs))
        _check_lengths(self)
        if any(not 1 <= int(c) < 1 << 32 for c in self.cardinalities):
            raise ValueError(f"preset {self.name!r}: cardinalities must lie in [1, 2**32 - 1]")
        if not self.zipf_exponent > 0:
            raise ValueError(f"preset {self.name!r}: zipf_exponent must be positive, got {self.zipf_exponent}")
        rates = (*self.cat_missing_rates, *self.dense_missing_rates, self.negative_rate)
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError(f"preset {self.name!r}: missing and negative rates must lie in [0, 1)")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"preset {self.name!r}: target_ctr must lie in (0, 1), got {self.target_ctr}")
        if self.interaction_rank < 1:
            raise ValueError(f"preset {self.name!r}: interaction_rank must be >= 1, got {self.interaction_rank}")
        for a, b in self.interaction_pairs:
            if not (0 <= a < CAT_FEATURE_COUNT and 0 <= b < CAT_FEATURE_COUNT and a != b):
                raise ValueError(f"preset {self.name!r}: bad interaction pair {(a, b)}")
        scales = (*self.cat_effect_scales, self.effect_scale, self.tail_effect_boost, self.interaction_scale)
        if any(s < 0 for s in scales) or any(s < 0 for s in self.dense_log_stds):
            raise ValueError(f"preset {self.name!r}: effect scales and spreads must be non-negative")


def _check_lengths(preset: SyntheticPreset) -> None:
    expected = {
        "cardinalities": CAT_FEATURE_COUNT,
        "cat_effect_scales": CAT_FEATURE_COUNT,
        "cat_missing_rates": CAT_FEATURE_COUNT,
        "dense_missing_rates": INT_FEATURE_COUNT,
        "dense_log_means": INT_FEATURE_COUNT,
        "dense_log_stds": INT_FEATURE_COUNT,
        "dense_weights": INT_FEATURE_COUNT,
    }
    for name, size in expected.items():
        if len(getattr(preset, name)) != size:
            raise ValueError(f"preset {preset.name!r}: {name} needs {size} entries, got {len(getattr(preset, name))}")


def _scales_by_size(cardinalities: Sequence[int], small: float, large: float) -> tuple[float, ...]:
    """Effect scales growing with log table size, from ``small`` (2 ids) to ``large`` (the largest table)."""
    top = math.log(max(cardinalities))
    return tuple(round(small + (large - small) * math.log(max(c, 2)) / top, 4) for c in cardinalities)


PRESETS: dict[str, SyntheticPreset] = {
    # Bayes AUC ~0.81; about a fifth of the logit variance comes from ids seen < 10 times in 160k training rows.
    "demo": SyntheticPreset(
        name="demo",
        cardinalities=DEMO_CARDINALITIES,
        zipf_exponent=1.05,
        cat_effect_scales=_scales_by_size(DEMO_CARDINALITIES, 0.075, 0.225),
        tail_effect_boost=1.0,
        interaction_pairs=((0, 1), (2, 9), (3, 11), (4, 12), (6, 14), (15, 20)),
        interaction_scale=0.2,
    ),
    # Bayes AUC ~0.85; a flatter popularity law and 5x larger tables than demo: 8% of the validation ids never occur
    # in 160k training rows and 20% fewer than 5 times, and rare ids carry larger effects. FP32 DLRM under the demo's
    # settings memorises them: validation AUC peaks after epoch 1-2 and then falls fast (configs/hard.yaml).
    "hard": SyntheticPreset(
        name="hard",
        cardinalities=HARD_CARDINALITIES,
        zipf_exponent=0.9,
        cat_effect_scales=_scales_by_size(HARD_CARDINALITIES, 0.075, 0.225),
        tail_effect_boost=1.5,
        interaction_pairs=((0, 1), (2, 9), (3, 11), (4, 12), (6, 14), (15, 20)),
        interaction_scale=0.2,
    ),
    # Bayes AUC ~0.80, like the best published models on Criteo Kaggle.
    "kaggle": SyntheticPreset(
        name="kaggle",
        cardinalities=KAGGLE_CARDINALITIES,
        zipf_exponent=1.1,
        cat_effect_scales=_scales_by_size(KAGGLE_CARDINALITIES, 0.1, 0.26),
        tail_effect_boost=0.5,
        interaction_pairs=((0, 1), (2, 9), (3, 11), (4, 12), (6, 14), (15, 20)),
        interaction_scale=0.3,
    ),
}
"""Named presets: ``demo`` (small tables, quick DLRM runs that overfit), ``hard`` (more rare ids: FP32 DLRM overfits
within 2 epochs), ``kaggle`` (Criteo Kaggle table sizes) and ``terabyte`` (DLRM's Terabyte table sizes)."""

# The kaggle preset's click model over DLRM's Terabyte table sizes (configs/data/synthetic_terabyte.yaml): data to train
# and measure the Terabyte-size model with; the real Terabyte's click rate (after sub-sampling) differs.
PRESETS["terabyte"] = dataclasses.replace(
    PRESETS["kaggle"],
    name="terabyte",
    cardinalities=TERABYTE_CARDINALITIES,
    cat_effect_scales=_scales_by_size(TERABYTE_CARDINALITIES, 0.1, 0.26),
)


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    """Return ``preset`` itself or the named entry of :data:`PRESETS`.

    Raises:
        ValueError: The name is not a known preset.
    """
    if isinstance(preset, SyntheticPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]
