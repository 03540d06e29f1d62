"""The Laplace approximation of an EM fit: EM's posterior draws of θ.

A Gaussian in unconstrained coordinates centred at the fitted θ, whose precision is minus the
Hessian of the (penalised) marginal log-likelihood log p(x | θ) (+ log p(θ)), mapped to the
constrained space. The Hessian goes through the E-step's twice-differentiable path
(:mod:`jointkl.inference.em.estep`).
"""

from __future__ import annotations

from typing import Any

import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for

from jointkl.errors import InputError
from jointkl.fit import Fit

__all__ = ["laplace", "laplace_draws"]


def laplace_draws(
    fit: Fit, num_samples: int, seed: int, num_chains: int = 1
) -> dict[str, torch.Tensor]:
    """``num_chains`` x ``num_samples`` independent draws of every parameter and MAP global
    of ``fit`` from its Laplace approximation, each ``(num_chains, num_samples, *shape)``,
    seeded by ``seed``."""
    lap = laplace(fit)
    gen = torch.Generator().manual_seed(seed)
    mean, factor = lap["mean"], lap["factor"]
    total = num_chains * num_samples
    eps = torch.randn(total, factor.shape[1], generator=gen, dtype=mean.dtype).to(mean.device)
    u = mean + eps @ factor.T
    out, start = {}, 0
    for name, shape, size in zip(lap["names"], lap["shapes"], lap["sizes"], strict=True):
        uu = u[:, start : start + size].reshape((total,) + tuple(shape))
        start += size
        t = transform_for(lap["constraints"][name])
        v = t(uu)  # constrained: a simplex has one coordinate more than its u
        out[name] = v.reshape(num_chains, num_samples, *v.shape[1:])
    return out


def laplace(fit: Fit) -> dict[str, Any]:
    """The Laplace approximation of a fit (computed once, cached in ``fit.state``)."""
    if fit.pair is None:
        raise InputError("this Fit has no model attached; load it with Fit.load(dir, pair=...)")
    dtype = torch.float32 if fit.config.get("dtype") == "float32" else torch.float64
    fm = FactorModel(
        fit.pair.model, fit.args, fit.kwargs, seed=fit.config.get("seed", 0), dtype=dtype
    )
    names = [n for n in fm.free if n in fit.params]
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    theta = {n: fit.params[n].to(dtype) for n in names}
    us = {n: ts[n].inv(theta[n]).detach() for n in names}
    shapes = [tuple(us[n].shape) for n in names]
    sizes = [us[n].numel() for n in names]
    mean = torch.cat([us[n].reshape(-1) for n in names])
    if "laplace:factor" in fit.state:
        factor = fit.state["laplace:factor"].to(dtype)
    else:
        factor = _laplace_factor(fm, names, ts, theta, us, mean, sizes)
        fit.state["laplace:factor"] = factor
    return {
        "names": names,
        "shapes": shapes,
        "sizes": sizes,
        "mean": mean,
        "factor": factor,
        "constraints": {n: fm.free[n].constraint for n in names},
    }


def _laplace_factor(fm, names, ts, theta, us, mean, sizes) -> torch.Tensor:
    """A factor F with F F^T = (-H)^-1 on the coordinates that move the constrained value
    (lower_cholesky's unused upper triangle does not); directions where -H is not positive
    (flat or saddle: e.g. an empty component) get a tiny variance instead."""
    # Active coordinates: a random direction through the transform's Jacobian.
    active = []
    for n in names:
        u = us[n].clone().requires_grad_()
        with torch.enable_grad():
            y = ts[n](u)
            (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), u)
        active.append(g.reshape(-1) != 0)
    active = torch.cat(active)
    idx = active.nonzero().squeeze(-1)

    def f(v):
        u = mean.clone().index_copy(0, idx, v)
        th, start = {}, 0
        for n, size in zip(names, sizes, strict=True):
            th[n] = ts[n](u[start : start + size].reshape(us[n].shape))
            start += size
        return fm.log_partition(_tables(fm, th, fast), twice_differentiable=True)

    fast = _bernoulli_matmul_groups(fm, theta)
    H = _hessian(f, mean[idx].clone())
    P = -(H + H.T) / 2
    lam, V = torch.linalg.eigh(P)
    floor = lam.abs().max().clamp_min(1.0) * 1e-8
    lam = torch.where(lam > floor, lam, floor.expand_as(lam) * 1e8)
    factor = torch.zeros(mean.numel(), idx.numel(), dtype=mean.dtype, device=mean.device)
    factor[idx] = V / lam.sqrt()
    return factor


def _bernoulli_matmul_groups(fm: FactorModel, theta: dict[str, torch.Tensor]) -> list[int]:
    """Recipe groups whose Bernoulli table Σ_d x log p + (1 − x) log(1 − p) can be taken as
    two contractions over the event axis (x · log pᵀ, the matmul form) instead of the
    family's broadcast ``xlogy`` over (components x points x features): identity view, one
    event axis, no mask, and every probability strictly inside (0, 1) at θ (where the two
    forms agree; at an exact 0 or 1 ``xlogy``'s convention 0 log 0 = 0 is kept by falling
    back). Each Hessian-vector product then costs a few small products, not a pass over
    the broadcast intermediate."""
    out = []
    for i, g in enumerate(fm.groups):
        if g.kind != "recipe" or g.family != "bernoulli" or g.n_event != 1 or g.mask is not None:
            continue
        view, inputs = fm.slot_inputs(g, "probs", theta)
        if view != "identity" or len(inputs) != 1:
            continue
        t = inputs[0].detach()
        if bool(((t > 0) & (t < 1)).all()) and bool(torch.isfinite(fm.value(g, t.dtype)).all()):
            out.append(i)
    return out


def _tables(
    fm: FactorModel, theta: dict[str, torch.Tensor], fast: list[int]
) -> dict[int, torch.Tensor]:
    """``fm.tables(theta)``, the groups ``fast`` in the matmul form (see
    :func:`_bernoulli_matmul_groups`; equal to the family's table where it applies)."""
    out = fm.tables(theta, [i for i in range(len(fm.groups)) if i not in fast])
    for i in fast:
        g = fm.groups[i]
        _, (t,) = fm.slot_inputs(g, "probs", theta)
        x = fm.value(g, t.dtype)
        out[i] = torch.einsum("...d,...d->...", x, t.log()) + torch.einsum(
            "...d,...d->...", 1 - x, torch.log1p(-t)
        )
    return dict(sorted(out.items()))


def _hessian(f, v0: torch.Tensor) -> torch.Tensor:
    """Hessian of a scalar function, row by row: one Hessian-vector product (reverse over
    reverse, the gradient's graph kept) per row. Batching the rows (``is_grads_batched``,
    ``torch.func`` forward-over-reverse) was measured slower on CPU: each batched product
    holds per-row copies of the E-step's (points x components x features) intermediates,
    which is memory-bound, while one row at a time reuses the same buffers."""
    n = v0.numel()
    with torch.enable_grad():
        v = v0.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(f(v), v, create_graph=True)
        basis = torch.zeros(n, dtype=v.dtype, device=v.device)
        rows = []
        for i in range(n):
            basis.zero_()[i] = 1.0
            (h,) = torch.autograd.grad(g, v, grad_outputs=basis, retain_graph=True)
            rows.append(h.detach())
    return torch.stack(rows)
