"""The chain recursions of a linear-chain CRF, specialised to its factored transfer matrices.

:mod:`jointkl.chain` takes arbitrary transfer matrices ``P_t (..., T-1, C, C)`` and one
semiring. A CRF's matrices factor: ``P_t[i, j] = g[i, j] + h_{t+1}[j]``, one shared transition
matrix plus the emission of the tag moved into. This module uses that structure for the two
recursions a tagger runs at every training and decoding step, where the generic code spends
most of its time on per-operation overhead (a few tags, tens of positions):

- :func:`log_partition` (log semiring): the forward recursion in *scaled probability space*
  (Rabiner 1989): with ``X_t = exp(h_t - max h_t)`` and ``E = exp(g - max g)`` the step is
  ``alpha_{t+1} = (alpha_t @ E) * X_{t+1}``, one matrix product shared by the batch and one
  product, renormalised every :data:`RESCALE_EVERY` steps with the log of the scale
  accumulated (``log Z = Σ log scales + Σ shifts + log Σ alpha_{L-1} exp(end)``). Its backward
  pass is written by hand (:class:`_LogPartition`): the matching scaled backward recursion
  gives ``beta``, and ``alpha_t * beta_t`` are the node marginals (the gradient with respect
  to the emissions), ``Σ_t alpha_t^T (X_{t+1} beta_{t+1}) * E`` the transition counts, in one
  pass instead of autograd through ``T`` small operations.
- :func:`viterbi` (max semiring): ``v_{t+1} = max_i (v_t[i] + g[i, j]) + h_{t+1}[j]``,
  over a ``(C, C, 2B)`` tensor per step (an addition, an ``amax`` and the emission's
  addition into preallocated buffers; the back-pointers recovered in bulk, a cache-sized
  chunk of steps at a time), meet in the middle: the first half of each sequence forward and
  the second half as a forward recursion over the reversed sequence, as one batch of ``2B``
  columns in ``ceil(T/2)`` steps; the path is read back by one ``take`` a step.

Neither masks positions past a sequence's end inside the loop: the recursion up to position
``L - 1`` does not depend on later positions, so it runs over the whole padded length and the
answer of each sequence is read at its own last position (and the backward pass starts
there).

When the scaled arithmetic cannot be trusted (a scale below :data:`SCALE_FLOOR`, which
happens only when the scores span hundreds of nats within a few positions, or when no path
is possible), :func:`log_partition` returns ``None`` and the caller uses the generic
log-space recursion; a gradient that comes out non-finite is recomputed the same way. The
arithmetic is float64 whatever the input dtype (on the few-tag problems this is for, the
cost is per operation, not per element), which pushes underflow out to ~700 nats.

This is a deliberate exception to writing each dynamic programme once over a semiring; the
tests pin both functions to :mod:`jointkl.chain`, to brute-force enumeration and to
pytorch-crf (``tests/test_crf.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from jointkl.chain import chain_contract
from jointkl.semiring import LogSemiring

__all__ = [
    "RESCALE_EVERY",
    "SCALE_FLOOR",
    "VITERBI_CHUNK_BYTES",
    "log_partition",
    "viterbi",
    "generic_log_partition",
]

# Renormalise the scaled forward vector every this many steps. Between renormalisations a
# vector's sum grows by at most a factor C per step (E, X <= 1), so float64 cannot overflow,
# and shrinks by the step's probability, which SCALE_FLOOR bounds.
RESCALE_EVERY = 8
# Smallest accepted scale (sum of a forward vector whose previous scaled value summed to 1).
# Entries lost to underflow are below float64's 1e-308, so relative to a sum of at least
# 1e-250 they change log Z by less than 1e-57.
SCALE_FLOOR = 1e-250
# Viterbi recovers the back-pointers of this many bytes of per-step sums at a time (at least
# one step), so that they are read back while still in cache (under a 1 MB L2).
VITERBI_CHUNK_BYTES = 2**19


def _shift(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max over ``dim`` (kept; all of ``x`` when None), with an all -inf slice shifted by 0
    instead (exp then gives 0, not nan)."""
    m = x.max() if dim is None else x.amax(dim, keepdim=True)
    return m.nan_to_num_(neginf=0.0)


