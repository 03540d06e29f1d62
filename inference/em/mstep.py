"""EM's M-step: maximise Q(θ) = Σ_tables ⟨posterior weights, log-density table(θ)⟩.

The M-step is a sequence of conditional maximisations (ECM, Meng & Rubin 1993), each of which
cannot lower Q, so the marginal likelihood never decreases:

1. probabilities: Categorical / Bernoulli / Poisson parameters (counts over weights);
2. locations: Normal and MultivariateNormal means, given the current scales;
3. scales: variances / covariance factors, given the new means;
4. everything else, jointly, by L-BFGS on Q in unconstrained coordinates (the gradient
   M-step, :func:`gradient_step`), reverted if it would lower Q.

A free variable gets a closed form (steps 1-3, the table :data:`CLOSED_FORMS`) when every
table it enters is a ``recipe`` table (:mod:`jointkl.inference.em.factors`) of one family,
slot and view, and its prior (for a MAP global) is conjugate there: Dirichlet for probability
vectors, Beta for Bernoulli probabilities, Gamma for Poisson rates and for precisions, Wishart
for precision matrices, Normal for means. Mean and
covariance updates of a MultivariateNormal also need the covariance to vary only where the
mean does (per component, or shared), which makes the mean update independent of it, as in
scikit-learn. Everything else (a prior that is not conjugate, a parameter used in arithmetic
the engine cannot see through, a parameter shared between families) goes to step 4.

The sufficient statistics are in :mod:`jointkl.inference.em.statistics`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for
from jointkl.inference.em.families import unwrap
from jointkl.inference.em.statistics import Theta, Use, Weights
from jointkl.inference.em.updates import (
    SingularCovariance,
    categorical_update,
    mean_update,
    mvn_loc_update,
    mvn_scale_update,
    normal_loc_update,
    normal_scale_update,
)

__all__ = [
    "Update",
    "ClosedForm",
    "CLOSED_FORMS",
    "plan_updates",
    "m_step",
    "gradient_step",
    "SingularCovariance",
]


@dataclass
class Update:
    """A closed-form conditional maximisation of the free variables ``names``.

    :param kind: the :data:`CLOSED_FORMS` entry.
    :param uses: where the variables enter recipes: (group, slot, which input of the slot).
    :param view: the view of the slot they feed.
    :param prior: ``(kind, parameters)`` of a conjugate prior (a MAP global), or ``None``.
    :param stage: the ECM stage (0 probabilities, 1 locations, 2 scales).
    """

    kind: str
    names: tuple[str, ...]
    uses: list[Use]
    view: str
    prior: tuple[str, dict[str, torch.Tensor]] | None = None
    stage: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A free variable that enters recipes of one family, slot, view and slot input."""

    name: str
    uses: list[Use]
    view: str
    which: int
    prior: tuple[str, dict[str, torch.Tensor]] | None


# --------------------------------------------------------------------------- the updates
# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class ClosedForm:
    """A closed-form conditional maximisation of the free variable(s) feeding one slot of
    one family.

    :param kind: its name (``Update.kind``).
    :param family, slot: the recipe slot the variable feeds.
    :param stage: the ECM stage (0 probabilities, 1 locations, 2 scales).
    :param priors: the priors it is exact under (``None``: a pyro.param, no prior), each with
        the views it allows (``None``: any view).
    :param update: ``update(fm, theta, W, up, reg_covar) -> {name: new value}``.
    :param plan: ``plan(fm, candidate, uses_of, traced) -> Update | None`` where more than
        the family, slot and prior decide (the default makes the Update).
    """

    kind: str
    family: str
    slot: str
    stage: int
    priors: Mapping[str | None, tuple[str, ...] | None]
    update: Callable[[FactorModel, Theta, Weights, Update, float], dict[str, torch.Tensor]]
    plan: Callable[..., Update | None] | None = None

    def allows(self, prior_kind: str | None, view: str) -> bool:
        if prior_kind not in self.priors:
            return False
        views = self.priors[prior_kind]
        return views is None or view in views

    def make(self, c: Candidate) -> Update:
        return Update(self.kind, (c.name,), c.uses, c.view, c.prior, self.stage)


def _plan_mvn_loc(fm: FactorModel, c: Candidate, uses_of, traced) -> Update | None:
    """One table only, and a covariance that varies only where the mean does."""
    pk = c.prior[0] if c.prior else None
    if len(c.uses) == 1 and _mvn_loc_ok(fm, c.uses[0][0], c.name, pk):
        return CLOSED_FORMS["mvn_loc"].make(c)
    return None


