"""The heavy ball with friction: momentum SGD as a damped Newtonian system.

The ODE is a ball of unit mass rolling on the surface L with friction λ,

    θ̈ + λ θ̇ = −∇L(θ),

written as the first-order system θ̇ = v, v̇ = −λ v − ∇L(θ). Semi-implicit (symplectic) Euler
with time step ε updates the velocity first and moves with the new velocity:

    v_{n+1} = (1 − ελ) v_n − ε ∇L(θ_n)
    θ_{n+1} = θ_n + ε v_{n+1}.

Eliminating v gives θ_{n+1} = θ_n − ε²∇L(θ_n) + (1 − ελ)(θ_n − θ_{n−1}), which is momentum SGD
(``torch.optim.SGD(lr, momentum)``, buffer b = −v/ε) under the map

    lr = ε²,   momentum = 1 − ελ        (ε = √lr,  λ = (1 − momentum)/√lr).

So momentum 0.9 at lr 0.01 is a time step of 0.1 with friction 1. The friction must keep the
momentum in [0, 1]: 0 ≤ λ ≤ 1/ε (λ = 0 is the undamped ball, which orbits a minimum forever;
λ = 1/ε forgets the velocity each step and is gradient descent with step ε²).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from jointkl.optim.discretisation import Discretisation, check_positive, check_range

__all__ = ["HeavyBall", "sgd_settings", "heavyball_settings"]


def sgd_settings(step_size: float, friction: float) -> dict[str, float]:
    """The ``torch.optim.SGD`` settings ``{"lr", "momentum"}`` that take the same steps as a
    heavy ball with time step ``step_size`` (ε) and ``friction`` (λ): lr = ε², momentum = 1 − ελ.
    """
    return {"lr": step_size * step_size, "momentum": 1.0 - step_size * friction}


def heavyball_settings(lr: float, momentum: float) -> dict[str, float]:
    """The inverse of :func:`sgd_settings`: ε = √lr, λ = (1 − momentum)/√lr."""
    check_positive("heavyball_settings", "lr", lr)
    check_range("heavyball_settings", "momentum", momentum, 0.0, 1.0)
    step_size = math.sqrt(lr)
    return {"step_size": step_size, "friction": (1.0 - momentum) / step_size}


def check_friction(owner: str, group: dict[str, Any]) -> None:
    """Friction must lie in [0, 1/ε] so that the momentum 1 − ελ lies in [0, 1]."""
    check_positive(owner, "step_size", group["step_size"])
    check_range(owner, "friction", group["friction"], 0.0, 1.0 / group["step_size"])


class HeavyBall(Discretisation):
    """Semi-implicit Euler on θ̈ + λθ̇ = −∇L(θ) (momentum SGD with physical parameters).

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0.
    :param float friction: the friction λ, in [0, 1/ε].

    Equivalent to ``torch.optim.SGD(lr=ε², momentum=1 − ελ)`` (see :func:`sgd_settings`).
    The velocity v is kept in ``state[p]["velocity"]``, starting at rest.
    """

    def __init__(self, params: Iterable[Any], step_size: float = 0.1, friction: float = 1.0):
        super().__init__(params, {"step_size": step_size, "friction": friction})

    def check_group(self, group: dict[str, Any]) -> None:
        check_friction(type(self).__name__, group)

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        eps, lam = group["step_size"], group["friction"]
        velocity = self.state_tensors(params, "velocity")
        # v ← (1 − ελ) v − ε g: friction and force over one time step.
        torch._foreach_mul_(velocity, 1.0 - eps * lam)
        torch._foreach_add_(velocity, grads, alpha=-eps)
        # θ ← θ + ε v, with the *new* velocity (symplectic Euler).
        torch._foreach_add_(params, velocity, alpha=eps)
