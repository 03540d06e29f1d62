"""EM's closed-form M-step updates, one function per family and slot.

Each is the exact conditional maximiser of Q(θ) in the free variable(s) it updates, given
the E-step's weights ``W`` and the other variables in ``theta`` (+ the conjugate prior's
terms for a MAP global; ``reg``: the ``reg_covar`` added to variances). Cells with no
posterior mass leave Q flat, and keep their old value. The table that says which applies
where is :data:`jointkl.inference.em.mstep.CLOSED_FORMS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jointkl.inference.em.factors import index_part
from jointkl.inference.em.gaussian import (
    DIAGONAL_VIEWS,
    data_moments,
    diagonal_features,
    diagonal_sd,
    moment_parts,
    mvn_tril,
    weighted_diagonal,
    weighted_moments,
)
from jointkl.inference.em.statistics import (
    Theta,
    Weights,
    component_bernoulli_sums,
    counts,
    scatter,
    target_shape,
    to_param,
    trailing,
    weighted_sums,
    wsum,
)

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel
    from jointkl.inference.em.mstep import Update

__all__ = [
    "SingularCovariance",
    "categorical_update",
    "mean_update",
    "normal_loc_update",
    "normal_scale_update",
    "mvn_loc_update",
    "mvn_scale_update",
]


class SingularCovariance(ArithmeticError):
    """A covariance estimate is not positive definite (a component on too few points)."""


def _keep_old(new: torch.Tensor, old: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    # A cell with no posterior mass leaves Q flat in it: any value maximises; keep the old.
    return torch.where(empty, old, new)


def categorical_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """Probability vectors: counts (+ Dirichlet α - 1), normalised."""
    name = up.names[0]
    old = theta[name]
    return categorical_from_counts(counts(fm, theta, W, name, up.uses, old.dtype), old, up)


def categorical_from_counts(
    c: torch.Tensor, old: torch.Tensor, up: Update
) -> dict[str, torch.Tensor]:
    """:func:`categorical_update` from the counts ``c`` (in the layout of ``old``)."""
    name = up.names[0]
    tiny = torch.finfo(old.dtype).tiny
    if up.prior:
        c = (c + up.prior[1]["alpha"] - 1).clamp_min(0)
    tot = c.sum(-1, keepdim=True)
    p = c / tot.clamp_min(tiny)
    p = _keep_old(p, old if up.view == "identity" else old.softmax(-1), tot == 0)
    return {name: p if up.view == "identity" else p.clamp_min(tiny).log()}


def mean_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """Bernoulli probabilities and Poisson rates: the weighted mean Σ w x / Σ w, with a
    conjugate prior's pseudo-counts (Beta(a, b): a - 1 ones and b - 1 zeros; Gamma(a, b):
    a - 1 counts over b points), in the view's coordinates (logits, log-rates)."""
    old = theta[up.names[0]]
    dtype = old.dtype
    if up.kind == "bernoulli" and len(up.uses) == 1:
        sums = component_bernoulli_sums(fm, W, up.uses[0], tuple(old.shape))
        if sums is not None and sums[0].dtype == dtype:
            return mean_from_sums(*sums, old, up)
    s0, s1 = weighted_sums(
        fm, theta, W, up.uses, old.shape, dtype, lambda gi: (None, fm.value(gi, dtype).to(dtype))
    )
    return mean_from_sums(s0, s1, old, up)


def mean_from_sums(
    s0: torch.Tensor, s1: torch.Tensor, old: torch.Tensor, up: Update
) -> dict[str, torch.Tensor]:
    """:func:`mean_update` from the sums ``s0 = Σ w`` and ``s1 = Σ w x`` (layout of ``old``)."""
    name = up.names[0]
    tiny = torch.finfo(old.dtype).tiny
    bernoulli = up.kind == "bernoulli"
    if up.prior:
        a, b = up.prior[1]["a"], up.prior[1]["b"]
        s1, s0 = (s1 + a - 1, s0 + a + b - 2) if bernoulli else ((s1 + a - 1).clamp_min(0), s0 + b)
    mean = s1 / s0.clamp_min(tiny)
    if bernoulli:
        p = mean.clamp(0, 1)
        # A logit cannot hold an exact 0 or 1; ±30 is 1e-13 from it.
        new = torch.logit(p).clamp(-30, 30) if up.view == "sigmoid" else p
    else:
        new = mean.clamp_min(tiny).log() if up.view == "exp" else mean
    return {name: _keep_old(new, old, s0 <= 0)}