def generic_log_partition(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """``log Z`` of ``h (B, T, C)`` by :func:`jointkl.chain.chain_contract` in log space: the
    reference the scaled recursion falls back to."""
    init = start + h[:, 0]
    potentials = trans + h[:, 1:, None, :]
    alpha = chain_contract(init, potentials, LogSemiring, lengths, "auto")
    return LogSemiring.plus(alpha + end, dim=-1)


class _Forward:
    """The scaled forward pass of one batch (float64, time-major), kept for the backward."""

    def __init__(self, h, trans, start, end, lengths):
        B, T, C = h.shape
        f64 = torch.float64
        # A copy (never a view of h: it is modified in place below), time-major.
        x = h.detach().transpose(0, 1).to(f64, memory_format=torch.contiguous_format, copy=True)
        x[0] += start.detach().to(f64)
        m = _shift(x, -1)  # (T, B, 1)
        x.sub_(m).exp_()  # X_t: max 1 at every position
        g = trans.detach().to(f64)
        m_g = _shift(g)
        E = (g - m_g).exp_()
        e = end.detach().to(f64)
        m_e = _shift(e)
        exp_end = (e - m_e).exp_()
        rows = x.unbind(0)
        c = rows[0].sum(-1, keepdim=True)
        a = rows[0] / c
        alphas, scaled_at, scales = [a], [0], [c]
        mm = torch.mm
        for t in range(1, T):
            a = mm(a, E).mul_(rows[t])
            if t % RESCALE_EVERY == 0 or t == T - 1:
                c = a.sum(-1, keepdim=True)
                a = a.div_(c)
                scaled_at.append(t)
                scales.append(c)
            alphas.append(a)
        alpha = torch.stack(alphas)  # (T, B, C)
        scale = x.new_ones(T, B, 1)  # 1 where no renormalisation happened
        scale[scaled_at] = torch.stack(scales)
        last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=x.device)
        at_last = last.view(1, B, 1)
        alpha_last = alpha.gather(0, at_last.expand(1, B, C))[0]  # (B, C)
        end_scale = alpha_last @ exp_end  # (B,)
        # log Z = Σ_{t<L} (log scale_t + m_t) + (L-1) max g + log Σ alpha_{L-1} exp(end) + max e
        cum = (scale.log() + m).cumsum(0).gather(0, at_last)[0, :, 0]
        self.log_z = cum + last * m_g + end_scale.log() + m_e
        self.valid = torch.arange(T, device=x.device).view(T, 1, 1) <= at_last  # (T, B, 1)
        # Trusted iff every scale a sequence uses is >= SCALE_FLOOR (a nan fails too).
        low = torch.minimum(torch.where(self.valid, scale, 1.0).min(), end_scale.min())
        self.trusted = bool(low >= SCALE_FLOOR)
        self.x, self.scale, self.alpha, self.E = x, scale, alpha, E
        self.exp_end, self.end_scale, self.last = exp_end, end_scale, last
        self.alpha_last = alpha_last


class _LogPartition(torch.autograd.Function):
    """``log Z`` with the hand-written scaled forward-backward as its gradient."""

    @staticmethod
    def forward(ctx, h, trans, start, end, lengths, fwd: _Forward):
        ctx.save_for_backward(h, trans, start, end, lengths)
        ctx.fwd = fwd
        return fwd.log_z.to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, trans, start, end, lengths = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # create_graph=True (a gradient of the gradient): the analytic marginals below are
            # not themselves differentiable, so take this gradient by autograd of the generic
            # recursion, which is.
            return _generic_grads(h, trans, start, end, lengths, grad, needs)
        grads = _scaled_grads(ctx.fwd, grad)
        if grads is None:
            return _generic_grads(h, trans, start, end, lengths, grad, needs)
        g_h, g_trans, g_start, g_end = grads
        return (
            g_h.to(h.dtype) if needs[0] else None,
            g_trans.to(trans.dtype) if needs[1] else None,
            g_start.to(start.dtype) if needs[2] else None,
            g_end.to(end.dtype) if needs[3] else None,
            None,
            None,
        )


def _generic_grads(h, trans, start, end, lengths, grad, needs):
    inputs = [x for x, n in zip((h, trans, start, end), needs, strict=True) if n]
    with torch.enable_grad():
        log_z = generic_log_partition(h, trans, start, end, lengths)
        got = iter(torch.autograd.grad(log_z, inputs, grad, create_graph=torch.is_grad_enabled()))
    return (*(next(got) if n else None for n in needs), None, None)


