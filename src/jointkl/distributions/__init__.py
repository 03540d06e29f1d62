"""jointkl.distributions: structured distributions for Pyro models."""

from jointkl.distributions.crf import LinearChainCRF, TagConstraints, bmes_constraints

__all__ = ["LinearChainCRF", "TagConstraints", "bmes_constraints"]
