"""Normalised gradient flow, integrated by Euler's method: steps of fixed length ε.

The ODE is dθ/dt = −∇L(θ)/‖∇L(θ)‖, gradient flow reparameterised by arc length: the path is
the steepest-descent curve of L, traversed at unit speed whatever the gradient's size, so t is
the distance travelled. One explicit Euler step of size ε is

    θ_{n+1} = θ_n − ε ∇L(θ_n) / ‖∇L(θ_n)‖,

a move of exactly ε in parameter space. ‖·‖ is the global Euclidean norm over every parameter
the step moves, so the direction is the whole gradient's, not a per-tensor one. Where
∇L = 0 (a stationary point, where the flow is undefined) the step moves nothing.

On an isotropic quadratic L = ½a‖θ − θ*‖² the exact flow runs straight at θ* and arrives at
t = ‖θ_0 − θ*‖; every Euler step lies on that line, so the iterates are the exact solution at
t = nε until they pass θ*, and then stay within ε of it (a fixed step length cannot settle:
the normalised step converges to a neighbourhood of size ε, not to the point).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from jointkl.optim.discretisation import Discretisation

__all__ = ["NormalisedFlow"]


class NormalisedFlow(Discretisation):
    """Euler's method on dθ/dt = −∇L(θ)/‖∇L(θ)‖ (global norm over all parameters).

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0, which is also the length of every step.
        Groups with different step sizes move ε_group · g_group/‖g‖, ‖g‖ still global.
    """

    def __init__(self, params: Iterable[Any], step_size: float = 1e-3):
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.evaluate(closure)
        groups = [(g, *self.params_with_grad(g)) for g in self.param_groups]
        grads = [t for _, _, gs in groups for t in gs]
        if not grads:
            return loss
        norms = torch._foreach_norm(grads)
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0]) for n in norms]))
        # 1/‖g‖, or 0 where the gradient vanishes: on the device, no host sync.
        inverse = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
        for group, params, gs in groups:
            if params:
                self.update(group, params, gs, inverse)
        return loss

    def update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], inverse: Tensor
    ) -> None:
        scaled = torch._foreach_mul(grads, inverse * group["step_size"])
        torch._foreach_sub_(params, scaled)
