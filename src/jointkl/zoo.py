"""Zoo models and user models: the declared protocol, and finding a model by name or file.

Zoo classes (in ``jointkl.models``) subclass :class:`ZooModel` and register themselves with
:func:`register_model`. :class:`ZooModel` declares every hook an engine or the CLI may use,
with its default, so a user writing a model sees what they may provide; a plain
:class:`~jointkl.pair.Pair` or any object with ``model``/``guide`` works too, and
:func:`hook` reads a hook from either kind of object with the same defaults.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from jointkl.errors import InputError
from jointkl.pair import as_pair
from jointkl.registry import MODELS, model_class, register_model

__all__ = [
    "ZooModel",
    "hook",
    "MODELS",
    "register_model",
    "model_class",
    "load_user_object",
    "build_pair",
]


class ZooModel:
    """The protocol of a model/guide pair, with every optional hook and its default.

    Required: ``model(*args, **kwargs)``, a Pyro model whose per-datum sites sit inside
    ``pyro.plate("data", N)``, and, for a zoo model that a saved fit can rebuild,
    ``settings()``. Everything else is optional; a hook left at ``None`` means "not
    provided" and the engine does without it (engines read hooks with :func:`hook`, so a
    plain :class:`~jointkl.pair.Pair` gets the same defaults).

    A zoo model is a subclass that sets ``name`` and ``description``, takes its settings as
    constructor keyword arguments (validated there with the checks of
    :mod:`jointkl.settings`), returns them from ``settings()`` as JSON values, and is
    decorated with :func:`register_model`::

        @register_model
        class Coin(ZooModel):
            name = "coin"
            description = "a biased coin"

            def __init__(self, alpha: float = 1.0):
                self.alpha = positive_float(alpha, "Coin: alpha")

            def settings(self):
                return {"alpha": self.alpha}

            def model(self, flips):
                p = pyro.sample("p", dist.Beta(self.alpha, self.alpha))
                with pyro.plate("data", len(flips)):
                    pyro.sample("flip", dist.Bernoulli(p), obs=flips)

    Class-level hooks:

    :cvar name: the short name the CLI and saved fits use (``jointkl fit <name>``).
    :cvar description: one line for ``jointkl models``.
    :cvar engine_defaults: measured engine settings per engine name, applied by the CLI
        before ``--set`` (e.g. ``{"svi": {"batch_size": 1024}}``).
    :cvar default_guide: the autoguide SVI builds when ``guide`` is ``None`` (``"delta"``,
        ``"normal"``, ``"lowrank"``); ``None``: SVI's own default.

    Optional callables (absent or ``None``: not provided; read them with :func:`hook`):

    :ivar guide: a Pyro guide ``guide(*args, **kwargs)``; ``None``: the engine's default
        (an autoguide for SVI; EM's E-step is exact and needs none).
    :ivar init_values: ``init_values(*args, seed=int, **kwargs) -> {site: value}``, initial
        values for the latent/global sites (SVI's autoguides start there).
    :ivar default_loss: ``loss(model, guide, *args, **kwargs) -> tensor``, an objective that
        is not an ELBO (SVI uses it when ``loss=None``).
    :ivar candidate_scores: ``candidate_scores(candidates, *context) -> (B, K) tensor``, the
        unnormalised log-density of every candidate in every context at once (NCE scores
        shared noise with it).

    Methods with a default: :meth:`spec` (rebuild recipe from :meth:`settings`),
    :meth:`default_data` (none: the CLI asks for ``--data``), :meth:`diagnostic_plots`
    (none).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    engine_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_guide: ClassVar[str | None] = None
    guide: Callable[..., Any] | None = None
    init_values: Callable[..., Mapping[str, Any]] | None = None
    default_loss: Callable[..., Any] | None = None
    candidate_scores: Callable[..., Any] | None = None

    def model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define model()")

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as JSON values, so a saved fit can rebuild the model
        (``type(self)(**self.settings())``)."""
        raise NotImplementedError(f"{type(self).__name__} must define settings()")

    def spec(self) -> dict[str, Any] | None:
        """How a saved fit rebuilds this model: ``{"zoo": name, "settings": settings()}``.

        ``None`` when the class is not the one registered under its ``name`` or does not
        define :meth:`settings` (a subclass written for its hooks alone), since the model
        registry could not rebuild it; a model holding code that JSON cannot record (a user's
        network) overrides this to return ``None`` too. Such a fit is loaded with
        ``Fit.load(dir, pair=...)``."""
        if MODELS.get(self.name) is not type(self) or type(self).settings is ZooModel.settings:
            return None
        return {"zoo": self.name, "settings": self.settings()}

    def default_data(self, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
        """An embedded dataset as ``(args, kwargs)``, so ``jointkl fit <name>`` runs with no
        ``--data``. Default: none."""
        raise InputError(f"model {self.name!r} has no default dataset: pass --data PATH")

    def diagnostic_plots(self, fit: Any, folder: Path) -> list[Path]:
        """Model-specific plots written into ``folder`` after a fit; their paths. Default:
        none."""
        return []


_OPTIONAL = ("guide", "init_values", "default_loss", "candidate_scores")
_CLASS_HOOKS = ("name", "description", "engine_defaults", "default_guide")
_METHODS = ("model", "settings", "spec", "default_data", "diagnostic_plots")


def hook(pair: Any, name: str) -> Any:
    """The hook ``name`` of any pair-like object, with :class:`ZooModel`'s default when the
    object does not provide it.

    Optional callables (``guide``, ``init_values``, ``default_loss``, ``candidate_scores``)
    default to ``None``; class-level hooks to ZooModel's value (``engine_defaults``: ``{}``,
    ``description``: ``""``, ``default_guide``: ``None``); methods (``settings``, ``spec``,
    ``default_data``, ``diagnostic_plots``) to ``None`` on an object that is not a ZooModel,
    so a caller tests ``hook(pair, "default_data") is None`` to learn that there is none.

    :param pair: a ZooModel, a :class:`~jointkl.pair.Pair`, any object with ``model``, or a
        zoo class (for class-level hooks).
    :param name: one of the hooks above; anything else is a :class:`KeyError`.
    """
    if name in _OPTIONAL or name in _METHODS:
        return getattr(pair, name, None)
    if name in _CLASS_HOOKS:
        return getattr(pair, name, getattr(ZooModel, name))
    raise KeyError(f"{name!r} is not a hook of the model protocol")


def load_user_object(spec: str) -> tuple[Any, dict[str, Any]]:
    """``path/to/file.py:name`` (or ``file.py``, taking ``pair``, ``model`` in that order) ->
    the object and the spec to rebuild it."""
    path_s, _, attr = spec.partition(":")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"model file {path_s!r} not found")
    if path.suffix != ".py":
        raise InputError(f"model file {path_s!r} must be a .py file")
    mod_name = f"jointkl_user_{abs(hash(str(path)))}"
    module = sys.modules.get(mod_name)
    if module is None:
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        try:
            s.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise InputError(
                f"model file {path_s!r} failed to import: {type(e).__name__}: {e}"
            ) from e
    candidates = [attr] if attr else ["pair", "model"]
    for name in candidates:
        if hasattr(module, name):
            obj = getattr(module, name)
            if isinstance(obj, type):  # a class: instantiate with defaults
                obj = obj()
            return obj, {"file": str(path), "name": name}
    want = attr or "'pair' or 'model'"
    raise InputError(f"model file {path_s!r} defines no {want}")


def build_pair(spec: dict[str, Any]) -> Any:
    """Rebuild a pair from the ``model_spec`` recorded in a Fit."""
    if "zoo" in spec:
        return model_class(spec["zoo"])(**spec.get("settings", {}))
    if "file" in spec:
        obj, _ = load_user_object(f"{spec['file']}:{spec['name']}")
        return as_pair(obj)
    raise InputError(f"cannot rebuild a model from spec {spec!r}")
