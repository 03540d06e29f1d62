"""Information criteria of an EM fit: parameters counted in unconstrained coordinates."""

from __future__ import annotations

import math
from typing import Any

import torch
from jointkl.inference.em.factors import transform_for
from torch.distributions import constraints

from jointkl.errors import InputError
from jointkl.fit import Fit

__all__ = ["n_parameters", "bic", "aic", "degrees_of_freedom"]


def n_parameters(fit: Fit) -> int:
    """Free parameters of a fit, counted in unconstrained coordinates (a K-simplex has K-1,
    a D x D Cholesky factor D(D+1)/2, a correlation Cholesky factor D(D-1)/2)."""
    if "n_parameters" in fit.info:
        return int(fit.info["n_parameters"])
    raise InputError("this Fit has no parameter count: it was not made by the EM engine")


def bic(fit: Fit, n: int | None = None) -> float:
    """Bayesian information criterion, -2 log L + k log n (lower is better); ``n`` defaults
    to the size of the ``"data"`` plate."""
    n = fit.info["n_points"] if n is None else n
    return -2 * float(fit.info["log_likelihood"]) + n_parameters(fit) * math.log(n)


def aic(fit: Fit) -> float:
    """Akaike information criterion, -2 log L + 2 k (lower is better)."""
    return -2 * float(fit.info["log_likelihood"]) + 2 * n_parameters(fit)


def degrees_of_freedom(constraint: Any, value: torch.Tensor) -> int:
    """How many free coordinates a value on ``constraint`` has (its unconstrained size,
    less the coordinates a transform ignores, such as a Cholesky factor's upper triangle)."""
    if isinstance(constraint, type(constraints.simplex)):
        return value.numel() - value.numel() // max(value.shape[-1], 1)
    if isinstance(
        constraint, (type(constraints.lower_cholesky), type(constraints.positive_definite))
    ):
        d = value.shape[-1]
        return value.numel() // (d * d) * d * (d + 1) // 2
    if isinstance(constraint, type(constraints.corr_cholesky)):
        d = value.shape[-1]
        return value.numel() // (d * d) * d * (d - 1) // 2
    return transform_for(constraint).inv(value).numel()