def _scaled_grads(fwd: _Forward, grad: torch.Tensor):
    """Node marginals, transition counts, first- and last-tag marginals, each weighted by the
    incoming gradient of its sequence's log Z; ``None`` if any came out non-finite."""
    T, B, C = fwd.x.shape
    # W_t = X_t / scale_t: the backward recursion divides by the same scales as the forward,
    # so alpha_t * beta_t sums to 1 at every position. Zeroed past each sequence's end,
    # where the forward values may be 0/0.
    w = torch.where(fwd.valid, fwd.x / fwd.scale, 0.0)
    alpha = torch.where(fwd.valid, fwd.alpha, 0.0)
    # beta at the last position: exp(end) / Σ alpha_{L-1} exp(end); injected at t = L - 1,
    # so rows that end earlier start their backward recursion there (beta = 0 after it).
    beta_last = fwd.exp_end / fwd.end_scale.unsqueeze(-1)
    inject = torch.zeros_like(w).scatter_(
        0, fwd.last.view(1, B, 1).expand(1, B, C), beta_last[None]
    )
    w_rows, i_rows = w.unbind(0), inject.unbind(0)
    b = i_rows[T - 1]
    betas = [b]
    Et = fwd.E.t()
    addmm = torch.addmm
    for t in range(T - 1, 0, -1):
        b = addmm(i_rows[t - 1], w_rows[t] * b, Et)
        betas.append(b)
    beta = torch.stack(betas[::-1])  # (T, B, C)
    g = grad.detach().to(torch.float64).view(1, B, 1)
    node = alpha * beta * g  # (T, B, C): the marginals, weighted
    g_end = (fwd.alpha_last * beta_last * g[0]).sum(0)
    if T > 1:
        # Σ_t alpha_t^T (W_{t+1} beta_{t+1}), then * E: the expected transition counts.
        counts = (alpha[:-1] * g).reshape(-1, C).t() @ (w[1:] * beta[1:]).reshape(-1, C)
        g_trans = counts.mul_(fwd.E)
    else:
        g_trans = fwd.E.new_zeros(C, C)
    if not bool(torch.isfinite(node.sum() + g_trans.sum())):
        return None
    return node.transpose(0, 1), g_trans, node[0].sum(0), g_end


