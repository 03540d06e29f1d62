"""A guide moment-matched to posterior draws of per-datum latents: the importance proposal
of a sampler's IWAE log-likelihood.

A sampler (Langevin) has draws z_i^(s) ~ p(z_i | x_i, θ) but no q(z_i | x_i). The pointwise
log-likelihood that LOO needs is log p(x_i | θ) = log ∫ p(x_i | z) p(z) dz, not
log p(x_i | z_i^(s), θ) at each draw. :func:`moment_guide` gives the proposal

    q_i(z_i) = Normal(mean_s z_i^(s), sd_s z_i^(s))   (independent per coordinate),

and :func:`jointkl.bounds.iwae_per_datum` then estimates log p(x_i) by
log (1/K) Σ_k p(x_i, z_k) / q_i(z_k), z_k ~ q_i: a lower bound in expectation whatever q_i
is, exact as K → ∞ (the same estimator SVI's fits use, with the guide as proposal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from jointkl.sites import DATA_PLATE, trace_model

__all__ = ["moment_guide"]

# A coordinate whose draws never moved (a stuck chain) gets this floor on its sd, so the
# proposal stays a density.
MIN_SD = 1e-6


def _real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def moment_guide(
    model, args: tuple, kwargs: Mapping, draws: Mapping[str, torch.Tensor]
) -> Callable | None:
    """The guide ``guide(*args, **kwargs)`` sampling each latent site of ``draws`` from an
    independent normal with the draws' mean and sd, inside the model's ``"data"`` plate.

    :param model: the Pyro model the draws are of.
    :param args: its positional data arguments; ``kwargs`` its keyword ones.
    :param draws: ``{site: (chain, draw, *site_shape)}``, every latent of the model.
    :return: the guide, or ``None`` when a site is not real-valued (a normal proposal
        would leave its support) or not inside the data plate.
    """
    if not draws:
        return None
    base = trace_model(model, args, kwargs)
    moments = {}
    for name, v in draws.items():
        site = base.nodes.get(name)
        if site is None or site["type"] != "sample" or not _real(site["fn"].support):
            return None
        if not any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
            return None
        flat = v.detach().reshape(-1, *v.shape[2:])
        loc = flat.mean(0)
        sd = flat.std(0, correction=1 if flat.shape[0] > 1 else 0).clamp_min(MIN_SD)
        moments[name] = (loc, sd, site["fn"].event_dim)
    size = next(
        f.size for f in base.nodes[next(iter(draws))]["cond_indep_stack"] if f.name == DATA_PLATE
    )

    def guide(*_args, **_kwargs) -> None:
        with pyro.plate(DATA_PLATE, size):
            for name, (loc, sd, event_dim) in moments.items():
                pyro.sample(name, dist.Normal(loc, sd).to_event(event_dim))

    return guide
