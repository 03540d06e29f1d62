"""Gaussian log-densities and M-step statistics as matrix products with cached data moments.

A Gaussian log-density is linear in the features Φ = [(x_i - c_i)(x_j - c_j) for i <= j,
x - c, 1] of a point (c: the data's centre), and so are the sufficient statistics of its
M-step. The features of the observed data never change during a fit, so they are computed
once (:class:`GaussianMoments`, kept on the group) and every E-step and M-step is then one
matrix product with them, as scikit-learn computes with precision Cholesky factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jointkl.inference.em.factors import Group

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = [
    "GaussianMoments",
    "data_moments",
    "moment_parts",
    "weighted_moments",
    "linear_log_density",
    "mvn_tril",
    "mvn_log_prob",
    "precision_tril",
    "diagonal_features",
    "weighted_diagonal",
    "diagonal_precision",
    "DIAGONAL_VIEWS",
    "diagonal_sd",
]

# Views of a MultivariateNormal's scale whose covariance is diagonal: per-dimension (or one,
# spherical) standard deviations or precisions.
DIAGONAL_VIEWS = ("diag", "spherical", "diag_precision", "spherical_precision")

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMoments:
    """The moment features of a group's observed data.

    :param data: the tensor they summarise (a group whose data are replaced recomputes them).
    :param centre: the data's mean ``c``, ``(D,)``.
    :param features: Φ of every point, ``(points, D(D+1)/2 + D + 1)``.
    :param spread: the largest squared distance of a point from the centre.
    """

    data: torch.Tensor
    centre: torch.Tensor
    features: torch.Tensor
    spread: float


def data_moments(g: Group, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centre ``c`` and the features Φ = [(x_i - c_i)(x_j - c_j) for i <= j, x - c, 1] of
    every point, ``(points, D(D+1)/2 + D + 1)``, cached on the group (the observed values never
    change during a fit), and the largest squared distance from the centre. A Gaussian
    log-density is linear in Φ, and so are the sufficient statistics of its M-step: one matrix
    product each (the upper triangle only: the products are symmetric)."""
    m = g.moments
    if m is None or m.data is not x:  # a group's data are replaced while stacking
        D = x.shape[-1]
        flat = x.reshape(-1, D)
        c = flat.mean(0)
        xc = flat - c
        i, j = torch.triu_indices(D, D, device=x.device)
        phi = torch.cat([xc[:, i] * xc[:, j], xc, torch.ones_like(xc[:, :1])], -1)
        m = GaussianMoments(x, c, phi, float(xc.square().sum(-1).max()))
        g.moments = m
    return m.centre, m.features, m.spread


