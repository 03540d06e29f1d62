"""The linear-chain forward recursion, written once over a semiring.

A chain of ``T`` positions with ``C`` states each is given by an initial vector and ``T - 1``
transfer matrices::

    init       (..., C)           weight of each state at position 0
    potentials (..., T-1, C, C)   potentials[..., t, i, j]: weight of state i at t -> j at t+1

A path ``y`` has weight ``init[y_0] ⊗ potentials[0, y_0, y_1] ⊗ ... ⊗ potentials[T-2, ...]``
and the forward vector at position ``t`` is the ⊕-sum over all path prefixes ending there,
``alpha_{t+1} = alpha_t ⊗ potentials[t]`` (a semiring vector-matrix product). Over the log
semiring the sum over the last vector is the log-partition, its gradients are the marginals
(Eisner 2016: forward-backward is backprop); over the max semiring it is the Viterbi score.
A linear-chain CRF puts ``start + emissions[0]`` in ``init`` and ``transitions +
emissions[t+1]`` in the potentials; an HMM puts ``log pi + log p(x_0|.)`` and ``log A + log
p(x_{t+1}|.)`` there, so both are served by the same code.

Variable lengths: a sequence of length ``L`` uses ``potentials[..., :L-1]``; later transfer
matrices are replaced by the semiring identity so the forward vector is carried unchanged to
the end and the last one is the vector at position ``L - 1``. Length 1 is the plain ``init``.

Two evaluation orders give the same numbers:

- ``"sequential"``: ``T - 1`` vector-matrix products, ``O(T C^2)`` work, ``T`` steps;
- ``"scan"``: a balanced tree of matrix products (Blelloch's up-sweep) and, when all forward
  vectors are wanted, the matching down-sweep, ``O(T C^3)`` work in ``O(log T)`` steps.

``method="auto"`` picks the scan when its largest intermediate (``T/2 * C^3`` per sequence)
stays under a memory budget (:data:`SCAN_BUDGET`) and, on CPU, when one step's matrix work
(``batch * C^3``) is small (:data:`CPU_SCAN_WORK`, or :data:`CPU_SCAN_WORK_MAX` for the
cheaper max semiring): for the small ``C`` of tagging problems a
step costs mostly fixed per-operation overhead, which the scan pays ``log T`` times instead of
``T`` times; for large ``C`` its extra factor ``C`` of arithmetic dominates.

Decoding and sampling reuse the forward vectors: back-pointers (the argmax predecessor, or a
Gumbel-perturbed one for forward-filtering backward-sampling) are computed for all positions
at once, and followed by pointer doubling (:func:`chain_backtrack`), again in ``O(log T)``
steps rather than a Python loop over positions.
"""

from __future__ import annotations

from typing import Literal

import torch

from jointkl.errors import InputError
from jointkl.semiring import LogSemiring, MaxSemiring, Semiring

__all__ = [
    "Method",
    "SCAN_BUDGET",
    "auto_method",
    "CPU_SCAN_WORK",
    "CPU_SCAN_WORK_MAX",
    "mask_potentials",
    "chain_contract",
    "chain_forward",
    "chain_backtrack",
    "chain_viterbi",
    "chain_sample",
    "chain_kbest",
]

Method = Literal["auto", "sequential", "scan"]

