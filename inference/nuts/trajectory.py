"""One NUTS transition for a batch of chains at once (multinomial sampling, iterative
doubling, the generalised U-turn criterion), every chain with its own tree.

Hamiltonian H(θ, r) = U(θ) + ½ rᵀ M⁻¹ r with an inverse mass M⁻¹ per chain, diagonal or
dense (:mod:`~jointkl.inference.nuts.metric`); the leapfrog step of size ε is
r ← r − ε/2 ∇U(θ); θ ← θ + ε M⁻¹ r; r ← r − ε/2 ∇U(θ).

A transition (Hoffman & Gelman 2014; Betancourt 2017, as Stan and Pyro do it) draws
r ~ N(0, M) and grows a trajectory around (θ, r) by doublings: the j-th doubling picks a
direction at random and adds a subtree of 2^j leapfrog states at that end. Within a subtree
the proposal is drawn in proportion to exp(−H) (multinomial, progressive); a finished
subtree's proposal replaces the tree's with probability min(1, w_subtree / w_tree) (biased
progressive sampling, which favours states far from the start). The tree stops when

* its two ends turn back towards each other: p♯₋·ρ ≤ 0 or p♯₊·ρ ≤ 0, ρ the sum of the
  momenta over the tree less half of the two end momenta, p♯ = M⁻¹ r at the ends — checked
  for the whole tree after every doubling, and inside a subtree for every aligned
  power-of-two piece of it (the checks of the recursive build, done iteratively from
  checkpoints of the momentum and its running sum, as NumPyro does);
* a leapfrog state has H − H₀ > 1000 (a *divergence*: the integrator left the level set);
* or ``max_tree_depth`` doublings were made.

All chains advance in lock step: leaf n of the current subtree is computed for every chain
in one batched potential call, and a chain whose tree has stopped keeps its state (masks),
so a batch costs the deepest chain's tree. The acceptance statistic for step-size adaptation
is the mean of min(1, exp(H₀ − H)) over the states of the tree, Stan's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from jointkl.inference.nuts.metric import kinetic, momentum, velocity

__all__ = ["Transition", "transition", "leaf", "step_function", "MAX_DELTA_H"]

MAX_DELTA_H = 1000.0


@dataclass
class Transition:
    """The chains' next state and the statistics of their trees, each of shape (C,)."""

    theta: torch.Tensor
    potential: torch.Tensor
    grad: torch.Tensor
    accept_prob: torch.Tensor
    diverging: torch.Tensor
    tree_depth: torch.Tensor
    num_steps: torch.Tensor
    energy: torch.Tensor
    evaluations: int = 0


def _turning(p_left, p_right, rho) -> torch.Tensor:
    """The U-turn test, (C,) bool: p♯ at either end has a non-positive projection on ρ."""
    return ((p_left * rho).sum(-1) <= 0) | ((p_right * rho).sum(-1) <= 0)


def _checkpoint_range(n: int) -> tuple[int, int]:
    """For leaf n (odd) of a subtree, the checkpoints [lo, hi] that start the aligned
    power-of-two pieces ending at n: hi = popcount(n >> 1), and as many as n has trailing
    one bits."""
    hi = bin(n >> 1).count("1")
    trailing = 0
    while (n >> trailing) & 1:
        trailing += 1
    return hi - trailing + 1, hi


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - 1)), a, b)


