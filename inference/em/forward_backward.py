"""Forward-backward recursions whose gradients are the posterior marginals of a chain.

The log-partition of a chain (a mixture is one of length 1, an HMM a longer one) is a forward
recursion, and its gradient with respect to each potential is that potential's posterior
marginal ("inside-outside and forward-backward are just backprop", Eisner 2016). These
autograd functions compute both without taping the recursion: the E-step of
:mod:`jointkl.inference.em.estep` says when each is used.
"""

from __future__ import annotations

import torch

from jointkl.chain import chain_forward
from jointkl.semiring import LogSemiring

__all__ = ["FusedLogSemiring", "SharedChainLogPartition", "ChainLogPartition"]


class FusedLogSemiring(LogSemiring):
    """The log semiring with ⊕ as torch's fused ``logsumexp`` (one kernel instead of the ten
    of :class:`~jointkl.semiring.LogSemiring`'s version, whose guards exist for gradients:
    this one is used without autograd)."""

    @staticmethod
    def plus(x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.logsumexp(x, dim)


class SharedChainLogPartition(torch.autograd.Function):
    """Per-chain log-partition of unary tables ``(..., T, K)`` and one transition table
    ``(K, K)`` shared by every step and chain (a homogeneous HMM), with the forward-backward
    posterior as its gradient.

    :func:`jointkl.chain.chain_forward` needs the (..., T-1, K, K) potentials written out;
    with a shared transition the recursion only needs one (batch x K) @ (K x K) product per
    step. It runs in probability space with per-step normalisation (Rabiner 1989's scaled
    forward-backward, what hmmlearn's "scaling" implementation does): alpha_t is normalised
    to sum 1 and log Z = Σ_t log c_t. The gradients are the state marginals gamma_t and the
    expected transition counts Σ_t xi_t, the latter as one matrix product over all (chain,
    step) pairs. If a step's normaliser underflows (every state below e^-700 of the best
    path) log Z comes back -inf and the caller falls back to the log-space recursion.
    """

    @staticmethod
    def forward(ctx, unary, trans, first=None):
        batch, (T, K) = unary.shape[:-2], unary.shape[-2:]
        U = unary.reshape(-1, T, K)
        P = trans.exp()
        # Time-major (T, B, K), so that each step reads and writes contiguous (B, K) slices
        # in place: four kernels per step and no allocation (the loop is Python-level).
        E = U.new_empty((T, U.shape[0], K))
        E.copy_(U.transpose(0, 1))
        if first is not None:  # the initial-state table, added at t = 0 (no index_add)
            E[0] += first.reshape(-1, K)
        m = E.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        E.sub_(m).exp_()
        a = torch.empty_like(E)
        c = E.new_empty(E.shape[:-1] + (1,))
        es, avs, cs = E.unbind(0), a.unbind(0), c.unbind(0)
        avs[0].copy_(es[0])
        torch.sum(avs[0], -1, keepdim=True, out=cs[0])
        avs[0].div_(cs[0])
        for t in range(1, T):
            torch.mm(avs[t - 1], P, out=avs[t])
            avs[t].mul_(es[t])
            torch.sum(avs[t], -1, keepdim=True, out=cs[t])
            avs[t].div_(cs[t])
        logz = c.log().sum(0).squeeze(-1) + m.squeeze(-1).sum(0)
        ctx.save_for_backward(a, c, E, P)
        ctx.batch = batch
        ctx.first = None if first is None else first.shape
        return logz.reshape(batch)

    @staticmethod
    def backward(ctx, grad):
        a, c, E, P = ctx.saved_tensors
        T, B, K = a.shape
        g = grad.reshape(1, -1, 1)
        PT = P.T
        # right[t] = E_{t+1} beta_{t+1} / c_{t+1}: the backward message into step t, written
        # in place; beta_{t} = right[t] @ P^T, kept in one scratch buffer.
        Ec = E / c
        right = a.new_empty((max(T - 1, 0), B, K))
        rs, ecs = right.unbind(0), Ec.unbind(0)
        b = a.new_ones((B, K))
        for t in range(T - 1, 0, -1):
            torch.mul(ecs[t], b, out=rs[t - 1])
            torch.mm(rs[t - 1], PT, out=b)
        beta = torch.cat([right @ PT, a.new_ones((1, B, K))], 0)
        g_unary = (a * beta).mul_(g).transpose(0, 1)
        left = a[:-1] * g
        g_trans = P * (left.reshape(-1, K).T @ right.reshape(-1, K))
        g_first = None if ctx.first is None else g_unary[:, 0].reshape(ctx.first)
        return g_unary.reshape(ctx.batch + (T, K)), g_trans, g_first


class ChainLogPartition(torch.autograd.Function):
    """Per-chain log-partition ``log Σ_paths`` of ``init (..., K)`` and ``potentials
    (..., T-1, K, K)``, whose gradient is the forward-backward posterior.

    The forward runs :func:`jointkl.chain.chain_forward` twice, on the chain and on its
    reversal (which gives the backward vectors beta), without autograd; the backward returns
    the marginals exp(alpha_t + potential_t + beta_{t+1} - log Z) — exactly what autograd
    through the forward recursion would, at the cost of two recursions and no taped graph.
    """

    @staticmethod
    def forward(ctx, init, pots, method):
        alphas = chain_forward(init, pots, FusedLogSemiring, method=method)
        rev = pots.flip(-3).transpose(-1, -2)
        betas = chain_forward(torch.zeros_like(init), rev, FusedLogSemiring, method=method)
        betas = betas.flip(-2)
        logz = torch.logsumexp(alphas[..., -1, :], -1)
        ctx.save_for_backward(pots, alphas, betas, logz)
        return logz

    @staticmethod
    def backward(ctx, grad):
        pots, alphas, betas, logz = ctx.saved_tensors
        lz = logz.unsqueeze(-1)
        g_init = (alphas[..., 0, :] + betas[..., 0, :] - lz).exp() * grad.unsqueeze(-1)
        lz = lz.unsqueeze(-1).unsqueeze(-1)
        g_pots = (alphas[..., :-1, :, None] + pots + betas[..., 1:, None, :] - lz).exp()
        return g_init, g_pots * grad[..., None, None, None], None