# Largest scan intermediate, in elements, that "auto" accepts (~64 MiB in float32).
SCAN_BUDGET = 2**24
# On CPU the scan does C times the arithmetic of the sequential recursion in log T instead of
# T steps; it wins while one step's matrix work (batch * C^3 elements) is small next to the
# fixed per-operation cost of a step. Measured crossovers (one thread, scripts/bench/crf.py
# shapes): log semiring with backward between 2^12 and 2^14; max semiring (decoding, whose
# steps are a single reduction) between 2^10 and 2^12.
CPU_SCAN_WORK = 2**13
CPU_SCAN_WORK_MAX = 2**11


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` without its per-call overhead (it goes through the Python
    reference implementation, ~0.2 ms, several times per CRF call); RuntimeError on mismatch."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        for i, d in enumerate(s, start=ndim - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return torch.Size(out)


def _batch_shape(init: torch.Tensor, potentials: torch.Tensor, lengths: torch.Tensor | None):
    shapes = [init.shape[:-1], potentials.shape[:-3]]
    if lengths is not None:
        shapes.append(lengths.shape)
    return broadcast_shapes(*shapes)


def _check(init: torch.Tensor, potentials: torch.Tensor, lengths: torch.Tensor | None) -> None:
    if init.dim() < 1:
        raise InputError(f"init must have shape (..., C), got {tuple(init.shape)}")
    c = init.shape[-1]
    if potentials.dim() < 3 or potentials.shape[-2:] != (c, c):
        raise InputError(
            f"potentials must have shape (..., T-1, {c}, {c}) to match init (..., {c}), "
            f"got {tuple(potentials.shape)}"
        )
    if lengths is not None and (lengths.dtype.is_floating_point or lengths.dtype == torch.bool):
        raise InputError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    try:
        _batch_shape(init, potentials, lengths)
    except RuntimeError as e:
        raise InputError(
            f"init {tuple(init.shape)}, potentials {tuple(potentials.shape)} and lengths "
            f"{None if lengths is None else tuple(lengths.shape)} have incompatible batch shapes"
        ) from e


def _pick(
    method: Method, batch_numel: int, n: int, c: int, device: torch.device, semiring
) -> Literal["sequential", "scan"]:
    if method not in ("auto", "sequential", "scan"):
        raise InputError(f"method must be 'auto', 'sequential' or 'scan', got {method!r}")
    if method != "auto":
        return method
    # Below 4 transfer matrices the two orders take about the same number of steps.
    if n < 4 or batch_numel * ((n + 1) // 2) * c**3 > SCAN_BUDGET:
        return "sequential"
    limit = CPU_SCAN_WORK_MAX if issubclass(semiring, MaxSemiring) else CPU_SCAN_WORK
    if device.type == "cpu" and batch_numel * c**3 > limit:
        return "sequential"
    return "scan"


def auto_method(
    batch_numel: int, n: int, c: int, device: torch.device, semiring: type[Semiring]
) -> Literal["sequential", "scan"]:
    """What ``method="auto"`` runs for ``batch_numel`` chains of ``n`` transfer matrices of
    ``c`` states on ``device`` under ``semiring``."""
    return _pick("auto", batch_numel, n, c, device, semiring)


def mask_potentials(
    potentials: torch.Tensor, lengths: torch.Tensor | None, semiring: type[Semiring]
) -> torch.Tensor:
    """Replace the transfer matrices past each sequence's end by the semiring identity.

    ``potentials[..., t]`` is used by a sequence of length ``L`` iff ``t < L - 1``. The
    replacement goes through ``torch.where``, so the unused entries get zero gradient (and may
    even be ``-inf`` or garbage without poisoning the result).
    """
    if lengths is None:
        return potentials
    n, c = potentials.shape[-3], potentials.shape[-1]
    used = torch.arange(n, device=potentials.device) < (lengths.unsqueeze(-1) - 1)
    eye = semiring.identity(c, like=potentials)
    return torch.where(used[..., None, None], potentials, eye)


# The recursions below work in a "state-major" layout: the C x C state dimensions first and
# the flattened (positions, batch) dimensions last, e.g. potentials as (C, C, N, B). Every
# semiring operation then runs over long contiguous rows and reduces over an outer dimension,
# instead of striding over tiny trailing C-sized dimensions (which made the scan several
# times slower on CPU).


def _state_major(init, potentials, lengths, semiring):
    """-> (init (C, B), masked potentials (C, C, N, B), batch shape)."""
    batch = _batch_shape(init, potentials, lengths)
    n, c, b = potentials.shape[-3], init.shape[-1], batch.numel()
    potentials = mask_potentials(potentials, lengths, semiring)
    pot = potentials.expand(*batch, n, c, c).reshape(b, n, c, c).permute(2, 3, 1, 0)
    return init.expand(*batch, c).reshape(b, c).t(), pot.contiguous(), batch


def _vecmat(semiring: type[Semiring], v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """State-major (I, ...) ⊗ (I, J, ...) -> (J, ...)."""
    return semiring.plus(semiring.times(v.unsqueeze(1), m), dim=0)


def _matmul(semiring: type[Semiring], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State-major (I, J, ...) ⊗ (J, K, ...) -> (I, K, ...)."""
    return semiring.plus(semiring.times(a.unsqueeze(2), b.unsqueeze(0)), dim=1)


def _up_sweep(m: torch.Tensor, semiring: type[Semiring]) -> list[torch.Tensor]:
    """Levels of the product tree over (C, C, N, B): level 0 the matrices, each next level the
    products of adjacent pairs (an odd one out is paired with the identity), the last one a
    single matrix."""
    levels = [m]
    while m.shape[2] > 1:
        if m.shape[2] % 2:
            eye = semiring.identity(m.shape[0], like=m)[:, :, None, None]
            m = torch.cat([m, eye.expand(-1, -1, 1, m.shape[3])], dim=2)
        m = _matmul(semiring, m[:, :, 0::2], m[:, :, 1::2])
        levels.append(m)
    return levels


def _down_sweep(
    init: torch.Tensor, levels: list[torch.Tensor], semiring: type[Semiring]
) -> torch.Tensor:
    """The forward vector entering every level-0 matrix, (C, N, B), from the product tree.

    Invariant: ``starts`` holds, for each node of the current level, the forward vector
    entering the span it covers. A left child enters where its parent does; a right child
    enters after its left sibling's span.
    """
    starts = init.unsqueeze(1)  # the root's span starts at position 0
    for level in reversed(levels[:-1]):
        n = level.shape[2]
        left = level[:, :, 0::2]  # (C, C, ceil(n/2), B)
        parent = starts[:, : left.shape[2]]
        right = _vecmat(semiring, parent, left)
        starts = torch.stack([parent, right], dim=2).flatten(1, 2)[:, :n]
    return starts


def _sequential(init, pot, semiring, keep_all: bool) -> torch.Tensor:
    alphas = [init]
    # unbind once: indexing pot[:, :, t] in the loop would make each step's backward write a
    # zero-filled gradient of the whole (C, C, N, B) tensor, O(T^2) work in all.
    for m in pot.unbind(2):
        alphas.append(_vecmat(semiring, alphas[-1], m))
    return torch.stack(alphas, dim=1) if keep_all else alphas[-1]


def chain_contract(
    init: torch.Tensor,
    potentials: torch.Tensor,
    semiring: type[Semiring] = LogSemiring,
    lengths: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """The forward vector at each sequence's last position, ``init ⊗ P_0 ⊗ ... ⊗ P_{L-2}``.

    Args:
        init: ``(..., C)`` weights of the first state.
        potentials: ``(..., T-1, C, C)`` transfer weights, ``[t, i, j]`` for ``i`` at ``t`` then
            ``j`` at ``t+1``. ``T - 1 = 0`` is allowed (every sequence has length 1).
        semiring: :class:`~jointkl.semiring.LogSemiring` (log-sums) or
            :class:`~jointkl.semiring.MaxSemiring` (best scores), or any other semiring.
        lengths: optional ``(...)`` integer lengths in ``1..T`` (broadcast with the batch).
            Not range-checked here: callers validate user input once.
        method: ``"sequential"``, ``"scan"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``(..., C)``: ``⊕``-sum of the weights of all paths ending in each state. Reduce it with
        ``semiring.plus(out + final, -1)`` for the total (log Z, or the Viterbi score).
    """
    _check(init, potentials, lengths)
    batch = _batch_shape(init, potentials, lengths)
    n, c = potentials.shape[-3], init.shape[-1]
    if n == 0:
        return init.expand(*batch, c)
    init_s, pot, batch = _state_major(init, potentials, lengths, semiring)
    if _pick(method, batch.numel(), n, c, init.device, semiring) == "sequential":
        alpha = _sequential(init_s, pot, semiring, keep_all=False)
    else:
        alpha = _vecmat(semiring, init_s, _up_sweep(pot, semiring)[-1][:, :, 0])
    return alpha.t().reshape(*batch, c)


def _forward_state_major(init, potentials, semiring, lengths, method):
    """All forward vectors in state-major layout: -> (alphas (C, T, B), potentials (C, C, T-1,
    B) masked, batch shape)."""
    _check(init, potentials, lengths)
    n, c = potentials.shape[-3], init.shape[-1]
    init_s, pot, batch = _state_major(init, potentials, lengths, semiring)
    if n == 0:
        alphas = init_s.unsqueeze(1)
    elif _pick(method, batch.numel(), n, c, init.device, semiring) == "sequential":
        alphas = _sequential(init_s, pot, semiring, keep_all=True)
    else:
        levels = _up_sweep(pot, semiring)
        starts = _down_sweep(init_s, levels, semiring)  # vectors entering P_0 .. P_{n-1}
        last = _vecmat(semiring, init_s, levels[-1][:, :, 0])
        alphas = torch.cat([starts, last.unsqueeze(1)], dim=1)
    return alphas, pot, batch


def chain_forward(
    init: torch.Tensor,
    potentials: torch.Tensor,
    semiring: type[Semiring] = LogSemiring,
    lengths: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """All forward vectors: ``(..., T, C)``, entry ``t`` the ⊕-sum over prefixes ending at ``t``.

    Past a sequence's length the vector is carried unchanged, so ``[..., -1, :]`` is the
    vector at its last position (what :func:`chain_contract` returns). Same arguments.
    """
    alphas, _, batch = _forward_state_major(init, potentials, semiring, lengths, method)
    c, t = alphas.shape[:2]
    return alphas.permute(2, 1, 0).reshape(*batch, t, c)  # (C, T, B) -> (*batch, T, C)


def chain_backtrack(
    pointers: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Follow back-pointers from the last state: ``y_{T-1} = last``, ``y_t = pointers[t, y_{t+1}]``.

    Args:
        pointers: ``(..., T-1, S)`` integer maps from the state at ``t+1`` to the one at ``t``.
        last: ``(...)`` state at each sequence's last position (broadcast with the batch).
        lengths: optional ``(...)`` lengths; the pointers past a sequence's end are taken to be
            the identity, so ``last`` lands at position ``L - 1``; positions ``>= L`` are 0.

    Returns:
        ``(..., T)`` states (``int64``).

    The suffix compositions ``F_t = pointers[t] ∘ ... ∘ pointers[T-2]`` are built by pointer
    doubling (Hillis-Steele): ``log2 T`` rounds of one batched gather each.
    """
    n, s = pointers.shape[-2], pointers.shape[-1]
    shapes = [pointers.shape[:-2], last.shape] + ([lengths.shape] if lengths is not None else [])
    batch = broadcast_shapes(*shapes)
    pointers = pointers.expand(*batch, n, s)
    last = last.expand(batch)
    if lengths is not None and n > 0:
        ident = torch.arange(s, device=pointers.device).expand_as(pointers)
        used = torch.arange(n, device=pointers.device) < (lengths.unsqueeze(-1) - 1)
        pointers = torch.where(used.unsqueeze(-1), pointers, ident)
    comp = pointers
    step = 1
    while step < n:
        # Invariant: comp[t] = pointers[t] ∘ ... ∘ pointers[min(t+step, n)-1]; composing it
        # with comp[t+step] doubles the span (entries already reaching the end stay).
        head, tail = comp[..., : n - step, :], comp[..., step:, :]
        comp = torch.cat([torch.gather(head, -1, tail), comp[..., n - step :, :]], dim=-2)
        step *= 2
    states = torch.gather(comp, -1, last[..., None, None].expand(*batch, n, 1)).squeeze(-1)
    path = torch.cat([states, last.unsqueeze(-1)], dim=-1)
    if lengths is not None:
        t = torch.arange(n + 1, device=path.device)
        path = path.masked_fill(t >= lengths.unsqueeze(-1), 0)
    return path


def _final_state_major(final: torch.Tensor | None, batch: torch.Size, like: torch.Tensor):
    c = like.shape[0]
    if final is None:
        return like.new_zeros(c, 1)
    return final.expand(*batch, c).reshape(batch.numel(), c).t()


def chain_viterbi(
    init: torch.Tensor,
    potentials: torch.Tensor,
    final: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    method: Method = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best path and its score under the max semiring.

    ``final`` (``(..., C)``, optional) is added to the last position's state (a CRF's end
    scores). Returns ``(score (...), path (..., T))``; the score is differentiable (its
    gradient is the path's indicator), positions past a sequence's length are 0. Ties are
    broken towards the lowest state index, consistently along the path.
    """
    alphas, pot, batch = _forward_state_major(init, potentials, MaxSemiring, lengths, method)
    c, n = alphas.shape[0], alphas.shape[1] - 1
    # ``max(...).indices`` rather than ``argmax``: the latter is ~10x slower on CPU here.
    score, last = (alphas[:, -1] + _final_state_major(final, batch, alphas)).max(dim=0)
    with torch.no_grad():
        # pointers[j, t, b]: best state at t given state j at t+1.
        pointers = (alphas[:, None, :-1] + pot).max(dim=0).indices
    pointers = pointers.permute(2, 1, 0).reshape(*batch, n, c)
    path = chain_backtrack(pointers, last.reshape(batch), lengths)
    return score.reshape(batch), path


def _gumbel(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    # Clamp away from 0 and 1 so the noise is finite: an infinite draw would turn an
    # impossible (-inf) state into nan and argmax would pick it.
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(shape, dtype=like.dtype, device=like.device).clamp(tiny, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def chain_sample(
    init: torch.Tensor,
    potentials: torch.Tensor,
    final: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    sample_shape: torch.Size | tuple[int, ...] = (),
    method: Method = "auto",
) -> torch.Tensor:
    """Exact paths ``~ p(y) ∝ exp(weight(y))`` by forward filtering, backward sampling.

    ``y_{L-1} ~ softmax(alpha_{L-1} + final)`` and ``y_t | y_{t+1} ~ softmax_i(alpha_t[i] +
    potentials[t, i, y_{t+1}])``. Each backward draw is an argmax with Gumbel noise; as the
    noise at ``t`` is used for one column only, it can be drawn for all columns and positions
    at once, turning the backward pass into :func:`chain_backtrack`. Uses torch's global RNG
    (so ``pyro.set_rng_seed`` makes it reproducible). Returns ``sample_shape + (..., T)``.
    """
    sample_shape = torch.Size(sample_shape)
    s = sample_shape.numel()
    with torch.no_grad():
        init, potentials = init.detach(), potentials.detach()
        alphas, pot, batch = _forward_state_major(init, potentials, LogSemiring, lengths, method)
        c, n, b = alphas.shape[0], alphas.shape[1] - 1, alphas.shape[2]
        final = None if final is None else final.detach()
        end = (alphas[:, -1] + _final_state_major(final, batch, alphas)).unsqueeze(1)  # (C,1,B)
        last = (end + _gumbel((c, s, b), end)).max(dim=0).indices  # (S, B)
        # One noise value per (state i, position t, draw): shared by all columns j.
        noise = _gumbel((c, 1, n, s, b), end)
        cand = alphas[:, None, :-1, None] + pot.unsqueeze(3) + noise  # (C_i, C_j, N, S, B)
        pointers = cand.max(dim=0).indices.permute(2, 3, 1, 0)  # (S, B, N, C_j)
        pointers = pointers.reshape(*sample_shape, *batch, n, c)
        return chain_backtrack(pointers, last.reshape(*sample_shape, *batch), lengths)


def chain_kbest(
    init: torch.Tensor,
    potentials: torch.Tensor,
    k: int,
    final: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best paths, best first: ``(scores (k, ...), paths (k, ..., T))``.

    The k-best max semiring (each forward entry holds the ``k`` best prefix scores ending in
    its state, with back-pointers into the ``C * k`` (state, rank) pairs of the previous
    position), evaluated sequentially. When fewer than ``k`` paths have finite weight the
    remaining scores are ``-inf`` and their paths are arbitrary. Ties are ordered arbitrarily.
    """
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    _check(init, potentials, lengths)
    batch = _batch_shape(init, potentials, lengths)
    n, c = potentials.shape[-3], init.shape[-1]
    with torch.no_grad():
        # alpha[..., j, r]: r-th best score of a prefix ending in j (rank 0 real, others -inf).
        alpha = torch.full((*batch, c, k), float("-inf"), dtype=init.dtype, device=init.device)
        alpha[..., 0] = init.detach()
        masked = mask_potentials(potentials.detach(), lengths, MaxSemiring)
        pointers = []
        for t in range(n):
            # cand[..., j, i*k + r] = alpha[i, r] + P_t[i, j]
            cand = alpha.unsqueeze(-2) + masked[..., t, :, :, None]  # (..., i, j, r)
            cand = cand.transpose(-3, -2).flatten(-2)  # (..., j, i*k + r)
            alpha, idx = cand.topk(k, dim=-1)
            pointers.append(idx.flatten(-2))  # state (j, r') at t+1 -> state i*k + r at t
        end = alpha if final is None else alpha + final.detach().unsqueeze(-1)
        scores, last = end.flatten(-2).topk(k, dim=-1)  # (..., k)
        last = last.movedim(-1, 0)
        if n == 0:
            ptr = torch.zeros(*batch, 0, c * k, dtype=torch.long, device=init.device)
        else:
            ptr = torch.stack(pointers, dim=-2)
        states = chain_backtrack(ptr, last, lengths)  # (k, ..., T) in (state, rank) space
        paths = torch.div(states, k, rounding_mode="floor")
    return scores.movedim(-1, 0), paths
