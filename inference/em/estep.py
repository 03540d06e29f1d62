"""EM's E-step: the log-partition log Σ_z Π tables and every table's posterior marginal.

The log-partition of the compiled factor tables is the marginal log-likelihood log p(x | θ)
(plus log p(θ) for MAP globals), and its gradient with respect to each table is that table's
exact posterior marginal (Eisner 2016: "inside-outside and forward-backward are just
backprop"). Pyro's :func:`~pyro.ops.contract.contract_to_tensor` computes it for any model;
the other paths of :data:`PATHS` compute the same numbers faster for the structures EM meets
most, and each is pinned to the generic contraction by a test.

A model is a *chain* when its enumerated variables are v_0 - v_1 - ... with every table over
no variable, one variable or two neighbours, all variables sharing plates and cardinality
(:func:`chain_plan`); a *mixture* is a chain of length one with one table row per group.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jointkl.inference.em.forward_backward import ChainLogPartition, SharedChainLogPartition
from jointkl.inference.em.gaussian import linear_log_density
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing

from jointkl.chain import chain_contract
from jointkl.semiring import LogSemiring

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = [
    "EStepPath",
    "PATHS",
    "ChainPotentials",
    "chain_plan",
    "is_mixture",
    "e_step",
    "log_partition",
    "chain_potentials",
    "chain_path",
    "mixture_e_step",
    "scaled_hmm_log_partition",
    "log_chain_log_partition",
    "chain_hessian_log_partition",
    "contract_log_partition",
]

# Points per block of a mixture's E-step: (block x K) doubles stay in a core's L2 cache.
MIXTURE_BLOCK = 4096
# Longer chains run the sequential recursion (the parallel scan's log-depth passes cost more
# memory traffic than they save).
PARALLEL_SCAN_MAX_STEPS = 64


@dataclass(frozen=True)
class EStepPath:
    """One way of computing the E-step.

    :param name: the key in :data:`PATHS`.
    :param run: the function that computes it (its own docstring gives its arguments).
    :param reason: why it exists next to the generic contraction.
    :param pinned_by: the test that compares it with the generic contraction.
    """

    name: str
    run: Callable[..., Any]
    reason: str
    pinned_by: str


# --------------------------------------------------------------------------- chains
@dataclass
class ChainPotentials:
    """A chain's tables summed into the potentials of its recursion, batched over plates.

    :param total: the sum of the tables over no variable (a constant of the log-partition).
    :param unary: ``(plates..., T, K)`` log-potentials of each step's value.
    :param first: ``(plates..., K)`` the initial state's table, added at step 0, or ``None``.
    :param pair: ``(plates..., T-1, K, K)`` log-potentials of neighbouring values, or ``None``.
    :param shared: ``(K, K)`` one transition table for every step and chain, or ``None``.
    :param plate_sizes: the plates' sizes (the batch shape).
    """

    total: Any
    unary: torch.Tensor
    first: torch.Tensor | None
    pair: torch.Tensor | None
    shared: torch.Tensor | None
    plate_sizes: tuple[int, ...]

    @property
    def steps(self) -> int:
        return self.unary.shape[-2]

    def initial_and_transitions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``init (plates..., K)`` and the potentials ``(plates..., T-1, K, K)`` of the
        log-space recursion (``None`` for a chain of one step)."""
        n_p, T = len(self.plate_sizes), self.steps
        unary, pair = self.unary, self.pair
        if self.first is not None:
            zero = torch.zeros(1, dtype=torch.long, device=unary.device)
            unary = unary.index_add(n_p, zero, self.first.unsqueeze(n_p))
        if T == 1:
            return unary[..., 0, :], None
        K = unary.shape[-1]
        if self.shared is not None:
            full = self.plate_sizes + (T - 1, K, K)
            pair = self.shared.expand(full) if pair is None else pair + self.shared
        pots = unary[..., 1:, None, :]
        pots = pots + pair if pair is not None else pots.expand(self.plate_sizes + (T - 1, K, K))
        return unary[..., 0, :], pots


