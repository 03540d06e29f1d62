"""The log-density of a vector of independent Bernoullis as one matrix product.

A mixture's observed site ``Bernoulli(probs[z]).to_event(1)`` under enumeration (and a
plate of posterior draws) has batch shape ``(K, draws, N)``: Pyro's ``log_prob`` expands the
probabilities to ``(K, draws, N, D)`` and takes a logarithm, a ``log1p`` and a
cross-entropy over all of it (a Bernoulli mixture on the digits: 400 draws × 10 × 1,797 ×
64 values, ~55 s). The probabilities do not depend on the data point and the data do not
depend on the draw or the component, so with x ∈ {0, 1}

    log p(x_n | p_k) = Σ_d x_nd log p_kd + (1 − x_nd) log(1 − p_kd)
                     = Σ_d x_nd ℓ_kd + Σ_d log(1 − p_kd),     ℓ = log p − log(1 − p),

one product ``ℓ @ xᵀ`` over (rows of p) × N × D plus a sum over D. The probabilities are
clamped to [ε, 1 − ε] (ε the dtype's machine epsilon) as torch's ``Bernoulli`` does; with
logits ℓ, log(1 − p) = −softplus(ℓ) = −(max(ℓ, 0) + log(1 + e^{−|ℓ|})). The product runs
in float64 and the result is cast to the value's dtype.
"""

from __future__ import annotations

import torch
import torch.distributions as tdist
from pyro.distributions.util import scale_and_mask

__all__ = ["independent_bernoulli_log_prob", "fill_site_log_prob"]


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every broadcast dimension (stride 0, size > 1) cut to size 1: a view."""
    index = tuple(
        slice(0, 1) if s == 0 and n > 1 else slice(None)
        for s, n in zip(t.stride(), t.shape, strict=True)
    )
    return t[index]


def independent_bernoulli_log_prob(fn, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value)`` by the matrix product above, or ``None`` where it does not apply.

    :param fn: a distribution; only ``Independent(Bernoulli, 1)`` qualifies.
    :param value: the observed 0/1 values, ``(..., N, D)``. It applies when the value,
        broadcast dimensions aside, is one ``(N, D)`` matrix on the last batch dimension and
        the probabilities (or logits), broadcast dimensions aside, do not vary along it.
    :returns: log p(value), shape ``fn.batch_shape`` (an expanded view where it repeats).
    """
    if not isinstance(fn, tdist.Independent) or fn.reinterpreted_batch_ndims != 1:
        return None
    base = fn.base_dist
    # torch's Bernoulli or a subclass (Pyro's) that keeps its log_prob
    if not isinstance(base, tdist.Bernoulli) or type(base).log_prob is not tdist.Bernoulli.log_prob:
        return None
    by_logits = "probs" not in base.__dict__
    param = _unexpanded(base.logits if by_logits else base.probs)
    x = _unexpanded(value)
    batch = tuple(fn.batch_shape)
    if not batch or x.dim() < 2 or param.dim() < 2:
        return None
    if any(n != 1 for n in x.shape[:-2]) or param.shape[-2] != 1:
        return None
    n, d = x.shape[-2], x.shape[-1]
    if param.shape[-1] != d or batch[-1] != n or x.shape[-1] != d:
        return None
    if x.is_floating_point() and not bool(((x == 0) | (x == 1)).all()):
        return None  # the identity above holds for 0/1 values only
    p = param.squeeze(-2).double()
    if by_logits:
        logit = p
        # softplus(ℓ) in the form torch's cross-entropy takes it (softplus itself switches
        # to ℓ above 20, a 1e-9 gap)
        log_not = -(p.clamp(min=0) + torch.log1p(torch.exp(-p.abs())))
    else:
        eps = torch.finfo(param.dtype).eps
        p = p.clamp(min=eps, max=1 - eps)
        logit = torch.log(p) - torch.log1p(-p)
        log_not = torch.log1p(-p)
    xs = x.reshape(n, d).double()
    lp = logit @ xs.T + log_not.sum(-1, keepdim=True)  # (..., N)
    try:
        dtype = torch.promote_types(param.dtype, value.dtype)
        return lp.to(dtype).expand(batch)
    except RuntimeError:
        return None  # shapes that do not broadcast to the batch shape: the plain path


def fill_site_log_prob(site: dict, log_prob=None) -> bool:
    """Give an observed site (a trace node or a message) its ``unscaled_log_prob``,
    ``log_prob`` (scaled and masked) and ``log_prob_sum`` as Pyro's
    ``Trace.compute_log_prob`` would, by the matrix product above; Pyro's
    ``compute_log_prob`` then keeps them.

    :param site: the site's dict, changed in place.
    :param log_prob: the function giving the log-density or ``None`` where it does not
        apply; default :func:`independent_bernoulli_log_prob`.
    :returns: whether it applied (a site that has a ``log_prob`` already is left alone).
    """
    if "log_prob" in site:
        return False
    lp = (log_prob or independent_bernoulli_log_prob)(site["fn"], site["value"])
    if lp is None:
        return False
    site["unscaled_log_prob"] = lp
    site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
    site["log_prob_sum"] = site["log_prob"].sum()
    return True
