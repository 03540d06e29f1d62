"""The common ground of the optimisers: an optimiser is a discretisation of an ODE.

Every optimiser in :mod:`jointkl.optim` integrates a flow in fictitious time t, such as
gradient flow dθ/dt = −∇L(θ), with a time step ε (``step_size``). This module holds what they
share: validation of the settings of each parameter group (at construction and in
``add_param_group``, before any step is taken), and the collection of the parameters that have
a gradient, as flat lists for torch's multi-tensor (``torch._foreach_*``) kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from jointkl.errors import InputError
from jointkl.settings import is_number

__all__ = ["Discretisation", "check_positive", "check_range"]


def check_positive(owner: str, name: str, value: Any) -> None:
    """Raise :class:`InputError` unless ``value`` is a finite number > 0."""
    if not is_number(value) or value <= 0:
        raise InputError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def check_range(
    owner: str, name: str, value: Any, low: float, high: float, *, high_open: bool = False
) -> None:
    """Raise :class:`InputError` unless ``low <= value <= high`` (``< high`` if ``high_open``)."""
    ok = is_number(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise InputError(
            f"{owner}: {name} must be a number in [{low:g}, {high:g}{bracket}, got {value!r}"
        )


class Discretisation(torch.optim.Optimizer):
    """Base class: a :class:`torch.optim.Optimizer` whose update is one step of an ODE solver.

    Subclasses pass their defaults (always including ``step_size``) and implement
    :meth:`check_group`, which raises :class:`~jointkl.errors.InputError` for a setting outside
    the range where the discretisation means what its docstring says, and :meth:`update`, one
    solver step for one parameter group.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        check_positive(type(self).__name__, "step_size", group["step_size"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be (defaults filled in) before it joins the optimiser,
        # so a bad group never half-exists.
        merged = {**self.defaults, **param_group}
        self.check_group(merged)
        super().add_param_group(param_group)

    def params_with_grad(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters of ``group`` that have a gradient, and those gradients."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise InputError(
                    f"{type(self).__name__}: sparse gradients are not supported "
                    f"(parameter of shape {tuple(p.shape)})"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def state_tensors(self, params: list[Tensor], key: str) -> list[Tensor]:
        """Per-parameter state ``key`` (e.g. a velocity), created as zeros on first use: the
        ODE's auxiliary variables start at rest."""
        out = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(state[key])
        return out

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """One step of the solver for ``group``: ``params`` (those with a gradient) and their
        ``grads``, updated in place."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self.evaluate(closure)
        for group in self.param_groups:
            params, grads = self.params_with_grad(group)
            if params:
                self.update(group, params, grads)
        return loss

    @staticmethod
    def evaluate(closure: Callable[[], Any] | None) -> Any:
        """Call ``closure`` (if any) with gradients enabled, as torch optimisers do."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
