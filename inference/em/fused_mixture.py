"""One EM iteration of a Bernoulli mixture in a handful of tensor operations.

The generic steps (:func:`~jointkl.inference.em.estep.mixture_e_step`,
:func:`~jointkl.inference.em.mstep.m_step`) find, at every iteration, which tables are
linear in the data, which weights each closed-form update reads and how each sum maps back
to a parameter's layout. For a large mixture that bookkeeping is nothing beside the
arithmetic; on a small one (``BernoulliMixture()`` on the 1797 digits: a (10, 65) by
(65, 1797) product and a (10, 1797) by (1797, 64) one) it was most of an iteration. A
compiled model whose structure is exactly a Bernoulli mixture — Categorical assignments
with probabilities ``weights``, one vector of Bernoulli observations with probabilities
``probs[z]``, both updated in closed form, each a ``pyro.param`` or a MAP global under a
Dirichlet / Beta prior — gets :class:`BernoulliMixtureSteps`, which does the same
arithmetic directly:

* E-step: ``L = [logit p, Σ_d log(1 - p)] @ [x, 1]^T + log w``, ``(K, points)``, a stable
  softmax over the K rows, ``log Z = Σ_n (m_n + log Σ_k exp(L_kn - m_n))``, plus the
  priors' log-densities;
* M-step: counts ``c_k = Σ_n r_kn``, weights ``(c + α - 1)_+`` normalised, probabilities
  ``(r x + a - 1) / (c + a + b - 2)`` clipped to [0, 1] (a component with no mass keeps
  its probabilities), as :func:`~jointkl.inference.em.updates.categorical_from_counts` and
  :func:`~jointkl.inference.em.updates.mean_from_sums` compute them;
* coordinates that are 0 in every point (an image's border) add exactly 0 to both
  products and are left out of them.

The numbers are the generic steps' up to the order of rounding (the table is laid out
component-major, where the generic E-step lays it out point-major): on the tests' fits the
same iterations, parameters within 1e-13 (``tests/test_em_fused_mixture.py``). Where a
probability is exactly 0 or 1 in a coordinate some point has (no prior keeps it inside) the
linear form has no finite value and that E-step is the generic one. Hard assignments,
SQUAREM, streamed or distributed data and any other structure use the generic steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from jointkl.inference.em.estep import is_mixture
from jointkl.inference.em.fixed_prior import prior_terms

if TYPE_CHECKING:
    from jointkl.inference.em.engine import Steps
    from jointkl.inference.em.factor_model import FactorModel
    from jointkl.inference.em.mstep import Update

__all__ = ["bernoulli_mixture_plan", "BernoulliMixtureSteps"]


def bernoulli_mixture_plan(steps: Steps) -> dict | None:
    """What :class:`BernoulliMixtureSteps` needs from ``steps``' compiled model, or ``None``
    when it is not exactly a soft-assignment Bernoulli mixture with closed-form updates of
    both parameters (identity views, no masks, priors only Dirichlet / Beta or none)."""
    fm, closed = steps.fm, steps.closed
    if steps.hard or steps.gradient or len(closed) != 2 or not is_mixture(fm):
        return None
    by_kind = {up.kind: up for up in closed}
    cat, bern = by_kind.get("categorical"), by_kind.get("bernoulli")
    if cat is None or bern is None or closed[0] is not cat:
        return None
    if not (_plain(fm, cat, "categorical", "own") and _plain(fm, bern, "bernoulli", "data")):
        return None
    w_name, p_name = cat.names[0], bern.names[0]
    cat_gi, bern_gi = cat.uses[0][0], bern.uses[0][0]
    g = fm.groups[bern_gi]
    x = g.data
    if not x.is_floating_point() or x.dim() != 4 or tuple(x.shape[:2]) != (1, 1):
        return None
    K, D = fm.free[p_name].shape if len(fm.free[p_name].shape) == 2 else (None, None)
    if K is None or tuple(fm.free[w_name].shape) != (K,) or x.shape[-1] != D:
        return None
    if fm.groups[cat_gi].cards != (K,) or g.cards != (K,):
        return None
    priors = []
    for i, gr in enumerate(fm.groups):
        if i in (cat_gi, bern_gi):
            continue
        # only the two parameters' own priors (no other table enters the mixture), each a
        # torch Dirichlet / Beta (whose log-density's constants prior_terms gives)
        if gr.kind != "fixed" or gr.fn is None or gr.free not in (w_name, p_name):
            return None
        terms = prior_terms(gr.fn)
        if terms is None or terms[0] != ("dirichlet" if gr.free == w_name else "beta"):
            return None
        priors.append(i)
    if (cat.prior is None) != (w_name not in {fm.groups[i].free for i in priors}):
        return None
    if (bern.prior is None) != (p_name not in {fm.groups[i].free for i in priors}):
        return None
    if cat.prior is not None and cat.prior[0] != "dirichlet":
        return None
    if bern.prior is not None and bern.prior[0] != "beta":
        return None
    return {
        "weights": w_name,
        "probs": p_name,
        "groups": (cat_gi, bern_gi),
        "priors": priors,
        "x": x[0, 0],
        "alpha": None if cat.prior is None else cat.prior[1]["alpha"],
        "beta": None if bern.prior is None else (bern.prior[1]["a"], bern.prior[1]["b"]),
    }


def _plain(fm: FactorModel, up: Update, family: str, value: str) -> bool:
    """An update of one parameter, used once, by a group of ``family`` that reads it
    through the identity (unindexed for the weights, ``param[z]`` for the emission)."""
    if up.view != "identity" or len(up.names) != 1 or len(up.uses) != 1:
        return False
    gi, slot, _ = up.uses[0]
    g = fm.groups[gi]
    if g.kind != "recipe" or g.family != family or g.value != value or g.mask is not None:
        return False
    if g.rows != 1 or len(g.cards) != 1 or len(g.slots) != 1 or slot != "probs":
        return False
    s = g.slots[slot]
    index = ((),) if family == "categorical" else ((("role", 0),),)
    return s.const is None and s.params == up.names and s.index == index and s.pad == (0,)


class BernoulliMixtureSteps:
    """:class:`~jointkl.inference.em.engine.Steps` of a Bernoulli mixture (see the module's
    docstring), built by :func:`fused_steps` on the generic ``steps``.

    The log-joint table is computed component-major, ``(K, points)``, where the generic
    E-step lays it out point-major: the product ``coef @ [x, 1]^T`` and the reductions over
    the K rows run along contiguous memory, and the M-step's ``r @ x`` reads the
    responsibilities as they are stored. Their sums are therefore rounded in another order
    than the generic ones (differences of order 1e-13 in the log-likelihood). The weights are
    returned in the generic layout (responsibilities ``(1, K, points)``, counts
    ``(1, K, 1)``), so anything that reads them reads what the generic E-step gives."""

    name = "bernoulli-mixture"

    def __init__(self, steps: Steps, plan: dict):
        self.generic, self.plan = steps, plan
        self.fm, self.closed, self.gradient = steps.fm, steps.closed, steps.gradient
        self.reg_covar, self.mstep_iter, self.hard = steps.reg_covar, steps.mstep_iter, False
        self.priors = _prior_terms(steps.fm, plan)
        # A coordinate that is 0 in every point adds x_nd logit(p_kd) = 0 to every entry of
        # the table and 0 to Σ_n r_nk x_nd: the products run over the other coordinates.
        x = plan["x"]
        active = x.amax(0).ne_(0).logical_or_(x.amin(0).ne_(0))  # (any(0) is slower)
        self.columns = None if bool(active.all()) else active.nonzero().squeeze(-1)
        width = x.shape[1] if self.columns is None else len(self.columns)
        features_t = x.new_empty((width + 1, x.shape[0]))  # [x, 1]^T
        if self.columns is None:
            features_t[:width] = x.T
        else:
            torch.index_select(x.T, 0, self.columns, out=features_t[:width])
        features_t[width] = 1
        self.features_t = features_t
        self.x = x.contiguous() if self.columns is None else features_t[:width].T.contiguous()

    @property
    def n_points(self) -> int:
        return self.fm.n_points

    def expect(self, theta, iteration: int):
        """E-step at θ (see :meth:`Steps.expect`); where the log-likelihood is not finite
        (a probability at 0 or 1 has no logit) the generic E-step decides."""
        ll, W = self._e_step(theta[self.plan["weights"]], theta[self.plan["probs"]])
        if not math.isfinite(ll):
            return self.generic.expect(theta, iteration)
        return ll, W

    def _e_step(self, w: torch.Tensor, p: torch.Tensor):
        pr = self.priors
        K, D = p.shape
        log_p, log1m = p.log(), p.neg().log1p_()
        logit, log1m_sum = log_p - log1m, log1m.sum(-1, keepdim=True)
        if self.columns is not None:
            logit = logit.index_select(1, self.columns)
        coef = torch.cat([logit, log1m_sum], -1)  # [logit p, Σ_d log(1 - p)]
        L = torch.addmm(w.log().unsqueeze_(-1), coef, self.features_t)  # (K, points)
        # no clamp of the shift: a point with no finite entry makes log Z non-finite, and
        # then the generic E-step runs instead
        m = L.amax(0)
        L.sub_(m).exp_()
        z = L.sum(0)
        L.div_(z)
        ll = float(z.log_().add_(m).sum()) + pr["constant"]
        if pr["dirichlet"] is not None:  # Σ (α - 1) log w, when some α ≠ 1
            ll += float(torch.xlogy(pr["dirichlet"], w).sum())
        # Σ (a - 1) log p + (b - 1) log(1 - p), a zero coefficient scoring 0 at p = 0 or 1 as
        # xlogy does (Beta(1, b) leaves a coordinate no point has at exactly 0)
        beta = pr["beta"]
        if isinstance(beta, tuple):  # one (a - 1, b - 1) for every probability
            if beta[0]:
                ll += beta[0] * float(log_p.sum())
            if beta[1]:
                ll += beta[1] * float(log1m_sum.sum())
        elif beta is not None:
            ll += float(torch.xlogy(beta[0], p).sum() + torch.xlogy(beta[1], 1 - p).sum())
        cat_gi, bern_gi = self.plan["groups"]
        return ll, {cat_gi: L.sum(1).reshape(1, K, 1), bern_gi: L.unsqueeze(0)}

    def initial_m_step(self, theta, W) -> dict[str, torch.Tensor]:
        """The M-step that follows an initial labelling (weights W, generic layout)."""
        return self.maximise(theta, W, 0)

    def maximise(self, theta, W, iteration: int) -> dict[str, torch.Tensor]:
        """M-step from θ with the weights W (see :meth:`Steps.maximise`): the generic
        closed forms (``categorical_from_counts``, ``mean_from_sums``) on these sums. A
        component with no mass keeps its probabilities, and weights with no mass at all
        keep theirs; with a prior whose pseudo-counts are positive neither can happen, and
        the test is skipped."""
        pl, pr = self.plan, self.priors
        cat_gi, bern_gi = pl["groups"]
        theta = dict(theta)
        w_old, p_old = theta[pl["weights"]], theta[pl["probs"]]
        tiny = torch.finfo(w_old.dtype).tiny
        with torch.no_grad():
            n = W[cat_gi][0]  # (K, 1): the E-step's counts; (K, points): a labelling's
            n = n.sum(-1, keepdim=True) if n.shape[-1] > 1 else n
            c = n.reshape(-1)
            if pr["alpha1"] is not None:
                c = (c + pr["alpha1"]).clamp_min_(0)
            tot = c.sum()
            new_w = c / tot.clamp_min(tiny)
            theta[pl["weights"]] = new_w if pr["mass"] else torch.where(tot == 0, w_old, new_w)
            s1 = W[bern_gi][0] @ self.x
            if self.columns is not None:
                s1 = p_old.new_zeros(p_old.shape).index_copy_(1, self.columns, s1)
            s0 = n
            if pr["ab"] is not None:
                a1, ab2 = pr["ab"]
                s1.add_(a1)
                s0 = n + ab2
            p = s1.div_(s0.clamp_min(tiny)).clamp_(0, 1)
            theta[pl["probs"]] = p if pr["pseudo"] else torch.where(s0 <= 0, p_old, p)
        return theta


def _prior_terms(fm: FactorModel, plan: dict) -> dict:
    """What the priors add to the E-step's log-likelihood and to the M-step's sums.

    ``constant``: the log-normalisers (as :mod:`.fixed_prior` computes them);
    ``dirichlet``: ``α - 1`` (``None`` where every α is 1, a constant density);
    ``beta``: ``(a - 1, b - 1)``, as two floats where every probability has the same
    prior; ``alpha1``, ``ab``: ``α - 1`` and ``(a - 1, a + b - 2)`` for the M-step, and
    ``mass`` / ``pseudo``: whether they keep every total positive."""
    out = {"constant": 0.0, "dirichlet": None, "beta": None, "alpha1": None, "ab": None}
    for i in plan["priors"]:
        g = fm.groups[i]
        _, terms = prior_terms(g.fn)
        shape = fm.free[g.free].shape
        if g.free == plan["weights"]:
            c1, norm = terms
            out["constant"] += float(norm.sum())
            if bool((c1 != 0).any()):
                out["dirichlet"] = c1.expand(shape)
        else:
            a1, b1, norm = (t.expand(shape) for t in terms)
            out["constant"] += float(norm.sum())
            same = all(bool((t == t.reshape(-1)[0]).all()) for t in (a1, b1))
            out["beta"] = (float(a1.reshape(-1)[0]), float(b1.reshape(-1)[0])) if same else (a1, b1)
    alpha, beta = plan["alpha"], plan["beta"]
    # Σ_k (n_k + α_k - 1)_+ >= Σ_k n_k = N > 0 when every α_k >= 1
    out["mass"] = alpha is None or bool((alpha >= 1).all())
    out["pseudo"] = False
    if alpha is not None:
        out["alpha1"] = alpha - 1
    if beta is not None:
        a, b = beta
        out["ab"] = (a - 1, a + b - 2)
        out["pseudo"] = bool((out["ab"][1] > 0).all())
    return out


def fused_steps(steps: Steps, accelerate: str | None) -> Steps | BernoulliMixtureSteps:
    """``steps``, or :class:`BernoulliMixtureSteps` on them where the compiled model is a
    Bernoulli mixture and the loop is plain EM (no SQUAREM: its extrapolated points take
    the generic E-step)."""
    if accelerate is not None:
        return steps
    plan = bernoulli_mixture_plan(steps)
    return steps if plan is None else BernoulliMixtureSteps(steps, plan)