def transition(
    theta: torch.Tensor,
    potential: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    inv_mass: torch.Tensor,
    max_tree_depth: int,
    step_fn: Callable[..., tuple],
    gen: torch.Generator,
) -> Transition:
    """One NUTS transition of every chain.

    :param theta: (C, D) current unconstrained positions.
    :param potential: (C,) U(theta).
    :param grad: (C, D) ∇U(theta).
    :param step_size: (C,) leapfrog step ε per chain.
    :param inv_mass: the inverse mass matrix M⁻¹ per chain: (C, D) diagonal or (C, D, D)
        dense.
    :param int max_tree_depth: the most doublings per transition.
    :param step_fn: :func:`leaf` with its potential bound (or its compiled graph).
    :param gen: the generator of the momenta, directions and multinomial draws.

    ``energy`` is H at the chosen state (ArviZ's ``energy``, for E-BFMI).
    """
    C, D = theta.shape
    opts = dict(dtype=theta.dtype, device=theta.device)
    r0 = momentum(torch.randn(C, D, generator=gen, **opts), inv_mass)
    h0 = potential + kinetic(r0, inv_mass)
    eps = step_size.reshape(C, 1)
    # The tree: its two ends (position, momentum, gradient), its proposal, log Σ exp(H₀ − H),
    # and Σ r over its states.
    left = [theta, r0, grad]
    right = [theta, r0, grad]
    prop = [theta, potential, grad, h0]
    log_w = torch.zeros(C, **opts)
    r_sum = r0.clone()
    done = torch.zeros(C, dtype=torch.bool, device=theta.device)
    diverging = torch.zeros_like(done)
    depth = torch.zeros(C, dtype=torch.long, device=theta.device)
    accept_sum = torch.zeros(C, **opts)
    n_states = torch.zeros(C, **opts)
    evaluations = 0
    for j in range(max_tree_depth):
        if bool(done.all()):
            break
        active = ~done
        depth = depth + active.long()
        forward = torch.rand(C, generator=gen, **opts) < 0.5
        sign = torch.where(forward, 1.0, -1.0).to(theta.dtype).reshape(C, 1)
        start = [_where(forward, a, b) for a, b in zip(right, left, strict=True)]
        sub = _subtree(start, sign * eps, j, active, h0, inv_mass, step_fn, gen, max_tree_depth)
        end, s_prop, s_log_w, s_r_sum, s_stop, s_div, s_acc, s_n, calls = sub
        evaluations += calls * C
        right = [_where(active & forward, e, r) for e, r in zip(end, right, strict=True)]
        left = [_where(active & ~forward, e, lf) for e, lf in zip(end, left, strict=True)]
        accept_sum = accept_sum + s_acc
        n_states = n_states + s_n
        diverging = diverging | (active & s_div)
        ok = active & ~s_stop
        # Biased progressive sampling: move to the subtree's proposal w.p. min(1, w_sub/w).
        u = torch.rand(C, generator=gen, **opts)
        take = ok & (u.log() < s_log_w - log_w)
        prop = [_where(take, a, b) for a, b in zip(s_prop, prop, strict=True)]
        log_w = torch.where(ok, torch.logaddexp(log_w, s_log_w), log_w)
        r_sum = _where(ok, r_sum + s_r_sum, r_sum)
        rho = r_sum - (left[1] + right[1]) / 2
        turned = _turning(velocity(left[1], inv_mass), velocity(right[1], inv_mass), rho)
        done = done | (active & (s_stop | turned))
    new_theta, new_u, new_grad, new_h = prop
    return Transition(
        theta=new_theta,
        potential=new_u,
        grad=new_grad,
        accept_prob=accept_sum / n_states.clamp_min(1),
        diverging=diverging,
        tree_depth=depth,
        num_steps=n_states.long(),
        energy=new_h,
        evaluations=evaluations,
    )


def _subtree(start, step, depth, active, h0, inv_mass, step_fn, gen, max_depth):
    """2^depth leapfrog states from ``start`` = (θ, r, ∇U) with signed step ``step`` (C, 1)
    for the ``active`` chains. Returns the last state, the proposal (θ, U, ∇U, H), log Σ
    exp(H₀ − H) and Σ r over the states, whether the subtree stopped (U-turn inside it or
    divergence), the divergence flags, Σ min(1, exp(H₀ − H)) and the number of states."""
    theta, r, grad = start
    C, D = theta.shape
    opts = dict(dtype=theta.dtype, device=theta.device)
    K = max(max_depth, 1)
    state = (
        theta,
        r,
        grad,
        torch.full((C,), -torch.inf, **opts),  # log Σ exp(H₀ − H) over the subtree
        torch.zeros(C, D, **opts),  # Σ r
        theta,
        h0.new_zeros(C),
        grad,
        h0,  # the proposal: θ, U, ∇U, H
        torch.zeros(C, **opts),  # Σ min(1, exp(H₀ − H))
        torch.zeros(C, **opts),  # states
        torch.zeros(C, dtype=torch.bool, device=theta.device),  # stopped
        torch.zeros(C, dtype=torch.bool, device=theta.device),  # diverged
        torch.zeros(K, C, D, **opts),  # momentum checkpoints
        torch.zeros(K, C, D, **opts),  # running-sum checkpoints
    )
    calls = 0
    for n in range(2**depth):
        if not bool((active & ~state[11]).any()):
            break
        calls += 1
        write, check = _checkpoint_masks(n, K, theta.device)
        unif = torch.rand(C, generator=gen, **opts)
        state = step_fn(*state, step, inv_mass, h0, active, unif, write, check)
    theta, r, grad, log_w, r_sum, pt, pu, pg, ph, acc, n_states, stop, div, _, _ = state
    return [theta, r, grad], [pt, pu, pg, ph], log_w, r_sum, stop, div, acc, n_states, calls


_MASKS: dict = {}


