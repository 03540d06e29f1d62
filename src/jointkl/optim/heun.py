"""Heun's method on gradient flow: a second-order integrator with two gradients per step.

The ODE is dθ/dt = −∇L(θ), as for :mod:`jointkl.optim.flow`. Heun's method (explicit
trapezoidal rule, a two-stage Runge–Kutta method) takes an Euler predictor step and then
averages the slopes at both ends:

    θ̃       = θ_n − ε ∇L(θ_n)                    (predictor)
    θ_{n+1} = θ_n − ε/2 [∇L(θ_n) + ∇L(θ̃)]         (corrector)

Its local error is O(ε³), its global error O(ε²): halving ε divides the error by four, where
Euler only halves it. The price is a second gradient, so ``step`` needs a closure that
re-evaluates the loss and its gradients at the predicted point.

Pyro's ``SVI.step`` calls its optimiser without a closure (the ELBO's gradients are computed
once, before the optimiser runs), so ``Heun`` cannot be driven by ``pyro.infer.SVI``; use it in
a plain torch loop, or in an engine that passes the closure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from jointkl.errors import InputError
from jointkl.optim.discretisation import Discretisation

__all__ = ["Heun"]


class Heun(Discretisation):
    """Heun's (explicit trapezoidal) method on dθ/dt = −∇L(θ).

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0.

    ``step(closure)`` requires ``closure``: a function that computes the loss, calls
    ``backward()`` and returns the loss. Heun clears the gradients before each of the two calls,
    so the closure need not (it may). ``step`` returns the loss at the start of the step; after
    it, ``p.grad`` holds the gradient at the predicted point.
    """

    def __init__(self, params: Iterable[Any], step_size: float = 1e-3):
        super().__init__(params, {"step_size": step_size})

    def _clear_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise InputError(
                "Heun.step: closure is required (a function that recomputes the loss, calls "
                "backward() and returns the loss): Heun's method evaluates the gradient twice "
                "per step, at θ and at the Euler-predicted point"
            )
        self._clear_grads()
        loss = self.evaluate(closure)

        # Predictor: θ̃ = θ − ε g₀. The first gradients are taken out of p.grad (and kept)
        # instead of copied, so the second backward fills fresh tensors.
        stages = []
        for group in self.param_groups:
            params, grads = self.params_with_grad(group)
            if params:
                torch._foreach_add_(params, grads, alpha=-group["step_size"])
                stages.append((group["step_size"], params, grads))
        self._clear_grads()
        self.evaluate(closure)

        # Corrector: θ_{n+1} = θ_n − ε/2 (g₀ + g₁) = θ̃ + ε/2 (g₀ − g₁).
        for eps, params, g0 in stages:
            # A parameter the loss stopped depending on has zero slope at θ̃.
            g1 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            torch._foreach_sub_(g0, g1)
            torch._foreach_add_(params, g0, alpha=0.5 * eps)
        return loss