def _plan_mvn_scale(fm: FactorModel, c: Candidate, uses_of, traced) -> Update | None:
    """One table only; a scaled-correlation factor is updated as a pair (scales, correlation
    Cholesky factor) when the partner is free, used there only, and indexed alike."""
    if len(c.uses) != 1:
        return None
    if c.view != "scaled_corr":
        return CLOSED_FORMS["mvn_scale"].make(c)
    gi = c.uses[0][0]
    slot = fm.groups[gi].slots["scale_tril"]
    other = slot.params[1 - c.which]
    if (
        other not in traced
        and len(uses_of[other]) == 1
        and _prior(fm, other) is None
        and slot.index[0] == slot.index[1]
    ):
        return Update("mvn_scale", slot.params, [(gi, "scale_tril", 1)], c.view, None, 2)
    return None


ANY_VIEW = None
# fmt: off
CLOSED_FORMS: dict[str, ClosedForm] = {f.kind: f for f in (
    #          kind            family         slot          stage  conjugate priors -> views
    ClosedForm("categorical",  "categorical", "probs",      0, {None: ANY_VIEW, "dirichlet": ("identity",)}, categorical_update),
    ClosedForm("bernoulli",    "bernoulli",   "probs",      0, {None: ANY_VIEW, "beta": ("identity",)}, mean_update),
    ClosedForm("poisson",      "poisson",     "rate",       0, {None: ANY_VIEW, "gamma": ("identity",)}, mean_update),
    ClosedForm("normal_loc",   "normal",      "loc",        1, {None: ANY_VIEW, "normal": ANY_VIEW}, normal_loc_update),
    ClosedForm("normal_scale", "normal",      "scale",      2, {None: ANY_VIEW}, normal_scale_update),
    ClosedForm("mvn_loc",      "mvn",         "loc",        1, {None: ANY_VIEW, "normal": ANY_VIEW}, mvn_loc_update, _plan_mvn_loc),
    ClosedForm("mvn_scale",    "mvn",         "scale_tril", 2, {None: ANY_VIEW, "wishart": ("precision",), "gamma": ("diag_precision", "spherical_precision")}, mvn_scale_update, _plan_mvn_scale),
)}
# fmt: on


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
    if isinstance(fn, dists.Wishart):
        d = fn.event_shape[-1]
        return "wishart", {
            "df": fn.df.expand(shape[:-2]),
            "scale_inv": fn.precision_matrix.expand(shape[:-2] + (d, d)),
        }
    if isinstance(fn, dists.Normal):
        return "normal", {"loc": fn.loc.expand(shape), "scale": fn.scale.expand(shape)}
    return False


def plan_updates(fm: FactorModel) -> tuple[list[Update], list[str]]:
    """Closed-form updates, in the order to apply them, and the free variables left to the
    gradient M-step (see the module docstring for the rules)."""
    uses: dict[str, list[Use]] = defaultdict(list)
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
        form = next(
            (f for f in CLOSED_FORMS.values() if (f.family, f.slot) == (family, slot)), None
        )
        if form is None or not form.allows(prior[0] if prior else None, view):
            continue
        c = Candidate(name, u, view, which, prior)
        upd = form.plan(fm, c, uses, traced) if form.plan else form.make(c)
        if upd is not None:
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


# --------------------------------------------------------------------------- the M-step
def gradient_step(
    fm: FactorModel,
    theta: Theta,
    W: Weights,
    names: list[str],
    max_iter: int,
) -> dict[str, torch.Tensor]:
    """Raise Q in ``names`` by L-BFGS (strong Wolfe line search) in unconstrained coordinates;
    returns the new values, or the old ones if Q did not go up (so EM stays monotone)."""
    if not names or max_iter < 1:
        return {}
    which = fm.groups_using(set(names))
    if not which:  # no table depends on them (a one-value simplex): Q is flat in them
        return {}
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
    theta: Theta,
    W: Weights,
    closed: list[Update],
    gradient: list[str],
    reg: float = 0.0,
    max_iter: int = 20,
) -> dict[str, torch.Tensor]:
    """One M-step (closed forms in stage order, then the gradient block)."""
    theta = dict(theta)
    with torch.no_grad():
        for up in closed:
            theta.update(CLOSED_FORMS[up.kind].update(fm, theta, W, up, reg))
    theta.update(gradient_step(fm, theta, W, gradient, max_iter))
    return theta
