"""Has a stochastic-gradient fit stopped improving? A trend test on its loss history.

A fit that ran its step budget out has converged, in the sense this module tests, when its
loss no longer falls by more than the noise of the loss and a small tolerance. Over the last
W recorded losses ℓ_1 … ℓ_W the least-squares line ℓ_t ≈ a + b t gives the fall over the
window, D = −b (W − 1), and its standard error from the residuals r_t = ℓ_t − a − b t,

    SE(D) = (W − 1) · √( Σ r_t² / (W − 2) / Σ (t − t̄)² ).

The fit is still descending when D > 2·SE(D) + tol·N: the fall is larger than twice its
noise (mini-batch losses are noisy: only a significant fall counts) and larger than ``tol``
nats per data point over the window (a deterministic full-batch loss falls forever by
rounding-level amounts: only a fall that matters counts). N is the number of data points the
loss sums over, so ``tol`` means the same for a loss of 200 points and one of 200,000 — the
per-datum tolerance scikit-learn's mixtures use (1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LossTrend", "loss_trend", "trend_window"]


@dataclass(frozen=True)
class LossTrend:
    """The fall of the loss over the last ``window`` steps, with its noise and verdict.

    :param fall: D, the fitted fall of the loss over the window (negative: it rose).
    :param stderr: SE(D), its standard error from the residuals of the fitted line.
    :param window: W, the number of losses the line was fitted to.
    :param threshold: 2·SE(D) + tol·N, the fall above which the fit is still descending.
    """

    fall: float
    stderr: float
    window: int
    threshold: float

    @property
    def descending(self) -> bool:
        """Is the loss still falling by more than its noise and the tolerance?"""
        return not self.fall <= self.threshold  # a NaN fall counts as not settled


def trend_window(n_steps: int) -> int:
    """W: the last half of the steps, between 10 and 250 (0 when fewer than 10 steps).

    Half, because a short window cannot tell a slow fall from mini-batch noise (the standard
    error of the fall shrinks as W^(-1/2) relative to it); a fit that settled only within the
    last half is reported as still falling, which errs towards asking for more steps."""
    if n_steps < 10:
        return 0
    return max(10, min(250, n_steps // 2))


def loss_trend(history: Sequence[float], data_size: int | None, tol: float = 1e-3) -> LossTrend:
    """The least-squares trend of the last :func:`trend_window` losses of ``history``.

    :param history: the loss after each step, oldest first.
    :param data_size: N, the data points the loss sums over (``None``: 1).
    :param tol: the fall per data point over the window that still counts as settled.
    :raises ValueError: when ``history`` has fewer than 10 losses (no trend to read).
    """
    w = trend_window(len(history))
    if w == 0:
        raise ValueError(f"a trend needs at least 10 losses, got {len(history)}")
    ys = [float(v) for v in history[-w:]]
    t_mean = (w - 1) / 2
    y_mean = sum(ys) / w
    sxx = sum((t - t_mean) ** 2 for t in range(w))
    slope = sum((t - t_mean) * (y - y_mean) for t, y in enumerate(ys)) / sxx
    resid = sum((y - y_mean - slope * (t - t_mean)) ** 2 for t, y in enumerate(ys))
    stderr = (w - 1) * math.sqrt(resid / (w - 2) / sxx)
    fall = -slope * (w - 1)
    return LossTrend(fall, stderr, w, 2 * stderr + tol * (data_size or 1))
