"""Reading the gradients a step is about to apply: are they finite, and how large.

A loop checks every step's gradients before its optimiser moves, so that a NaN/inf never
reaches the parameters (the last good state is kept and can be saved).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["grads_finite", "grad_norm"]


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    # A sparse gradient's stored values may repeat a row (uncoalesced): they are all finite
    # exactly when the coalesced sums are (or a sum overflows, which is divergence too).
    return [g._values() if g.is_sparse else g for p in params if (g := p.grad) is not None]


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """Are all gradient entries of ``params`` finite (parameters without a gradient pass)?

    One fused reduction and one host sync, not one per parameter: the per-tensor norms are
    finite iff every entry is (or none is so large its square overflows, which is divergence
    all the same).
    """
    grads = _grads(params)
    if not grads:
        return True
    try:
        norms = torch._foreach_norm(grads)
    except (RuntimeError, TypeError):  # a tensor kind the fused kernel does not take
        return all(bool(torch.isfinite(g).all()) for g in grads)
    # Norms are ≥ 0, so their sum is finite iff each is (NaN and inf propagate, nothing
    # cancels): one reduction and one read instead of a stack, an isfinite and an all.
    if len(norms) == 1:
        return math.isfinite(float(norms[0]))
    return math.isfinite(float(torch.stack([n.to(norms[0]) for n in norms]).sum()))


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """The global L2 norm ‖g‖ = √(Σ_p ‖g_p‖²) of the gradients of ``params``, sparse ones
    coalesced first (a repeated row counts once, with its summed value): the norm clipping
    scales by."""
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()._values()
        total += float(torch.linalg.vector_norm(g)) ** 2
    return math.sqrt(total)
