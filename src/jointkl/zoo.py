"""The model registry: zoo models by short name, and user models from ``file.py:name``.

Zoo classes (in ``jointkl.models``) register themselves with :func:`register_model`; each
has a ``name``, a one-line ``description``, ``settings()`` (the constructor arguments, JSON,
so a saved fit can rebuild the model) and ``default_data(seed)`` (an embedded dataset as
``(args, kwargs)`` so ``jointkl fit <name>`` runs with no ``--data``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from jointkl.errors import InputError
from jointkl.pair import as_pair
from jointkl.registry import MODELS, model_class, register_model

__all__ = ["MODELS", "register_model", "model_class", "load_user_object", "build_pair"]


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
