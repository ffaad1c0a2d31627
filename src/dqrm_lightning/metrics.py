"""Click-prediction metrics: AUC, accuracy at 0.5 and log loss, per evaluation and best-so-far.

The DQRM paper reports the best value of each metric over all evaluations of a run (its reference code keeps running
maxima); we report both the final and the best value, and say which is which.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchmetrics.functional.classification import binary_auroc as _binary_auroc

_EPS = 1e-7


def binary_auroc(prob: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (ties counted half), as sklearn's ``roc_auc_score``."""
    return float(_binary_auroc(prob.double(), labels.long(), thresholds=None))


def binary_log_loss(prob: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of probabilities (clamped to [1e-7, 1 - 1e-7])."""
    p = prob.double().clamp(_EPS, 1 - _EPS)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


class ClickMetrics(MetricCollection):
    """AUC, accuracy (p > 0.5 is a click) and log loss over an evaluation; update with logits and labels."""

    def __init__(self, prefix: str) -> None:
        super().__init__(
            {"auc": BinaryAUROC(thresholds=None), "accuracy": BinaryAccuracy(threshold=0.5), "log_loss": MeanMetric()},
            prefix=prefix,
            compute_groups=False,
        )

    def update_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        prob = torch.sigmoid(logits.detach().float())
        target = labels.long()
        self["auc"].update(prob, target)
        self["accuracy"].update(prob, target)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.detach().float(), labels.float(), reduction="none"
        )
        self["log_loss"].update(loss)


class BestTracker:
    """Best value of each metric over evaluations (max for AUC and accuracy, min for log loss)."""

    _LOWER_IS_BETTER = ("log_loss",)

    def __init__(self) -> None:
        self.best: dict[str, float] = {}
        self.final: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> None:
        self.final = dict(values)
        for key, value in values.items():
            better = min if key.rsplit("/", 1)[-1] in self._LOWER_IS_BETTER else max
            self.best[key] = better(self.best.get(key, value), value)

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"best": dict(self.best), "final": dict(self.final)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.best = dict(state.get("best", {}))
        self.final = dict(state.get("final", {}))
