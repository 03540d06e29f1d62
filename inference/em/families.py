"""The distribution families EM computes without running the model, and their log-densities.

A *recipe* (:mod:`jointkl.inference.em.factors`) computes a site's table from θ when its
distribution is one of :data:`FAMILIES`: each names the parameters (*slots*) the engine reads
from the torch distribution and the *views* through which a free variable may feed a slot
(``softmax`` of logits, ``exp`` of a log-rate, a Cholesky factor from standard deviations,
...). The family's log-density function then evaluates the table from the slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from jointkl.inference.em.factors import Group
from jointkl.inference.em.gaussian import LOG_2PI, mvn_log_prob, precision_tril
from torch.distributions import Distribution

from jointkl.chain import broadcast_shapes

__all__ = ["SlotSpec", "Family", "FAMILIES", "VIEW_RANK", "family_of", "unwrap", "apply_view"]

# A log-density takes the slots as {slot: (view, pre-view tensors)} in canonical layout, the
# value, and the group; it returns the elementwise log-density (event dims of the base
# distribution summed, reinterpreted batch dims not yet summed).
LogDensity = Callable[[dict[str, Any], torch.Tensor, Group], torch.Tensor]


def categorical_log_prob(sv: dict[str, Any], x: torch.Tensor, g: Group) -> torch.Tensor:
    view, (t,) = sv["probs"]
    logp = torch.log_softmax(t, -1) if view == "softmax" else t.log()
    shape = broadcast_shapes(tuple(logp.shape[:-1]), tuple(x.shape))
    logp = logp.expand(shape + logp.shape[-1:])
    return logp.gather(-1, x.expand(shape).unsqueeze(-1)).squeeze(-1)


def bernoulli_log_prob(sv: dict[str, Any], x: torch.Tensor, g: Group) -> torch.Tensor:
    view, (t,) = sv["probs"]
    if view == "sigmoid":
        return x * torch.nn.functional.logsigmoid(t) + (1 - x) * torch.nn.functional.logsigmoid(-t)
    # xlogy: an exact 0 or 1 probability scores the matching value 0, not nan.
    return torch.xlogy(x, t) + torch.xlogy(1 - x, 1 - t)


def poisson_log_prob(sv: dict[str, Any], x: torch.Tensor, g: Group) -> torch.Tensor:
    view, (t,) = sv["rate"]
    if view == "exp":
        return x * t - t.exp() - torch.lgamma(x + 1)
    return torch.xlogy(x, t) - t - torch.lgamma(x + 1)


def normal_log_prob(sv: dict[str, Any], x: torch.Tensor, g: Group) -> torch.Tensor:
    _, (mu,) = sv["loc"]
    view, (s,) = sv["scale"]
    sd, log_sd = (s.exp(), s) if view == "exp" else (s, s.log())
    return -0.5 * ((x - mu) / sd) ** 2 - log_sd - 0.5 * LOG_2PI


@dataclass(frozen=True)
class SlotSpec:
    """One parameter of a family.

    :param name: the slot's name in a recipe.
    :param attr: the attribute of the torch distribution that holds it.
    :param rank: the rank of one parameter value (1 for a probability vector).
    :param views: the views through which a free variable may feed it.
    """

    name: str
    attr: str
    rank: int
    views: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """A distribution family a recipe can compute: its torch class, slots, log-density."""

    name: str
    distribution: type[Distribution]
    slots: tuple[SlotSpec, ...]
    log_prob: LogDensity

    def slot(self, name: str) -> SlotSpec:
        return next(s for s in self.slots if s.name == name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "categorical",
            torch.distributions.Categorical,
            (SlotSpec("probs", "probs", 1, ("identity", "softmax")),),
            categorical_log_prob,
        ),
        Family(
            "bernoulli",
            torch.distributions.Bernoulli,
            (SlotSpec("probs", "probs", 0, ("identity", "sigmoid")),),
            bernoulli_log_prob,
        ),
        Family(
            "poisson",
            torch.distributions.Poisson,
            (SlotSpec("rate", "rate", 0, ("identity", "exp")),),
            poisson_log_prob,
        ),
        Family(
            "normal",
            torch.distributions.Normal,
            (
                SlotSpec("loc", "loc", 0, ("identity",)),
                SlotSpec("scale", "scale", 0, ("identity", "exp")),
            ),
            normal_log_prob,
        ),
        Family(
            "mvn",
            torch.distributions.MultivariateNormal,
            (
                SlotSpec("loc", "loc", 1, ("identity",)),
                SlotSpec(
                    "scale_tril",
                    "_unbroadcasted_scale_tril",
                    2,
                    (
                        "identity",
                        "diag",
                        "spherical",
                        "covariance",
                        "scaled_corr",
                        "precision",
                        "diag_precision",
                        "spherical_precision",
                    ),
                ),
            ),
            mvn_log_prob,
        ),
    )
}

# How many trailing dims a view's input has, relative to the slot's (diag: a vector of
# standard deviations for a D x D Cholesky factor). scaled_corr takes (scales, corr_chol).
# The *_precision views take precisions (inverse variances, or a precision matrix).
VIEW_RANK = {
    "identity": (0,),
    "softmax": (0,),
    "sigmoid": (0,),
    "exp": (0,),
    "covariance": (0,),
    "diag": (-1,),
    "spherical": (-2,),
    "scaled_corr": (-1, 0),
    "precision": (0,),
    "diag_precision": (-1,),
    "spherical_precision": (-2,),
}


def family_of(fn: Distribution) -> str | None:
    """The name of the family ``fn`` belongs to, or ``None``."""
    for family in FAMILIES.values():
        if isinstance(fn, family.distribution):
            return family.name
    return None


def unwrap(fn: Distribution) -> tuple[Distribution, int]:
    """The base distribution under ``.to_event`` / ``.expand`` wrappers, and how many of its
    batch dims were reinterpreted as event dims (they are summed in the log-density)."""
    r = 0
    while True:
        if isinstance(fn, torch.distributions.Independent):
            r += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.torch_distribution.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, r


def apply_view(view: str, ts: tuple[torch.Tensor, ...], size: int | None = None) -> torch.Tensor:
    """The distribution parameter a view makes from its input(s) (used when probing).

    :param size: the parameter's last dim (a spherical view repeats one value that often).
    """
    t = ts[0]
    if view == "identity":
        return t
    if view == "softmax":
        return t.softmax(-1)
    if view == "sigmoid":
        return t.sigmoid()
    if view == "exp":
        return t.exp()
    if view == "diag":
        return torch.diag_embed(t)
    if view == "spherical":
        return torch.diag_embed(t.unsqueeze(-1).expand(*t.shape, size))
    if view == "covariance":
        return torch.linalg.cholesky(t)
    if view == "scaled_corr":
        return ts[0].unsqueeze(-1) * ts[1]
    if view == "precision":
        return precision_tril(t)
    if view == "diag_precision":
        return torch.diag_embed(t.rsqrt())
    if view == "spherical_precision":
        return torch.diag_embed(t.rsqrt().unsqueeze(-1).expand(*t.shape, size))
    raise ValueError(view)
