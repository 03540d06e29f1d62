"""Gradient flow, integrated by Euler's method: plain gradient descent.

The ODE is dθ/dt = −∇L(θ). Its fixed points are the stationary points of L, and the minima are
the stable ones. One explicit Euler step of size ε is

    θ_{n+1} = θ_n − ε ∇L(θ_n),

which is ``torch.optim.SGD(lr=ε)``. Euler is a first-order method (global error O(ε)) and is
stable near a minimum only while ε < 2/λ_max(∇²L): past that, the mode with the largest
curvature is multiplied by |1 − ελ_max| > 1 each step and the iterates blow up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from jointkl.optim.discretisation import Discretisation

__all__ = ["GradientFlow"]


class GradientFlow(Discretisation):
    """Euler's method on dθ/dt = −∇L(θ).

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0. Equivalent to ``torch.optim.SGD(lr=ε)``.
    """

    def __init__(self, params: Iterable[Any], step_size: float = 1e-3):
        super().__init__(params, {"step_size": step_size})

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        torch._foreach_add_(params, grads, alpha=-group["step_size"])