def chain_plan(fm: FactorModel) -> dict[str, Any] | None:
    """If the enumerated variables form one chain v_0 - v_1 - ... (a mixture is a chain
    of length 1, an HMM a longer one), the positions each table adds to; else ``None``.

    Every table must touch no variable, one variable, or two neighbours; all variables
    share their plates and cardinality. The E-step is then a forward recursion batched over
    the plates.
    """
    names = list(fm.vars)
    first = fm.vars[names[0]]
    if any((fm.vars[n].plates, fm.vars[n].card) != (first.plates, first.card) for n in names):
        return None
    links: dict[str, set[str]] = {n: set() for n in names}
    for g in fm.groups:
        for roles in g.roles:
            if len(roles) > 2:
                return None
            if len(roles) == 2:
                a, b = roles
                links[a].add(b)
                links[b].add(a)
    if any(len(v) > 2 for v in links.values()):
        return None
    ends = [n for n in names if len(links[n]) < 2]
    if len(names) > 1 and len(ends) != 2:
        return None
    order = [min(ends, key=names.index)] if names else []
    while len(order) < len(names):
        nxt = [n for n in links[order[-1]] if n not in order]
        if len(nxt) != 1:
            return None
        order.append(nxt[0])
    pos = {n: i for i, n in enumerate(order)}
    plan: dict[str, Any] = {"T": len(order), "K": first.card, "plates": first.plates}
    per_group = []
    for g in fm.groups:
        n_roles = len(g.cards)
        if n_roles == 0:
            per_group.append({"kind": "const"})
            continue
        if not set(first.plates) <= set(g.plates):
            return None
        extra = tuple(1 + len(g.cards) + j for j, p in enumerate(g.plates) if p not in first.plates)
        if n_roles == 1:
            where = torch.tensor([pos[r[0]] for r in g.roles])
            in_order = bool(torch.equal(where, torch.arange(len(order))))
            per_group.append({"kind": "unary", "pos": where, "extra": extra, "in_order": in_order})
        else:
            p0 = torch.tensor([pos[r[0]] for r in g.roles])
            p1 = torch.tensor([pos[r[1]] for r in g.roles])
            if not bool(((p0 - p1).abs() == 1).all()):
                return None
            start = torch.minimum(p0, p1)
            flip = p0 > p1
            per_group.append(
                {
                    "kind": "pair",
                    "pos": start,
                    "flip": flip,
                    "extra": extra,
                    # every step once, one orientation: a shared table can stay (K, K)
                    "in_order": bool(torch.equal(start.sort().values, torch.arange(len(order) - 1)))
                    and bool(flip.all() or (~flip).all()),
                    "flipped": bool(flip.all()) if len(flip) else False,
                }
            )
    plan["groups"] = per_group
    return plan


def chain_potentials(fm: FactorModel, tabs: Mapping[int, torch.Tensor]) -> ChainPotentials:
    """Sum a chain's tables (natural shapes, not yet expanded) into its potentials."""
    plan = fm.chain
    T, K = plan["T"], plan["K"]
    psizes = tuple(fm.plate_sizes[p] for p in plan["plates"])
    n_p = len(psizes)
    total = 0.0
    some = next(iter(tabs.values()))
    unary, first = None, None
    pair, shared = None, None
    for i, t in tabs.items():
        info, g = plan["groups"][i], fm.groups[i]
        if info["kind"] == "const":
            total = total + t.expand((g.rows,) + g.shape).sum()
            continue
        if info["extra"]:
            t = t.expand((t.shape[0],) + g.shape)
            t = t.sum(info["extra"])  # plates no chain variable is in: a product
        n_r = t.dim() - 1 - n_p  # role axes
        if info["kind"] == "pair" and info["in_order"] and t.shape[0] == 1 and pair is None:
            # One transition table for every step and sequence (a homogeneous HMM): kept as
            # (K, K) for the scaled recursion.
            if all(n == 1 for n in t.shape[1 + n_r :]):
                shared = t.reshape(K, K)
                shared = shared.T if info["flipped"] else shared
                continue
        t = t.expand((g.rows,) + t.shape[1:])
        # (rows, roles..., plates...) -> (plates..., rows, roles...)
        t = t.permute(tuple(range(1 + n_r, t.dim())) + tuple(range(1 + n_r)))
        t = t.expand(psizes + t.shape[n_p:])
        if info["kind"] == "unary":
            if info["in_order"] and unary is None:
                unary = t
            elif t.shape[n_p] == 1 and not bool(info["pos"].any()):
                # The initial state's table: kept apart, added at t = 0 by the recursion
                # (an index_add would copy every step's table).
                first = t[..., 0, :] if first is None else first + t[..., 0, :]
            else:
                if unary is None:
                    unary = some.new_zeros(psizes + (T, K))
                unary = unary.index_add(n_p, info["pos"], t)
        else:
            flip = info["flip"].reshape((1,) * n_p + (-1, 1, 1))
            t = torch.where(flip, t.transpose(-1, -2), t)
            if pair is None:
                pair = some.new_zeros(psizes + (max(T - 1, 0), K, K))
            pair = pair.index_add(n_p, info["pos"], t)
    if unary is None:
        unary = some.new_zeros(psizes + (T, K))
    return ChainPotentials(total, unary, first, pair, shared, psizes)


