"""Popularity ranks of categorical ids drawn from a rank-Zipf law, in constant memory whatever the table size."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ZipfSampler"]

_ZIPF_HEAD = 1024
"""The most popular ranks, whose probabilities are tabulated exactly."""


class ZipfSampler:
    """Inverse-CDF sampler of popularity ranks ``k`` in ``[0, n_ids)`` with ``p(k) ~ (k + 1) ** -a``.

    The :data:`_ZIPF_HEAD` most popular ranks use an exact cumulative table, searched through a guide table (the
    first candidate rank of each of ``8 * head`` equal slices of the head's mass, then a few vectorised steps);
    beyond it, ``j = k + 1`` is the rounded value of a continuous power law on ``[head + 0.5, n_ids + 0.5)``, whose
    inverse CDF is closed-form. Nothing of size ``n_ids`` is allocated.

    Args:
        n_ids: Number of ids (>= 1).
        exponent: The law's exponent ``a`` (> 0).

    Example::

        sampler = ZipfSampler(10_000_000, 1.1)
        ranks = sampler.sample(np.random.default_rng(0).random(4))  # int64 ranks, 0 is the most popular id
    """

    _MAX_GUIDE_STEPS = 8

    def __init__(self, n_ids: int, exponent: float) -> None:
        self.n_ids = n_ids
        self.exponent = exponent
        head = min(n_ids, _ZIPF_HEAD)
        self.head = head
        self._cum = np.cumsum(np.arange(1, head + 1, dtype=np.float64) ** -exponent)
        self._cum_stop = np.append(self._cum, np.inf)  # the guided search never steps past the head
        self._head_mass = float(self._cum[-1])
        self._tail_lo = head + 0.5
        self._g_lo = self._g(self._tail_lo)
        tail_mass = self._g(n_ids + 0.5) - self._g_lo if n_ids > head else 0.0
        self.total = self._head_mass + tail_mass
        self._build_guide()

    def _build_guide(self) -> None:
        slices = 8 * self.head
        width = self._head_mass / slices
        edges = np.arange(slices + 1, dtype=np.float64) * width
        first = np.searchsorted(self._cum, edges[:-1] * (1.0 - 1e-12), side="right")
        last = np.searchsorted(self._cum, edges[1:] * (1.0 + 1e-12), side="right")
        self._guide = first.astype(np.int64)
        self._guide_scale = slices / self._head_mass
        self._guide_steps = int((last - first).max())

    def _g(self, y: float) -> float:
        """Antiderivative of ``y ** -a`` (continuous in ``a`` at 1)."""
        b = 1.0 - self.exponent
        return math.log(y) if b == 0.0 else math.expm1(b * math.log(y)) / b

    def _g_inverse(self, g: np.ndarray) -> np.ndarray:
        b = 1.0 - self.exponent
        return np.exp(g) if b == 0.0 else np.exp(np.log1p(b * g) / b)

    def _head_ranks(self, x: np.ndarray) -> np.ndarray:
        """The smallest ``k`` with ``cum[k] > x`` (``head`` when ``x`` is beyond the head)."""
        if self._guide_steps > self._MAX_GUIDE_STEPS:
            return np.searchsorted(self._cum, x, side="right").astype(np.int64)
        slot = (x * self._guide_scale).astype(np.int64)
        np.minimum(slot, len(self._guide) - 1, out=slot)
        ranks = self._guide[slot]
        for _ in range(self._guide_steps):
            ranks += self._cum_stop[ranks] <= x
        return ranks

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Ranks (int64) for uniforms ``u`` in ``[0, 1)``."""
        x = u * self.total
        ranks = self._head_ranks(x)
        if self.n_ids > self.head:
            tail = ranks >= self.head
            if tail.any():
                y = self._g_inverse(self._g_lo + (x[tail] - self._head_mass))
                ranks[tail] = np.clip(np.floor(y + 0.5).astype(np.int64) - 1, self.head, self.n_ids - 1)
        else:
            np.minimum(ranks, self.n_ids - 1, out=ranks)
        return ranks

    def pmf(self, ranks: np.ndarray) -> np.ndarray:
        """The exact probability of each rank under this sampler (0 outside ``[0, n_ids)``)."""
        ranks = np.asarray(ranks, dtype=np.int64)
        out = np.zeros(ranks.shape, dtype=np.float64)
        head = (ranks >= 0) & (ranks < self.head)
        out[head] = (ranks[head] + 1.0) ** -self.exponent
        tail = (ranks >= self.head) & (ranks < self.n_ids)
        y = ranks[tail].astype(np.float64)
        b = 1.0 - self.exponent
        if b == 0.0:
            out[tail] = np.log((y + 1.5) / (y + 0.5))
        else:
            out[tail] = (np.expm1(b * np.log(y + 1.5)) - np.expm1(b * np.log(y + 0.5))) / b
        return out / self.total
