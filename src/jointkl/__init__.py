"""jointkl: latent-variable and unnormalised models on Pyro, fitted by minimising a KL
divergence between joint distributions — EM, SVI, NCE and Langevin dynamics."""

# Public re-exports. The core imports jointkl.models and jointkl.inference only here and in
# the cli (docs/architecture.md); importing them also fills the MODELS and ENGINES registries.
from importlib.metadata import PackageNotFoundError, version

from jointkl import inference, models  # noqa: E402,I001
from jointkl.comparison import compare
from jointkl.engine import ENGINES, Engine, register_engine
from jointkl.errors import ConvergenceWarning, FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.pair import Pair, as_pair
from jointkl.zoo import MODELS, register_model

try:
    __version__ = version("jointkl")  # one source of truth: pyproject.toml's version
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Pair",
    "as_pair",
    "Fit",
    "compare",
    "__version__",
    "Engine",
    "ENGINES",
    "MODELS",
    "register_engine",
    "register_model",
    "InputError",
    "FitDivergedError",
    "ConvergenceWarning",
    "models",
    "inference",
]
