"""Optimisers as integrators of gradient dynamics (see docs/optim.md).

Each optimiser is a :class:`torch.optim.Optimizer` that takes one step of a stated ODE solver
with time step ``step_size`` (ε):

==================  ==========================================  ===============================
name                ODE and discretisation                      torch.optim equivalent
==================  ==========================================  ===============================
``GradientFlow``    dθ/dt = −∇L, Euler                          SGD(lr=ε)
``HeavyBall``       θ̈ + λθ̇ = −∇L, semi-implicit Euler          SGD(lr=ε², momentum=1−ελ)
``Nesterov``        same, force at the look-ahead point         SGD(..., nesterov=True)
``Heun``            dθ/dt = −∇L, Heun (2nd order, 2 gradients)  none
``AdaptiveFlow``    dθ/dt = −h⊙∇L, h = 1/(√avg g² + δ)          RMSprop; with momentum, Adam
``NormalisedFlow``  dθ/dt = −∇L/‖∇L‖, Euler, steps of length ε  none
==================  ==========================================  ===============================

:data:`OPTIMIZERS` names them for engines (``SVI(optim="heavyball")``); :data:`OPTIM_CLASSES`
adds torch's optimisers, the whole table an engine's ``optim`` setting reads through
:func:`optim_class`. :func:`pyro_optim` wraps an integrator as a :class:`pyro.optim.PyroOptim`.
"""

from __future__ import annotations

from typing import Any

import pyro.optim
import torch

from jointkl.errors import InputError
from jointkl.optim.adaptive import AdaptiveFlow
from jointkl.optim.discretisation import Discretisation
from jointkl.optim.flow import GradientFlow
from jointkl.optim.fused_pyro import FusedPyroOptim
from jointkl.optim.heavyball import HeavyBall, heavyball_settings, sgd_settings
from jointkl.optim.heun import Heun
from jointkl.optim.names import COUPLED, OPTIM_CLASSES, OPTIMIZERS, optim_class, step_size_args
from jointkl.optim.nesterov import Nesterov
from jointkl.optim.normalised import NormalisedFlow

__all__ = [
    "AdaptiveFlow",
    "Discretisation",
    "GradientFlow",
    "HeavyBall",
    "Heun",
    "Nesterov",
    "NormalisedFlow",
    "OPTIMIZERS",
    "OPTIM_CLASSES",
    "optim_class",
    "step_size_args",
    "heavyball_settings",
    "pyro_optim",
    "sgd_settings",
]


def pyro_optim(
    name: str, clip_args: dict[str, float] | None = None, **kwargs: Any
) -> pyro.optim.PyroOptim:
    """One of :data:`OPTIMIZERS` as a :class:`pyro.optim.PyroOptim` for ``pyro.infer.SVI``.

    :param name: a key of :data:`OPTIMIZERS` (``"heavyball"``, ...), case-insensitive.
    :param clip_args: Pyro's gradient clipping (``{"clip_norm": ...}``), optional.
    :param kwargs: the optimiser's settings, e.g. ``step_size=0.1, friction=1.0``.

    ``"normalisedflow"`` (a global gradient norm) comes as one optimiser over all parameters
    (:class:`~jointkl.optim.fused_pyro.FusedPyroOptim`), not Pyro's one per tensor.

    The settings are checked here, before any step, by building the optimiser once on a
    dummy parameter. ``"heun"`` is refused: Pyro's ``SVI.step`` calls the optimiser without a
    closure, and Heun's method needs one to take its second gradient.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise InputError(
            f"pyro_optim: unknown optimiser {name!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    if key == "heun":
        raise InputError(
            "pyro_optim: 'heun' cannot run under pyro.infer.SVI, which steps its optimiser "
            "without a closure; Heun's method needs one to evaluate its second gradient. Use "
            "jointkl.optim.Heun in a torch loop with step(closure), or another optimiser"
        )
    cls = OPTIMIZERS[key]
    try:
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except TypeError as e:
        raise InputError(f"pyro_optim: bad settings for {cls.__name__}: {e}") from e
    if key in COUPLED:
        # A global gradient norm spans every parameter: one optimiser for all of them.
        if clip_args:
            raise InputError(
                f"pyro_optim: {name!r} takes no clip_args: its step has length step_size "
                "whatever the gradient's size, and per-tensor clipping would bend its direction"
            )
        return FusedPyroOptim(cls, dict(kwargs))
    return pyro.optim.PyroOptim(cls, dict(kwargs), clip_args)
