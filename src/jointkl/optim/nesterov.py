"""Nesterov's accelerated gradient: the heavy ball that looks where it is going.

Same ODE as :mod:`jointkl.optim.heavyball`, θ̈ + λθ̇ = −∇L(θ), and the same semi-implicit
Euler step, except that the force is evaluated at the look-ahead point θ_n + εμ v_n (where the
ball would coast to with no force; μ = 1 − ελ):

    v_{n+1} = μ v_n − ε ∇L(θ_n + εμ v_n)
    θ_{n+1} = θ_n + ε v_{n+1}.

To need only one gradient, at the parameters' current value, the optimiser stores the
look-ahead point φ_n = θ_n + εμ v_n as the parameters. Substituting,

    φ_{n+1} = φ_n − ε² ∇L(φ_n) + εμ v_{n+1},

which is ``torch.optim.SGD(lr=ε², momentum=μ, nesterov=True)``: the same map as the heavy
ball, lr = ε² and momentum = 1 − ελ. Expanding ∇L(θ + εμv) ≈ ∇L(θ) + εμ∇²L v shows what the
look-ahead does to the dynamics: to first order in ε it integrates θ̈ + (λ + εμ∇²L) θ̇ = −∇L,
extra friction along the directions of high curvature, which is why Nesterov oscillates less
than the heavy ball at the same λ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jointkl.optim.heavyball import HeavyBall

__all__ = ["Nesterov"]


class Nesterov(HeavyBall):
    """Heavy ball with the force evaluated at the look-ahead point (Nesterov momentum).

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0.
    :param float friction: the friction λ, in [0, 1/ε].

    Equivalent to ``torch.optim.SGD(lr=ε², momentum=1 − ελ, nesterov=True)``. The parameters
    hold the look-ahead point; the velocity is ``state[p]["velocity"]``, starting at rest.
    """

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        eps = group["step_size"]
        mu = 1.0 - eps * group["friction"]
        velocity = self.state_tensors(params, "velocity")
        # v ← μ v − ε g, with g taken at the look-ahead point φ (the stored parameters).
        torch._foreach_mul_(velocity, mu)
        torch._foreach_add_(velocity, grads, alpha=-eps)
        # φ ← φ − ε² g + εμ v: the next look-ahead point.
        torch._foreach_add_(params, grads, alpha=-eps * eps)
        torch._foreach_add_(params, velocity, alpha=eps * mu)
