"""The engines (import name ``jointkl.inference``)."""

from jointkl.inference.em import EM  # noqa: F401
from jointkl.inference.langevin import Langevin  # noqa: F401
from jointkl.inference.nce import NCE  # noqa: F401
from jointkl.inference.svi import SVI

__all__ = ["SVI"]
