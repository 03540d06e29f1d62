"""EM's M-step: maximise Q(θ) = Σ_tables ⟨posterior weights, log-density table(θ)⟩.

The M-step is a sequence of conditional maximisations (ECM, Meng & Rubin 1993), each of which
cannot lower Q, so the marginal likelihood never decreases:

1. probabilities: Categorical / Bernoulli / Poisson parameters (counts over weights);
2. locations: Normal and MultivariateNormal means, given the current scales;
3. scales: variances / covariance factors, given the new means;
4. everything else, jointly, by L-BFGS on Q in unconstrained coordinates (the gradient
   M-step), reverted if it would lower Q.

A free variable gets a closed form (steps 1-3) when every table it enters is a ``recipe`` table
(see :mod:`jointkl.inference.em.compile`) of one family, slot and view, and its prior (for a
MAP global) is conjugate there: Dirichlet for probability vectors, Beta for Bernoulli
probabilities, Gamma for Poisson rates, Normal for means. Mean and covariance updates of a
MultivariateNormal also need the covariance to vary only where the mean does (per component,
or shared), which makes the mean update independent of it, as in scikit-learn. Everything
else (a prior that is not conjugate, a parameter used in arithmetic the engine cannot see
through, a parameter shared between families) goes to step 4.

Sufficient statistics are weighted sums over the tables' axes (one einsum each); they are
mapped back to the free variable's own shape by the adjoint of the recipe's indexing (a
vector-Jacobian product), which also sums statistics over shared or tied cells.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import opt_einsum
import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import index_part, transform_for
from jointkl.inference.em.families import unwrap
from jointkl.inference.em.gaussian import data_moments, moment_parts, mvn_tril, weighted_moments

from jointkl.chain import broadcast_shapes

__all__ = ["Update", "plan_updates", "m_step", "gradient_step", "SingularCovariance", "wsum"]


class SingularCovariance(ArithmeticError):
    """A covariance estimate is not positive definite (a component on too few points)."""


@dataclass
class Update:
    """A closed-form conditional maximisation of the free variables ``names``."""

    kind: str
    names: tuple[str, ...]
    uses: list[tuple[int, str, int]]  # (group, slot, which input of the slot)
    view: str
    prior: tuple[str, dict[str, torch.Tensor]] | None = None
    stage: int = 0
    info: dict[str, Any] = field(default_factory=dict)


STAGE = {
    "categorical": 0,
    "bernoulli": 0,
    "poisson": 0,
    "normal_loc": 1,
    "mvn_loc": 1,
    "normal_scale": 2,
    "mvn_scale": 2,
}


# --------------------------------------------------------------------------- planning
def _prior(fm: FactorModel, name: str) -> tuple[str, dict[str, torch.Tensor]] | None | bool:
    """``None`` (no prior: a pyro.param), a recognised prior, or ``False`` (not conjugate)."""
    free = fm.free[name]
    if free.kind == "param":
        return None
    groups = [g for g in fm.groups if g.kind == "fixed" and g.fn is not None and g.free == name]
    if not groups:
        return False
    fn, _ = unwrap(groups[0].fn)
    shape = free.shape
    dists = torch.distributions
    if isinstance(fn, dists.Dirichlet):
        return "dirichlet", {"alpha": fn.concentration.expand(shape)}
    if isinstance(fn, dists.Beta):
        return "beta", {"a": fn.concentration1.expand(shape), "b": fn.concentration0.expand(shape)}
    if isinstance(fn, dists.Gamma):
        return "gamma", {"a": fn.concentration.expand(shape), "b": fn.rate.expand(shape)}
    if isinstance(fn, dists.Normal):
        return "normal", {"loc": fn.loc.expand(shape), "scale": fn.scale.expand(shape)}
    return False


def plan_updates(fm: FactorModel) -> tuple[list[Update], list[str]]:
    """Closed-form updates, in the order to apply them, and the free variables left to the
    gradient M-step (see the module docstring for the rules)."""
    uses: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for gi, g in enumerate(fm.groups):
        if g.kind == "recipe":
            for sname, s in g.slots.items():
                for w, p in enumerate(s.params):
                    uses[p].append((gi, sname, w))
    traced = set().union(*(g.depends for g in fm.groups if g.kind == "traced"))
    closed: list[Update] = []
    taken: set[str] = set()
    for name in fm.free:
        if name in taken or name in traced or not uses.get(name):
            continue
        u = uses[name]
        kinds = {(fm.groups[gi].family, s, fm.groups[gi].slots[s].view, w) for gi, s, w in u}
        if len(kinds) != 1:
            continue
        family, slot, view, which = kinds.pop()
        prior = _prior(fm, name)
        if prior is False:
            continue
        pk = prior[0] if prior else None
        upd = None
        if family == "categorical" and (pk is None or (pk == "dirichlet" and view == "identity")):
            upd = Update("categorical", (name,), u, view, prior)
        elif family == "bernoulli" and (pk is None or (pk == "beta" and view == "identity")):
            upd = Update("bernoulli", (name,), u, view, prior)
        elif family == "poisson" and (pk is None or (pk == "gamma" and view == "identity")):
            upd = Update("poisson", (name,), u, view, prior)
        elif family == "normal" and slot == "loc" and pk in (None, "normal"):
            upd = Update("normal_loc", (name,), u, view, prior)
        elif family == "normal" and slot == "scale" and pk is None:
            upd = Update("normal_scale", (name,), u, view, prior)
        elif family == "mvn" and slot == "loc" and len(u) == 1 and pk in (None, "normal"):
            if _mvn_loc_ok(fm, u[0][0], name, pk):
                upd = Update("mvn_loc", (name,), u, view, prior)
        elif family == "mvn" and slot == "scale_tril" and len(u) == 1 and pk is None:
            if view != "scaled_corr":
                upd = Update("mvn_scale", (name,), u, view, prior)
            else:
                pair = fm.groups[u[0][0]].slots["scale_tril"].params
                other = pair[1 - which]
                if (
                    other not in traced
                    and len(uses[other]) == 1
                    and _prior(fm, other) is None
                    and fm.groups[u[0][0]].slots["scale_tril"].index[0]
                    == fm.groups[u[0][0]].slots["scale_tril"].index[1]
                ):
                    upd = Update("mvn_scale", pair, [(u[0][0], "scale_tril", 1)], view, None)
        if upd is not None:
            upd.stage = STAGE[upd.kind]
            closed.append(upd)
            taken.update(upd.names)
    closed.sort(key=lambda up: up.stage)
    gradient = [n for n in fm.free if n not in taken]
    return closed, gradient


def _mvn_loc_ok(fm: FactorModel, gi: int, name: str, prior_kind: str | None) -> bool:
    """The covariance must vary only along axes the mean varies along (so the weighted mean
    is the conditional maximiser); with a Normal prior each mean row must be one cell."""
    g = fm.groups[gi]
    _, (loc,) = fm.slot_inputs(gi, "loc", fm.init)
    _, ins = fm.slot_inputs(gi, "scale_tril", fm.init)
    n = 1 + g.n_axes
    for t in ins:
        for a in range(n):
            if loc.shape[a] == 1 and t.shape[a] != 1:
                return False
    if prior_kind == "normal":
        s = g.slots["loc"]
        idx = s.index[0]
        roles = [a for kind, a in idx if kind == "role"]
        if s.pad[0] or len(roles) != len(idx) or len(set(roles)) != len(roles):
            return False
        if len(idx) != len(fm.free[name].shape) - 1:
            return False
    return True


# --------------------------------------------------------------------------- statistics
def wsum(target: tuple[int, ...], *ops: torch.Tensor, full: tuple[int, ...] | None = None):
    """Σ of the broadcast product of ``ops`` over the axes where ``target`` has size 1
    (kept as size 1). All tensors have ``len(target)`` dims. ``full`` is the size the
    product really has along axes every op broadcasts (each counts that many times)."""
    nd = len(target)
    letters = [opt_einsum.get_symbol(i) for i in range(nd)]
    subs, squeezed = [], []
    present = set()
    for t in ops:
        keep = [a for a in range(nd) if t.shape[a] != 1]
        present.update(keep)
        subs.append("".join(letters[a] for a in keep))
        squeezed.append(t.reshape([t.shape[a] for a in keep]))
    out_axes = [a for a in range(nd) if target[a] != 1 and a in present]
    eq = ",".join(subs) + "->" + "".join(letters[a] for a in out_axes)
    res = torch.einsum(eq, *squeezed)
    shape = [target[a] if a in out_axes else 1 for a in range(nd)]
    res = res.reshape(shape)
    if full is not None:
        mult = 1
        for a in range(nd):
            if target[a] == 1 and a not in present:
                mult *= full[a]
        if mult != 1:
            res = res * mult
    return res.expand(target)


def _to_param(fm: FactorModel, gi: int, slot: str, which: int, shape, stat: torch.Tensor):
    """Map statistics in a slot's canonical layout to the free variable's layout: the
    adjoint (vector-Jacobian product) of the recipe's indexing. ``shape`` may add trailing
    dims to the variable's (statistics that are matrices per mean vector, say)."""
    g = fm.groups[gi]
    s = g.slots[slot]
    dummy = torch.zeros(shape, dtype=stat.dtype, device=stat.device, requires_grad=True)
    with torch.enable_grad():
        out = index_part(s, which, dummy, fm.role_index(gi), g.n_axes)
        (grad,) = torch.autograd.grad(out, dummy, grad_outputs=stat.sum_to_size(out.shape))
    return grad