def _method(steps: int, method: str) -> str:
    return "sequential" if steps - 1 > PARALLEL_SCAN_MAX_STEPS else method


def scaled_hmm_log_partition(c: ChainPotentials, method: str = "auto") -> torch.Tensor | None:
    """log Z of a homogeneous chain by the scaled forward recursion (probability space,
    Rabiner 1989), or ``None`` when a step's normaliser underflows."""
    logz = SharedChainLogPartition.apply(c.unary, c.shared, c.first)
    return logz.sum() if bool(torch.isfinite(logz).all()) else None


def log_chain_log_partition(c: ChainPotentials, method: str = "auto") -> torch.Tensor:
    """log Z of any chain by the log-space forward recursion, forward-backward gradient."""
    init, pots = c.initial_and_transitions()
    if pots is None:
        return torch.logsumexp(init, -1).sum()
    return ChainLogPartition.apply(init, pots, _method(c.steps, method)).sum()


def chain_hessian_log_partition(c: ChainPotentials, method: str = "auto") -> torch.Tensor:
    """log Z of any chain by :func:`jointkl.chain.chain_contract` under autograd: slower, but
    twice differentiable (its Hessian is the Laplace approximation's precision)."""
    init, pots = c.initial_and_transitions()
    if pots is None:
        return torch.logsumexp(init, -1).sum()
    alpha = chain_contract(init, pots, LogSemiring, method=_method(c.steps, method))
    return torch.logsumexp(alpha, -1).sum()


def chain_path(c: ChainPotentials, twice_differentiable: bool) -> str:
    """The :data:`PATHS` entry that computes a chain's log-partition."""
    if c.shared is not None and c.pair is None and not twice_differentiable and c.steps > 1:
        return "scaled-hmm"
    return "chain-hessian" if twice_differentiable else "log-chain"


