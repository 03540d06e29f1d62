"""Sufficient statistics of EM's closed-form M-steps.

Statistics are weighted sums over the tables' axes (one einsum each, :func:`wsum`) in a slot's
canonical layout; :func:`to_param` maps them back to the free variable's own shape by the
adjoint of the recipe's indexing (a vector-Jacobian product, written out in
:func:`~jointkl.inference.em.factors.index_part_adjoint`), which also sums statistics over
shared or tied cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import opt_einsum
import torch
from jointkl.inference.em.factors import index_part, index_part_adjoint
from jointkl.inference.em.gaussian import data_moments, moment_parts, weighted_moments

from jointkl.chain import broadcast_shapes

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = [
    "wsum",
    "to_param",
    "to_param_by_autograd",
    "target_shape",
    "trailing",
    "full_shape",
    "counts",
    "own_counts",
    "weighted_sums",
    "component_bernoulli_sums",
    "scatter",
]

# A use of a free variable: (group, slot, which input of the slot).
Use = tuple[int, str, int]
# θ by free variable's name; the E-step's posterior weights by group index.
Theta = Mapping[str, torch.Tensor]
Weights = Mapping[int, torch.Tensor]


def wsum(
    target: tuple[int, ...], *ops: torch.Tensor, full: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Σ of the broadcast product of ``ops`` over the axes where ``target`` has size 1
    (kept as size 1). All tensors have ``len(target)`` dims. ``full`` is the size the
    product really has along axes every op broadcasts (each counts that many times)."""
    nd = len(target)
    letters = [opt_einsum.get_symbol(i) for i in range(nd)]
    subs, squeezed = [], []
    present = set()
    for t in ops:
        keep = [a for a in range(nd) if t.shape[a] != 1]
        present.update(keep)
        subs.append("".join(letters[a] for a in keep))
        squeezed.append(t.reshape([t.shape[a] for a in keep]))
    out_axes = [a for a in range(nd) if target[a] != 1 and a in present]
    eq = ",".join(subs) + "->" + "".join(letters[a] for a in out_axes)
    res = torch.einsum(eq, *squeezed)
    shape = [target[a] if a in out_axes else 1 for a in range(nd)]
    res = res.reshape(shape)
    if full is not None:
        mult = 1
        for a in range(nd):
            if target[a] == 1 and a not in present:
                mult *= full[a]
        if mult != 1:
            res = res * mult
    return res.expand(target)


def to_param(
    fm: FactorModel, gi: int, slot: str, which: int, shape: tuple[int, ...], stat: torch.Tensor
) -> torch.Tensor:
    """Map statistics in a slot's canonical layout to the free variable's layout: the
    adjoint (vector-Jacobian product) of the recipe's indexing. ``shape`` may add trailing
    dims to the variable's (statistics that are matrices per mean vector, say)."""
    g = fm.groups[gi]
    return index_part_adjoint(g.slots[slot], which, tuple(shape), stat, fm.role_index(gi), g.n_axes)


def to_param_by_autograd(
    fm: FactorModel, gi: int, slot: str, which: int, shape: tuple[int, ...], stat: torch.Tensor
) -> torch.Tensor:
    """:func:`to_param` by ``torch.autograd.grad`` through :func:`index_part` (the
    definition of the adjoint; the tests check :func:`to_param` against it)."""
    g = fm.groups[gi]
    s = g.slots[slot]
    dummy = torch.zeros(shape, dtype=stat.dtype, device=stat.device, requires_grad=True)
    with torch.enable_grad():
        out = index_part(s, which, dummy, fm.role_index(gi), g.n_axes)
        (grad,) = torch.autograd.grad(out, dummy, grad_outputs=stat.sum_to_size(out.shape))
    return grad


def target_shape(fm: FactorModel, gi: int, slot: str, which: int, theta: Theta) -> tuple[int, ...]:
    """Shape of a slot input in canonical layout: what its statistics are reduced to."""
    g = fm.groups[gi]
    s = g.slots[slot]
    v = theta[s.params[which]]
    return tuple(index_part(s, which, v, fm.role_index(gi), g.n_axes).shape)