def normal_loc_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """Normal means given the scales: precision-weighted means (+ a Normal prior)."""
    name = up.names[0]
    old = theta[name]

    def precision_and_data(gi: int) -> tuple[torch.Tensor, torch.Tensor]:
        view, (sc,) = fm.slot_inputs(gi, "scale", theta)
        sd = sc.exp() if view == "exp" else sc
        return sd.pow(-2), fm.value(gi, old.dtype)

    s0, s1 = weighted_sums(fm, theta, W, up.uses, old.shape, old.dtype, precision_and_data)
    if up.prior:
        m, s = up.prior[1]["loc"], up.prior[1]["scale"]
        s1, s0 = s1 + m / s**2, s0 + 1 / s**2
    return {name: _keep_old(s1 / s0.clamp_min(torch.finfo(old.dtype).tiny), old, s0 <= 0)}


def normal_scale_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """Normal scales given the means: sqrt(Σ w (x - mu)^2 / Σ w + reg)."""
    name = up.names[0]
    old = theta[name]

    def squared_residuals(gi: int) -> tuple[None, torch.Tensor]:
        _, (mu,) = fm.slot_inputs(gi, "loc", theta)
        return None, (fm.value(gi, old.dtype) - mu).square()

    s0, s2 = weighted_sums(fm, theta, W, up.uses, old.shape, old.dtype, squared_residuals)
    sd = (s2 / s0.clamp_min(torch.finfo(old.dtype).tiny) + reg).sqrt()
    new = sd.log() if up.view == "exp" else sd
    return {name: _keep_old(new, old, s0 <= 0)}


def mvn_loc_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """MultivariateNormal means given the covariances: weighted means per cell (read off
    the cached weighted moments where they apply), or with a Normal prior N(m, diag s^2)
    the solution of (n P + S^-1) mu = P Σwx + S^-1 m."""
    name = up.names[0]
    old = theta[name]
    dtype = old.dtype
    ((gi, slot, which),) = up.uses
    x = fm.value(gi, dtype)
    D = x.shape[-1]
    w = trailing(W[gi], 1)
    target = target_shape(fm, gi, slot, which, theta)  # (1, cells.., D)
    S = None
    diagonal = fm.slot_inputs(gi, "scale_tril", theta)[0] in DIAGONAL_VIEWS
    if tuple(target[:-1]) == tuple(W[gi].shape[:-1]) + (1,):  # cells, the plate summed
        g = fm.groups[gi]
        S = weighted_diagonal(g, x, W[gi]) if diagonal else weighted_moments(g, x, W[gi])
    if S is not None:  # the statistics _mvn_scale reads too, in the same pass over W
        if diagonal:
            c = diagonal_features(fm.groups[gi], x)[0]
            m1, n = S[..., D : 2 * D], S[..., -1]
        else:
            c = data_moments(fm.groups[gi], x)[0]
            _, m1, n = moment_parts(S, D)
        s0 = n.reshape(target[:-1] + (1,))
        s1 = (m1 + n.unsqueeze(-1) * c).reshape(target)
    else:
        s0 = wsum(target[:-1] + (1,), w)
        s1 = wsum(target, w, x)
    return mvn_loc_from_sums(fm, theta, up, target, s0, s1)


