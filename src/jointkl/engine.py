"""The engine base class and the registry of engines by name.

An engine is configured in its constructor, is stateless between fits, and exposes
``fit(pair, *args, **kwargs) -> Fit``. Engines register a short name (``"svi"``, ``"em"``) so a
saved :class:`~jointkl.fit.Fit` can find, on load, the code that draws from its posterior.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from jointkl.fit import Fit

__all__ = ["Engine", "ENGINES", "register_engine", "engine_class", "recreate_params"]

ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine findable by its ``name``."""
    ENGINES[cls.name] = cls
    return cls


def engine_class(name: str) -> type[Engine]:
    from jointkl.errors import InputError

    if name not in ENGINES:
        import jointkl.inference  # noqa: F401  (engines register on import)
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


class Engine:
    """Base class of the fitting engines.

    Subclasses set ``name`` and ``description``, keep their settings in ``self.config`` (plain,
    JSON-serialisable values), and implement :meth:`fit` and :meth:`posterior_draws`.
    """

    name: ClassVar[str] = "engine"
    description: ClassVar[str] = ""

    def __init__(self, **config: Any):
        self.config = dict(config)

    def fit(self, pair: Any, *args: Any, **kwargs: Any) -> Fit:
        raise NotImplementedError

    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Put ``fit``'s learned parameters where the model reads them (e.g. Pyro's param
        store) before the model is re-run for predictions. Default: nothing to do."""

    @classmethod
    def posterior_draws(cls, fit: Fit, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """Draws of every latent/global site, each of shape ``(num_samples, *site_shape)``.

        The default uses draws the engine stored in ``fit.samples`` (MCMC-like engines), and
        otherwise repeats the point estimate in ``fit.params`` for the model's latent sites.
        """
        from jointkl.fit import point_draws, stored_draws

        if fit.samples:
            return stored_draws(fit, num_samples, seed)
        return point_draws(fit, num_samples)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def recreate_params(*fns: Any, args: tuple = (), kwargs: dict | None = None) -> None:
    """Empty Pyro's param store, then run each of ``fns`` once on the data so that every
    ``pyro.param``/``pyro.module`` exists again (values are then poured in by the engine).

    Runs without gradients or side effects, and leaves torch's RNG state as it found it.
    """
    import pyro
    import pyro.poutine as poutine
    import torch

    pyro.clear_param_store()
    rng = torch.get_rng_state()
    with torch.no_grad(), poutine.block():
        for fn in fns:
            poutine.trace(fn).get_trace(*args, **(kwargs or {}))
    torch.set_rng_state(rng)