def trailing(W: torch.Tensor, n: int) -> torch.Tensor:
    """Weights with ``n`` trailing singleton dims (to meet values with event dims)."""
    return W.reshape(W.shape + (1,) * n)


def full_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast shape of ``shapes``."""
    return tuple(broadcast_shapes(*(tuple(s) for s in shapes)))


def counts(
    fm: FactorModel,
    theta: Theta,
    W: Weights,
    name: str,
    uses: list[Use],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Σ weights x [value == k] in the layout of the probability vectors ``name``.

    :param W: the E-step's weights by group; ``uses``: where ``name`` enters a recipe.
    """
    if len(uses) == 1:
        own = own_counts(fm, W, uses[0], tuple(fm.free[name].shape), dtype)
        if own is not None:
            return own
    total = torch.zeros(fm.free[name].shape, dtype=dtype, device=fm.device)
    for gi, slot, which in uses:
        g = fm.groups[gi]
        K = fm.free[name].shape[-1]
        x = fm.value(gi, dtype)
        onehot = torch.nn.functional.one_hot(x.long(), K).to(dtype)
        w = trailing(W[gi], g.n_event + 1)
        target = target_shape(fm, gi, slot, which, theta)
        stat = wsum(target, w, onehot)
        total = total + to_param(fm, gi, slot, which, theta[name].shape, stat)
    return total