def mvn_loc_from_sums(
    fm: FactorModel,
    theta: Theta,
    up: Update,
    target: tuple[int, ...],
    s0: torch.Tensor,
    s1: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """:func:`mvn_loc_update` from the sums ``s0 = Σ w`` ``(1, cells.., 1)`` and
    ``s1 = Σ w x`` per cell (``target``, the slot input's canonical layout)."""
    name = up.names[0]
    old = theta[name]
    dtype = old.dtype
    ((gi, slot, which),) = up.uses
    D = target[-1]
    if up.prior is None:
        S0 = to_param(fm, gi, slot, which, old.shape, s0.expand(target))
        S1 = to_param(fm, gi, slot, which, old.shape, s1)
        return {name: _keep_old(S1 / S0.clamp_min(torch.finfo(dtype).tiny), old, S0 <= 0)}
    # MAP with a Normal prior N(m, diag s^2) per cell: (n P + S^-1) mu = P Σwx + S^-1 m.
    g = fm.groups[gi]
    s = g.slots[slot]
    ri = fm.role_index(gi)
    m = index_part(s, which, up.prior[1]["loc"], ri, g.n_axes)
    sp = index_part(s, which, up.prior[1]["scale"], ri, g.n_axes)
    view, ins = fm.slot_inputs(gi, "scale_tril", theta)
    if view in DIAGONAL_VIEWS:
        sd = diagonal_sd(view, ins)
        P = torch.diag_embed(sd.pow(-2).expand(sd.shape[:-1] + (D,)))
    elif view == "precision":
        P = ins[0]
    else:
        P = torch.cholesky_inverse(mvn_tril(view, ins))
    P = P.expand(target + (D,))
    A = s0.unsqueeze(-1) * P + torch.diag_embed(sp.pow(-2).expand(target))
    b = (P @ s1.unsqueeze(-1)).squeeze(-1) + m / sp**2
    mu = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    return {name: to_param(fm, gi, slot, which, old.shape, mu)}


def diagonal_residuals(
    fm: FactorModel,
    gi: int,
    x: torch.Tensor,
    mu: torch.Tensor,
    W: torch.Tensor,
    target: tuple[int, ...],
    view: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Σ w, Σ w (x - mu)^2)`` per cell of a diagonal (``target`` ``(1, cells.., 1, D)``)
    or spherical (``(1, cells.., 1)``, summed over D, the mass times D) view, from the cached
    weighted features Σ w [(x - c)^2, x - c, 1] (:func:`weighted_diagonal`):

        Σ w (x - mu)^2 = Σ w (x - c)^2 - 2 m Σ w (x - c) + m^2 Σ w,   m = mu - c,

    one matrix product with the responsibilities instead of a pass over (cells x points x D)
    differences. ``None`` when the mean is not one per cell or the layout differs (the
    caller sums directly), or where the subtraction cancels more than 8 digits."""
    g = fm.groups[gi]
    D = x.shape[-1]
    cells = tuple(W.shape[:-1])
    spherical = not view.startswith("diag")
    want = cells + ((1,) if spherical else (1, D))
    if tuple(target) != want or tuple(mu.shape) not in (cells + (1, D),):
        return None
    S = weighted_diagonal(g, x, W)
    if S is None:
        return None
    c = diagonal_features(g, x)[0]
    m2, m1, n = S[..., :D], S[..., D : 2 * D], S[..., -1:]
    m = mu.reshape(m1.shape) - c
    s2 = m2 - 2 * m * m1 + n * m.square()
    if not bool(((s2 > 1e-8 * m2) | (m2 == 0)).all()):
        return None
    if spherical:
        return (n * D).reshape(target), s2.sum(-1).reshape(target)
    return n.expand(m1.shape).reshape(target), s2.reshape(target)


def mvn_scale_update(
    fm: FactorModel, theta: Theta, W: Weights, up: Update, reg: float
) -> dict[str, torch.Tensor]:
    """MultivariateNormal scales given the means: per-dimension variances (diag,
    spherical), or the weighted scatter Σ w (x - mu)(x - mu)^T / Σ w + reg I per cell as the
    view needs it (covariance, Cholesky factor, precision, or scales and correlation factor).

    Conjugate priors of the precisions (MAP globals), in the precision's own coordinates:
    Gamma(a, b) on a precision τ gives 1/τ = (Σ w r^2 + 2b) / (Σ w + 2a - 2) (r: residuals,
    summed over the dimensions a spherical precision covers); Wishart(ν, V) on a precision
    matrix P gives P^-1 = (S + V^-1) / (Σ w + ν - D - 1) (S: the weighted scatter). With
    a = 1 and ν = D + 1 the prior adds 2b or V^-1 to the scatter and no pseudo-count."""
    ((gi, slot, which),) = up.uses
    g = fm.groups[gi]
    pname = g.slots[slot].params[which]
    dtype = theta[pname].dtype
    x = fm.value(gi, dtype)
    D = x.shape[-1]
    _, (mu,) = fm.slot_inputs(gi, "loc", theta)
    view = up.view
    if view in DIAGONAL_VIEWS:
        target = target_shape(fm, gi, slot, which, theta)
        moments = diagonal_residuals(fm, gi, x, mu, W[gi], target, view)
        if moments is not None:
            s0, s2 = moments
        elif view.startswith("diag"):
            diff = x - mu
            s2 = wsum(target, trailing(W[gi], 1), diff.square())
            s0 = wsum(target[:-1] + (1,), trailing(W[gi], 1)).expand(target)
        else:
            diff = x - mu
            s2 = wsum(target, W[gi], diff.square().sum(-1))
            s0 = wsum(target, W[gi]) * D
        return diagonal_scale_from_sums(fm, theta, up, s0, s2, reg)
    # Full covariance: Σ = Σ w (x - mu)(x - mu)^T / Σ w per cell, then the view's factor.
    target = target_shape(fm, gi, slot, which, theta)  # (1, cells.., D, D)
    w = trailing(W[gi], 2)
    s0 = wsum(target[:-2] + (1, 1), w).expand(target)
    s2 = scatter(fm, gi, x, mu, W[gi], target)
    return full_scale_from_sums(fm, theta, up, s0, s2, reg)


def diagonal_scale_from_sums(
    fm: FactorModel, theta: Theta, up: Update, s0: torch.Tensor, s2: torch.Tensor, reg: float
) -> dict[str, torch.Tensor]:
    """:func:`mvn_scale_update` of a diagonal or spherical view from ``s0 = Σ w`` (times D
    for a spherical one) and ``s2 = Σ w (x - mu)^2`` per cell of the slot input's layout."""
    ((gi, slot, which),) = up.uses
    pname = fm.groups[gi].slots[slot].params[which]
    old = theta[pname]
    tiny = torch.finfo(old.dtype).tiny
    S2 = to_param(fm, gi, slot, which, old.shape, s2)
    S0 = to_param(fm, gi, slot, which, old.shape, s0)
    if up.prior is not None:  # Gamma(a, b) on the precisions
        a, b = up.prior[1]["a"], up.prior[1]["b"]
        S2, S0 = S2 + 2 * b, S0 + 2 * a - 2
    var = S2 / S0.clamp_min(tiny) + reg
    new = var.reciprocal() if up.view.endswith("precision") else var.sqrt()
    return {pname: _keep_old(new, old, S0 <= 0)}


def full_scale_from_sums(
    fm: FactorModel, theta: Theta, up: Update, s0: torch.Tensor, s2: torch.Tensor, reg: float
) -> dict[str, torch.Tensor]:
    """:func:`mvn_scale_update` of a full-covariance view from ``s0 = Σ w`` and the scatter
    ``s2 = Σ w (x - mu)(x - mu)^T`` per cell, both ``(1, cells.., D, D)``."""
    ((gi, slot, which),) = up.uses
    pname = fm.groups[gi].slots[slot].params[which]
    old = theta[pname]
    dtype = old.dtype
    tiny = torch.finfo(dtype).tiny
    D = s2.shape[-1]
    view = up.view
    S2 = to_param(fm, gi, slot, which, old.shape, s2)
    S0 = to_param(fm, gi, slot, which, old.shape, s0)
    if up.prior is not None:  # Wishart(ν, V) on the precision matrices
        S2 = S2 + up.prior[1]["scale_inv"]
        S0 = S0 + (up.prior[1]["df"] - D - 1)[..., None, None]
    eye = torch.eye(D, dtype=dtype, device=S2.device)
    cov = S2 / S0.clamp_min(tiny) + reg * eye
    empty = S0[..., :1, :1] <= 0
    if view == "covariance":
        return {pname: torch.where(empty, old, cov)}
    L, info = torch.linalg.cholesky_ex(torch.where(empty, eye, cov))
    if bool((info > 0).any()):
        raise SingularCovariance(
            f"the covariance estimate of {pname!r} is singular (a component sits on fewer "
            "than D distinct points); set reg_covar > 0 or use fewer components"
        )
    if view == "identity":
        return {pname: torch.where(empty, old, L)}
    if view == "precision":
        P = torch.cholesky_inverse(L)
        return {pname: torch.where(empty, old, 0.5 * (P + P.transpose(-1, -2)))}
    scales, corr = up.names
    sd = L.square().sum(-1).sqrt()
    C = L / sd.unsqueeze(-1)
    return {
        scales: torch.where(empty[..., 0], theta[scales], sd),
        corr: torch.where(empty, theta[corr], C),
    }
