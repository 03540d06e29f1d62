"""A whole NUTS transition of every chain as one TorchScript call: the momentum draw, the
doublings, every subtree's leaves (the compiled leaf of
:func:`~jointkl.inference.nuts.trajectory.step_function` called in a loop) and the tree's
U-turn checks and proposals, with no Python between two leapfrog steps.

It is :func:`~jointkl.inference.nuts.trajectory.transition` written again in TorchScript,
operation for operation and random draw for random draw (the same generator, the same draws
in the same order: momenta, direction, one uniform per leaf while a chain is live, one per
doubling), so it gives the same transition bit for bit; the eager one stays the reference
and the fallback. On a small model a leaf costs about as much as the Python that drove it
(host syncs, mask look-ups, the tree's bookkeeping), so one call per transition instead of
one per leaf takes most of that away.

The compiled leaf's last output flags a failed linear-algebra check (a matrix that is not
positive definite where the eager model raises): the call then raises ``RuntimeError``, as
any error inside the graph does, and the caller replays the transition eagerly from the
generator state it started with (:meth:`Chains.iterate`), where each such leaf is guarded
one at a time.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["TransitionGraph", "transition_graph"]


def _velocity(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    if inv_mass.dim() == 3:
        return (inv_mass @ r.unsqueeze(-1)).squeeze(-1)
    return r * inv_mass


def _kinetic(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    return 0.5 * (r * _velocity(r, inv_mass)).sum(-1)


def _momentum(z: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    if inv_mass.dim() != 3:
        return z / inv_mass.sqrt()
    chol = torch.linalg.cholesky(inv_mass)
    return torch.linalg.solve_triangular(chol.mT, z.unsqueeze(-1), upper=True).squeeze(-1)


def _rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with a (C,) mask over (C, D) tensors."""
    return torch.where(mask.unsqueeze(-1), a, b)