def own_counts(
    fm: FactorModel, W: Weights, use: Use, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """:func:`counts` of an enumerated variable's own probabilities ``(K,)`` (a mixture's
    weights, unindexed) when its weights are already one count per value (the mixture
    E-step's): the one-hot sum Σ_j w_j [j == k] is w_k exactly (every other term an exact
    0), so the counts are the weights, bit for bit; ``None`` for any other use."""
    gi, slot, which = use
    g = fm.groups[gi]
    s = g.slots[slot]
    w = W[gi]
    if (
        g.value != "own"
        or g.family != "categorical"
        or g.mask is not None
        or len(g.cards) != 1
        or g.n_event != 0
        or s.const is not None
        or s.index != ((),)
        or s.pad != (0,)
        or tuple(shape) != g.cards
        or w.dtype != dtype
        or w.dim() < 2
        or w.shape[1] != g.cards[0]
        or any(n != 1 for i, n in enumerate(w.shape) if i != 1)
        or not bool(torch.isfinite(w).all())
    ):
        return None
    return w.reshape(g.cards).clone()


def weighted_sums(
    fm: FactorModel,
    theta: Theta,
    W: Weights,
    uses: list[Use],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    terms: Callable[[int], tuple[torch.Tensor | None, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w a, Σ w a b) in a free variable's layout ``shape``, over the groups of ``uses``,
    with ``(a, b) = terms(group)``: a factor of the weights (``None``: 1; a precision, say)
    and the values summed (the data, squared residuals). The first sum counts each weight as
    often as the product with ``b`` has cells.

    :param theta: θ (the recipe's indexing); ``W``: the E-step's weights by group.
    """
    s0 = torch.zeros(shape, dtype=dtype, device=fm.device)
    s1 = torch.zeros_like(s0)
    for gi, slot, which in uses:
        w = trailing(W[gi], fm.groups[gi].n_event)
        a, b = terms(gi)
        ops = (w,) if a is None else (w, a)
        target = target_shape(fm, gi, slot, which, theta)
        full = full_shape(*(t.shape for t in ops), b.shape)
        s0 = s0 + to_param(fm, gi, slot, which, shape, wsum(target, *ops, full=full))
        s1 = s1 + to_param(fm, gi, slot, which, shape, wsum(target, *ops, b))
    return s0, s1


def component_bernoulli_sums(
    fm: FactorModel, W: Weights, use: Use, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(Σ w, Σ w x) of :func:`weighted_sums` for a mixture's Bernoulli vectors whose
    probabilities are ``probs[z]`` (``shape`` ``(K, D)``, one row per component), computed
    as the general sums compute them — the same ``(K, points) @ (points, D)`` product and
    the same sum over the points, so the same bits — without the einsum set-up and the
    index adjoint (an identity here), which cost about as much as the product on the
    digits; ``None`` for any other use. ``tests/test_em_statistics.py`` pins it to
    :func:`weighted_sums`, bit for bit."""
    gi, slot, which = use
    g = fm.groups[gi]
    s = g.slots[slot]
    x = g.data
    if (
        g.kind != "recipe"
        or g.mask is not None
        or x is None
        or not x.is_floating_point()
        or g.n_event != 1
        or len(g.cards) != 1
        or len(g.plates) != 1
        or s.const is not None
        or len(s.params) != 1
        or s.index != ((("role", 0),),)
        or s.pad != (0,)
    ):
        return None
    K, D = g.cards[0], x.shape[-1]
    w = W[gi]
    if tuple(shape) != (K, D) or x.dim() != 4 or tuple(x.shape[:2]) != (1, 1):
        return None
    if tuple(w.shape) != (1, K, x.shape[2]) or w.dtype != x.dtype:
        return None
    w = w[0]
    return w.sum(-1, keepdim=True).expand(K, D), w @ x[0, 0]


def scatter(
    fm: FactorModel,
    gi: int,
    x: torch.Tensor,
    mu: torch.Tensor,
    W: torch.Tensor,
    target: tuple[int, ...],
) -> torch.Tensor:
    """Σ w (x - mu)(x - mu)^T per cell of ``target`` (group ``gi``'s data ``x``, means
    ``mu`` and weights ``W``).

    When the mean is constant within each cell (per component, as usual) this is
    Σ w x x^T - m1 mu^T - mu m1^T + (Σ w) mu mu^T with m1 = Σ w x, whose first term is one
    matrix product with the data's outer products (cached: the data do not change) instead
    of a pass over (cells x points x D) differences. The data are centred first, and where
    the subtraction cancels more than 8 digits of a variance the direct sum is used.
    """
    nb = len(target) - 2
    w = W.reshape(W.shape + (1, 1))
    mean_per_cell = all(mu.shape[a] == 1 or mu.shape[a] == target[a] for a in range(nb)) and all(
        target[a] != 1 or mu.shape[a] == 1 for a in range(nb)
    )
    if mean_per_cell:
        g = fm.groups[gi]
        D = x.shape[-1]
        c, phi, _ = data_moments(g, x)
        S = None
        if tuple(target[:-2]) == tuple(W.shape[:-1]) + (1,):  # cells, the plate summed
            S = weighted_moments(g, x, W)
        if S is not None:
            m2, m1, n = moment_parts(S, D)
            m2 = m2.reshape(target)
            m1 = m1.reshape(target[:-1]).unsqueeze(-1)  # (.., D, 1)
            s0 = n.reshape(target[:-2] + (1, 1))
        else:
            n_u = D * (D + 1) // 2
            xc = phi[:, n_u : n_u + D].reshape(x.shape)
            outer = xc.unsqueeze(-1) * xc.unsqueeze(-2)
            m2 = wsum(target, w, outer)
            m1 = wsum(target[:-1], W.unsqueeze(-1), xc).unsqueeze(-1)  # (.., D, 1)
            s0 = wsum(target[:-2], W).unsqueeze(-1).unsqueeze(-1)
        mc = (mu - c).unsqueeze(-1)
        s2 = (
            m2
            - m1 @ mc.transpose(-1, -2)
            - mc @ m1.transpose(-1, -2)
            + s0 * (mc @ mc.transpose(-1, -2))
        )
        kept = s2.diagonal(dim1=-2, dim2=-1) > 1e-8 * m2.diagonal(dim1=-2, dim2=-1)
        if bool(kept.all()):
            return s2
    diff = x - mu
    return wsum(target, w, diff.unsqueeze(-1), diff.unsqueeze(-2))
