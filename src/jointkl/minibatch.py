"""Mini-batching through the model's ``"data"`` plate, shared by the gradient engines.

An engine slices every per-data-point argument (a tensor whose first dimension is the plate's
size N) to a batch of B points and scales the log-density of every site inside the plate by
N/B, so the batch objective is an unbiased estimate of the full-data one while global sites
keep scale 1. Models keep their ordinary form (``with pyro.plate("data", len(x)): ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pyro.poutine.messenger import Messenger

from jointkl.errors import InputError

__all__ = [
    "DATA_PLATE",
    "ScaleDataPlate",
    "check_finite_data",
    "sliceable_arguments",
    "slice_arguments",
]

DATA_PLATE = "data"


class ScaleDataPlate(Messenger):
    """Multiply the log-density of every site inside the ``"data"`` plate by N/B.

    The engine slices the data arguments to a mini-batch and the model sees a plate of size
    B; scaling those sites by N/B keeps the ELBO an unbiased estimate of the full-data one,
    while global sites keep scale 1.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if any(f.name == DATA_PLATE for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def check_finite_data(args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Refuse NaN/inf in floating data arguments before any work starts."""
    for where, a in [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if (
            isinstance(a, torch.Tensor)
            and a.dtype.is_floating_point
            and not torch.isfinite(a).all()
        ):
            n = int((~torch.isfinite(a)).sum())
            raise InputError(f"data {where} has {n} NaN/inf value(s); clean or drop them first")


def sliceable_arguments(
    args: tuple, kwargs: Mapping[str, Any], n: int
) -> tuple[set[int], set[str]]:
    """Which arguments are per-data-point (a tensor whose first dim is the plate size)."""

    def per_point(a):
        return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n

    return (
        {i for i, a in enumerate(args) if per_point(a)},
        {k for k, a in kwargs.items() if per_point(a)},
    )


def slice_arguments(args: tuple, kwargs: Mapping[str, Any], which, idx: torch.Tensor):
    """The batch ``idx`` of the arguments marked by :func:`sliceable_arguments`."""
    ai, ki = which
    return (
        tuple(a[idx] if i in ai else a for i, a in enumerate(args)),
        {k: (a[idx] if k in ki else a) for k, a in kwargs.items()},
    )
