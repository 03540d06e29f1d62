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
  accumulated (``log Z = Σ log scales + Σ shifts + log Σ alpha_{L-1} exp(end)``). When a
  gradient may be asked for, the backward recursion runs in the same loop, as a second batch
  of the same step (``E^T`` over each sequence reversed within its length: one batched matrix
  product and one product a step for both). The gradient is written by hand
  (:class:`_Scaled`): ``alpha_t * beta_t`` normalised per position are the node marginals
  (the gradient with respect to the emissions), ``Σ_t alpha_t^T (X_{t+1} beta_{t+1}) * E``
  (normalised likewise) the transition counts, computed in bulk after the loop, instead of
  autograd through ``T`` small operations. :func:`log_likelihood` folds the gold path's
  score into the same ``autograd.Function`` (its gradient: the path's indicators minus the
  marginals). The loop and the bulk gradient run as TorchScript functions (:func:`_compiled`).
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


def _forward_kernel(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor,
    tags: torch.Tensor | None,
    both: bool,
    every: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """The scaled forward recursion of :func:`log_partition` (and, with ``both``, the
    backward one as a second batch of the same steps), written in the subset of Python that
    TorchScript compiles.

    Args:
        h: ``(B, T, C)`` emissions; trans ``(C, C)``, start / end ``(C,)`` scores.
        lengths: ``(B,)`` int64 lengths in ``1..T``.
        tags: ``(B, T)`` int64 tags, or ``None``: with tags the first output is the
            log-likelihood ``s(tags) - log Z`` (``-inf`` for a forbidden path) instead of
            ``log Z``.
        both: also run the reversed recursion (the gradient needs it).
        every: renormalise every this many steps (:data:`RESCALE_EVERY`).

    Returns ``(out (B,), low, possible, X, V, P, scale, M, idx, live)``: ``low`` the smallest
    scale a sequence uses (0-dim); ``possible`` (``B``, bool) whether the path's score is
    finite (empty without tags); ``X (T, D, B, C)`` the shifted, exponentiated emissions of
    each direction (``D = 2`` with ``both``, else 1), ``V`` the scaled forward vectors,
    ``P`` the matrix products before the emission (``P[0]``: ``exp(end - m)``), ``scale
    (T, D, B, 1)`` the renormalisations (1 where none), ``M (D, C, C)`` the step matrices
    ``exp(g - m)`` (and its transpose), ``idx (T, B)`` the position each reversed step reads
    (empty without ``both``), ``live (T, B)`` bool, position ``t < L``; float64 but
    ``possible``, ``idx`` and ``live``. ``m`` is the largest of
    the transition, start and end scores.

    Direction 0 is ``alpha_t = (alpha_{t-1} @ E) * X_t`` from ``X_0 = exp(h_0 + start)``
    (shifted). Direction 1 runs the same step with ``E^T`` over each sequence reversed within
    its length: its step ``s`` reads position ``L - 1 - s`` (position 0 past its start: never
    used), starts from ``exp(h_{L-1} + end)``, and its product ``P[s, 1] = V[s-1, 1] @ E^T``
    is the backward vector ``beta`` at position ``L - 1 - s`` up to a positive factor per
    (step, sequence).
    """
    B, T, C = h.shape
    dev = h.device
    f64 = torch.float64
    D = 2 if both else 1
    pos = torch.arange(T, device=dev).unsqueeze(-1)  # (T, 1)
    # Made once and handed to the path score and the gradient: each distinct operation
    # costs tens of microseconds when cold, as it is right after other work.
    live = pos < lengths  # (T, B)
    xf = h.detach().transpose(0, 1).to(f64)  # (T, B, C); a view when h is float64
    m = xf.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # (T, B, 1); 0 if all -inf
    Y = (xf - m).exp_()  # max 1 at every (position, sequence), 0 for a forbidden tag
    # The transition, start and end scores shifted by one common maximum (one exp for all):
    # exp(g - m), exp(start - m), exp(end - m).
    par = torch.cat([trans.detach().reshape(-1), start.detach(), end.detach()]).to(f64)
    m_p = par.max().nan_to_num(neginf=0.0)
    par = (par - m_p).exp_()
    E = par[: C * C].view(C, C)
    exp_end = par[C * C + C :]
    idx = pos[:0]  # (T, B) reversed-step positions, with ``both`` only
    if both:
        idx = (lengths - 1 - pos).clamp_(min=0)  # (T, B): position read at reversed step s
        X = torch.stack([Y, Y.gather(0, idx.unsqueeze(-1).expand(T, B, C))], 1)  # (T,2,B,C)
        X[0] *= par[C * C :].view(2, 1, C)  # start into direction 0, end into direction 1
        M = torch.stack([E, E.t()])  # (2, C, C)
    else:
        X = Y.unsqueeze(1)
        X[0] *= par[C * C : C * C + C]
        M = E.unsqueeze(0)
    V = torch.empty(T, D, B, C, dtype=f64, device=dev)
    P = torch.empty(T, D, B, C, dtype=f64, device=dev)
    scale = torch.ones(T, D, B, 1, dtype=f64, device=dev)
    # Views made once (unbind), not one indexing operation per step.
    x, v, p, sc = X.unbind(0), V.unbind(0), P.unbind(0), scale.unbind(0)
    torch.sum(x[0], -1, keepdim=True, out=sc[0])
    torch.div(x[0], sc[0], out=v[0])
    P[0] = exp_end  # used in direction 1 only (0 has no product before its first step)
    for t in range(1, T):
        torch.bmm(v[t - 1], M, out=p[t])
        torch.mul(p[t], x[t], out=v[t])
        if t % every == 0:
            torch.sum(v[t], -1, keepdim=True, out=sc[t])
            v[t].div_(sc[t])
    # log Z = Σ_{t<L} (log scale_t + m_t) + log Σ alpha_{L-1} exp(end - m) + (L + 1) m: the
    # shift m of the start, of L - 1 transitions and of the end.
    last = lengths - 1
    at_last = last.view(1, B, 1)
    cum = (scale[:, 0].log() + m).cumsum(0).gather(0, at_last)[0, :, 0]
    alpha_last = V[:, 0].gather(0, at_last.expand(1, B, C))[0]  # (B, C)
    end_scale = alpha_last.mv(exp_end)  # (B,)
    out = cum + end_scale.log() + (last + 2) * m_p
    # Trusted iff every scale a sequence uses (in either direction) is >= SCALE_FLOOR.
    valid = live.view(T, 1, B, 1)
    low = torch.minimum(torch.where(valid, scale, 1.0).min(), end_scale.min())
    possible = torch.empty(0, dtype=torch.bool, device=dev)
    if tags is not None:
        score = _path_score(
            h.detach(), trans.detach(), start.detach(), end.detach(), lengths, tags, live.t()
        )
        possible = torch.isfinite(score)
        out = torch.where(possible, score.to(f64) - out, float("-inf"))
    return out, low, possible, X, V, P, scale, M, idx, live


def _gradient_kernel(
    X: torch.Tensor,
    V: torch.Tensor,
    P: torch.Tensor,
    scale: torch.Tensor,
    M: torch.Tensor,
    idx: torch.Tensor,
    live: torch.Tensor,
    lengths: torch.Tensor,
    grad: torch.Tensor,
    tags: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The gradients of ``Σ_b grad_b log Z_b`` from :func:`_forward_kernel`'s two directions
    (``both``): ``(emissions (B, T, C), transitions (C, C), start (C,), end (C,), finite)``,
    float64, in TorchScript's subset of Python.

    With ``alpha_t`` and ``beta_t`` each known up to a positive factor per (position,
    sequence), the node marginal is ``alpha_t beta_t / n_t`` with ``n_t = Σ alpha_t beta_t``
    (the gradient with respect to ``h_t``; at ``t = 0`` for start, ``t = L - 1`` for end),
    and the edge marginal ``alpha_t[i] E[i, j] X_{t+1}[j] beta_{t+1}[j] / (scale_{t+1}
    n_{t+1})`` (its normaliser is ``Σ_j (alpha_t @ E)[j] X_{t+1}[j] beta_{t+1}[j]``, and
    ``alpha_{t+1} = (alpha_t @ E) X_{t+1} / scale_{t+1}``); summed over positions and the
    batch it is one matrix product, ``alpha^T (X beta) * E``. Positions past each length are
    zeroed with ``where`` (their forward values may be 0/0).

    With ``tags (B, T)`` the gradients are those of ``Σ_b grad_b (s_b(tags) - log Z_b)``
    instead (:func:`log_likelihood`): the path's indicators (its tags, its transitions, its
    first and last tag, weighted by ``grad``) minus the weighted marginals."""
    T, _, B, C = X.shape
    f64 = torch.float64
    valid = live.unsqueeze(-1)  # (T, B, 1)
    alpha = V[:, 0]
    # Read at reversed steps 0..L-1 only: finite wherever the forward pass was trusted.
    beta = P[:, 1].gather(0, idx.unsqueeze(-1).expand(T, B, C))
    # Each normalised to sum 1 before their product, which then cannot underflow where the
    # marginals themselves are representable (the raw vectors may each be ~1e-250).
    sa = alpha.sum(-1, keepdim=True)
    beta = beta / beta.sum(-1, keepdim=True)
    prod = (alpha / sa) * beta
    g = grad.to(f64)
    w = (g if tags is None else -g).view(1, B, 1) / prod.sum(-1, keepdim=True)
    node = torch.where(valid, prod * w, 0.0)  # (T, B, C): the marginals, weighted
    E = M[0]
    if T > 1:
        # The edge (t, t+1)'s normaliser in these units: n_{t+1} times the step's mass
        # r_{t+1} = Σ (alpha_t / sa_t @ E) X_{t+1} = sa_{t+1} scale_{t+1} / sa_t.
        r = sa[1:] * (scale[1:, 0] / sa[:-1])
        left = torch.where(valid[1:], alpha[:-1] / sa[:-1] * (w[1:] / r), 0.0)
        right = X[1:, 0] * beta[1:]
        g_trans = left.reshape(-1, C).t().mm(right.reshape(-1, C)).mul_(E)
    else:
        g_trans = torch.zeros(C, C, dtype=f64, device=X.device)
    if tags is not None:
        y = torch.where(valid[:, :, 0], tags.t(), 0)  # (T, B); padding tags ignored
        gv = torch.where(valid[:, :, 0], g, 0.0)  # (T, B)
        node.scatter_add_(-1, y.unsqueeze(-1), gv.unsqueeze(-1))
        if T > 1:
            g_trans.view(-1).index_add_(0, (y[:-1] * C + y[1:]).view(-1), gv[1:].reshape(-1))
    g_start = node[0].sum(0)
    g_end = node.gather(0, (lengths - 1).view(1, B, 1).expand(1, B, C))[0].sum(0)
    finite = bool(torch.isfinite(node.sum() + g_trans.sum()))
    return node.transpose(0, 1), g_trans, g_start, g_end, finite


class _Scaled(torch.autograd.Function):
    """``log Z`` (``tags`` None) or ``s(tags) - log Z`` with the hand-written scaled
    forward-backward as its gradient."""

    @staticmethod
    def forward(ctx, h, trans, start, end, lengths, tags, value, state):
        ctx.save_for_backward(h, trans, start, end, lengths, tags)
        ctx.state = state  # (X, V, P, scale, M, idx, live) of both directions; which paths count
        return value.to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, trans, start, end, lengths, tags = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        *kernel_state, possible = ctx.state
        if possible is not None:  # an impossible path's -inf is a constant: no gradient
            grad = torch.where(possible, grad, 0.0)
        if torch.is_grad_enabled():
            # create_graph=True (a gradient of the gradient): the analytic marginals below are
            # not themselves differentiable, so take this gradient by autograd of the generic
            # recursion, which is.
            return _generic_grads(h, trans, start, end, lengths, tags, grad, needs)
        g_h, g_trans, g_start, g_end, finite = _compiled(_gradient_kernel)(
            *kernel_state, lengths, grad.detach(), tags
        )
        if not finite:
            return _generic_grads(h, trans, start, end, lengths, tags, grad, needs)
        return (
            g_h.to(h.dtype) if needs[0] else None,
            g_trans.to(trans.dtype) if needs[1] else None,
            g_start.to(start.dtype) if needs[2] else None,
            g_end.to(end.dtype) if needs[3] else None,
            None,
            None,
            None,
            None,
        )


def _generic_grads(h, trans, start, end, lengths, tags, grad, needs):
    inputs = [x for x, n in zip((h, trans, start, end), needs, strict=True) if n]
    with torch.enable_grad():
        out = generic_log_partition(h, trans, start, end, lengths)
        if tags is not None:
            out = _path_score(h, trans, start, end, lengths, tags) - out
        got = iter(torch.autograd.grad(out, inputs, grad, create_graph=torch.is_grad_enabled()))
    return (*(next(got) if n else None for n in needs), None, None, None, None)


def _path_score(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor,
    tags: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s(tags)`` (``(B,)``, in ``h``'s dtype; ``-inf`` for a forbidden path) of ``tags (B, T)``
    int64, padding tags ignored: the sum of the path's emissions, transitions, first and last
    tag scores (differentiable; TorchScript compiles it)."""
    B, T, C = h.shape
    if valid is None:  # (B, T): position t < L
        valid = torch.arange(T, device=h.device) < lengths.unsqueeze(-1)
    y = torch.where(valid, tags, 0)
    emit = h.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
    steps = emit[:, 1:] + trans.take(y[:, :-1] * C + y[:, 1:])  # into position t + 1
    last = y.gather(1, (lengths - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid[:, 1:], steps, 0.0).sum(-1) + (emit[:, 0] + start[y[:, 0]]) + end[last]


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
        tensors (by the scaled backward recursion, run alongside the forward one when a
        gradient may be asked for); ``None`` when some sequence's scales fell below
        :data:`SCALE_FLOOR` (including a sequence with no possible path), in which case the
        caller should use :func:`generic_log_partition`.
    """
    B, T = h.shape[:2]
    if B == 0:
        return None  # an empty batch: nothing to gain, and the checks below need an element
    if lengths is None:
        lengths = torch.full((B,), T, device=h.device, dtype=torch.long)
    both = torch.is_grad_enabled() and (
        h.requires_grad or trans.requires_grad or start.requires_grad or end.requires_grad
    )
    log_z, low, _, *state = _compiled(_forward_kernel)(
        h, trans, start, end, lengths, None, both, RESCALE_EVERY
    )
    if not bool(low >= SCALE_FLOOR):
        return None
    if not both:
        return log_z.to(h.dtype)
    return _Scaled.apply(h, trans, start, end, lengths, None, log_z, (*state, None))


def log_likelihood(
    h: torch.Tensor,
    trans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    lengths: torch.Tensor | None,
    tags: torch.Tensor,
) -> torch.Tensor | None:
    """``log p(tags) = s(tags) - log Z`` of a batch of CRF sequences, or ``None``.

    Same arguments as :func:`log_partition`, and ``tags (B, T)`` integer tags (any value
    past each length). ``-inf`` for a path the scores forbid (its gradient 0). One
    ``autograd.Function`` for the whole: its gradient is the path's indicators minus the
    marginals, from one pass of the scaled forward-backward, instead of autograd through
    the path score's gathers. ``None`` where :func:`log_partition` gives ``None``.
    """
    B, T = h.shape[:2]
    if B == 0:
        return None
    if lengths is None:
        lengths = torch.full((B,), T, device=h.device, dtype=torch.long)
    tags = tags.long()
    both = torch.is_grad_enabled() and (
        h.requires_grad or trans.requires_grad or start.requires_grad or end.requires_grad
    )
    value, low, possible, *state = _compiled(_forward_kernel)(
        h, trans, start, end, lengths, tags, both, RESCALE_EVERY
    )
    if not bool(low >= SCALE_FLOOR):
        return None
    if not both:
        return value.to(h.dtype)
    return _Scaled.apply(h, trans, start, end, lengths, tags, value, (*state, possible))


def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled by TorchScript once per process (``fn`` itself if TorchScript is
    unavailable or fails on it: the eager function does the same operations).

    Why: at the sizes this is for (tens of positions, a few tags) each of these kernels is a
    few hundred small tensor operations, and a TorchScript function runs them without the
    Python interpreter and argument parsing between them."""
    got = _SCRIPTED.get(fn.__name__)
    if got is None:
        try:
            with warnings.catch_warnings():
                # torch.jit.script is deprecated in favour of torch.compile, which needs a C++
                # compiler at run time and compiles per shape: not a default for a library.
                warnings.simplefilter("ignore", DeprecationWarning)
                got = torch.jit.script(fn)
        except Exception:  # noqa: BLE001 (any failure to compile: the eager function is exact)
            got = fn
        _SCRIPTED[fn.__name__] = got
    return got


_SCRIPTED: dict[str, Callable] = {}


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
    if TorchScript is unavailable or fails on it): 1.2-1.3x faster on CPU than the eager
    function for the same operations in the same order, so the same paths bit for bit
    (pinned by the tests)."""
    return _compiled(_viterbi_kernel)


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
