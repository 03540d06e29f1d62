"""The optimiser names an engine's ``optim`` setting accepts, and the one lookup of a name.

:data:`OPTIMIZERS` holds the integrators of this package (their step is ``step_size``, ε);
:data:`OPTIM_CLASSES` is every name an engine may give: torch's optimisers, Pyro's
``ClippedAdam``, and the integrators. :func:`optim_class` is the one place a name becomes a
class, with one message for an unknown name.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.optim.clipped_adam import ClippedAdam

from jointkl.errors import InputError
from jointkl.optim.adaptive import AdaptiveFlow
from jointkl.optim.flow import GradientFlow
from jointkl.optim.heavyball import HeavyBall
from jointkl.optim.heun import Heun
from jointkl.optim.nesterov import Nesterov
from jointkl.optim.normalised import NormalisedFlow

__all__ = [
    "OPTIMIZERS",
    "OPTIM_CLASSES",
    "NEEDS_CLOSURE",
    "COUPLED",
    "optim_class",
    "step_size_args",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "gradientflow": GradientFlow,
    "heavyball": HeavyBall,
    "nesterov": Nesterov,
    "heun": Heun,
    "adaptiveflow": AdaptiveFlow,
    "normalisedflow": NormalisedFlow,
}

# Optimisers whose update couples all parameters (a global gradient norm): they need one
# optimiser over every parameter, not Pyro's one-per-tensor.
COUPLED: frozenset[str] = frozenset({"normalisedflow"})

OPTIM_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "lbfgs": torch.optim.LBFGS,
    "clippedadam": ClippedAdam,
    **OPTIMIZERS,
}

# Optimisers whose step() must re-evaluate the loss through a closure: a loop that calls
# step() with none (Pyro's SVI step, a plain mini-batch loop) cannot run them.
NEEDS_CLOSURE: dict[str, str] = {
    "heun": "two gradients per step",
    "lbfgs": "a line search at every step",
}


def optim_class(name: Any, owner: str, *, closure: bool = False) -> type[torch.optim.Optimizer]:
    """The optimiser class an engine's ``optim`` name stands for.

    :param name: a key of :data:`OPTIM_CLASSES`.
    :param owner: who asks (an engine's name), for the message.
    :param closure: whether the caller's loop passes ``step()`` a closure; without one, the
        optimisers of :data:`NEEDS_CLOSURE` are refused.
    :raises InputError: for an unknown name (listing the known ones), or a closure-only
        optimiser in a loop without closures.
    """
    cls = OPTIM_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join(sorted(OPTIM_CLASSES))
        raise InputError(f"{owner}: unknown optim {name!r}; known: {known}")
    if name in NEEDS_CLOSURE and not closure:
        raise InputError(
            f"{owner}: optim {name!r} needs a closure ({NEEDS_CLOSURE[name]}), which this "
            f"step loop cannot give; use another optimiser (or {cls.__name__} in a torch loop "
            "with step(closure))"
        )
    return cls


def step_size_args(name: str, lr: float) -> dict[str, float]:
    """The constructor argument that sets the step: ``step_size`` (ε) for the integrators of
    :data:`OPTIMIZERS`, ``lr`` for the others."""
    return {"step_size": lr} if name in OPTIMIZERS else {"lr": lr}