def _target(fm: FactorModel, gi: int, slot: str, which: int, theta) -> tuple[int, ...]:
    """Shape of a slot input in canonical layout: what its statistics are reduced to."""
    g = fm.groups[gi]
    s = g.slots[slot]
    v = theta[s.params[which]]
    return tuple(index_part(s, which, v, fm.role_index(gi), g.n_axes).shape)


def _weights(W: torch.Tensor, trailing: int) -> torch.Tensor:
    return W.reshape(W.shape + (1,) * trailing)


def _full(*shapes) -> tuple[int, ...]:
    return tuple(broadcast_shapes(*(tuple(s) for s in shapes)))


# --------------------------------------------------------------------------- updates
def _keep_old(new: torch.Tensor, old: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    # A cell with no posterior mass leaves Q flat in it: any value maximises; keep the old.
    return torch.where(empty, old, new)


def _counts(fm, theta, W, up: Update, dtype):
    """Σ weights x [value == k] for probability vectors."""
    name = up.names[0]
    total = torch.zeros(fm.free[name].shape, dtype=dtype)
    for gi, slot, which in up.uses:
        g = fm.groups[gi]
        K = fm.free[name].shape[-1]
        x = fm.value(gi, dtype)
        onehot = torch.nn.functional.one_hot(x.long(), K).to(dtype)
        w = _weights(W[gi], g.n_event + 1)
        target = _target(fm, gi, slot, which, theta)
        stat = wsum(target, w, onehot)
        total = total + _to_param(fm, gi, slot, which, theta[name].shape, stat)
    return total


def _moments(fm, theta, W, up: Update, dtype):
    """(Σ w, Σ w x) in the free variable's layout, for Bernoulli and Poisson parameters."""
    name = up.names[0]
    s0 = torch.zeros(fm.free[name].shape, dtype=dtype)
    s1 = torch.zeros_like(s0)
    for gi, slot, which in up.uses:
        g = fm.groups[gi]
        x = fm.value(gi, dtype).to(dtype)
        w = _weights(W[gi], g.n_event)
        target = _target(fm, gi, slot, which, theta)
        full = _full(w.shape, x.shape)
        s0 = s0 + _to_param(fm, gi, slot, which, s0.shape, wsum(target, w, full=full))
        s1 = s1 + _to_param(fm, gi, slot, which, s0.shape, wsum(target, w, x))
    return s0, s1


def _apply(fm: FactorModel, theta, W, up: Update, reg: float) -> dict[str, torch.Tensor]:
    name = up.names[0]
    old = theta[name]
    dtype = old.dtype
    tiny = torch.finfo(dtype).tiny
    if up.kind == "categorical":
        c = _counts(fm, theta, W, up, dtype)
        if up.prior:
            c = (c + up.prior[1]["alpha"] - 1).clamp_min(0)
        tot = c.sum(-1, keepdim=True)
        p = c / tot.clamp_min(tiny)
        p = _keep_old(p, old if up.view == "identity" else old.softmax(-1), tot == 0)
        return {name: p if up.view == "identity" else p.clamp_min(tiny).log()}
    if up.kind in ("bernoulli", "poisson"):
        s0, s1 = _moments(fm, theta, W, up, dtype)
        if up.kind == "bernoulli":
            if up.prior:
                a, b = up.prior[1]["a"], up.prior[1]["b"]
                s1, s0 = s1 + a - 1, s0 + a + b - 2
            p = (s1 / s0.clamp_min(tiny)).clamp(0, 1)
            if up.view == "sigmoid":
                # A logit cannot hold an exact 0 or 1; ±30 is 1e-13 from it.
                new = torch.logit(p).clamp(-30, 30)
            else:
                new = p
        else:
            if up.prior:
                a, b = up.prior[1]["a"], up.prior[1]["b"]
                s1, s0 = (s1 + a - 1).clamp_min(0), s0 + b
            rate = s1 / s0.clamp_min(tiny)
            new = rate.clamp_min(tiny).log() if up.view == "exp" else rate
        return {name: _keep_old(new, old, s0 <= 0)}
    if up.kind == "normal_loc":
        s0 = torch.zeros_like(old)
        s1 = torch.zeros_like(old)
        for gi, slot, which in up.uses:
            g = fm.groups[gi]
            x = fm.value(gi, dtype)
            w = _weights(W[gi], g.n_event)
            view, (sc,) = fm.slot_inputs(gi, "scale", theta)
            sd = sc.exp() if view == "exp" else sc
            prec = sd.pow(-2)
            target = _target(fm, gi, slot, which, theta)
            full = _full(w.shape, x.shape, prec.shape)
            s0 = s0 + _to_param(fm, gi, slot, which, old.shape, wsum(target, w, prec, full=full))
            s1 = s1 + _to_param(fm, gi, slot, which, old.shape, wsum(target, w, prec, x))
        if up.prior:
            m, s = up.prior[1]["loc"], up.prior[1]["scale"]
            s1, s0 = s1 + m / s**2, s0 + 1 / s**2
        return {name: _keep_old(s1 / s0.clamp_min(tiny), old, s0 <= 0)}
    if up.kind == "normal_scale":
        s0 = torch.zeros_like(old)
        s2 = torch.zeros_like(old)
        for gi, slot, which in up.uses:
            g = fm.groups[gi]
            x = fm.value(gi, dtype)
            w = _weights(W[gi], g.n_event)
            _, (mu,) = fm.slot_inputs(gi, "loc", theta)
            r2 = (x - mu).square()
            target = _target(fm, gi, slot, which, theta)
            full = _full(w.shape, r2.shape)
            s0 = s0 + _to_param(fm, gi, slot, which, old.shape, wsum(target, w, full=full))
            s2 = s2 + _to_param(fm, gi, slot, which, old.shape, wsum(target, w, r2))
        sd = (s2 / s0.clamp_min(tiny) + reg).sqrt()
        new = sd.log() if up.view == "exp" else sd
        return {name: _keep_old(new, old, s0 <= 0)}
    if up.kind == "mvn_loc":
        return _mvn_loc(fm, theta, W, up)
    if up.kind == "mvn_scale":
        return _mvn_scale(fm, theta, W, up, reg)
    raise ValueError(up.kind)


def _mvn_loc(fm, theta, W, up: Update):
    name = up.names[0]
    old = theta[name]
    dtype = old.dtype
    ((gi, slot, which),) = up.uses
    x = fm.value(gi, dtype)
    D = x.shape[-1]
    w = _weights(W[gi], 1)
    target = _target(fm, gi, slot, which, theta)  # (1, cells.., D)
    S = None
    if tuple(target[:-1]) == tuple(W[gi].shape[:-1]) + (1,):  # cells, the plate summed
        S = weighted_moments(fm.groups[gi], x, W[gi])
    if S is not None:  # the statistics _mvn_scale reads too, in the same pass over W
        c = data_moments(fm.groups[gi], x)[0]
        _, m1, n = moment_parts(S, D)
        s0 = n.reshape(target[:-1] + (1,))
        s1 = (m1 + n.unsqueeze(-1) * c).reshape(target)
    else:
        s0 = wsum(target[:-1] + (1,), w)
        s1 = wsum(target, w, x)
    if up.prior is None:
        S0 = _to_param(fm, gi, slot, which, old.shape, s0.expand(target))
        S1 = _to_param(fm, gi, slot, which, old.shape, s1)
        return {name: _keep_old(S1 / S0.clamp_min(torch.finfo(dtype).tiny), old, S0 <= 0)}
    # MAP with a Normal prior N(m, diag s^2) per cell: (n P + S^-1) mu = P Σwx + S^-1 m.
    g = fm.groups[gi]
    s = g.slots[slot]
    ri = fm.role_index(gi)
    m = index_part(s, which, up.prior[1]["loc"], ri, g.n_axes)
    sp = index_part(s, which, up.prior[1]["scale"], ri, g.n_axes)
    view, ins = fm.slot_inputs(gi, "scale_tril", theta)
    if view in ("diag", "spherical"):
        sd = ins[0] if view == "diag" else ins[0].unsqueeze(-1).expand(ins[0].shape + (D,))
        P = torch.diag_embed(sd.pow(-2))
    else:
        P = torch.cholesky_inverse(mvn_tril(view, ins))
    P = P.expand(target + (D,))
    A = s0.unsqueeze(-1) * P + torch.diag_embed(sp.pow(-2).expand(target))
    b = (P @ s1.unsqueeze(-1)).squeeze(-1) + m / sp**2
    mu = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    return {name: _to_param(fm, gi, slot, which, old.shape, mu)}


def _mvn_scale(fm, theta, W, up: Update, reg: float):
    ((gi, slot, which),) = up.uses
    g = fm.groups[gi]
    pname = g.slots[slot].params[which]
    old = theta[pname]
    dtype = old.dtype
    tiny = torch.finfo(dtype).tiny
    x = fm.value(gi, dtype)
    D = x.shape[-1]
    _, (mu,) = fm.slot_inputs(gi, "loc", theta)
    view = up.view
    if view in ("diag", "spherical"):
        diff = x - mu
        target = _target(fm, gi, slot, which, theta)
        if view == "diag":
            s2 = wsum(target, _weights(W[gi], 1), diff.square())
            s0 = wsum(target[:-1] + (1,), _weights(W[gi], 1)).expand(target)
        else:
            s2 = wsum(target, W[gi], diff.square().sum(-1))
            s0 = wsum(target, W[gi]) * D
        S2 = _to_param(fm, gi, slot, which, old.shape, s2)
        S0 = _to_param(fm, gi, slot, which, old.shape, s0)
        sd = (S2 / S0.clamp_min(tiny) + reg).sqrt()
        return {pname: _keep_old(sd, old, S0 <= 0)}
    # Full covariance: Σ = Σ w (x - mu)(x - mu)^T / Σ w per cell, then the view's factor.
    target = _target(fm, gi, slot, which, theta)  # (1, cells.., D, D)
    w = _weights(W[gi], 2)
    s0 = wsum(target[:-2] + (1, 1), w).expand(target)
    s2 = _scatter(fm, gi, x, mu, W[gi], target)
    S2 = _to_param(fm, gi, slot, which, old.shape, s2)
    S0 = _to_param(fm, gi, slot, which, old.shape, s0)
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
    scales, corr = up.names
    sd = L.square().sum(-1).sqrt()
    C = L / sd.unsqueeze(-1)
    return {
        scales: torch.where(empty[..., 0], theta[scales], sd),
        corr: torch.where(empty, theta[corr], C),
    }


def _scatter(
    fm, gi: int, x: torch.Tensor, mu: torch.Tensor, W: torch.Tensor, target
) -> torch.Tensor:
    """Σ w (x - mu)(x - mu)^T per cell of ``target``.

    When the mean is constant within each cell (per component, as usual) this is
    Σ w x x^T - m1 mu^T - mu m1^T + (Σ w) mu mu^T with m1 = Σ w x, whose first term is one
    matrix product with the data's outer products (cached: the data do not change) instead
    of a pass over (cells x points x D) differences. The data are centred first, and where
    the subtraction cancels more than 8 digits of a variance the direct sum is used.
    """
    nb = len(target) - 2
    w = W.reshape(W.shape + (1, 1))
    mean_per_cell = all(mu.shape[a] == 1 or mu.shape[a] == target[a] for a in range(nb)) and all(
        target[a] != 1 or mu.shape[a] == 1 for a in range(nb)
    )
    if mean_per_cell:
        g = fm.groups[gi]
        D = x.shape[-1]
        c, phi, _ = data_moments(g, x)
        S = None
        if tuple(target[:-2]) == tuple(W.shape[:-1]) + (1,):  # cells, the plate summed
            S = weighted_moments(g, x, W)
        if S is not None:
            m2, m1, n = moment_parts(S, D)
            m2 = m2.reshape(target)
            m1 = m1.reshape(target[:-1]).unsqueeze(-1)  # (.., D, 1)
            s0 = n.reshape(target[:-2] + (1, 1))
        else:
            n_u = D * (D + 1) // 2
            xc = phi[:, n_u : n_u + D].reshape(x.shape)
            outer = xc.unsqueeze(-1) * xc.unsqueeze(-2)
            m2 = wsum(target, w, outer)
            m1 = wsum(target[:-1], W.unsqueeze(-1), xc).unsqueeze(-1)  # (.., D, 1)
            s0 = wsum(target[:-2], W).unsqueeze(-1).unsqueeze(-1)
        mc = (mu - c).unsqueeze(-1)
        s2 = (
            m2
            - m1 @ mc.transpose(-1, -2)
            - mc @ m1.transpose(-1, -2)
            + s0 * (mc @ mc.transpose(-1, -2))
        )
        kept = s2.diagonal(dim1=-2, dim2=-1) > 1e-8 * m2.diagonal(dim1=-2, dim2=-1)
        if bool(kept.all()):
            return s2
    diff = x - mu
    return wsum(target, w, diff.unsqueeze(-1), diff.unsqueeze(-2))


# --------------------------------------------------------------------------- gradient M-step
def gradient_step(
    fm: FactorModel,
    theta: Mapping[str, torch.Tensor],
    W: Mapping[int, torch.Tensor],
    names: list[str],
    max_iter: int,
) -> dict[str, torch.Tensor]:
    """Raise Q in ``names`` by L-BFGS (strong Wolfe line search) in unconstrained coordinates;
    returns the new values, or the old ones if Q did not go up (so EM stays monotone)."""
    if not names or max_iter < 1:
        return {}
    which = fm.groups_using(set(names))
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    u = {n: ts[n].inv(theta[n]).detach().clone().requires_grad_() for n in names}
    scale = 1.0 / fm.n_points  # per-point Q keeps L-BFGS's tolerances meaningful

    def q() -> torch.Tensor:
        th = dict(theta)
        th.update({n: ts[n](u[n]) for n in names})
        return fm.expected_log_joint(th, W, which) * scale

    with torch.no_grad():
        q0 = float(q())
    opt = torch.optim.LBFGS(
        list(u.values()),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-13,
    )

    def closure():
        opt.zero_grad()
        loss = -q()
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()
        return loss

    with torch.enable_grad():
        try:
            opt.step(closure)
        except RuntimeError:  # a line search that stepped somewhere the model fails
            return {}
    with torch.no_grad():
        new = {n: ts[n](u[n]).detach() for n in names}
        th = dict(theta)
        th.update(new)
        q1 = float(fm.expected_log_joint(th, W, which) * scale)
    if not math.isfinite(q1) or q1 < q0:
        return {}
    return new


def m_step(
    fm: FactorModel,
    theta: Mapping[str, torch.Tensor],
    W: Mapping[int, torch.Tensor],
    closed: list[Update],
    gradient: list[str],
    reg: float = 0.0,
    max_iter: int = 20,
) -> dict[str, torch.Tensor]:
    """One M-step (closed forms in stage order, then the gradient block)."""
    theta = dict(theta)
    with torch.no_grad():
        for up in closed:
            theta.update(_apply(fm, theta, W, up, reg))
    theta.update(gradient_step(fm, theta, W, gradient, max_iter))
    return theta
