"""Per-data-point bounds on log p(x) for any model/guide pair with local latents.

For a guide q(z|x) and a model p(x, z) whose sample sites all sit in the ``"data"`` plate,
the importance weight of a draw z ~ q(z|x_i) is w = p(x_i, z) / q(z | x_i), and

    ELBO(x_i)  = E_q[log w]                                   (Jensen: ≤ log p(x_i))
    IWAE_k(x_i) = E_{z_1..k ~ q}[log (1/k) Σ_j w_j]           (Burda et al. 2016)

with ELBO = IWAE_1 ≤ IWAE_k ≤ IWAE_{k+1} ≤ log p(x_i), IWAE_k → log p(x_i) as k → ∞. The
particles are drawn in one vectorised pass (an extra plate left of the model's plates), in
chunks so memory stays bounded for large k. With ``analytic_kl`` the ELBO uses
KL(q(z|x) ‖ p(z)) in closed form wherever one is registered (lower variance, same mean).
Site masks (``poutine.mask``) are not applied: these bounds are for plain, unmasked data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from pyro.poutine.util import site_is_subsample

from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE, max_plate_nesting, trace_model

__all__ = ["log_importance_weights", "elbo_per_datum", "iwae_per_datum"]

_PARTICLES = "_bound_particles"


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng():  # the caller's RNG stream is left untouched
        pyro.set_rng_seed(seed)
        yield


class _Layout:
    """Where the particle and data dimensions sit in a site's log-density."""

    def __init__(self, model, args, kwargs):
        with torch.random.fork_rng():  # a look at the plates must not use up random draws
            tr = trace_model(model, args, kwargs)
        self.rank = max_plate_nesting(tr) + 1  # particles live one dim left of all plates
        self.data_dim, self.size = None, None
        for s in tr.nodes.values():
            for f in s.get("cond_indep_stack", ()):
                if f.name == DATA_PLATE:
                    self.data_dim, self.size = f.dim, f.size
        if self.data_dim is None:
            raise InputError(f"per-datum bounds need a pyro.plate({DATA_PLATE!r}, N) in the model")

    def per_datum(self, name: str, site: dict, lp: torch.Tensor) -> torch.Tensor:
        """Sum ``lp`` (a site's log-density) over every dim but particles and data -> (S, N)."""
        if not any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
            raise InputError(
                f"per-datum bounds need every sample site inside the {DATA_PLATE!r} plate; "
                f"site {name!r} is global (fit it as a pyro.param, or use the ELBO of the engine)"
            )
        lp = lp.reshape((1,) * (self.rank - lp.dim()) + tuple(lp.shape))
        lp = lp.movedim(self.rank + self.data_dim, 1)
        return lp.flatten(2).sum(-1) if lp.dim() > 2 else lp


def _sample_sites(tr) -> dict[str, dict]:
    # Plates record themselves as "subsample" sites; they carry no density.
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def _traces(model, guide, args, kwargs, layout: _Layout, num: int):
    particles = pyro.plate(_PARTICLES, num, dim=-layout.rank)
    with torch.no_grad(), particles:
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    return mtr, gtr


def _log_weights(model, guide, args, kwargs, layout: _Layout, num: int) -> torch.Tensor:
    mtr, gtr = _traces(model, guide, args, kwargs, layout, num)
    total = 0.0
    for sign, tr in ((1.0, mtr), (-1.0, gtr)):
        for n, s in _sample_sites(tr).items():
            total = total + sign * layout.per_datum(n, s, s["fn"].log_prob(s["value"]))
    return torch.as_tensor(total).expand(num, layout.size)


def log_importance_weights(
    model, guide, *args: Any, num_samples: int = 1, seed: int | None = None, **kwargs: Any
) -> torch.Tensor:
    """log p(x_i, z_s) − log q(z_s | x_i) for ``num_samples`` guide draws z_s per datum: (S, N)."""
    _check_count("num_samples", num_samples)
    layout = _Layout(model, args, kwargs)
    with _seeded(seed):
        return _log_weights(model, guide, args, kwargs, layout, num_samples)


def elbo_per_datum(
    model,
    guide,
    *args: Any,
    num_samples: int = 1,
    analytic_kl: bool = True,
    seed: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The ELBO of each data point, (N,), averaged over ``num_samples`` guide draws.

    With ``analytic_kl`` each latent site contributes −KL(q ‖ p) in closed form (where
    registered) and only the observed sites are Monte-Carlo estimates:
    ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)).
    """
    _check_count("num_samples", num_samples)
    layout = _Layout(model, args, kwargs)
    with _seeded(seed):
        if not analytic_kl:
            return _log_weights(model, guide, args, kwargs, layout, num_samples).mean(0)
        mtr, gtr = _traces(model, guide, args, kwargs, layout, num_samples)
        guide_sites = _sample_sites(gtr)
        total = 0.0
        for n, s in _sample_sites(mtr).items():
            g = guide_sites.get(n)
            term = None
            if g is not None:
                try:
                    term = -kl_divergence(g["fn"], s["fn"])
                except NotImplementedError:
                    term = None
            if term is None:
                term = s["fn"].log_prob(s["value"])
                if g is not None:
                    term = term - g["fn"].log_prob(g["value"])
            total = total + layout.per_datum(n, s, term)
        for n, g in guide_sites.items():
            if n not in mtr.nodes:  # guide-only auxiliary sites: −log q
                total = total - layout.per_datum(n, g, g["fn"].log_prob(g["value"]))
        return torch.as_tensor(total).expand(num_samples, layout.size).mean(0)


def iwae_per_datum(
    model,
    guide,
    *args: Any,
    k: int = 100,
    chunk_size: int = 256,
    seed: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The importance-weighted bound log (1/k) Σ_j w_j of each data point, (N,).

    :param k: importance samples per datum (k = 1 is the Monte-Carlo ELBO).
    :param chunk_size: particles drawn per vectorised pass; the log-sum-exp is accumulated
        across passes, so memory is O(chunk_size · N · event size) whatever k is.
    """
    _check_count("k", k)
    _check_count("chunk_size", chunk_size)
    layout = _Layout(model, args, kwargs)
    acc = None
    with _seeded(seed):
        for start in range(0, k, chunk_size):
            num = min(chunk_size, k - start)
            lw = _log_weights(model, guide, args, kwargs, layout, num).logsumexp(0)
            acc = lw if acc is None else torch.logaddexp(acc, lw)
    return acc - math.log(k)


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be an int >= 1, got {value!r}")