def _checkpoint_masks(n: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For leaf n: which checkpoint slot it writes (even n) and which slots start the
    aligned power-of-two pieces that end at it and must be checked (odd n), as (K,) masks."""
    key = (n, K, str(device))
    if key not in _MASKS:
        write = torch.zeros(K, dtype=torch.bool)
        check = torch.zeros(K, dtype=torch.bool)
        if n % 2 == 0:
            write[bin(n >> 1).count("1")] = True
        else:
            lo, hi = _checkpoint_range(n)
            check[lo : hi + 1] = True
        _MASKS[key] = (write.to(device), check.to(device))
    return _MASKS[key]


def leaf(
    value_and_grad,
    theta, r, grad, log_w, r_sum, p_theta, p_u, p_grad, p_h, acc, n_states, stop, div,
    r_ckpt, r_sum_ckpt, step, inv_mass, h0, active, unif, write, check,
):  # fmt: skip
    """One leapfrog state added to the subtree of every live chain (active, not stopped):
    the state, the multinomial proposal (kept with probability exp(−H) / Σ exp(−H)), the
    sums, the checkpoints (slot ``write``) and the U-turn checks of the pieces starting at
    the slots ``check``. A fixed tensor program (no Python branching on values), so that it
    can be traced once with the potential into one compiled graph."""
    live = active & ~stop
    r_half = r - 0.5 * step * grad
    theta_new = theta + step * velocity(r_half, inv_mass)
    u_new, grad_new = value_and_grad(theta_new)
    r_new = r_half - 0.5 * step * grad_new
    h = u_new + kinetic(r_new, inv_mass)
    delta = h - h0
    delta = torch.where(torch.isnan(delta), torch.inf, delta)
    bad = ~torch.isfinite(grad_new).all(-1)
    new_div = live & ((delta > MAX_DELTA_H) | bad)
    good = live & ~new_div
    acc = acc + torch.where(live, torch.clamp(torch.exp(-delta), max=1.0), 0.0)
    n_states = n_states + live.to(theta.dtype)
    # Multinomial (progressive) sampling within the subtree: uniform in exp(−H).
    new_log_w = torch.logaddexp(log_w, -delta)
    take = good & (unif.log() < -delta - new_log_w)
    p_theta = _where(take, theta_new, p_theta)
    p_u = torch.where(take, u_new, p_u)
    p_grad = _where(take, grad_new, p_grad)
    p_h = torch.where(take, h, p_h)
    log_w = torch.where(good, new_log_w, log_w)
    r_sum = _where(good, r_sum + r_new, r_sum)
    theta = _where(good, theta_new, theta)
    r = _where(good, r_new, r)
    grad = _where(good, grad_new, grad)
    slot = (write.reshape(-1, 1) & good.reshape(1, -1)).unsqueeze(-1)
    r_ckpt = torch.where(slot, r.unsqueeze(0), r_ckpt)
    r_sum_ckpt = torch.where(slot, r_sum.unsqueeze(0), r_sum_ckpt)
    # U-turn of each piece from checkpoint i to this state (Σ r over it, less half its ends).
    rho = r_sum.unsqueeze(0) - r_sum_ckpt + r_ckpt - (r_ckpt + r.unsqueeze(0)) / 2
    turned = ((velocity(r_ckpt, inv_mass) * rho).sum(-1) <= 0) | (
        (velocity(r, inv_mass) * rho).sum(-1) <= 0
    )
    turned = (turned & check.reshape(-1, 1)).any(0)
    stop = stop | (good & turned) | new_div
    div = div | new_div
    return (
        theta, r, grad, log_w, r_sum, p_theta, p_u, p_grad, p_h, acc, n_states, stop, div,
        r_ckpt, r_sum_ckpt,
    )  # fmt: skip


def step_function(
    potential, max_tree_depth: int, compile: bool, dense: bool = False
) -> Callable[..., tuple]:
    """:func:`leaf` with ``potential``'s U and ∇U bound; when ``compile`` and the potential
    itself compiled (:meth:`Potential.compile`), the whole leaf — leapfrog step, model,
    backward pass and the tree's bookkeeping — traced once into one graph (``make_fx``,
    frozen by TorchScript), kept only if it reproduces the eager leaf on random inputs.
    ``dense``: the graph is traced for a dense inverse mass matrix (C, D, D), else for a
    diagonal one (C, D); the sampler keeps one form for a whole fit."""
    import functools

    eager = functools.partial(leaf, potential.eager_value_and_grad)
    if not compile or potential.graph is None:
        return functools.partial(leaf, potential.value_and_grad)
    from jointkl.inference.nuts.potential import (
        _Checked,
        _close,
        _error_flagged,
        _traced,
    )
    from torch.fx.experimental.proxy_tensor import make_fx

    C, D, K = potential.num_chains, potential.dim, max(max_tree_depth, 1)
    gen = torch.Generator(device="cpu").manual_seed(2024)
    opts = dict(dtype=potential.dtype)

    def inputs() -> tuple:
        def f(*shape):
            return (torch.rand(*shape, generator=gen, **opts) * 2 - 1).to(potential.device)

        def b(*shape):
            return (torch.rand(*shape, generator=gen) < 0.5).to(potential.device)

        def metric():
            if not dense:
                return 1 + f(C, D).abs()
            a = f(C, D, D)  # symmetric positive definite: I + a aᵀ / D
            return torch.eye(D, **opts).to(potential.device) + a @ a.mT / D

        # Distinct tensors in every position: a tracer that meets one tensor object twice
        # would take the two inputs for one.
        return (
            f(C, D), f(C, D), f(C, D), f(C), f(C, D), f(C, D), f(C), f(C, D), f(C), f(C).abs(),
            f(C).abs(), b(C), b(C), f(K, C, D), f(K, C, D), 0.1 * f(C, 1), metric(),
            f(C), b(C), f(C).abs(), b(K), b(K),
        )  # fmt: skip

    try:
        # Pyro's validation checks values with Python branches, which a trace cannot hold:
        # the graph is traced without them (the potential's own graph is, too).
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            graph = make_fx(lambda *a: eager(*a))(*inputs())
        graph.graph.eliminate_dead_code()
        graph.recompile()
        # The failed-check flag is always the graph's last output (a constant False where
        # the leaf has no linear-algebra check), so the scripted transition
        # (:mod:`~jointkl.inference.nuts.compiled_transition`) sees one form of leaf.
        if _error_flagged(graph) is None:
            _flag_never(graph)
        traced = _traced(graph, inputs())  # kept unfrozen for the scripted transition
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                module = graph if traced is None else torch.jit.freeze(traced.eval())
        except Exception:  # TorchScript is optional: the FX graph is exact too
            module, traced = graph, None
        graph = _Checked(module, several=True)
        # Four consecutive leaves from each of two random starts, outputs fed back in.
        for _ in range(2):
            example = inputs()
            ours, theirs, fixed = (
                example[:15],
                tuple(t.clone() for t in example[:15]),
                example[15:20],
            )
            for n in range(4):
                write, check = _checkpoint_masks(n, K, potential.device)
                ours = graph(*ours, *fixed, write, check)
                theirs = eager(*theirs, *fixed, write, check)
                for a, e in zip(ours, theirs, strict=True):
                    same = torch.equal(a, e) if a.dtype == torch.bool else _close(a, e)
                    if not same:
                        return functools.partial(leaf, potential.value_and_grad)
    except Exception:  # tracing failed: the leaf runs eagerly on the compiled potential
        return functools.partial(leaf, potential.value_and_grad)
    return _GuardedLeaf(graph, functools.partial(leaf, potential.value_and_grad), traced)


def _flag_never(graph) -> None:
    """Append a constant False to the outputs of the FX ``graph`` (in place): the flag of
    :func:`~jointkl.inference.nuts.potential._error_flagged` for a graph with no check."""
    g = graph.graph
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        flag = g.call_function(torch.ops.aten.zeros.default, ([],), {"dtype": torch.bool})
    out.args = ((*out.args[0], flag),)
    graph.recompile()


class _GuardedLeaf:
    """The compiled leaf, falling back to the eager leaf on the guarded potential for the
    one call where the graph raises: a model that cannot be evaluated at some chain's new
    point (e.g. a precision matrix singular in floating point, met inside the frozen
    graph's forward or backward pass, where :meth:`Potential.value_and_grad` cannot catch
    it) then gets U = +inf there, which the leaf counts as a divergence, and the other
    chains' steps are exact.

    :param graph: the frozen leaf, called with :func:`leaf`'s arguments (less the potential).
    :param eager: :func:`leaf` bound to :meth:`Potential.value_and_grad`.
    :param traced: the same graph traced by TorchScript and not frozen (a submodule of the
        scripted transition, :mod:`~jointkl.inference.nuts.compiled_transition`), or
        ``None``.
    """

    def __init__(self, graph: Callable[..., tuple], eager: Callable[..., tuple], traced=None):
        self.graph, self.eager, self.traced = graph, eager, traced
        self.fallbacks = 0  # calls answered by the eager leaf (for the profile)

    def __call__(self, *args: torch.Tensor) -> tuple:
        try:
            return self.graph(*args)
        except RuntimeError:  # LinAlgError and TorchScript's errors are RuntimeErrors
            self.fallbacks += 1
            return self.eager(*args)
