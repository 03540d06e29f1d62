"""Expectation-maximisation for Pyro models with enumerated discrete latents."""

from jointkl.inference.em.engine import EM, aic, bic, laplace, n_parameters, squarem_point
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for
from jointkl.inference.em.forward_backward import ChainLogPartition, SharedChainLogPartition
from jointkl.inference.em.gaussian import weighted_moments
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