# --------------------------------------------------------------------------- the generic path
def contract_log_partition(fm: FactorModel, tabs: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """log Z of any model by Pyro's tensor contraction over plates and variables (tables
    expanded to their full shapes)."""
    tree: OrderedDict = OrderedDict()
    for i, t in tabs.items():
        g = fm.groups[i]
        ordinal = frozenset(fm.plate_symbol[p] for p in g.plates)
        for r in range(t.shape[0]):
            syms = [fm.var_symbol[v] for v in g.roles[r]] + [fm.plate_symbol[p] for p in g.plates]
            term = t[r]
            keep = [j for j in range(term.dim()) if term.shape[j] != 1]
            term = term.reshape([term.shape[j] for j in keep])
            term._pyro_dims = "".join(syms[j] for j in keep)
            tree.setdefault(ordinal, []).append(term)
    sum_dims = set(fm.var_symbol.values())
    out = contract_to_tensor(tree, sum_dims, ring=LogRing())
    return out.sum()


# --------------------------------------------------------------------------- mixtures
def mixture_e_step(
    fm: FactorModel, theta: Mapping[str, torch.Tensor], hard: bool = False
) -> tuple[float, dict[int, torch.Tensor]]:
    """The E-step of a mixture without autograd: the responsibilities are the softmax
    over the K values of the summed unary tables, and log Z = Σ_n (m_n + log Σ_k
    exp(L_nk - m_n)). It runs a block of ``MIXTURE_BLOCK`` points at a time, so the block
    stays in cache across the passes of a stable softmax; a Gaussian table that is linear
    in cached features (:func:`~jointkl.inference.em.gaussian.linear_log_density`) is
    evaluated block by block too, and never written out whole. The responsibilities live in
    one buffer per model (``fm.responsibilities``), which the next E-step overwrites (EM
    needs the weights of one E-step only).

    ``hard``: classification EM — each point's responsibilities are one-hot at its most
    probable value (ties: the first), and the returned objective is the classification
    log-likelihood Σ_n max_k log p(x_n, z_n = k | θ) that hard EM increases."""
    plan = fm.chain
    K = plan["K"]
    psizes = tuple(fm.plate_sizes[p] for p in plan["plates"])
    P = math.prod(psizes)
    with torch.no_grad():
        linear = {}
        for i in range(len(fm.groups)):
            form = linear_log_density(fm, i, theta)
            if form is not None:
                linear[i] = form
        rest = [i for i in range(len(fm.groups)) if i not in linear]
        tabs = fm.tables(theta, rest)
    # The tables' dtype and device (a Gaussian's features, when every table is one).
    some = next(iter(tabs.values())) if tabs else next(iter(linear.values()))[0]
    total = 0.0
    weights: dict[int, torch.Tensor] = {}
    unary = []
    for i, t in tabs.items():
        g = fm.groups[i]
        if plan["groups"][i]["kind"] == "const":
            full = (g.rows,) + g.shape
            total = total + float(t.expand(full).sum())
            # ∂/∂t of Σ expand(t): how many cells each entry of t stands for.
            weights[i] = t.new_ones(full).sum_to_size(t.shape)
            continue
        # (1, K, plates...) -> (points, K): a view (tables computed point-major stay so).
        unary.append(t[0].expand((K,) + psizes).reshape(K, P).T)
    R = fm.responsibilities
    if R is None or R.shape != (P, K) or R.dtype != some.dtype or R.device != some.device:
        R = torch.empty((P, K), dtype=some.dtype, device=some.device)
        fm.responsibilities = R
    logz = torch.zeros((), dtype=some.dtype, device=some.device)
    counts = torch.zeros(K, dtype=some.dtype, device=some.device)
    lowest = torch.finfo(some.dtype).min
    for s in range(0, P, MIXTURE_BLOCK):
        rows = slice(s, s + MIXTURE_BLOCK)
        block = R[rows]
        block.zero_()
        for phi, coef in linear.values():
            block.addmm_(phi[rows], coef.T)
        for u in unary:
            block.add_(u[rows])
        # A point no value can explain (-inf everywhere) gives log Z = -inf, which stops
        # the fit; the clamp only keeps -inf - -inf = nan out of the max shift.
        m = block.amax(-1, keepdim=True).clamp_(min=lowest)
        if hard:
            best = block.argmax(-1, keepdim=True)
            block.zero_().scatter_(-1, best, 1.0)
            logz += m.sum()
        else:
            block.sub_(m).exp_()
            z = block.sum(-1, keepdim=True)
            block.div_(z)
            logz += z.log_().add_(m).sum()
        counts += block.sum(0)
    W = R.T.reshape((1, K) + psizes)  # canonical layout, a view of the point-major R
    for i in linear:
        weights[i] = W
    for i, t in tabs.items():
        if i in weights:
            continue
        if tuple(t.shape) == tuple(W.shape):
            weights[i] = W
        elif all(n == 1 for n in t.shape[2:]):  # one table for every point (the weights)
            weights[i] = counts.reshape((1, K) + (1,) * len(psizes)).sum_to_size(t.shape)
        else:
            weights[i] = W.sum_to_size(t.shape)
    return float(logz) + total, weights


# --------------------------------------------------------------------------- the table
PATHS: dict[str, EStepPath] = {
    p.name: p
    for p in (
        EStepPath(
            "mixture-softmax",
            mixture_e_step,
            "A mixture's posterior is a softmax per point: computed a block of points at a "
            "time without autograd (and a full-covariance Gaussian's table never written out), "
            "several times faster than any recursion on large N.",
            "tests/test_em_estep.py::test_mixture_softmax_path_equals_the_generic_contraction",
        ),
        EStepPath(
            "scaled-hmm",
            scaled_hmm_log_partition,
            "A homogeneous HMM needs one (batch x K) @ (K x K) product per step in probability "
            "space instead of writing out (T-1, K, K) log-potentials; falls back to log-chain "
            "when scaling underflows.",
            "tests/test_em_estep.py::test_chain_paths_equal_the_generic_contraction",
        ),
        EStepPath(
            "log-chain",
            log_chain_log_partition,
            "Any chain in log space: two forward recursions and no taped graph, where Pyro's "
            "contraction of a long pyro.markov chain runs one einsum per step under autograd.",
            "tests/test_em_estep.py::test_chain_paths_equal_the_generic_contraction",
        ),
        EStepPath(
            "chain-hessian",
            chain_hessian_log_partition,
            "The Laplace approximation needs second derivatives, which the hand-written "
            "forward-backward backward passes do not give.",
            "tests/test_em.py::test_laplace_hessian_through_a_chain_is_exact",
        ),
        EStepPath(
            "contract",
            contract_log_partition,
            "The generic path: any model with enumerated discrete latents.",
            "tests/test_em.py::test_e_step_log_partition_equals_pyro_enumeration",
        ),
    )
}


# --------------------------------------------------------------------------- dispatch
def is_mixture(fm: FactorModel) -> bool:
    """One enumerated variable per element of its plates and every table over it alone
    (or over nothing), in those plates only: a mixture, whose posterior is a softmax."""
    plan = fm.chain
    if plan is None or plan["T"] != 1:
        return False
    for info, g in zip(plan["groups"], fm.groups, strict=True):
        if info["kind"] != "const" and (g.rows != 1 or info["extra"]):
            return False
    return True


def log_partition(
    fm: FactorModel, tables: Mapping[int, torch.Tensor], twice_differentiable: bool = False
) -> torch.Tensor:
    """log Σ_z Π tables: the marginal log-likelihood (plus log-priors of MAP globals).

    Its gradient is exact on every path; ``twice_differentiable`` picks a chain recursion
    under autograd (slower) so that Hessians (the Laplace approximation) are exact too.
    A recipe table that is the same for every row (transitions) is computed once; its
    weights then come back summed over rows, which is all the M-step needs.
    """
    if fm.chain is None:
        expanded = {
            i: t.expand((fm.groups[i].rows,) + fm.groups[i].shape) for i, t in tables.items()
        }
        return contract_log_partition(fm, expanded)
    c = chain_potentials(fm, tables)
    logz = PATHS[chain_path(c, twice_differentiable)].run(c, fm.chain_method)
    if logz is None:  # the scaled recursion underflowed (a path below e^-700 of the best)
        logz = log_chain_log_partition(c, fm.chain_method)
    return c.total + logz


def e_step(
    fm: FactorModel, theta: Mapping[str, torch.Tensor], hard: bool = False
) -> tuple[float, dict[int, torch.Tensor]]:
    """Log-partition at θ and every table's posterior marginal weights ∂logZ/∂table, masked
    entries zeroed. A mixture's weights are valid until the next E-step of this model, which
    reuses their memory (copy them to keep them longer). ``hard`` (mixtures only, see
    :func:`mixture_e_step`): one-hot weights and the classification log-likelihood."""
    if is_mixture(fm):
        ll, weights = mixture_e_step(fm, theta, hard)
        return ll, fm.masked(weights)
    if hard:
        raise ValueError("hard assignments are implemented for mixtures only")
    with torch.no_grad():
        tabs = fm.tables(theta)
    leaves = {i: t.detach().requires_grad_() for i, t in tabs.items()}
    with torch.enable_grad():
        logz = log_partition(fm, leaves)
        grads = torch.autograd.grad(logz, list(leaves.values()), allow_unused=True)
    weights = {
        i: (g if g is not None else torch.zeros_like(leaves[i]))
        for i, g in zip(leaves, grads, strict=True)
    }
    return float(logz.detach()), fm.masked(weights)