def log_partition(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor | None:
    """``log Z`` of a batch of CRF sequences by the scaled forward recursion, or ``None``.

    Args:
        h: ``(B, T, C)`` emissions (``-inf`` allowed).
        trans: ``(C, C)`` transition scores, ``-inf`` for forbidden transitions.
        start, end: ``(C,)`` first- and last-tag scores (``-inf`` allowed).
        lengths: ``(B,)`` int64 lengths in ``1..T``, or ``None`` for all ``T``.

    Returns:
        ``(B,)`` log-partition in ``h``'s dtype, differentiable with respect to the four score
        tensors (by the scaled backward recursion); ``None`` when some sequence's scales fell
        below :data:`SCALE_FLOOR` (including a sequence with no possible path), in which
        case the caller should use :func:`generic_log_partition`.
    """
    if h.shape[0] == 0:
        return None  # an empty batch: nothing to gain, and the checks below need an element
    fwd = _Forward(h, trans, start, end, lengths)
    if not fwd.trusted:
        return None
    if lengths is None:
        lengths = torch.full((h.shape[0],), h.shape[1], device=h.device, dtype=torch.long)
    return _LogPartition.apply(h, trans, start, end, lengths, fwd)


@torch.no_grad()
def viterbi(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Best tag path ``(B, T)`` (int64; 0 past each length) of a batch of CRF sequences.

    Same arguments as :func:`log_partition`. Meet in the middle: the forward max-plus
    recursion ``v_{t+1}[j] = max_i (v_t[i] + g[i, j]) + h_{t+1}[j]`` over the first
    ``m = ceil(L/2)`` positions of each sequence and the backward one over the rest (a forward
    recursion on the reversed sequence with transposed transitions, start and end swapped)
    run as one batch of ``N = 2B`` columns, ``K = ceil(T/2)`` positions instead of ``T``; the
    two halves are joined at the best ``(y_{m-1}, y_m)`` pair and each is read back from its
    back-pointers.

    Layout and cost (a few tags, tens of positions: the time is per operation, so the count
    of operations is what is kept small): a step is three operations into preallocated
    buffers, the addition ``sums[j, i, n] = v_t[i, n] + g_n[i, j]`` (pytorch-crf's order of
    additions), an ``amax`` over ``i`` (vectorised over the contiguous columns; ``max`` with
    indices is not, and cost 5x as much at ``C = 20``) and the emission's addition. The
    back-pointers are recovered in bulk every :data:`VITERBI_CHUNK_BYTES` of sums, while they
    are still in cache: the sum attaining a max equals it exactly, so the pointer is
    ``min { i : sums[j, i] == max }``, found as ``C - max_i ((sums == max) * (C - i))`` (the
    comparison written to a floating-point tensor: a boolean one is not vectorised). The path
    is read back by one ``take`` a position (pointers encoded as flat indices of their own
    position's ``(C, N)`` map) and put in place by one ``put_``.

    Ties (several best paths): the join takes the first best pair ``(y_{m-1}, y_m)`` in
    row-major order (lowest ``y_{m-1}``, then lowest ``y_m``); going back from ``y_{m-1}``
    each earlier position takes the lowest tag whose best prefix leads to the tag after it,
    and going forward from ``y_m`` each later position the lowest tag whose best suffix
    follows the tag before it. pytorch-crf (a full forward pass, backtracked from the last
    position with the lowest tag) may return another of the tied paths.

    The operations run as one TorchScript function (:func:`_compiled_kernel`), which removes
    the Python interpreter between them.
    """
    return _compiled_kernel()(h, trans, start, end, lengths, VITERBI_CHUNK_BYTES)


def _compiled_kernel() -> Callable[..., torch.Tensor]:
    """:func:`_viterbi_kernel` compiled by TorchScript once per process (the eager function
    if TorchScript is unavailable or fails on it).

    Why: at the sizes this is for (tens of positions, a few tags) the decode is about 200
    small tensor operations, and a TorchScript function runs them without the Python
    interpreter and argument parsing between them: 1.2-1.3x faster on CPU for the same
    operations in the same order, so the same paths bit for bit (pinned by the tests)."""
    global _KERNEL
    if _KERNEL is None:
        try:
            with warnings.catch_warnings():
                # torch.jit.script is deprecated in favour of torch.compile, which needs a C++
                # compiler at run time and compiles per shape: not a default for a library.
                warnings.simplefilter("ignore", DeprecationWarning)
                _KERNEL = torch.jit.script(_viterbi_kernel)
        except Exception:  # noqa: BLE001 (any failure to compile: the eager function is exact)
            _KERNEL = _viterbi_kernel
    return _KERNEL


_KERNEL: Callable[..., torch.Tensor] | None = None


def _viterbi_kernel(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor | None,
    chunk_bytes: int,
) -> torch.Tensor:
    """The body of :func:`viterbi` (``chunk_bytes``: :data:`VITERBI_CHUNK_BYTES`), written
    in the subset of Python that TorchScript compiles (no aliases of torch functions, no
    module constants, loops over ``range`` with a positive step)."""
    B, T, C = h.shape
    dev = h.device
    if B == 0:
        return torch.zeros(B, T, dtype=torch.long, device=dev)
    L = lengths if lengths is not None else torch.full((B,), T, device=dev, dtype=torch.long)
    K, N, BT = (T + 1) // 2, 2 * B, B * T
    # Integer halving by a shift and index arithmetic on views of one arange: floor division
    # and arange are among the slowest of the small operations this is made of.
    n_back = torch.bitwise_right_shift(L, 1)  # floor(L/2) positions in the backward half
    m = L - n_back  # forward half: positions 0..m-1; backward half: L-1 down to m
    ar = torch.arange(max(BT + K * N, C * N), device=dev)
    steps = torch.cat([m, n_back])  # (N,): positions in each column's half
    s = ar[:K].unsqueeze(-1)  # (K, 1)
    rows = ar[:BT:T]  # (B,): flat index of each row's position 0
    # (K, N): flat index (b * T + position) of column n's position at step s. Column b < B is
    # row b's forward half, column B + b row b reversed within its length (clamped at its
    # position 0 past it). Steps past a column's half read some position of its own row:
    # their values are never used (the recursion up to a step does not depend on later ones).
    at = torch.cat([rows + s, torch.maximum((rows + L - 1) - s, rows)], -1)
    # Emissions (C, N) per step: views of one gathered (K, N, C) tensor.
    x = h.reshape(BT, C).index_select(0, at.view(-1)).view(K, N, C).transpose(1, 2).unbind(0)
    # both[j, i, n]: the score of tag i -> tag j in column n's direction.
    both = torch.cat(
        [trans.t().unsqueeze(-1).expand(C, C, B), trans.unsqueeze(-1).expand(C, C, B)], -1
    )
    init = torch.cat([start.unsqueeze(-1).expand(C, B), end.unsqueeze(-1).expand(C, B)], -1)
    values = h.new_empty(K, C, N)
    chunk = max(1, min(K - 1, chunk_bytes // (C * C * N * h.element_size())))
    sums = h.new_empty(chunk, C, C, N)
    best = h.new_empty(K - 1, C, N)  # max_i (v_t[i] + g[i, j]), before the emission
    flipped = h.new_empty(K - 1, C, N)  # C - pointer
    weights = torch.arange(C, 0, -1, dtype=h.dtype, device=dev).view(1, 1, C, 1)
    # Views made once (unbind), not one indexing operation per step.
    v, s_t, b_t = values.unbind(0), sums.unbind(0), best.unbind(0)
    torch.add(x[0], init, out=v[0])
    for t0 in range(0, K - 1, chunk):
        n = min(chunk, K - 1 - t0)
        for u in range(n):
            t = t0 + u
            torch.add(v[t], both, out=s_t[u])
            torch.amax(s_t[u], 1, out=b_t[t])
            torch.add(b_t[t], x[t + 1], out=v[t + 1])
        hit = torch.eq(sums[:n], best[t0 : t0 + n].unsqueeze(2), out=sums[:n])  # 1.0 at the max
        torch.amax(hit.mul_(weights), 2, out=flipped[t0 : t0 + n])
    cols = ar[:N]
    tag_n = ar[: C * N : N]  # (C,): tag * N
    ident = tag_n.unsqueeze(-1) + cols  # (C, N): each state mapped to itself
    # Pointers as flat indices (pointer * N + column) of their step's (C, N) map, in int64 (a
    # float32 index is exact only up to 2^24); the identity past each column's last step, so
    # that its last state is carried back to it.
    used = s[1:].unsqueeze(-1) < steps  # (K-1, 1, N)
    flat = torch.where(used, torch.add(cols + C * N, flipped.long(), alpha=-N), ident)
    # Join: each column's values at its last step, (N, C), then the best (y_{m-1}, y_m) =
    # argmax fwd[j] + g[j, k] + bwd[k]; a length-1 row has no backward half and ends at
    # m - 1 = 0: argmax fwd[j] + end[j].
    last = ((steps - 1).clamp_(min=0) * (C * N) + cols).unsqueeze(-1) + tag_n
    ends = values.take(last)
    fwd, bwd = ends[:B], ends[B:]
    pair = (fwd.unsqueeze(-1) + trans + bwd.unsqueeze(1)).flatten(1).argmax(-1)
    first = torch.div(pair, C, rounding_mode="trunc")
    j = torch.where(n_back == 0, (fwd + end).argmax(-1), first)
    # (K, N) states encoded as tag * N + column, read back from the last step.
    states = torch.empty(K, N, dtype=torch.long, device=dev)
    torch.add(cols, torch.cat([j, pair.sub(first, alpha=C)]), alpha=N, out=states[K - 1])
    maps, st = flat.unbind(0), states.unbind(0)
    for u in range(K - 1):
        t = K - 2 - u
        torch.take(maps[t], st[t + 1], out=st[t])
    # Each column's states inside its half go to their positions (at); the others to slots
    # of their own past the end, so that no position is written twice. Padding stays 0.
    spare = ar[BT : BT + K * N].view(K, N)
    path = torch.zeros(BT + K * N, dtype=torch.long, device=dev)
    path.put_(torch.where(s < steps, at, spare), states.div_(N, rounding_mode="trunc"))
    return path[:BT].view(B, T)
