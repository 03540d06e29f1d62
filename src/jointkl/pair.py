"""A model/guide pair: the one thing every engine fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Pair", "ModelGuide", "as_pair"]


@runtime_checkable
class ModelGuide(Protocol):
    """Anything with Pyro callables ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)``.

    ``guide`` may be ``None``: the engine then builds its default guide (an autoguide for
    SVI, none for EM, whose E-step is exact). Zoo models add optional hooks an engine can use.
    """

    def model(self, *args: Any, **kwargs: Any) -> Any: ...


class Pair:
    """Wrap two plain Pyro functions as a model/guide pair.

    :param model: a Pyro model ``model(*args, **kwargs)``.
    :param guide: a Pyro guide with the same signature, or ``None`` for the engine's default.
    """

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any] | None = None):
        if not callable(model):
            raise TypeError(f"Pair: model must be callable, got {type(model).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"Pair: guide must be callable or None, got {type(guide).__name__}")
        self.model = model
        self.guide = guide

    def __repr__(self) -> str:
        name = getattr(self.model, "__name__", type(self.model).__name__)
        return f"Pair(model={name}, guide={'default' if self.guide is None else 'given'})"


def as_pair(obj: Any) -> Any:
    """A pair from a pair-like object or a bare model function (which gets the default guide)."""
    if hasattr(obj, "model") and callable(obj.model):
        if not hasattr(obj, "guide"):
            obj.guide = None
        return obj
    if callable(obj):
        return Pair(obj)
    raise TypeError(
        f"expected a model/guide pair (an object with .model and .guide) or a model function, "
        f"got {type(obj).__name__}"
    )
