"""The registries: engines and zoo models by their short names.

A leaf module (it imports nothing of jointkl but its errors): engines and zoo classes
register themselves here when their modules are imported (``import jointkl`` imports them
all), and the CLI and :meth:`jointkl.Fit.load` look them up by the name a run recorded.
"""

from __future__ import annotations

from typing import Any

from jointkl.errors import InputError

__all__ = ["ENGINES", "MODELS", "register_engine", "register_model", "engine_class", "model_class"]

ENGINES: dict[str, type[Any]] = {}
MODELS: dict[str, type[Any]] = {}


def register_engine(cls: type) -> type:
    """Class decorator: make an engine findable by its ``name``."""
    ENGINES[cls.name] = cls
    return cls


def register_model(cls: type) -> type:
    """Class decorator: make a zoo model findable by its ``name``."""
    MODELS[cls.name] = cls
    return cls


def engine_class(name: str) -> type:
    """The engine registered as ``name``; an :class:`InputError` listing the known ones."""
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


def model_class(name: str) -> type:
    """The zoo model registered as ``name``; an :class:`InputError` listing the known ones."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]
