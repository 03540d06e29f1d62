"""Where a fit computes: resolving the ``device`` setting and moving data and networks once.

Every engine takes ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or ``None``;
checked by :func:`jointkl.settings.device`). :meth:`jointkl.engine.Engine.bind_data` resolves
it with :func:`resolve_device` and moves the data (:func:`moved`) and the networks the pair
holds (:func:`move_modules`) there once, before the loop; the model then creates its
``pyro.param`` values on the data's device (``x.device``), so no step copies anything
between devices. A saved fit is device-free (``Fit.save`` writes CPU tensors) and
``Fit.load(dir, device=...)`` puts it back on any device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_device", "data_device", "moved", "move_modules", "follow"]


def data_device(
    args: Iterable[Any], kwargs: Mapping[str, Any], default: torch.device | None = None
) -> torch.device:
    """The device of the first tensor among the data arguments (``default``, else the CPU,
    when there is none)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return default if default is not None else torch.device("cpu")


def resolve_device(
    name: str | None, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> torch.device:
    """The ``torch.device`` a fit runs on.

    :param name: a checked ``device`` setting: ``"auto"`` is CUDA when
        ``torch.cuda.is_available()`` else the CPU; ``None`` is where the data already are
        (:func:`data_device`: the CPU for data read from files); ``"cuda"`` is the current
        CUDA device with its index (``cuda:0``); any other string is itself.
    :param args, kwargs: the data arguments (read only when ``name`` is ``None``).
    """
    if name is None:
        return data_device(args, kwargs or {})
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # named with its index, as a tensor's .device names it
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it on ``device``: a tensor, or tuples, lists and dicts
    of them (recursively); anything else is returned as it is. A tensor already there is
    returned itself (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(moved(v, device) for v in value)
    if isinstance(value, list):
        return [moved(v, device) for v in value]
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def move_modules(pair: Any, device: torch.device) -> None:
    """Move the ``nn.Module`` networks a pair holds (the pair itself when it is one, and its
    attributes that are modules) to ``device``, in place: their ``nn.Parameter`` objects stay
    the same objects, so ``pyro.module`` registrations stay linked."""
    if isinstance(pair, nn.Module):
        pair.to(device)
        return
    for value in list(getattr(pair, "__dict__", {}).values()):
        if isinstance(value, nn.Module):
            value.to(device)


def follow(module: nn.Module | None, x: torch.Tensor) -> nn.Module | None:
    """``module`` moved to ``x``'s device when its parameters (or buffers) are elsewhere (a
    network a model builds lazily is built on the CPU); in place, so cheap once there."""
    if module is None:
        return None
    # Only the first tensor is read, so the generators are not unpacked: listing every
    # parameter walks the whole module tree, which on a VAE's networks cost ~0.5 ms of
    # each SVI step (the model and the guide each call this).
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device != x.device:
            module.to(x.device)
        break
    return module
