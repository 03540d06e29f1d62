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
  state-major over a ``(C, C, 2B)`` tensor per step (an addition, an ``amax`` and the
  emission's addition into preallocated buffers; the back-pointers of all steps are recovered
  afterwards in three bulk operations), meet in the middle: the first half of each sequence
  forward and the second half as a forward recursion over the reversed sequence, as one batch
  of ``2B`` columns in ``ceil(T/2)`` steps; the path is read back by one ``take`` a step.

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

import torch

from jointkl.chain import chain_contract
from jointkl.semiring import LogSemiring

__all__ = ["RESCALE_EVERY", "SCALE_FLOOR", "log_partition", "viterbi", "generic_log_partition"]

# Renormalise the scaled forward vector every this many steps. Between renormalisations a
# vector's sum grows by at most a factor C per step (E, X <= 1), so float64 cannot overflow,
# and shrinks by the step's probability, which SCALE_FLOOR bounds.
RESCALE_EVERY = 8
# Smallest accepted scale (sum of a forward vector whose previous scaled value summed to 1).
# Entries lost to underflow are below float64's 1e-308, so relative to a sum of at least
# 1e-250 they change log Z by less than 1e-57.
SCALE_FLOOR = 1e-250


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


def _max_plus_forward(v0: torch.Tensor, g: torch.Tensor, x: torch.Tensor):
    """Max-plus forward vectors and back-pointers, state-major.

    ``v_{t+1}[j] = max_i (v_t[i] + g[i, j]) + x[t+1, j]`` (per column ``n``) from ``v0 (C, N)``,
    transitions ``g (C, C, N)`` and emissions ``x (K, C, N)``: the vectors ``(K, C, N)`` and the
    back-pointers ``(K-1, C, N)``, ``pointers[t, j] = min { i : v_t[i] + g[i, j] = max }``
    (the lowest tag attaining the max).

    Why this shape: per step only an addition, an ``amax`` over the leading dimension (an
    elementwise max of ``C`` contiguous slices, vectorised; ``max`` with indices is not, and
    cost 5x the ``amax`` at ``C = 20``) and the emission's addition, all written into
    preallocated buffers, so a step is three operations. The pointers are then recovered for
    all steps at once: the sum attaining the max equals it exactly (the max is one of the
    sums), so ``pointer = min i with sum == max``, found as ``C - max_i ((sum == max) · (C - i))``
    by one comparison (with a floating-point result: a boolean one is not vectorised), one
    product and one ``amax``.
    """
    C, N = v0.shape
    K = x.shape[0]
    values = v0.new_empty(K, C, N)
    values[0] = v0
    sums = v0.new_empty(K - 1, C, C, N)
    best = v0.new_empty(K - 1, C, N)  # max_i (v_t[i] + g[i, j]), before the emission
    # Views made once (unbind), not one indexing operation per step.
    prev = values.unsqueeze(2).unbind(0)  # (C, 1, N): the previous tag along dim 0
    nxt, s_t, b_t, x_t = values.unbind(0), sums.unbind(0), best.unbind(0), x.unbind(0)
    for t in range(K - 1):
        # Addition in pytorch-crf's order, (v + g) + x, so that the forward values are the
        # same floating-point numbers as its own.
        torch.add(prev[t], g, out=s_t[t])
        torch.amax(s_t[t], 0, out=b_t[t])
        torch.add(b_t[t], x_t[t + 1], out=nxt[t + 1])
    weights = torch.arange(C, 0, -1, dtype=sums.dtype, device=sums.device).view(1, C, 1, 1)
    hit = torch.eq(sums, best.unsqueeze(1), out=sums)  # 1.0 where the sum is the max
    pointers = C - hit.mul_(weights).amax(1).long()
    return values, pointers


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
    recursion over the first ``m = ceil(L/2)`` positions of each sequence and the backward one
    over the rest (a forward recursion on the reversed sequence with transposed transitions,
    start and end swapped) run as one batch of ``2B`` columns, ``ceil(T/2)`` steps instead of
    ``T`` (:func:`_max_plus_forward`); the two halves are joined at the best
    ``(y_{m-1}, y_m)`` pair and each is read back from its pointers (:func:`_backtrack`).

    Ties (several best paths): the join takes the first best pair ``(y_{m-1}, y_m)`` in
    row-major order (lowest ``y_{m-1}``, then lowest ``y_m``); going back from ``y_{m-1}``
    each earlier position takes the lowest tag whose best prefix leads to the tag after it,
    and going forward from ``y_m`` each later position the lowest tag whose best suffix
    follows the tag before it. pytorch-crf (a full forward pass, backtracked from the last
    position with the lowest tag) may return another of the tied paths.
    """
    B, T, C = h.shape
    h, g, start, end = h.detach(), trans.detach(), start.detach(), end.detach()
    dev = h.device
    L = lengths if lengths is not None else torch.full((B,), T, device=dev, dtype=torch.long)
    m = (L + 1) // 2  # forward half: positions 0..m-1; backward half: L-1 down to m
    K = (T + 1) // 2  # the longest half
    N = 2 * B
    # State-major emissions (K, C, 2B), read from h in one indexing operation: column b < B
    # is row b's forward half, column B + b row b reversed within its length
    # (x[s, :, B + b] = h[b, L_b - 1 - s], clamped at 0 past it).
    pos = torch.arange(T, device=dev)
    back = L.unsqueeze(-1) - 1 - pos  # (B, T): position t counted from the end
    rows = torch.arange(B, device=dev)
    at = torch.cat([pos[:K].expand(B, K), back[:, :K].clamp(min=0)]) + T * rows.repeat(2)[:, None]
    x = h.reshape(B * T, C).index_select(0, at.t().reshape(-1)).view(K, N, C)
    x = x.transpose(1, 2).contiguous()
    v0 = (x[0].view(C, 2, B) + torch.stack([start, end], -1).unsqueeze(-1)).view(C, N)
    both = torch.stack([g, g.t()], -1).unsqueeze(-1).expand(C, C, 2, B).reshape(C, C, N)
    values, pointers = _max_plus_forward(v0, both, x)
    fwd = values[m - 1, :, rows]  # best prefix ending at m-1 in each tag, (B, C)
    n_back = L - m  # positions in the backward half (0 for length 1)
    bwd = values[(n_back - 1).clamp(min=0), :, rows + B]  # best suffix from m in each tag
    # Join: best (y_{m-1}, y_m) = argmax fwd[j] + g[j, k] + bwd[k]; a length-1 row has no
    # backward half and ends at m - 1 = 0: fwd[j] + end[j].
    pair = (fwd.unsqueeze(-1) + g + bwd.unsqueeze(1)).flatten(1).max(-1).indices
    alone = (fwd + end).max(-1).indices
    single = n_back == 0
    j = torch.where(single, alone, torch.div(pair, C, rounding_mode="floor"))
    k = torch.where(single, 0, pair % C)
    # (K, 2B) tags encoded as tag * 2B + column: forward halves in order, backward reversed.
    states = _backtrack(pointers, torch.cat([j, k]), torch.cat([m, n_back.clamp(min=1)]))
    # Position t reads the forward half at t (t < m), the backward half at L-1-t (t >= m).
    src = torch.where(
        pos < m.unsqueeze(-1), pos * N + rows.unsqueeze(-1), back * N + B + rows.unsqueeze(-1)
    )
    path = states.take(src.clamp_(min=0)).div_(N, rounding_mode="floor")
    return path.masked_fill_(back < 0, 0)


def _backtrack(pointers: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The states ``(K, N)`` of each column's best path, encoded ``state * N + column``.

    ``pointers (K-1, C, N)`` map the state at ``t+1`` to the one at ``t``; column ``n`` ends at
    position ``lengths[n] - 1`` in state ``last[n]`` (later positions repeat it). One
    ``take`` per position: with the pointers encoded as flat indices of their own step's
    ``(C, N)`` map, following one is a single indexing operation into a preallocated buffer
    (measured cheaper than pointer doubling's ``log2 K`` gathers over all states at the
    few-hundred-step lengths this is for).
    """
    K1, C, N = pointers.shape
    cols = torch.arange(N, device=pointers.device)
    # Identity past each column's last position, so its last state is carried back to it.
    used = torch.arange(K1, device=pointers.device).view(K1, 1, 1) < (lengths - 1)
    ident = torch.arange(C, device=pointers.device).view(1, C, 1)
    flat = torch.where(used, pointers, ident).mul_(N).add_(cols)
    out = torch.empty(K1 + 1, N, dtype=torch.long, device=pointers.device)
    torch.add(cols, last, alpha=N, out=out[K1])
    maps, steps = flat.unbind(0), out.unbind(0)
    for t in range(K1 - 1, -1, -1):
        torch.take(maps[t], steps[t + 1], out=steps[t])
    return out
