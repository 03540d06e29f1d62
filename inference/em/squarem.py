"""SQUAREM acceleration of EM (Varadhan & Roland 2008, scheme S3).

After a plain EM step θ0 -> θ1, a second θ2 = M(θ1), then the point θ0 - 2α r + α² v with
r = θ1 - θ0, v = θ2 - 2θ1 + θ0 and α = -‖r‖/‖v‖, in unconstrained coordinates (so the point
satisfies every constraint). It is kept only when its log-likelihood is at least θ1's, else θ2
is: the log-likelihood still never decreases. Slow, nearly linear EM (overlapping clusters)
typically needs several times fewer iterations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for

if TYPE_CHECKING:
    from jointkl.inference.em.engine import Steps, Trajectory

__all__ = ["squarem_point", "squarem_step", "SQUAREM_MAX_STEP"]

# SQUAREM's step length |α| is capped (the scheme's own safeguard against a near-zero
# second difference, which would throw the point arbitrarily far).
SQUAREM_MAX_STEP = 64.0


def squarem_step(steps: Steps, path: Trajectory, theta0: Mapping[str, torch.Tensor]) -> None:
    """One SQUAREM step after the plain EM step ``theta0`` -> ``path.theta``: records the
    extrapolated point (not a convergence test: an extrapolation's gain says nothing of it)
    or, when it is worse than ``path.theta`` or there is none, the plain second step."""
    it = path.n_iter + 1
    theta1, ll1 = path.theta, path.history[-1]
    theta2 = steps.maximise(theta1, path.weights, it)
    jump = squarem_point(steps.fm, theta0, theta1, theta2)
    tried = None if jump is None else _e_step_or_none(steps.fm, jump, steps.hard)
    if tried is not None and tried[0] >= ll1:
        path.extrapolations += 1
        path.advance(jump, *tried, tested=False)
    else:
        path.advance(theta2, *steps.expect(theta2, it), tested=True)


def _e_step_or_none(fm: FactorModel, theta: Mapping[str, torch.Tensor], hard: bool = False):
    """The E-step at an extrapolated point, or ``None`` where it fails (a non-finite
    log-likelihood, or e.g. a Cholesky factor that fails): the point is then rejected."""
    try:
        ll, W = fm.e_step(theta, hard)
    except (RuntimeError, ValueError):
        return None
    return (ll, W) if math.isfinite(ll) else None


def squarem_point(
    fm: FactorModel,
    theta0: Mapping[str, torch.Tensor],
    theta1: Mapping[str, torch.Tensor],
    theta2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor] | None:
    """SQUAREM's extrapolation θ0 - 2α r + α² v (scheme S3, α = -‖r‖/‖v‖ clamped to
    [-SQUAREM_MAX_STEP, -1]; α = -1 gives θ2) of three successive EM iterates, taken in
    unconstrained coordinates so that the point satisfies every constraint. ``None`` when
    there is nothing to extrapolate (a fixed point, or a value on its constraint's boundary,
    e.g. an exact zero probability, whose unconstrained coordinate is infinite)."""
    names = list(theta0)
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    us = [{n: ts[n].inv(th[n]) for n in names} for th in (theta0, theta1, theta2)]
    if not all(bool(torch.isfinite(u[n]).all()) for u in us for n in names):
        return None
    r = {n: us[1][n] - us[0][n] for n in names}
    v = {n: us[2][n] - 2 * us[1][n] + us[0][n] for n in names}
    rr = sum(float(t.square().sum()) for t in r.values())
    vv = sum(float(t.square().sum()) for t in v.values())
    if vv == 0.0 or rr == 0.0:
        return None
    alpha = max(-math.sqrt(rr / vv), -SQUAREM_MAX_STEP)
    if alpha >= -1.0:
        return None  # the plain second step: nothing gained by a third evaluation
    out = {}
    for n in names:
        u = us[0][n] - 2 * alpha * r[n] + alpha**2 * v[n]
        out[n] = ts[n](u)
    return out
