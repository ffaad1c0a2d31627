"""AUC and log loss with row weights against brute-force definitions, and the paired bootstrap interval."""

import itertools

import numpy as np
import pytest

from dqrm_lightning.stats import paired_bootstrap, weighted_auc, weighted_log_loss


def _brute_auc(labels, scores):
    """The share of (positive, negative) pairs ordered right, ties 1/2, by enumerating every pair."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_equals_the_pairwise_definition_with_ties_and_repeated_rows(seed):
    rng = np.random.default_rng(seed)
    n = 40
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 6, n) / 5.0  # many ties
    weights = rng.integers(0, 4, n)  # a bootstrap resample: row i taken weights[i] times
    repeated = np.repeat(np.arange(n), weights)
    assert weighted_auc(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-12)
    assert weighted_auc(labels, scores, weights.astype(float)) == pytest.approx(
        _brute_auc(labels[repeated], scores[repeated]), abs=1e-12
    )


def test_weighted_log_loss_equals_the_mean_over_repeated_rows():
    rng = np.random.default_rng(1)
    labels, probs, weights = rng.integers(0, 2, 30), rng.uniform(0, 1, 30), rng.integers(0, 3, 30)
    repeated = np.repeat(np.arange(30), weights)
    y, p = labels[repeated], probs[repeated]
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert weighted_log_loss(labels, probs, weights.astype(float)) == pytest.approx(expected, rel=1e-12)


def test_the_interval_is_zero_for_identical_models_and_above_zero_for_a_better_one():
    rng = np.random.default_rng(2)
    n = 4000
    truth = rng.uniform(0.05, 0.6, n)
    labels = (rng.uniform(size=n) < truth).astype(int)
    noisy = [np.clip(truth + rng.normal(0, 0.25, n), 0.001, 0.999) for _ in range(3)]  # 3 seeds of a weak model
    sharp = [np.clip(truth + rng.normal(0, 0.02, n), 0.001, 0.999) for _ in range(3)]  # 3 seeds of a better one
    same = paired_bootstrap(labels, noisy, noisy, "auc", replicates=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_bootstrap(labels, noisy, sharp, "auc", replicates=200)
    assert 0.0 < better.low < better.difference < better.high
    loss = paired_bootstrap(labels, noisy, sharp, "log_loss", replicates=200)
    assert loss.high < 0.0  # lower log loss
    with pytest.raises(ValueError, match="pair the seeds"):
        paired_bootstrap(labels, noisy, sharp[:2])
    with pytest.raises(ValueError, match="same 4000 rows"):
        paired_bootstrap(labels, noisy, [p[:10] for p in sharp])


def test_the_interval_covers_the_spread_over_seeds_not_only_the_test_rows():
    rng = np.random.default_rng(3)
    n = 4000
    truth = rng.uniform(0.05, 0.6, n)
    labels = (rng.uniform(size=n) < truth).astype(int)
    baseline = [np.clip(truth + rng.normal(0, 0.1, n), 0.001, 0.999) for _ in range(5)]
    # seed k of the candidate is the baseline's seed k, sharper or blurrier: per-seed differences of both signs
    noise = (0.02, 0.2, 0.03, 0.18, 0.05)
    candidate = [np.clip(truth + rng.normal(0, sigma, n), 0.001, 0.999) for sigma in noise]
    per_seed = [weighted_auc(labels, c) - weighted_auc(labels, b) for b, c in zip(baseline, candidate, strict=True)]
    interval = paired_bootstrap(labels, baseline, candidate, "auc", replicates=300)
    assert interval.difference == pytest.approx(np.mean(per_seed))
    rows_only = [  # the row bootstrap of each seed alone sees no spread over seeds: a far narrower interval
        paired_bootstrap(labels, [b], [c], "auc", replicates=300) for b, c in zip(baseline, candidate, strict=True)
    ]
    assert all(r.low > 0 or r.high < 0 for r in rows_only)  # each seed alone looks significant, either way
    assert interval.low < 0 < interval.high  # over the seeds the difference is not: the interval holds 0
    assert interval.high - interval.low > 1.5 * max(r.high - r.low for r in rows_only)
