"""The engines (import name ``jointkl.inference``)."""

from jointkl.inference.svi import SVI

__all__ = ["SVI"]
