"""jointkl.distributions: structured distributions for Pyro models."""

from jointkl.distributions.crf import (
    LinearChainCRF,
    TagConstraints,
    bmes_constraints,
    constraint_violations,
)

__all__ = ["LinearChainCRF", "TagConstraints", "bmes_constraints", "constraint_violations"]
