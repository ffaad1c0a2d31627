"""The accuracy ceiling of a split: the Bayes-optimal AUC and log loss of the true click probabilities."""

from __future__ import annotations

import numpy as np

from dqrm_lightning.data.synthetic.truth import sigmoid

__all__ = ["AUC_METHOD", "BayesStats"]

_AUC_BINS = 1 << 18
_AUC_LOGIT_RANGE = 16.0
_PROB_EPS = 1e-7  # probabilities are clamped to [eps, 1 - eps] before they become logits

AUC_METHOD = f"histogram of the true logit, {_AUC_BINS} bins on [-{_AUC_LOGIT_RANGE:g}, {_AUC_LOGIT_RANGE:g}]"
"""How :class:`BayesStats` computes the AUC, in words (recorded in ``truth.json``)."""


class BayesStats:
    """Streaming positive rate, mean probability, log loss and AUC of the true model on one split.

    The AUC comes from histograms of the true logit of positives and negatives (:data:`_AUC_BINS` equal bins on
    ``[-16, 16]``, clipped at the ends); pairs inside one bin count as ties. Bins are 1.2e-4 logits wide, so it
    matches the exact AUC of the true probabilities to about 1e-6 while memory stays constant.

    Example::

        stats = BayesStats()
        for rows in blocks:
            stats.update(rows.labels, rows.logit)
        stats.result()["bayes_auc"]
    """

    def __init__(self) -> None:
        self.rows = 0
        self.positives = 0
        self.prob_sum = 0.0
        self.loss_sum = 0.0
        self._pos = np.zeros(_AUC_BINS, dtype=np.int64)
        self._neg = np.zeros(_AUC_BINS, dtype=np.int64)

    def update(self, labels: np.ndarray, logit: np.ndarray) -> None:
        """Add rows: ``(n,)`` 0/1 labels and ``(n,)`` float64 true logits."""
        y = labels.astype(bool)
        self.rows += len(y)
        self.positives += int(y.sum())
        self.prob_sum += float(sigmoid(logit).sum())
        self.loss_sum += float((np.logaddexp(0.0, logit) - y * logit).sum())
        scaled = (np.clip(logit, -_AUC_LOGIT_RANGE, _AUC_LOGIT_RANGE) + _AUC_LOGIT_RANGE) * (
            _AUC_BINS / (2 * _AUC_LOGIT_RANGE)
        )
        bins = np.minimum(scaled.astype(np.int64), _AUC_BINS - 1)
        self._pos += np.bincount(bins[y], minlength=_AUC_BINS)
        self._neg += np.bincount(bins[~y], minlength=_AUC_BINS)

    def update_probabilities(self, labels: np.ndarray, prob: np.ndarray) -> None:
        """Add rows given by their true probabilities (``(n,)``, e.g. the float32 ``prob`` of prepared shards)."""
        p = np.clip(np.asarray(prob, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
        self.update(labels, np.log(p) - np.log1p(-p))

    def auc(self) -> float | None:
        """The AUC of the true logits over the rows so far (None without both positives and negatives)."""
        negatives = self.rows - self.positives
        if self.positives == 0 or negatives == 0:
            return None
        pos = self._pos.astype(np.float64)
        neg = self._neg.astype(np.float64)
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (float(self.positives) * float(negatives)))

    def result(self) -> dict:
        """Rows, positives, positive rate, mean probability, Bayes AUC and log loss (None where undefined)."""
        empty = self.rows == 0
        return {
            "rows": self.rows,
            "positives": self.positives,
            "positive_rate": None if empty else self.positives / self.rows,
            "mean_prob": None if empty else self.prob_sum / self.rows,
            "bayes_auc": self.auc(),
            "bayes_log_loss": None if empty else self.loss_sum / self.rows,
        }