def moment_parts(S: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split statistics Σ w Φ ``(..., F)`` into the scatter ``(..., D, D)``, the first moment
    ``(..., D)`` (both about the data's centre) and the mass ``(...)``."""
    n_u = D * (D + 1) // 2
    i, j = torch.triu_indices(D, D, device=S.device)
    m2 = S.new_zeros(S.shape[:-1] + (D, D))
    m2[..., i, j] = S[..., :n_u]
    m2[..., j, i] = S[..., :n_u]
    return m2, S[..., n_u : n_u + D], S[..., -1]


def weighted_moments(g: Group, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
    """Σ_n W[cell, n] Φ_n per cell, ``(cells, F)``: the scatter, first moment and
    mass of every cell about the data's centre in one pass over the weights (the M-step's
    Gaussian updates all read it). Kept on the group for the weights tensor ``W`` (the mean
    and the covariance update of one M-step share it); ``None`` unless ``W`` is
    ``(1, *cells, points)`` over one plate of observations ``(1, 1.., points, D)``."""
    if len(g.plates) != 1 or x.dim() != W.dim() + 1 or W.shape[0] != 1 or x.shape[0] != 1:
        return None
    if W.shape[-1] != x.shape[-2] or any(n != 1 for n in x.shape[1:-2]):
        return None
    if g.weighted is not None and g.weighted[0] is W:
        return g.weighted[1]
    _, phi, _ = data_moments(g, x)
    cells = W.shape[1:-1]
    S = W.reshape(-1, W.shape[-1]) @ phi
    S = S.reshape(cells + (phi.shape[-1],))
    g.weighted = (W, S)
    return S


def per_cell(g: Group, mu: torch.Tensor, L: torch.Tensor) -> bool:
    """A mean and a Cholesky factor per cell of the roles, the same for every row and point."""
    n_r, n_p = len(g.cards), len(g.plates)
    plates = slice(1 + n_r, 1 + n_r + n_p)
    return (
        g.n_event == 0
        and L.shape[0] == 1
        and mu.shape[0] == 1
        and all(n == 1 for n in L.shape[plates])
        and all(n == 1 for n in mu.shape[plates])
    )


def quadratic_log_density(
    g: Group, x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gaussian log-densities of every point under every cell as one matrix product with the
    cached features Φ (see :func:`data_moments`), returned as ``(Φ, coef)``:

        log N(x | mu, L L^T) = <(x-c)(x-c)^T, -P/2> + (x-c)^T P m - m^T P m / 2
                               - log|L| - D/2 log 2π,      P = (L L^T)^-1, m = mu - c,

    instead of passes over (cells x points x D) differences. Used only while the data's
    spread over the tightest component is below 1e8 (cancellation then costs < 1e-8 of a
    distance of order one); ``None`` otherwise.

    :param x: the group's data; ``mu``, ``L``: mean and Cholesky factor per cell.
    """
    D = x.shape[-1]
    if x.shape[0] != 1 or not torch.is_floating_point(x) or x.dtype != torch.float64:
        return None
    c, phi, spread = data_moments(g, x)
    eye = torch.eye(D, dtype=L.dtype, device=L.device)
    Lf = L.reshape(-1, D, D)
    Linv = torch.linalg.solve_triangular(Lf, eye, upper=False)  # (C, D, D)
    if spread * float(Linv.detach().square().sum((-1, -2)).max()) > 1e8:
        return None
    P = Linv.transpose(-1, -2) @ Linv
    mc = mu.reshape(-1, D).expand(P.shape[0], D) - c  # (C, D)
    Pm = (P @ mc.unsqueeze(-1)).squeeze(-1)
    logdet = Lf.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    const = -0.5 * (mc * Pm).sum(-1) - logdet - 0.5 * D * LOG_2PI
    i, j = torch.triu_indices(D, D, device=P.device)
    # <outer, -P/2> over the upper triangle: off-diagonal products stand for two entries.
    quad = -0.5 * P[:, i, j] * torch.where(i == j, 1.0, 2.0).to(P.dtype)
    coef = torch.cat([quad, Pm, const.unsqueeze(-1)], -1)  # (C, F)
    return phi, coef


def diagonal_features(g: Group, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centre ``c`` and the diagonal features Φ_d = [(x - c)^2, x - c, 1] of every point,
    ``(points, 2D + 1)``, cached on the group, and the largest squared distance from the
    centre. A Gaussian with diagonal (or spherical) covariance has a log-density linear in
    Φ_d, and its M-step statistics are Σ w Φ_d: one matrix product each, without the
    D(D + 1)/2 cross products of :func:`data_moments`."""
    cached = g.features.get("diagonal")
    if cached is None or cached[0] is not x:
        D = x.shape[-1]
        flat = x.reshape(-1, D)
        c = flat.mean(0)
        xc = flat - c
        phi = torch.cat([xc.square(), xc, torch.ones_like(xc[:, :1])], -1)
        cached = (x, c, phi, float(xc.square().sum(-1).max()))
        g.features["diagonal"] = cached
        g.features.pop("diagonal:weighted", None)
    return cached[1], cached[2], cached[3]


def weighted_diagonal(g: Group, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
    """Σ_n W[cell, n] Φ_d,n per cell, ``(cells, 2D + 1)``: the per-dimension scatter, the
    first moment and the mass of every cell about the data's centre (see
    :func:`diagonal_features`), kept on the group for the weights tensor ``W`` (the mean and
    the variance update of one M-step share it); ``None`` unless ``W`` is
    ``(1, *cells, points)`` over one plate of observations ``(1, 1.., points, D)``."""
    if len(g.plates) != 1 or x.dim() != W.dim() + 1 or W.shape[0] != 1 or x.shape[0] != 1:
        return None
    if W.shape[-1] != x.shape[-2] or any(n != 1 for n in x.shape[1:-2]):
        return None
    cached = g.features.get("diagonal:weighted")
    if cached is not None and cached[0] is W and cached[1] is x:
        return cached[2]
    _, phi, _ = diagonal_features(g, x)
    cells = W.shape[1:-1]
    S = (W.reshape(-1, W.shape[-1]) @ phi).reshape(cells + (phi.shape[-1],))
    g.features["diagonal:weighted"] = (W, x, S)
    return S


def diagonal_precision(view: str, ins: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Precisions (..., D or 1) of a diagonal view's input (read directly from a precision
    view, so that no rounding of a square root enters)."""
    t = ins[0]
    lam = t if view.endswith("precision") else t.pow(-2)
    return lam if view.startswith("diag") else lam.unsqueeze(-1)


def diagonal_log_density(
    g: Group, x: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Diagonal-Gaussian log-densities of every point under every cell as one matrix product
    with the cached features Φ_d (see :func:`diagonal_features`), returned as
    ``(Φ_d, coef)``: with m = mu - c and precisions λ,

        log N(x | mu, diag(1/λ)) = Σ_d [ -λ_d (x_d - c_d)^2 / 2 + λ_d m_d (x_d - c_d)
                                         - λ_d m_d^2 / 2 + log(λ_d) / 2 ] - D/2 log 2π,

    two matrix products' worth instead of a pass over (cells x points x D) differences.
    Used only while the data's spread times the largest precision is below 1e8 (as
    :func:`quadratic_log_density`); ``None`` otherwise.

    :param x: the group's data; ``mu`` ``(.., D)``, ``lam`` ``(.., D or 1)``: per cell."""
    D = x.shape[-1]
    if x.shape[0] != 1 or not torch.is_floating_point(x) or x.dtype != torch.float64:
        return None
    c, phi, spread = diagonal_features(g, x)
    lam = lam.reshape(-1, lam.shape[-1])
    if spread * float(lam.detach().max()) > 1e8:
        return None
    C = max(lam.shape[0], mu.reshape(-1, D).shape[0])
    lam = lam.expand(C, D)
    mc = mu.reshape(-1, D).expand(C, D) - c
    lm = lam * mc
    const = -0.5 * (lm * mc).sum(-1) + 0.5 * lam.log().sum(-1) - 0.5 * D * LOG_2PI
    coef = torch.cat([-0.5 * lam, lm, const.unsqueeze(-1)], -1)  # (C, 2D + 1)
    return phi, coef


def bernoulli_features(g: Group, x: torch.Tensor) -> torch.Tensor:
    """The features Φ_b = [x, 1] of every point, ``(points, D + 1)``, cached on the group."""
    cached = g.features.get("bernoulli")
    if cached is None or cached[0] is not x:
        flat = x.reshape(-1, x.shape[-1])
        cached = (x, torch.cat([flat, torch.ones_like(flat[:, :1])], -1))
        g.features["bernoulli"] = cached
    return cached[1]


def bernoulli_log_density(
    g: Group, x: torch.Tensor, view: str, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Log-likelihoods of every point's D binary observations (one event) under every cell
    as one matrix product with Φ_b = [x, 1] (see :func:`bernoulli_features`):

        Σ_d x_d log p_d + (1 - x_d) log(1 - p_d) = Σ_d x_d logit(p_d) + Σ_d log(1 - p_d),

    linear in x. ``None`` when a probability is exactly 0 or 1 (its logit is infinite; the
    elementwise table scores the matching value 0 there).

    :param view: ``"identity"`` (``t`` holds probabilities) or ``"sigmoid"`` (logits);
        ``t``: ``(.., D)`` per cell."""
    if x.shape[0] != 1 or not torch.is_floating_point(x):
        return None
    D = x.shape[-1]
    t = t.reshape(-1, D)
    if view == "sigmoid":
        logit, log1m = t, torch.nn.functional.logsigmoid(-t)
    else:
        if bool(((t <= 0) | (t >= 1)).any()):
            return None
        log1m = torch.log1p(-t)
        logit = t.log() - log1m
    if not bool(torch.isfinite(logit).all()):
        return None
    coef = torch.cat([logit, log1m.sum(-1, keepdim=True)], -1)  # (C, D + 1)
    return bernoulli_features(g, x), coef


def linear_log_density(
    fm: FactorModel, i: int, theta: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Φ, coef)`` with group ``i``'s table = Φ @ coef^T laid out ``(points, cells)``, for a
    Gaussian (full, diagonal or spherical covariance) or a Bernoulli vector of observed
    data with parameters per cell (a mixture's components); ``None`` for any other group.
    Lets a mixture's E-step evaluate its table a block of points at a time instead of
    writing the whole table out."""
    g = fm.groups[i]
    if g.kind != "recipe" or g.value != "data" or g.mask is not None:
        return None
    cells = slice(1, 1 + len(g.cards))
    if g.family == "bernoulli" and g.n_event == 1:
        view, ins = fm.slot_inputs(g, "probs", theta)
        if view not in ("identity", "sigmoid"):
            return None
        t = ins[0]
        plates = t.shape[1 + len(g.cards) : 1 + len(g.cards) + len(g.plates)]
        if t.shape[0] != 1 or any(n != 1 for n in plates) or t.shape[cells] != g.cards:
            return None
        return bernoulli_log_density(g, g.data, view, t)
    if g.family != "mvn" or g.n_event:
        return None
    sv = {k: fm.slot_inputs(g, k, theta) for k in g.slots}
    view, ins = sv["scale_tril"]
    if view == "const" or sv["loc"][0] == "const":
        return None
    if view in DIAGONAL_VIEWS:
        mu, lam = sv["loc"][1][0], diagonal_precision(view, ins)
        if not per_cell(g, mu, lam) or lam.shape[cells] != g.cards or mu.shape[cells] != g.cards:
            return None
        return diagonal_log_density(g, g.data, mu, lam)
    mu, L = sv["loc"][1][0], mvn_tril(view, ins)
    if not per_cell(g, mu, L) or L.shape[cells] != g.cards or mu.shape[cells] != g.cards:
        return None
    return quadratic_log_density(g, g.data, mu, L)


def precision_tril(P: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L of the covariance P^-1 (L L^T = P^-1), as torch's
    MultivariateNormal(precision_matrix=P) holds it: with P = U U^T (U lower), L = U^-T is
    upper triangular, so it is computed on the flipped matrix, where it is lower."""
    flip = torch.flip(P, (-2, -1))
    Lf = torch.linalg.cholesky(flip)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    # flip(P) = Lf Lf^T  =>  P^-1 = flip(Lf^-T Lf^-1): the factor flip(Lf^-T) is lower.
    inv = torch.linalg.solve_triangular(Lf, eye, upper=False)
    return torch.flip(inv.transpose(-1, -2), (-2, -1))


def diagonal_sd(view: str, ins: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Standard deviations (..., D or 1) of a diagonal view's input."""
    t = ins[0]
    sd = t.rsqrt() if view.endswith("precision") else t
    return sd if view.startswith("diag") else sd.unsqueeze(-1)


def mvn_tril(view: str, ins: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Cholesky factor a full-covariance view describes."""
    if view == "scaled_corr":
        return ins[0].unsqueeze(-1) * ins[1]
    if view == "covariance":
        return torch.linalg.cholesky(ins[0])
    if view == "precision":
        return precision_tril(ins[0])
    return ins[0]


def mvn_log_prob(sv: dict[str, Any], x: torch.Tensor, g: Group) -> torch.Tensor:
    """MultivariateNormal log-density table (see :mod:`jointkl.inference.em.families` for
    the arguments): per-dimension for diagonal and spherical views; for full covariances one
    matrix product with the cached moments where the parameters are per cell, else one
    triangular solve per point."""
    _, (mu,) = sv["loc"]
    view, ins = sv["scale_tril"]
    D = x.shape[-1]
    if view in DIAGONAL_VIEWS:
        s = diagonal_sd(view, ins)
        z = (x - mu) / s
        return (-0.5 * z**2 - s.log()).sum(-1) - 0.5 * D * LOG_2PI
    L = mvn_tril(view, ins)
    logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    n_r, n_p = len(g.cards), len(g.plates)
    plates = slice(1 + n_r, 1 + n_r + n_p)
    fast = per_cell(g, mu, L)
    if fast and g.value == "data" and x is g.data:
        form = quadratic_log_density(g, x, mu, L)
        if form is not None:
            phi, coef = form
            lp = phi @ coef.T  # (points, cells): the layout a mixture's E-step normalises in
            return lp.T.reshape(L.shape[1 : 1 + n_r] + x.shape[plates]).unsqueeze(0)
    if fast:
        # One (points x D) @ (D x D) product per cell, as scikit-learn does with precision
        # Cholesky factors: no per-point triangular solves.
        eye = torch.eye(D, dtype=L.dtype, device=L.device)
        Lt = torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)
        Lt = Lt.reshape(Lt.shape[: 1 + n_r] + (D, D))
        xs = x.reshape(x.shape[: 1 + n_r] + (-1, D))
        m = mu.reshape(mu.shape[: 1 + n_r] + (-1, D))
        y = xs @ Lt - m @ Lt
        maha = y.square().sum(-1)
        maha = maha.reshape(maha.shape[: 1 + n_r] + x.shape[plates])
    else:
        diff = x - mu
        Lb = L.expand(diff.shape + (D,))
        y = torch.linalg.solve_triangular(Lb, diff.unsqueeze(-1), upper=False).squeeze(-1)
        maha = y.square().sum(-1)
    return -0.5 * maha - logdet - 0.5 * D * LOG_2PI
