"""Expectation-maximisation for Pyro models with enumerated discrete latents."""

from jointkl.inference.em.compile import (
    ChainLogPartition,
    FactorModel,
    SharedChainLogPartition,
    transform_for,
    weighted_moments,
)
from jointkl.inference.em.engine import EM, aic, bic, laplace, n_parameters, squarem_point
from jointkl.inference.em.mstep import SingularCovariance, m_step, plan_updates

__all__ = [
    "EM",
    "aic",
    "bic",
    "n_parameters",
    "laplace",
    "squarem_point",
    "FactorModel",
    "transform_for",
    "weighted_moments",
    "ChainLogPartition",
    "SharedChainLogPartition",
    "m_step",
    "plan_updates",
    "SingularCovariance",
]