class TransitionGraph(torch.nn.Module):
    """One NUTS transition of every chain (see
    :func:`~jointkl.inference.nuts.trajectory.transition`, whose arguments and results it
    takes and gives, less the step function, which it holds).

    :param leaf: the TorchScript leaf (:func:`~jointkl.inference.nuts.trajectory.leaf`
        traced with the potential), returning the leaf's 15 tensors and the failed-check flag.
    :param int max_tree_depth: the most doublings per transition.
    """

    def __init__(self, leaf: Any, max_tree_depth: int):
        super().__init__()
        self.leaf = leaf
        self.max_tree_depth = max_tree_depth

    def forward(
        self,
        theta: torch.Tensor,
        potential: torch.Tensor,
        grad: torch.Tensor,
        step_size: torch.Tensor,
        inv_mass: torch.Tensor,
        gen: torch.Generator,
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        int,
    ]:
        C, D = theta.shape[0], theta.shape[1]
        dtype, device = theta.dtype, theta.device
        K = max(self.max_tree_depth, 1)
        slots = torch.arange(K, device=device)
        r0 = _momentum(torch.randn([C, D], generator=gen, dtype=dtype, device=device), inv_mass)
        h0 = potential + _kinetic(r0, inv_mass)
        eps = step_size.reshape(C, 1)
        l_theta, l_r, l_grad = theta, r0, grad
        r_theta, r_r, r_grad = theta, r0, grad
        p_theta, p_u, p_grad, p_h = theta, potential, grad, h0
        log_w = torch.zeros([C], dtype=dtype, device=device)
        r_sum = r0.clone()
        done = torch.zeros([C], dtype=torch.bool, device=device)
        diverging = torch.zeros_like(done)
        depth = torch.zeros([C], dtype=torch.long, device=device)
        accept_sum = torch.zeros([C], dtype=dtype, device=device)
        n_states = torch.zeros([C], dtype=dtype, device=device)
        evaluations = 0
        for j in range(self.max_tree_depth):
            if bool(done.all()):
                break
            active = ~done
            depth = depth + active.long()
            forward = torch.rand([C], generator=gen, dtype=dtype, device=device) < 0.5
            sign = torch.where(forward, 1.0, -1.0).to(dtype).reshape(C, 1)
            step = sign * eps
            # The subtree (trajectory._subtree): 2^j leaves from the end it grows.
            s_theta = _rows(forward, r_theta, l_theta)
            s_r = _rows(forward, r_r, l_r)
            s_grad = _rows(forward, r_grad, l_grad)
            s_log_w = torch.full([C], -float("inf"), dtype=dtype, device=device)
            s_r_sum = torch.zeros([C, D], dtype=dtype, device=device)
            sp_theta, sp_u, sp_grad, sp_h = s_theta, h0.new_zeros([C]), s_grad, h0
            s_acc = torch.zeros([C], dtype=dtype, device=device)
            s_n = torch.zeros([C], dtype=dtype, device=device)
            s_stop = torch.zeros([C], dtype=torch.bool, device=device)
            s_div = torch.zeros([C], dtype=torch.bool, device=device)
            r_ckpt = torch.zeros([K, C, D], dtype=dtype, device=device)
            r_sum_ckpt = torch.zeros([K, C, D], dtype=dtype, device=device)
            calls = 0
            for n in range(1 << j):
                if not bool((active & ~s_stop).any()):
                    break
                calls += 1
                write, check = _checkpoint_masks(n, slots)
                unif = torch.rand([C], generator=gen, dtype=dtype, device=device)
                out = self.leaf(
                    s_theta, s_r, s_grad, s_log_w, s_r_sum, sp_theta, sp_u, sp_grad, sp_h,
                    s_acc, s_n, s_stop, s_div, r_ckpt, r_sum_ckpt, step, inv_mass, h0,
                    active, unif, write, check,
                )  # fmt: skip
                if bool(out[15]):
                    raise RuntimeError("NUTS: a linear-algebra check failed in the compiled leaf")
                s_theta, s_r, s_grad, s_log_w, s_r_sum = out[0], out[1], out[2], out[3], out[4]
                sp_theta, sp_u, sp_grad, sp_h = out[5], out[6], out[7], out[8]
                s_acc, s_n, s_stop, s_div = out[9], out[10], out[11], out[12]
                r_ckpt, r_sum_ckpt = out[13], out[14]
            evaluations += calls * C
            # The tree (trajectory.transition): its ends, proposal, weights and U-turn.
            grow_right = active & forward
            grow_left = active & ~forward
            r_theta = _rows(grow_right, s_theta, r_theta)
            r_r = _rows(grow_right, s_r, r_r)
            r_grad = _rows(grow_right, s_grad, r_grad)
            l_theta = _rows(grow_left, s_theta, l_theta)
            l_r = _rows(grow_left, s_r, l_r)
            l_grad = _rows(grow_left, s_grad, l_grad)
            accept_sum = accept_sum + s_acc
            n_states = n_states + s_n
            diverging = diverging | (active & s_div)
            ok = active & ~s_stop
            u = torch.rand([C], generator=gen, dtype=dtype, device=device)
            take = ok & (u.log() < s_log_w - log_w)
            p_theta = _rows(take, sp_theta, p_theta)
            p_u = torch.where(take, sp_u, p_u)
            p_grad = _rows(take, sp_grad, p_grad)
            p_h = torch.where(take, sp_h, p_h)
            log_w = torch.where(ok, torch.logaddexp(log_w, s_log_w), log_w)
            r_sum = _rows(ok, r_sum + s_r_sum, r_sum)
            rho = r_sum - (l_r + r_r) / 2
            turned = ((_velocity(l_r, inv_mass) * rho).sum(-1) <= 0) | (
                (_velocity(r_r, inv_mass) * rho).sum(-1) <= 0
            )
            done = done | (active & (s_stop | turned))
        accept = accept_sum / n_states.clamp_min(1)
        return (
            p_theta, p_u, p_grad, accept, diverging, depth, n_states.long(), p_h, evaluations,
        )  # fmt: skip


def _checkpoint_masks(n: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """trajectory._checkpoint_masks for leaf n over the K slots ``slots`` = 0..K−1: the slot
    an even leaf writes (popcount(n >> 1)), the slots an odd leaf checks (from hi − t + 1 to
    hi, hi = popcount(n >> 1), t its trailing one bits)."""
    hi = 0
    m = n >> 1
    while m > 0:
        hi += m & 1
        m = m >> 1
    if n % 2 == 0:
        return slots == hi, slots < 0
    trailing = 0
    while ((n >> trailing) & 1) == 1:
        trailing += 1
    return slots < 0, (slots >= hi - trailing + 1) & (slots <= hi)


def transition_graph(step_fn: Any, max_tree_depth: int) -> TransitionGraph | None:
    """The scripted transition around ``step_fn``'s frozen leaf, or ``None`` when the leaf
    is not a TorchScript module (not compiled, or TorchScript could not take it) or the
    loop cannot be scripted: the eager transition then drives the leaf."""
    leaf = getattr(step_fn, "traced", None)
    if not isinstance(leaf, torch.jit.ScriptModule):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        try:
            scripted = torch.jit.script(TransitionGraph(leaf, max_tree_depth))
        except Exception:  # TorchScript is optional: the eager loop gives the same draws
            return None
        try:  # frozen: the leaf's graph inlined into the loop, its constants folded
            return torch.jit.freeze(scripted.eval())
        except Exception:
            return scripted
