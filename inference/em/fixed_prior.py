"""A fixed conjugate prior's log-density at the current θ, its normaliser computed once.

EM evaluates the MAP globals' priors at every iteration (the objective is the log-posterior).
A Beta or Dirichlet prior's ``log_prob`` recomputes its log-normaliser (``lgamma`` of the
concentrations, which do not change during a fit), stacks ``(p, 1 - p)`` for a Beta and
re-validates the value: on a Bernoulli mixture that is a fifth of an iteration. The same
density, with the concentrations' terms kept from the first call:

    Beta(a, b):     log p(v) = (a - 1) log v + (b - 1) log(1 - v) + log Γ(a + b) - log Γ(a) - log Γ(b)
    Dirichlet(α):   log p(v) = Σ_k (α_k - 1) log v_k + log Γ(Σ_k α_k) - Σ_k log Γ(α_k)

(``xlogy``, as torch computes them: a zero concentration term times log 0 is 0). Wrapped in
``Independent``, the last dims are summed. Any other distribution: its own ``log_prob``.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributions as tdist

__all__ = ["fixed_prior_log_prob", "prior_terms"]

# Per prior object: (name of the family, its terms that do not depend on the value).
_TERMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base(fn: tdist.Distribution) -> tuple[tdist.Distribution, int]:
    """The distribution under ``Independent`` wrappers and how many dims they sum."""
    n = 0
    while isinstance(fn, tdist.Independent):
        n += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, n


def prior_terms(fn: tdist.Distribution) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """(family, constant terms) of a Beta or Dirichlet with torch's own ``log_prob``."""
    if fn in _TERMS:
        return _TERMS[fn]
    base, _ = _base(fn)
    out = None
    if isinstance(base, tdist.Beta) and type(base).log_prob is tdist.Beta.log_prob:
        a, b = base.concentration1, base.concentration0
        norm = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
        out = ("beta", (a - 1, b - 1, norm))
    elif isinstance(base, tdist.Dirichlet) and type(base).log_prob is tdist.Dirichlet.log_prob:
        c = base.concentration
        norm = torch.lgamma(c.sum(-1)) - torch.lgamma(c).sum(-1)
        out = ("dirichlet", (c - 1, norm))
    _TERMS[fn] = out
    return out


def fixed_prior_log_prob(fn: tdist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` for a prior whose parameters stay fixed during a fit.

    :param fn: the prior (a Beta or Dirichlet, possibly in ``Independent``, takes the fast
        form above; anything else calls ``fn.log_prob``).
    :param value: the current value of the variable it scores.
    :returns: the log-density, shape ``fn.batch_shape`` broadcast with the value's batch.
    """
    terms = prior_terms(fn)
    if terms is None:
        return fn.log_prob(value)
    family, t = terms
    if family == "beta":
        a1, b1, norm = t
        lp = torch.xlogy(a1, value) + torch.xlogy(b1, 1 - value) + norm
    else:
        c1, norm = t
        lp = torch.xlogy(c1, value).sum(-1) + norm
    n = _base(fn)[1]
    return lp.sum(tuple(range(-n, 0))) if n else lp
