"""Expectation-maximisation for Pyro models with enumerated discrete latents.

The engine (:mod:`.engine`) runs the EM loop on a model compiled once into factor tables:

- :mod:`.factors` — the compiled pieces and their canonical layout;
  :mod:`.families` — the distribution families computed without running the model;
  :mod:`.gaussian` — Gaussian log-densities and statistics from cached data moments;
- :mod:`.compile` — the compilation steps; :mod:`.classify` — sites into groups;
  :mod:`.recipes` — probing for how parameters are computed from θ;
  :mod:`.factor_model` — :class:`FactorModel`, the compiled model;
- :mod:`.estep` — the E-step paths (one table, :data:`~.estep.PATHS`);
  :mod:`.forward_backward` — the chain recursions;
- :mod:`.mstep` — the M-step (the closed-form table :data:`~.mstep.CLOSED_FORMS`, the
  gradient M-step); :mod:`.updates` — the closed forms; :mod:`.statistics` — their
  sufficient statistics;
- :mod:`.fused_mixture` — a Bernoulli mixture's E- and M-step written out;
  :mod:`.initial` — initial values; :mod:`.squarem` — acceleration;
  :mod:`.laplace` — posterior draws; :mod:`.criteria` — BIC/AIC.
"""

from jointkl.inference.em.criteria import aic, bic, n_parameters
from jointkl.inference.em.engine import EM, EMSettings
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for
from jointkl.inference.em.forward_backward import ChainLogPartition, SharedChainLogPartition
from jointkl.inference.em.gaussian import weighted_moments
from jointkl.inference.em.laplace import laplace
from jointkl.inference.em.mstep import SingularCovariance, m_step, plan_updates
from jointkl.inference.em.squarem import squarem_point

__all__ = [
    "EM",
    "EMSettings",
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
