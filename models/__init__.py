"""Zoo models: Pyro model/guide pairs (import name ``jointkl.models``)."""

from jointkl.models.gmm import GaussianMixture

__all__ = ["GaussianMixture"]
