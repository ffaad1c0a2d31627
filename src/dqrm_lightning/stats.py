"""Comparing click models with statistics: AUC and log loss with paired bootstrap confidence intervals.

AUC on 20,000 test rows has a sampling noise of a few thousandths, about the size of the differences between FP32
and INT4 models, so a comparison states an interval, not a single difference. Two models scored on the same rows are
compared *paired*: every bootstrap replicate resamples the rows once (multinomial weights) and evaluates both models
on that same resample, so the noise the models share (which rows are hard) cancels in the difference. With several
seeds per model, a replicate averages the difference over the seeds (seed ``k`` of one model paired with seed ``k``
of the other): the interval then covers the test sampling noise of the mean difference, and the spread over seeds is
reported beside it.

Notation: N rows, S seeds, R bootstrap replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] for the log loss (as torchmetrics' binary log loss)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve: the probability that a positive row scores above a negative one (ties count 1/2),
    each row counted ``weights[i]`` times (a bootstrap resample).

    Args:
        labels: ``(N,)`` 0/1 labels.
        scores: ``(N,)`` scores (probabilities or logits).
        weights: ``(N,)`` non-negative row weights; ``None``: all 1.
    """
    return _AucTable(labels, scores).auc(np.ones(len(labels)) if weights is None else weights)


def weighted_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (``(N,)``), each row counted ``weights[i]`` times."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(np.dot(w, losses) / w.sum())


class _AucTable:
    """A model's scores sorted once, so that each resample's AUC costs O(N): rows are grouped by equal score; a
    positive's share is the negative weight below its group plus half the negative weight inside it."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        _, self.group = np.unique(np.asarray(scores), return_inverse=True)  # (N,) rank of each row's score value
        self.groups = int(self.group.max()) + 1 if len(self.group) else 0
        self.positive = np.asarray(labels) == 1

    def auc(self, weights: np.ndarray) -> float:
        pos = np.bincount(self.group[self.positive], weights[self.positive], minlength=self.groups)  # (G,)
        neg = np.bincount(self.group[~self.positive], weights[~self.positive], minlength=self.groups)  # (G,)
        total = pos.sum() * neg.sum()
        if total == 0:
            return float("nan")  # one class only: AUC is undefined
        below = np.cumsum(neg) - neg  # negative weight strictly below each group
        return float(np.dot(pos, below + 0.5 * neg) / total)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation of one figure over seeds (std ``None`` for one seed: no spread seen)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def format_spread(values: dict[str, float | None], digits: int = 4) -> str:
    """``mean ± std`` of :func:`spread` (the mean alone for one seed)."""
    std = values["std"]
    return f"{values['mean']:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


@dataclass
class Interval:
    """A difference (candidate - baseline, mean over seeds) with its paired (rows and seeds) bootstrap interval."""

    difference: float
    low: float
    high: float
    level: float
    replicates: int

    def as_dict(self) -> dict[str, float]:
        return {"difference": self.difference, "low": self.low, "high": self.high, "level": self.level}


def paired_bootstrap(
    labels: np.ndarray,
    baseline: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    metric: str = "auc",
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``metric(candidate) - metric(baseline)``, averaged over seeds, by a two-level
    bootstrap: every replicate resamples the test rows (both models score the same resample) and the seed pairs
    (with replacement), so the interval covers both the sampling noise of the test rows and the spread of the
    difference over training seeds; with one seed it is the row bootstrap alone (the seeds' spread unseen). With few
    seeds the percentile interval of the seed resampling is somewhat too narrow (its variance is ``(S - 1) / S``
    of the sample variance), one reason to run more seeds.

    Args:
        labels: ``(N,)`` labels of the rows every model scored.
        baseline: S arrays ``(N,)`` of probabilities, one per seed.
        candidate: S arrays ``(N,)``, seed ``k`` paired with ``baseline[k]``.
        metric: ``"auc"`` or ``"log_loss"``.
        replicates: R bootstrap resamples (of the rows and of the seed pairs).
        level: coverage of the interval (0.95: the 2.5th to 97.5th percentile).
        seed: seed of the resampling.

    Raises:
        ValueError: a model scored other rows, the seed counts differ, or an unknown metric.
    """
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"pair the seeds: {len(baseline)} baseline and {len(candidate)} candidate prediction sets")
    n = len(labels)
    for probs in (*baseline, *candidate):
        if len(probs) != n:
            raise ValueError(f"every model must score the same {n} rows, got {len(probs)}")
    evaluate = _metric(metric, labels, [*baseline, *candidate])
    s = len(baseline)

    def mean_difference(weights: np.ndarray, seed_weights: np.ndarray) -> float:
        values = evaluate(weights)  # (2S,)
        return float(np.dot(seed_weights, values[s:] - values[:s]))

    point = mean_difference(np.ones(n), np.full(s, 1.0 / s))
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            mean_difference(
                rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64), rng.multinomial(s, np.full(s, 1.0 / s)) / s
            )
            for _ in range(replicates)
        ]
    )
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(draws, [tail, 1.0 - tail])
    return Interval(point, float(low), float(high), level, replicates)


def _metric(name: str, labels: np.ndarray, models: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``weights -> (len(models),)`` values of the metric for every model on one resample."""
    if name == "auc":
        tables = [_AucTable(labels, probs) for probs in models]
        return lambda weights: np.array([table.auc(weights) for table in tables])
    if name == "log_loss":
        return lambda weights: np.array([weighted_log_loss(labels, probs, weights) for probs in models])
    raise ValueError(f"`metric` must be 'auc' or 'log_loss', got {name!r}")
