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

    Required: ``model(*args, **kwargs)``, a Pyro model. Everything else is optional; a hook
    left at ``None`` means "not provided" and the engine does without it.

    :cvar name: the short name the CLI and saved fits use (``jointkl fit <name>``).
    :cvar description: one line for ``jointkl models``.
    :cvar engine_defaults: measured engine settings per engine name, applied by the CLI
        before ``--set`` (e.g. ``{"svi": {"batch_size": 1024}}``).
    :cvar default_guide: the autoguide SVI builds when ``guide`` is ``None`` (``"delta"``,
        ``"normal"``, ``"lowrank"``); ``None``: SVI's own default.
    :ivar guide: a Pyro guide ``guide(*args, **kwargs)``; ``None``: the engine's default
        (an autoguide for SVI; EM's E-step is exact and needs none).
    :ivar init_values: ``init_values(*args, seed=int, **kwargs) -> {site: value}``, initial
        values for the latent/global sites (SVI's autoguides start there).
    :ivar default_loss: ``loss(model, guide, *args, **kwargs) -> tensor``, an objective that
        is not an ELBO (SVI uses it when ``loss=None``).
    :ivar candidate_scores: ``candidate_scores(candidates, *context) -> (B, K) tensor``, the
        unnormalised log-density of every candidate in every context at once (NCE scores
        shared noise with it).
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

    def spec(self) -> dict[str, Any]:
        """How a saved fit rebuilds this model: its zoo name and settings."""
        return {"zoo": self.name, "settings": self.settings()}

    def default_data(self, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
        """An embedded dataset as ``(args, kwargs)``, so ``jointkl fit <name>`` runs with no
        ``--data``. Default: none."""
        raise InputError(f"model {self.name!r} has no default dataset: pass --data PATH")

    def diagnostic_plots(self, fit: Any, folder: Path) -> list[Path]:
        """Model-specific plots written into ``folder`` after a fit; their paths. Default:
        none."""
        return []


_DEFAULTS = {
    name: getattr(ZooModel, name)
    for name in ("guide", "init_values", "default_loss", "candidate_scores", "default_guide")
}


def hook(pair: Any, name: str) -> Any:
    """The hook ``name`` of any pair-like object, or :class:`ZooModel`'s default when the
    object does not provide it (``None`` for the optional callables)."""
    if name not in _DEFAULTS and not hasattr(ZooModel, name):
        raise KeyError(f"{name!r} is not a hook of the model protocol")
    default = _DEFAULTS.get(name)
    return getattr(pair, name, default)


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
