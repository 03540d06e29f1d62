"""Adaptive flow: gradient flow with a per-coordinate time scale (RMSprop, and Adam).

Only the fixed points of a flow decide where it ends, and dθ/dt = −h(θ) ⊙ ∇L(θ) has the same
fixed points as gradient flow for any positive h. Choosing h per coordinate so that every
coordinate moves by about the same amount per unit time gives h ∝ 1/|g|; smoothing g² by an
exponential moving average (time constant ~ 1/(1 − β) steps) gives

    s_{n+1} = β s_n + (1 − β) g_n²
    θ_{n+1} = θ_n − ε g_n / (√s_{n+1} + δ),

which is ``torch.optim.RMSprop(lr=ε, alpha=β, eps=δ)`` (with ``momentum=0`` and
``debias=False`` here).

With ``momentum`` = β₁ > 0 the force is low-pass filtered as well, m ← β₁ m + (1 − β₁) g. That
is the Euler step of ṁ = κ(∇L − m) with κ = (1 − β₁)/ε, and with θ̇ = −h m it gives
θ̈ + κθ̇ = −κ h ∇L (for slowly varying h): a heavy ball with friction κ in the preconditioned
geometry. With the bias correction of both averages (they start at zero, so divide by
1 − β^n), this is ``torch.optim.Adam(lr=ε, betas=(β₁, β), eps=δ)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from jointkl.optim.discretisation import Discretisation, check_range

__all__ = ["AdaptiveFlow"]


class AdaptiveFlow(Discretisation):
    """Euler's method on dθ/dt = −h ⊙ ∇L with h = 1/(√s + δ), s an average of g².

    :param params: the parameters (an iterable of tensors or of parameter-group dicts).
    :param float step_size: the time step ε > 0.
    :param float smoothing: β in [0, 1), the decay of the running average s of g².
    :param float momentum: β₁ in [0, 1), the decay of the running average m of g; 0 uses g.
    :param float eps: δ ≥ 0, added to √s so that flat coordinates don't get infinite steps.
    :param bool debias: divide the averages by 1 − β^n (they start at zero).

    Parameter maps: ``RMSprop(lr, alpha, eps)`` is ``AdaptiveFlow(step_size=lr,
    smoothing=alpha, eps=eps, momentum=0, debias=False)``; ``Adam(lr, betas=(b1, b2), eps)`` is
    ``AdaptiveFlow(step_size=lr, momentum=b1, smoothing=b2, eps=eps)``, the defaults.
    """

    def __init__(
        self,
        params: Iterable[Any],
        step_size: float = 1e-3,
        smoothing: float = 0.999,
        momentum: float = 0.9,
        eps: float = 1e-8,
        debias: bool = True,
    ):
        defaults = {
            "step_size": step_size,
            "smoothing": smoothing,
            "momentum": momentum,
            "eps": eps,
            "debias": debias,
        }
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        super().check_group(group)
        check_range(name, "smoothing", group["smoothing"], 0.0, 1.0, high_open=True)
        check_range(name, "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range(name, "eps", group["eps"], 0.0, float("inf"), high_open=True)

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta, beta1 = group["smoothing"], group["momentum"]
        sq_avg = self.state_tensors(params, "sq_avg")
        # s ← β s + (1 − β) g²: the running scale of each coordinate's gradient.
        torch._foreach_mul_(sq_avg, beta)
        torch._foreach_addcmul_(sq_avg, grads, grads, value=1.0 - beta)
        if beta1 > 0:
            force = self.state_tensors(params, "avg")
            # m ← m + (1 − β₁)(g − m): the filtered force (Euler on ṁ = κ(g − m)).
            torch._foreach_lerp_(force, grads, 1.0 - beta1)
        else:
            force = grads

        # Steps taken per parameter (a parameter may have skipped steps with no gradient).
        counts = []
        for p in params:
            state = self.state[p]
            state["steps"] = state.get("steps", 0) + 1
            counts.append(state["steps"])

        denom = torch._foreach_sqrt(sq_avg)
        if group["debias"]:
            torch._foreach_div_(denom, [(1.0 - beta**n) ** 0.5 for n in counts])
            scale = [-group["step_size"] / (1.0 - beta1**n) for n in counts]
        else:
            scale = [-group["step_size"]] * len(params)
        torch._foreach_add_(denom, group["eps"])
        # θ ← θ − ε m̂ / (√ŝ + δ)
        torch._foreach_addcdiv_(params, force, denom, scale)
