"""The engines (import name ``jointkl.inference``): EM, SVI, NCE, Langevin and NUTS, each an
:class:`~jointkl.engine.Engine` registered under its short name."""

from jointkl.inference.em import EM
from jointkl.inference.langevin import Langevin
from jointkl.inference.nce import NCE
from jointkl.inference.nuts import NUTS
from jointkl.inference.svi import SVI

__all__ = ["EM", "SVI", "NCE", "Langevin", "NUTS"]
