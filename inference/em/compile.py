"""A Pyro model with enumerated discrete latents, seen as a product of factor tables.

Traced once under :func:`pyro.poutine.enum`, a model is a product of factors, one per sample
site: the site's log-density as a table over the enumerated variables it depends on (its
*roles*) and the plates it sits in. EM needs nothing else:

* the **E-step** is a sum-product over those tables; its log-partition is the marginal
  log-likelihood log p(x | θ) (plus log p(θ) for MAP globals), and the gradient of the
  log-partition with respect to each table is that factor's exact posterior marginal
  (Eisner 2016: "inside-outside and forward-backward are just backprop");
* the **M-step** maximises Q(θ) = Σ_tables ⟨posterior marginal, table(θ)⟩.

Every table sits in one *canonical layout*, ``(rows, role axes..., plate axes...)``: sites
that compute the same thing for different variables (the 500 emission sites of a
``pyro.markov`` HMM, say) are stacked as rows of one :class:`Group` and computed in one
vectorised call. A group's table is computed in one of three ways, decided once per fit:

``recipe``  the site's distribution is a Categorical, Bernoulli, Poisson, Normal or
            MultivariateNormal whose parameters are free variables indexed by enumerated
            values (``locs[z]``, ``trans[z_prev]``, ``weights``) or constants. The table is
            recomputed from θ without running the model, and the closed-form M-steps in
            :mod:`jointkl.inference.em.mstep` read the recipe.
``fixed``   the distribution does not depend on θ (a prior of a MAP global, a known noise
            model): the table is constant, or the prior's log-density at the global's value.
``traced``  anything else: the table is read from a fresh trace of the model at θ.

Recipes are found by *probing*: the model is traced at the initial θ and at a random value
of θ; a distribution parameter is ``V[index]`` when it equals that expression at both (a
random probe makes an accidental match practically impossible).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import opt_einsum
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_median
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, biject_to, constraints

from jointkl.chain import chain_contract, chain_forward
from jointkl.errors import InputError
from jointkl.semiring import LogSemiring
from jointkl.sites import DATA_PLATE, max_plate_nesting

__all__ = [
    "Free",
    "Var",
    "Slot",
    "Group",
    "FactorModel",
    "FAMILIES",
    "index_part",
    "transform_for",
    "mvn_tril",
    "data_moments",
    "moment_parts",
    "weighted_moments",
]

# --------------------------------------------------------------------------- families
# Slots a recipe family exposes: (name, attribute on the torch distribution, the rank of one
# parameter value (1 for a probability vector), the views the engine can invert).
FAMILIES: dict[str, tuple[tuple[str, str, int, tuple[str, ...]], ...]] = {
    "categorical": (("probs", "probs", 1, ("identity", "softmax")),),
    "bernoulli": (("probs", "probs", 0, ("identity", "sigmoid")),),
    "poisson": (("rate", "rate", 0, ("identity", "exp")),),
    "normal": (
        ("loc", "loc", 0, ("identity",)),
        ("scale", "scale", 0, ("identity", "exp")),
    ),
    "mvn": (
        ("loc", "loc", 1, ("identity",)),
        (
            "scale_tril",
            "_unbroadcasted_scale_tril",
            2,
            ("identity", "diag", "spherical", "covariance", "scaled_corr"),
        ),
    ),
}

# How many trailing dims a view's input has, relative to the slot's (diag: a vector of
# standard deviations for a D x D Cholesky factor). scaled_corr takes (scales, corr_chol).
VIEW_RANK = {
    "identity": (0,),
    "softmax": (0,),
    "sigmoid": (0,),
    "exp": (0,),
    "covariance": (0,),
    "diag": (-1,),
    "spherical": (-2,),
    "scaled_corr": (-1, 0),
}


def transform_for(constraint: Any) -> torch.distributions.transforms.Transform:
    """Unconstrained -> constrained map of a free variable: a bijection where torch has one,
    else the transform Pyro's param store uses (e.g. lower_cholesky ignores the upper part)."""
    try:
        return biject_to(constraint)
    except NotImplementedError:
        return torch.distributions.transform_to(constraint)


def family_of(fn: Distribution) -> str | None:
    if isinstance(fn, torch.distributions.Categorical):
        return "categorical"
    if isinstance(fn, torch.distributions.Bernoulli):
        return "bernoulli"
    if isinstance(fn, torch.distributions.Poisson):
        return "poisson"
    if isinstance(fn, torch.distributions.Normal):
        return "normal"
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return "mvn"
    return None


def unwrap(fn: Distribution) -> tuple[Distribution, int]:
    """The base distribution under ``.to_event`` / ``.expand`` wrappers, and how many of its
    batch dims were reinterpreted as event dims (they are summed in the log-density)."""
    r = 0
    while True:
        if isinstance(fn, torch.distributions.Independent):
            r += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.torch_distribution.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, r


def apply_view(view: str, ts: tuple[torch.Tensor, ...], size: int | None = None) -> torch.Tensor:
    """The distribution parameter a view makes from its input(s) (used when probing)."""
    t = ts[0]
    if view == "identity":
        return t
    if view == "softmax":
        return t.softmax(-1)
    if view == "sigmoid":
        return t.sigmoid()
    if view == "exp":
        return t.exp()
    if view == "diag":
        return torch.diag_embed(t)
    if view == "spherical":
        return torch.diag_embed(t.unsqueeze(-1).expand(*t.shape, size))
    if view == "covariance":
        return torch.linalg.cholesky(t)
    if view == "scaled_corr":
        return ts[0].unsqueeze(-1) * ts[1]
    raise ValueError(view)


def site_log_prob(site: Mapping[str, Any]) -> torch.Tensor:
    """A site's factor as Pyro's TraceEnum_ELBO sees it: an enumerated latent's own
    log-density is taken unscaled and unmasked (Pyro applies masks and scales to the factors
    of observations and other sites only); every other site's is scaled and masked."""
    if site["infer"].get("_enumerate_dim") is not None and not site["is_observed"]:
        return site["unscaled_log_prob"]
    return site["log_prob"]


# --------------------------------------------------------------------------- structures
@dataclass
class Free:
    """A free variable of θ: a ``pyro.param`` (``kind="param"``) or a MAP global sample site
    (``kind="global"``), with the constraint its values live in."""

    name: str
    kind: str
    constraint: Any
    shape: torch.Size


@dataclass
class Var:
    """An enumerated site: ``card`` values, inside ``plates`` (canonical order)."""

    name: str
    card: int
    plates: tuple[str, ...]


@dataclass
class Slot:
    """How one distribution parameter is computed from θ.

    Either ``const`` (a tensor in canonical layout) or a ``view`` of free variables
    ``params``, each indexed by ``index`` — a tuple with ``("role", a)`` (the value of the
    group's a-th role) or ``("const", c)`` per leading dim — and padded with ``pad``
    singleton dims so that its trailing dims line up with the parameter's.
    """

    view: str = "identity"
    params: tuple[str, ...] = ()
    index: tuple[tuple[tuple[str, int], ...], ...] = ()
    pad: tuple[int, ...] = ()
    const: torch.Tensor | None = None

    def key(self) -> tuple:
        if self.const is not None:
            return ("const", tuple(self.const.shape))
        return (self.view, self.params, self.index, self.pad)


@dataclass
class Group:
    """Factor tables computed together; row r is site ``sites[r]``, whose roles are the
    enumerated variables ``roles[r]``. Tables are ``(rows, *cards, *plate_sizes)``."""

    kind: str  # "recipe" | "fixed" | "traced"
    family: str | None
    sites: list[str]
    roles: list[tuple[str, ...]]
    cards: tuple[int, ...]
    plates: tuple[str, ...]
    shape: tuple[int, ...]  # table shape without the rows dim (what pyro's log_prob has)
    value: str  # "data" | "own" | "free"
    own: int | None = None  # role index of the site's own variable (value == "own")
    free: str | None = None  # the free variable that is the value (value == "free")
    slots: dict[str, Slot] = field(default_factory=dict)
    n_event: int = 0  # reinterpreted batch dims, summed in the log-density
    data: torch.Tensor | None = None  # (rows, 1.., plates.., event) observed values
    table: torch.Tensor | None = None  # fixed tables that never change
    fn: Distribution | None = None  # fixed prior evaluated at the free value
    depends: frozenset[str] = frozenset()  # free variables the table depends on
    dims: Any = None  # (dim -> symbol, symbol -> axis) to lay out a fixed prior's log-density
    mask: torch.Tensor | None = None  # (rows, axes..) bool: poutine.mask / Pyro's site mask

    @property
    def rows(self) -> int:
        return len(self.sites)

    @property
    def n_axes(self) -> int:
        return len(self.cards) + len(self.plates)


# --------------------------------------------------------------------------- helpers
def _copy_group(g: Group) -> Group:
    """A shallow copy of a group's fields (not of caches kept on it)."""
    return Group(**{f.name: getattr(g, f.name) for f in dataclasses.fields(Group)})


def _plates_of(site: Mapping[str, Any]) -> list[Any]:
    return [f for f in site["cond_indep_stack"] if f.vectorized]


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """NumPy broadcasting of shapes (torch.broadcast_shapes goes through its symbolic-shape
    machinery: a millisecond a call, and a sympy import on the first)."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, n - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return tuple(out)


def _is_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` broadcasts to ``a``'s shape and equals it (to rounding; equal infinities match).

    Plates expand distribution parameters without copying (stride-0 dims): those dims are
    compared once, after checking that ``b`` does not vary along them either.
    """
    try:
        if broadcast_shape(tuple(a.shape), tuple(b.shape)) != tuple(a.shape):
            return False
    except ValueError:
        return False
    lead = a.dim() - b.dim()
    for d in range(a.dim()):
        if a.stride(d) == 0 and a.shape[d] > 1:
            a = a.narrow(d, 0, 1)
            bd = d - lead
            if bd >= 0 and b.shape[bd] > 1:
                first = b.narrow(bd, 0, 1)
                if b.dtype.is_floating_point:
                    same = all_close(first.expand_as(b), b, rtol=1e-5, atol=1e-8)
                else:
                    same = bool((first == b).all())
                if b.stride(bd) != 0 and not same:
                    return False
                b = first
    b = b.to(a.dtype).expand_as(a)
    if a.dtype.is_floating_point:
        tol = 1e-9 if a.dtype == torch.float64 else 1e-4
        return all_close(a, b, rtol=tol, atol=tol * 1e-2)
    return bool((a == b).all())


def all_close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """``torch.isclose(a, b, rtol, atol).all()`` in three passes instead of isclose's dozen
    (compiling a model compares tables of every point): |a - b| <= atol + rtol |b|, and
    isclose itself only when that fails, where equal infinities (inf - inf = nan) may match."""
    with torch.no_grad():
        diff = (a - b).abs_()
        if bool((diff <= b.abs().mul_(rtol).add_(atol)).all()):
            return True
        if not bool(diff.isnan().any()):
            return False  # finite differences too big: a real mismatch
        return bool(torch.isclose(a, b, rtol=rtol, atol=atol).all())


def canonical(
    t: torch.Tensor,
    n_trail: int,
    dim_to_symbol: Mapping[int, str],
    sym_to_axis: Mapping[str, int],
    n_axes: int,
    where: str,
) -> torch.Tensor:
    """Move a tensor from Pyro's layout (batch dims at global negative positions: plates and
    enumeration dims) to ``(1, *axes, *trailing)``; dims of size 1 become broadcast axes."""
    batch = t.dim() - n_trail
    sizes = list(t.shape)
    kept = [i for i in range(batch) if sizes[i] != 1]
    axes = []
    for i in kept:
        sym = dim_to_symbol.get(i - batch)
        if sym is None or sym not in sym_to_axis:
            raise InputError(
                f"EM: site {where!r} has a batch dimension of size {sizes[i]} at dim "
                f"{i - batch} that is neither a plate nor an enumerated variable it depends on"
            )
        axes.append(sym_to_axis[sym])
    t = t.reshape([sizes[i] for i in kept] + sizes[batch:])
    order = sorted(range(len(kept)), key=lambda j: axes[j])
    t = t.permute(order + list(range(len(kept), t.dim())))
    shape = [1] * n_axes
    for j, i in enumerate(kept):
        shape[axes[j]] = sizes[i]
    return t.reshape([1] + shape + sizes[batch:])


def index_part(
    slot: Slot, which: int, value: torch.Tensor, role_index: list[torch.Tensor], n_axes: int
) -> torch.Tensor:
    """``V[index]`` in canonical layout ``(1, *axes, *trailing)``, padded (the gather half of
    a recipe; the view is applied by the family). ``value`` may carry extra trailing dims."""
    idx = slot.index[which]
    if idx:
        ix = tuple(role_index[a] if kind == "role" else torch.tensor(a) for kind, a in idx)
        t = value[ix]
        lead = t.dim() - (value.dim() - len(idx))
        if lead < 1 + n_axes:  # only constant indices: no batch part yet
            t = t.reshape((1,) * (1 + n_axes - lead) + t.shape)
    else:
        t = value.reshape((1,) * (1 + n_axes) + value.shape)
    pad = slot.pad[which]
    if pad:
        trail = value.dim() - len(idx)
        t = t.reshape(t.shape[: t.dim() - trail] + (1,) * pad + t.shape[t.dim() - trail :])
    return t


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


# Points per block of a mixture's E-step: (block x K) doubles stay in a core's L2 cache.
MIXTURE_BLOCK = 4096


# --------------------------------------------------------------------------- the model
class FactorModel:
    """A Pyro model compiled into factor groups (see the module docstring).

    :param model: the Pyro model.
    :param args, kwargs: the data, passed as ``model(*args, **kwargs)``.
    :param seed: seeds the probes (and nothing else).
    :param dtype: floating dtype of parameter values (initial values are cast to it).
    """

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: Mapping[str, Any],
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ):
        self.model, self.args, self.kwargs = model, args, dict(kwargs)
        self.dtype = dtype
        self._discover(seed)

    # ------------------------------------------------------------------ running the model
    def _substituted(self, theta: Mapping[str, torch.Tensor]) -> Callable:
        params = {k: v for k, v in theta.items() if self.free[k].kind == "param"}
        globs = {k: v for k, v in theta.items() if self.free[k].kind == "global"}
        return poutine.condition(poutine.substitute(self.model, data=params), data=globs)

    def trace(self, theta: Mapping[str, torch.Tensor], enum: bool = True):
        """A trace of the model at θ (enumerated, log-densities computed, dims symbolised)."""
        m = self._substituted(theta)
        if enum:
            m = poutine.enum(m, first_available_dim=-self.nesting - 1)
        # The first, plain run of the model (in _discover) is validated; these repeat it at
        # other parameter values, and Pyro's argument checks would be a third of their time.
        with pyro.validation_enabled(False):
            tr = poutine.trace(m).get_trace(*self.args, **self.kwargs)
            tr = prune_subsample_sites(tr)
            # Log-densities without Pyro's per-site nan/inf warnings (checked by the caller:
            # a non-finite log-likelihood stops the fit).
            tr.compute_log_prob()
        tr.symbolize_dims()
        return tr

    # ------------------------------------------------------------------ discovery
    def _discover(self, seed: int) -> None:
        def init_fn(site):
            if site["infer"].get("enumerate") == "parallel" or site["fn"].support.is_discrete:
                return site["fn"].sample()
            # A global starts at its prior's median, unless that leaves the support (an
            # elementwise median of Dirichlet draws does not sum to one): then at the
            # transform of zero (uniform probabilities, identity correlations, ...).
            v = init_to_median(site)
            if not bool(site["fn"].support.check(v).all()):
                v = init_to_feasible(site)
            return v

        init_globals = pyro.infer.autoguide.initialization.InitMessenger(init_fn)
        # The model's own initial parameter values, from an empty param store (stale values
        # of another fit must not leak in); the caller's store is put back afterwards.
        store = pyro.get_param_store()
        saved = store.get_state()
        store.clear()
        try:
            with torch.no_grad():
                tr = poutine.trace(init_globals(self.model)).get_trace(*self.args, **self.kwargs)
            store_constraints = dict(store.get_state()["constraints"])
        finally:
            store.set_state(saved)
        tr = prune_subsample_sites(tr)
        self.free: dict[str, Free] = {}
        self.init: dict[str, torch.Tensor] = {}
        observed, enumerated = [], []
        for name, s in tr.nodes.items():
            if s["type"] == "param":
                c = store_constraints.get(name, constraints.real)
                v = self._cast(s["value"].detach(), c)
                self.free[name] = Free(name, "param", c, v.shape)
                self.init[name] = v.clone()
            if s["type"] != "sample":
                continue
            if s["is_observed"]:
                observed.append(name)
                continue
            how = s["infer"].get("enumerate")
            in_data = any(f.name == DATA_PLATE for f in s["cond_indep_stack"])
            if how == "parallel":
                if not s["fn"].has_enumerate_support:
                    raise InputError(
                        f"EM: site {name!r} is marked for enumeration but "
                        f"{type(s['fn']).__name__} has no finite support to enumerate"
                    )
                enumerated.append(name)
            elif how is not None:
                raise InputError(
                    f"EM: site {name!r} uses enumerate={how!r}; EM needs "
                    "infer={'enumerate': 'parallel'} (or @config_enumerate)"
                )
            elif s["fn"].support.is_discrete:
                raise InputError(
                    f"EM: site {name!r} is a discrete latent that is not enumerated; mark it "
                    "with infer={'enumerate': 'parallel'} or decorate the model with "
                    "@pyro.infer.config_enumerate"
                )
            elif in_data:
                raise InputError(
                    f"EM: site {name!r} is a continuous latent inside the {DATA_PLATE!r} plate; "
                    "EM handles discrete enumerable latents (and MAP point estimates of "
                    "globals) only — fit this model with the SVI engine"
                )
            else:
                v = self._cast(s["value"].detach(), s["fn"].support)
                self.free[name] = Free(name, "global", s["fn"].support, v.shape)
                self.init[name] = v.clone()
        if not enumerated:
            latent = [n for n in tr.nodes if n in self.free and self.free[n].kind == "global"]
            what = f" (its latents {latent} are continuous)" if latent else ""
            raise InputError(
                "EM: the model has no enumerated discrete latent site"
                f"{what}; EM needs at least one — fit it with the SVI engine instead"
            )
        if not observed:
            raise InputError("EM: the model has no observed sample site: nothing to fit")
        self.nesting = max_plate_nesting(tr)

        # Two enumerated traces: at θ0 and at a random probe of θ (random values make an
        # accidental match of a wrong recipe a measure-zero event; θ0 alone can be special,
        # e.g. uniform transition rows are all equal).
        g = torch.Generator().manual_seed(seed + 7919)
        probe = {}
        for k, f in self.free.items():
            t = transform_for(f.constraint)
            u = t.inv(self.init[k])
            probe[k] = t(torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device))
        # The plain trace above ran with Pyro's validation; these two skip its argument
        # checks (a third of the time of a long pyro.markov loop).
        with torch.no_grad():
            traces = [self.trace(self.init), self.trace(probe)]
        self._thetas = [self.init, probe]
        self._recipes: dict[tuple[str, str], list[Slot]] = {}
        t0 = traces[0]
        sites = [n for n, s in t0.nodes.items() if s["type"] == "sample" and n not in ("_RETURN",)]
        for tr_ in traces[1:]:
            other = [n for n, s in tr_.nodes.items() if s["type"] == "sample"]
            if other != sites or any(
                tr_.nodes[n]["log_prob"].shape != t0.nodes[n]["log_prob"].shape for n in sites
            ):
                raise InputError(
                    "EM: the model's sites or their shapes change with the parameter values; "
                    "EM needs a fixed structure for given data"
                )

        # Plates and enumerated variables.
        self.plate_dims: dict[str, int] = {}
        self.plate_sizes: dict[str, int] = {}
        for n in sites:
            for f in _plates_of(t0.nodes[n]):
                if self.plate_dims.setdefault(f.name, f.dim) != f.dim:
                    raise InputError(f"EM: plate {f.name!r} is used at two different dims")
                self.plate_sizes[f.name] = f.size
        self.plate_order = sorted(self.plate_dims, key=lambda p: self.plate_dims[p])
        self.n_points = self.plate_sizes.get(DATA_PLATE, 1)
        self.vars: dict[str, Var] = {}
        for n in enumerated:
            s = t0.nodes[n]
            plates = tuple(p for p in self.plate_order if p in {f.name for f in _plates_of(s)})
            self.vars[n] = Var(n, s["value"].shape[0], plates)
        self._var_vals = [{v: tr_.nodes[v]["value"] for v in self.vars} for tr_ in traces]
        self._sym_to_var = [
            {tr_.nodes[v]["infer"]["_enumerate_symbol"]: v for v in self.vars} for tr_ in traces
        ]
        self._role_index_cache: dict[tuple, list[torch.Tensor]] = {}

        # Sites with one signature (the iterations of a loop) are classified once, on the
        # first of them, and the others are checked together against that recipe.
        infos = {n: self._site_info(n, traces) for n in sites}
        buckets: dict[tuple, list[str]] = {}
        for n in sites:
            buckets.setdefault(infos[n]["signature"], []).append(n)
        candidates = []
        for names in buckets.values():
            first = self._site_group(names[0], infos[names[0]], traces)
            failed = names[1:]
            if failed and (first.kind == "recipe" or (first.kind == "fixed" and first.fn is None)):
                first, failed = self._extend(first, failed, infos, traces)
            candidates.append(first)
            candidates += [self._site_group(n, infos[n], traces) for n in failed]
        order = {n: i for i, n in enumerate(sites)}
        candidates.sort(key=lambda c: order[c.sites[0]])
        if any(c.kind == "traced" for c in candidates):
            dep_probe = self._probe_dependence(traces[0], sites)
            for c in candidates:
                if c.kind == "traced":
                    c.depends = dep_probe[c.sites[0]]
        self.groups = self._stack(candidates, order)
        self.chain = self._chain_plan()
        self.chain_method = "auto"
        self._symbols()

    def _cast(self, v: torch.Tensor, constraint: Any) -> torch.Tensor:
        """An initial value in the EM dtype, put back on its constraint at that precision (a
        float32 simplex is off by 1e-7 in float64, and Categorical would renormalise it)."""
        if self.dtype is not None and v.dtype.is_floating_point:
            v = v.to(self.dtype)
            t = transform_for(constraint)
            return t(t.inv(v))
        return v

    def _probe_dependence(self, t0, sites) -> dict[str, frozenset[str]]:
        """Which free variables change each site's log-density (one trace per variable)."""
        deps: dict[str, set[str]] = {n: set() for n in sites}
        g = torch.Generator().manual_seed(104729)
        for k, f in self.free.items():
            t = transform_for(f.constraint)
            u = t.inv(self.init[k])
            theta = dict(self.init)
            theta[k] = t(u + torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device))
            with torch.no_grad():
                tr = self.trace(theta)
            for n in sites:
                if not _is_close(site_log_prob(t0.nodes[n]), site_log_prob(tr.nodes[n])):
                    deps[n].add(k)
        return {n: frozenset(v) for n, v in deps.items()}

    def _axes(self, site, roles, plates, sym_to_var) -> dict[str, int]:
        """symbol -> canonical axis, for one site."""
        d2s = site["infer"]["_dim_to_symbol"]
        # The inverse map, once per trace (a 500-step chain asks for it 1,000 times).
        cache = self.__dict__.setdefault("_var_symbols", {})
        if id(sym_to_var) not in cache or cache[id(sym_to_var)][0] is not sym_to_var:
            cache[id(sym_to_var)] = (sym_to_var, {v: s for s, v in sym_to_var.items()})
        var_sym = cache[id(sym_to_var)][1]
        out = {var_sym[r]: i for i, r in enumerate(roles)}
        for j, p in enumerate(plates):
            out[d2s[self.plate_dims[p]]] = len(roles) + j
        return out

    def _site_info(self, name: str, traces) -> dict[str, Any]:
        """A site's roles, plates, canonical log-density in each trace, value and signature."""
        site = traces[0].nodes[name]
        d2s = site["infer"]["_dim_to_symbol"]
        lp = site_log_prob(site)
        if len(self.__dict__.get("_var_order", ())) != len(self.vars):  # once, not per site
            self._var_order = {v: i for i, v in enumerate(self.vars)}
        order = self._var_order
        deps = []
        for i, size in enumerate(lp.shape):
            v = self._sym_to_var[0].get(d2s.get(i - lp.dim()))
            if v is not None and v != name and size > 1:
                deps.append(v)
        deps.sort(key=order.get)
        roles = tuple(deps) + ((name,) if name in self.vars else ())
        plates = tuple(p for p in self.plate_order if p in {f.name for f in _plates_of(site)})
        n_axes = len(roles) + len(plates)
        axes = [
            self._axes(tr.nodes[name], roles, plates, stv)
            for tr, stv in zip(traces, self._sym_to_var, strict=True)
        ]
        lps = [
            canonical(
                site_log_prob(tr.nodes[name]),
                0,
                tr.nodes[name]["infer"]["_dim_to_symbol"],
                ax,
                n_axes,
                name,
            )
            for tr, ax in zip(traces, axes, strict=True)
        ]
        cards = tuple(self.vars[r].card for r in roles)
        shape = tuple(lps[0].shape[1:])
        shape = cards + shape[len(cards) :]  # a role the table is constant along still counts
        if name in self.vars:
            value, own, free = "own", roles.index(name), None
        elif name in self.free:
            value, own, free = "free", None, name
        else:
            value, own, free = "data", None, None
        data = None
        if value == "data":  # observed values in canonical layout
            n_ev = len(site["fn"].event_shape)
            data = canonical(site["value"], n_ev, d2s, axes[0], n_axes, name).detach()
        # A boolean mask tensor (poutine.mask: padding of unequal sequences, say) is kept in
        # canonical layout and applied to the table; a scale is not supported (traced).
        mask = site["mask"]
        if name in self.vars:  # ignored for an enumerated latent's own factor, as by Pyro
            mask = None
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            try:
                mask = canonical(mask.detach(), 0, d2s, axes[0], n_axes, name)
            except InputError:
                mask = False
        plain = (mask is None or isinstance(mask, torch.Tensor)) and (
            name in self.vars
            or site["scale"] is None
            or (not isinstance(site["scale"], torch.Tensor) and site["scale"] == 1.0)
        )
        mask = mask if isinstance(mask, torch.Tensor) else None
        chain, fn = [], site["fn"]
        while True:
            chain.append(type(fn).__name__)
            if isinstance(fn, torch.distributions.Independent):
                chain.append(fn.reinterpreted_batch_ndims)
            inner = getattr(fn, "base_dist", None)
            if inner is None or not isinstance(
                fn, (torch.distributions.Independent, dist.torch_distribution.ExpandedDistribution)
            ):
                break
            fn = inner
        family = family_of(fn)
        slot_shapes = ()
        if family is not None:
            slot_shapes = tuple(
                tuple(getattr(fn, attr).shape) for _, attr, _, _ in FAMILIES[family]
            )
        signature = (
            value,
            own,
            cards,
            plates,
            shape,
            None if data is None else (tuple(data.shape), data.dtype),
            tuple(chain),
            slot_shapes,
            plain,
            None if mask is None else tuple(mask.shape),
        )
        return {
            "roles": roles,
            "plates": plates,
            "cards": cards,
            "shape": shape,
            "axes": axes,
            "lps": lps,
            "value": value,
            "own": own,
            "free": free,
            "data": data,
            "plain": plain,
            "mask": mask,
            "signature": signature,
        }

    def _base(self, name: str, info: Mapping[str, Any]) -> dict[str, Any]:
        return dict(
            data=info["data"],
            mask=info["mask"],
            sites=[name],
            roles=[info["roles"]],
            cards=info["cards"],
            plates=info["plates"],
            shape=info["shape"],
            value=info["value"],
            own=info["own"],
            free=info["free"],
        )

    def _site_group(self, name: str, info: Mapping[str, Any], traces) -> Group:
        """Classify one site: a recipe, a fixed table or prior, or a traced site."""
        per_trace = [tr.nodes[name] for tr in traces]
        site = per_trace[0]
        roles, value = info["roles"], info["value"]
        sym_to_axis = info["axes"][0]
        d2s = site["infer"]["_dim_to_symbol"]
        base = self._base(name, info)
        fns = [s["fn"] for s in per_trace]
        plain = info["plain"]

        # fixed: the distribution is the same at every probe. With the same value in every
        # trace (data, enumerated values) that is the same log-density; a MAP global's value
        # moves with θ, so its prior is scored at one value under each trace's distribution.
        v0 = site["value"]
        if value != "free":
            same = all(_is_close(info["lps"][0], lp) for lp in info["lps"][1:])
        else:
            try:
                same = all(_is_close(fns[0].log_prob(v0), f.log_prob(v0)) for f in fns[1:])
            except Exception:  # noqa: BLE001 (a distribution that cannot score that value)
                same = False
        if same and plain:
            if value == "free":
                return Group(
                    kind="fixed",
                    family=None,
                    fn=fns[0],
                    depends=frozenset([name]),
                    dims=(d2s, sym_to_axis),
                    **base,
                )
            return Group(kind="fixed", family=None, table=info["lps"][0], **base)

        fam_fn, r = unwrap(fns[0])
        family = family_of(fam_fn)
        if (
            family is None
            or not plain
            or value == "free"
            or (value == "own" and family == "poisson")
        ):
            return Group(kind="traced", family=None, **base)
        slots = {}
        for slot_name, attr, rank, views in FAMILIES[family]:
            tensors = [getattr(unwrap(f)[0], attr) for f in fns]
            slot = self._match_slot(
                (family, slot_name, r),
                tensors,
                r + rank,
                views,
                d2s,
                self._sym_to_var[0],
                sym_to_axis,
                roles,
                name,
            )
            if slot is None:
                return Group(kind="traced", family=None, **base)
            slots[slot_name] = slot
        if family == "categorical" and base["data"] is not None:
            base["data"] = base["data"].long()
        depends = frozenset(p for s in slots.values() for p in s.params)
        g = Group(kind="recipe", family=family, slots=slots, n_event=r, depends=depends, **base)
        # The recipe must give the log-densities Pyro computed (a last check, e.g. that the
        # value is scored as the family's own log_prob would).
        if not self._rows_match(g, [info], traces=(0,))[0]:
            return Group(kind="traced", family=None, **base)
        return g

    def _rows_match(
        self, g: Group, infos: list[Mapping[str, Any]], traces: tuple[int, ...] = (0, 1)
    ) -> list[bool]:
        """Per row: does the recipe reproduce the site's log-density in the given traces?"""
        ok = torch.ones(g.rows, dtype=torch.bool)
        for k in traces:
            theta = self._thetas[k]
            with torch.no_grad():
                tab = self._recipe_table(g, theta)
            ref = torch.cat([info["lps"][k] for info in infos])
            tab = tab.expand(ref.shape) if tab.dim() == ref.dim() else tab
            tol = 1e-8 if ref.dtype == torch.float64 else 1e-3
            if all_close(tab.expand(ref.shape), ref, rtol=tol, atol=tol):
                continue  # every row matches (the usual case), in three passes
            close = torch.isclose(tab, ref, rtol=tol, atol=tol)
            ok &= close.reshape(g.rows, -1).all(-1)
        return ok.tolist()

    def _extend(self, first: Group, names: list[str], infos, traces) -> tuple[Group, list[str]]:
        """Add the sites ``names`` (same signature) to ``first`` as rows where its recipe (or
        fixed-ness) holds for them too; returns the group and the sites that did not fit."""
        if first.kind == "fixed":
            fits = [n for n in names if _is_close(infos[n]["lps"][0], infos[n]["lps"][1])]
            rows = [first.sites[0], *fits]
            g = _copy_group(first)
            g.sites, g.roles = rows, [infos[n]["roles"] for n in rows]
            g.table = torch.cat([infos[n]["lps"][0] for n in rows])
            if g.data is not None:
                g.data = torch.cat([infos[n]["data"] for n in rows])
            if g.mask is not None:
                g.mask = torch.cat([infos[n]["mask"] for n in rows])
            return g, [n for n in names if n not in set(fits)]
        consts = {k: s for k, s in first.slots.items() if s.const is not None}
        cand = []
        for n in names:
            site_fns = [tr.nodes[n]["fn"] for tr in traces]
            c = {}
            for k in consts:
                attr = next(a for sn, a, _, _ in FAMILIES[first.family] if sn == k)
                rank = next(r for sn, _, r, _ in FAMILIES[first.family] if sn == k)
                ts = [getattr(unwrap(f)[0], attr) for f in site_fns]
                if not all(_is_close(ts[0], t) for t in ts[1:]):
                    break
                site = traces[0].nodes[n]
                c[k] = canonical(
                    ts[0].detach(),
                    first.n_event + rank,
                    site["infer"]["_dim_to_symbol"],
                    infos[n]["axes"][0],
                    first.n_axes,
                    n,
                )
            else:
                cand.append((n, c))
        rows = [(first.sites[0], {k: s.const for k, s in consts.items()})] + cand
        g = _copy_group(first)
        g.slots = {k: Slot(**s.__dict__) for k, s in first.slots.items()}
        g.sites = [n for n, _ in rows]
        g.roles = [infos[n]["roles"] for n in g.sites]
        if g.data is not None:
            data = torch.cat([infos[n]["data"] for n in g.sites])
            g.data = data.long() if g.family == "categorical" else data
        if g.mask is not None:
            g.mask = torch.cat([infos[n]["mask"] for n in g.sites])
        for k in consts:
            g.slots[k].const = torch.cat([c[k] for _, c in rows])
        ok = self._rows_match(g, [infos[n] for n in g.sites])
        if not all(ok):
            keep = [n for n, good in zip(g.sites, ok, strict=True) if good]
            if first.sites[0] not in keep:
                return first, names
            idx = torch.tensor([i for i, good in enumerate(ok) if good])
            g.sites, g.roles = keep, [infos[n]["roles"] for n in keep]
            if g.data is not None:
                g.data = g.data[idx]
            if g.mask is not None:
                g.mask = g.mask[idx]
            for k in consts:
                g.slots[k].const = g.slots[k].const[idx]
        return g, [n for n in names if n not in set(g.sites)]

    def _match_slot(self, key, tensors, n_trail, views, d2s, sym_to_var, sym_to_axis, roles, name):
        """A :class:`Slot` reproducing ``tensors`` (the parameter at θ0 and at both probes),
        or ``None`` when no recipe does."""
        n_axes = len(sym_to_axis)
        if all(_is_close(tensors[0], t) for t in tensors[1:]):
            const = canonical(tensors[0].detach(), n_trail, d2s, sym_to_axis, n_axes, name)
            return Slot(const=const)
        t0 = tensors[0]
        batch = t0.dim() - n_trail
        slot_vars = []  # the enumerated variables the parameter varies along
        for i in range(batch):
            v = sym_to_var.get(d2s.get(i - batch))
            if v is not None and t0.shape[i] > 1:
                slot_vars.append(v)
        if not set(slot_vars) <= set(roles):
            return None
        size = t0.shape[-1] if t0.dim() else None
        # Sites in a loop (an HMM's time steps) repeat one recipe: try the known ones first.
        for known in self._recipes.get(key, []):
            if any(kind == "role" and a >= len(roles) for ix in known.index for kind, a in ix):
                continue
            idx = [
                tuple(("var", roles[a]) if kind == "role" else (kind, a) for kind, a in ix)
                for ix in known.index
            ]
            choice = tuple(zip(known.params, idx, known.pad, strict=True))
            if all(self._reproduces(choice, known.view, t, k, size) for k, t in enumerate(tensors)):
                return known
        for view in views:
            offsets = VIEW_RANK[view]
            for combo in self._param_combos(view):
                for choice in self._patterns(combo, offsets, n_trail, slot_vars):
                    if all(
                        self._reproduces(choice, view, tens, k, size)
                        for k, tens in enumerate(tensors)
                    ):
                        index = tuple(
                            tuple(
                                ("role", roles.index(a)) if kind == "var" else ("const", a)
                                for kind, a in idx
                            )
                            for _, idx, _ in choice
                        )
                        slot = Slot(
                            view=view,
                            params=tuple(p for p, _, _ in choice),
                            index=index,
                            pad=tuple(pad for _, _, pad in choice),
                        )
                        self._recipes.setdefault(key, []).append(slot)
                        return slot
        return None

    def _reproduces(self, choice, view, target, k, size) -> bool:
        """Does the recipe ``choice`` give ``target`` in trace ``k`` (Pyro's layout)?"""
        theta, var_values = self._thetas[k], self._var_vals[k]
        ins = []
        for pname, idx, pad in choice:
            V = theta[pname]
            t = V[tuple(var_values[a] if kind == "var" else a for kind, a in idx)] if idx else V
            trail = V.dim() - len(idx)
            t = t.reshape(t.shape[: t.dim() - trail] + (1,) * pad + t.shape[t.dim() - trail :])
            ins.append(t)
        try:
            cand = apply_view(view, tuple(ins), size)
        except (RuntimeError, IndexError):
            return False
        return _is_close(target, cand)

    def _param_combos(self, view: str) -> list[tuple[str, ...]]:
        """Free variables (pairs for scaled_corr) that could feed ``view``."""
        names = list(self.free)
        if view == "scaled_corr":
            corr = [n for n in names if self.free[n].constraint is constraints.corr_cholesky]
            return [(a, b) for b in corr for a in names if a != b]
        return [(n,) for n in names]

    def _patterns(self, combo, offsets, n_trail, slot_vars):
        """Index patterns ``((param, ((kind, a), ...), pad), ...)`` to try for ``combo``.

        The leading ``m`` dims of a free variable are indexed (by an enumerated variable the
        parameter varies along, or a constant), the rest are its trailing parameter dims; a
        pattern must use every variable the parameter varies along.
        """
        per_param = []
        for pname, off in zip(combo, offsets, strict=False):
            pre = n_trail + off
            shape = self.free[pname].shape
            opts = []
            for m in range(0, min(len(shape), 3) + 1):
                trail = len(shape) - m
                if trail > pre:
                    continue
                choices = []
                for j in range(m):
                    c = [("var", v) for v in slot_vars if self.vars[v].card == shape[j]]
                    if shape[j] <= 64:
                        c += [("const", i) for i in range(shape[j])]
                    choices.append(c)
                for idx in itertools.product(*choices):
                    if {a for kind, a in idx if kind == "var"} != set(slot_vars):
                        continue
                    opts.append((pname, tuple(idx), pre - trail))
                    if len(opts) > 2048:
                        break
            per_param.append(opts)
        out = list(itertools.product(*per_param))
        if len(combo) == 2:  # scales and correlations must be indexed the same way
            out = [c for c in out if c[0][1] == c[1][1]]
        return out

    def _stack(self, candidates: list[Group], order: Mapping[str, int]) -> list[Group]:
        """Stack single-site recipe groups that compute the same thing into one group."""
        out: list[Group] = []
        parts: dict[int, list[Group]] = {}
        index: dict[tuple, int] = {}
        for c in candidates:
            if c.kind != "recipe":
                out.append(c)
                continue
            key = (
                c.family,
                c.value,
                c.own,
                c.cards,
                c.plates,
                c.shape,
                c.n_event,
                tuple((k, s.key()) for k, s in sorted(c.slots.items())),
                None if c.data is None else (tuple(c.data.shape), c.data.dtype),
                None if c.mask is None else tuple(c.mask.shape),
            )
            if key not in index:
                index[key] = len(out)
                parts[len(out)] = [c]
                out.append(c)
            else:
                parts[index[key]].append(c)
        for i, ps in parts.items():
            if len(ps) == 1:
                continue
            g = out[i]
            sites = [n for p in ps for n in p.sites]
            # Rows in the model's order (loops whose iterations alternate Pyro's markov dims
            # arrive as two buckets): a chain then reads its unary tables in place.
            perm = sorted(range(len(sites)), key=lambda j: order[sites[j]])
            idx = torch.tensor(perm)
            g.sites = [sites[j] for j in perm]
            roles = [r for p in ps for r in p.roles]
            g.roles = [roles[j] for j in perm]
            if g.data is not None:
                g.data = torch.cat([p.data for p in ps])[idx]
            if g.mask is not None:
                g.mask = torch.cat([p.mask for p in ps])[idx]
            for k, s in g.slots.items():
                if s.const is not None:
                    s.const = torch.cat([p.slots[k].const for p in ps])[idx]
        return out

    # ------------------------------------------------------------------ contraction plans
    def _symbols(self) -> None:
        """Einsum symbols for the generic contraction: plates even, variables odd."""
        self.plate_symbol = {
            p: opt_einsum.get_symbol(2 * i) for i, p in enumerate(self.plate_order)
        }
        self.var_symbol = {v: opt_einsum.get_symbol(2 * i + 1) for i, v in enumerate(self.vars)}

    def _chain_plan(self) -> dict[str, Any] | None:
        """If the enumerated variables form one chain v_0 - v_1 - ... (a mixture is a chain
        of length 1, an HMM a longer one), the positions each table adds to; else ``None``.

        Every table must touch no variable, one variable, or two neighbours; all variables
        share their plates and cardinality. The E-step is then the forward recursion of
        :func:`jointkl.chain.chain_contract`, batched over the plates.
        """
        names = list(self.vars)
        first = self.vars[names[0]]
        if any(
            (self.vars[n].plates, self.vars[n].card) != (first.plates, first.card) for n in names
        ):
            return None
        links: dict[str, set[str]] = {n: set() for n in names}
        for g in self.groups:
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
        for g in self.groups:
            n_roles = len(g.cards)
            if n_roles == 0:
                per_group.append({"kind": "const"})
                continue
            if not set(first.plates) <= set(g.plates):
                return None
            extra = tuple(
                1 + len(g.cards) + j for j, p in enumerate(g.plates) if p not in first.plates
            )
            if n_roles == 1:
                where = torch.tensor([pos[r[0]] for r in g.roles])
                in_order = bool(torch.equal(where, torch.arange(len(order))))
                per_group.append(
                    {"kind": "unary", "pos": where, "extra": extra, "in_order": in_order}
                )
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
                        "in_order": bool(
                            torch.equal(start.sort().values, torch.arange(len(order) - 1))
                        )
                        and bool(flip.all() or (~flip).all()),
                        "flipped": bool(flip.all()) if len(flip) else False,
                    }
                )
        plan["groups"] = per_group
        return plan

    # ------------------------------------------------------------------ tables
    def _g(self, g: int | Group) -> Group:
        return self.groups[g] if isinstance(g, int) else g

    def role_index(self, g: int | Group) -> list[torch.Tensor]:
        """arange(card) placed on each role axis of a group (canonical layout)."""
        g = self._g(g)
        key = (g.cards, g.n_axes)
        if key not in self._role_index_cache:
            n = 1 + g.n_axes
            out = []
            for a, k in enumerate(g.cards):
                shape = [1] * n
                shape[1 + a] = k
                out.append(torch.arange(k).reshape(shape))
            self._role_index_cache[key] = out
        return self._role_index_cache[key]

    def slot_inputs(self, g: int | Group, name: str, theta: Mapping[str, torch.Tensor]):
        """``(view, inputs)`` of a slot in canonical layout (inputs are pre-view tensors)."""
        g = self._g(g)
        s = g.slots[name]
        if s.const is not None:
            return "const", (s.const,)
        ri = self.role_index(g)
        return s.view, tuple(
            index_part(s, i, theta[p], ri, g.n_axes) for i, p in enumerate(s.params)
        )

    def value(self, g: int | Group, dtype=None) -> torch.Tensor:
        """The values a group's tables score: observed data, or the enumerated values."""
        g = self._g(g)
        if g.value == "own":
            own = self.role_index(g)[g.own]
            return own if g.family == "categorical" else own.to(dtype)
        return g.data

    def tables(
        self,
        theta: Mapping[str, torch.Tensor],
        which: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Tables of the groups ``which`` (all by default) at θ, differentiable in θ."""
        which = list(range(len(self.groups))) if which is None else which
        out: dict[int, torch.Tensor] = {}
        traced = [i for i in which if self.groups[i].kind == "traced"]
        if traced:
            tr = self.trace(theta)
            sym_to_var = {tr.nodes[v]["infer"]["_enumerate_symbol"]: v for v in self.vars}
        for i in which:
            g = self.groups[i]
            if g.kind == "fixed":
                if g.fn is None:
                    out[i] = g.table
                else:
                    d2s, axes = g.dims
                    lp = g.fn.log_prob(theta[g.free])
                    out[i] = canonical(lp, 0, d2s, axes, g.n_axes, g.sites[0])
            elif g.kind == "traced":
                site = tr.nodes[g.sites[0]]
                axes = self._axes(site, g.roles[0], g.plates, sym_to_var)
                out[i] = canonical(
                    site_log_prob(site),
                    0,
                    site["infer"]["_dim_to_symbol"],
                    axes,
                    g.n_axes,
                    g.sites[0],
                )
            else:
                out[i] = self._recipe_table(i, theta)
        return out

    def _recipe_table(self, g: int | Group, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g = self._g(g)
        dtype = next(iter(theta.values())).dtype if theta else torch.get_default_dtype()
        x = self.value(g, dtype)
        sv = {k: self.slot_inputs(g, k, theta) for k in g.slots}
        lp = FAMILY_LOG_PROB[g.family](sv, x, g)
        if g.n_event:
            lp = lp.sum(tuple(range(-g.n_event, 0)))
        if g.mask is not None:  # Pyro's semantics: a masked-out entry scores 0
            lp = torch.where(g.mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        return lp

    # ------------------------------------------------------------------ E-step
    def log_partition(
        self, tables: Mapping[int, torch.Tensor], twice_differentiable: bool = False
    ) -> torch.Tensor:
        """log Σ_z Π tables: the marginal log-likelihood (plus log-priors of MAP globals).

        Its gradient is exact either way; ``twice_differentiable`` runs a chain's recursion
        under autograd (slower) so that Hessians (the Laplace approximation) are exact too.
        """
        # A recipe table that is the same for every row (transitions) is computed once; its
        # weights then come back summed over rows, which is all the M-step needs.
        if self.chain is not None:
            return self._chain_log_partition(tables, twice_differentiable)
        expanded = {
            i: t.expand((self.groups[i].rows,) + self.groups[i].shape) for i, t in tables.items()
        }
        return self._generic_log_partition(expanded)

    def _chain_log_partition(
        self, tabs: Mapping[int, torch.Tensor], twice_differentiable: bool = False
    ) -> torch.Tensor:
        """The chain's log-partition from its tables (natural shapes, not yet expanded)."""
        plan = self.chain
        T, K = plan["T"], plan["K"]
        psizes = tuple(self.plate_sizes[p] for p in plan["plates"])
        n_p = len(psizes)
        total = 0.0
        some = next(iter(tabs.values()))
        unary, first = None, None
        pair, shared = None, None
        for i, t in tabs.items():
            info, g = plan["groups"][i], self.groups[i]
            if info["kind"] == "const":
                total = total + t.expand((g.rows,) + g.shape).sum()
                continue
            if info["extra"]:
                t = t.expand((t.shape[0],) + g.shape)
                t = t.sum(info["extra"])  # plates no chain variable is in: a product
            n_r = t.dim() - 1 - n_p  # role axes
            if info["kind"] == "pair" and info["in_order"] and t.shape[0] == 1 and pair is None:
                # One transition table for every step and sequence (a homogeneous HMM):
                # kept as (K, K) for the structured recursion below.
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
        if shared is not None and pair is None and not twice_differentiable and T > 1:
            logz = SharedChainLogPartition.apply(unary, shared, first)
            if bool(torch.isfinite(logz).all()):
                return total + logz.sum()
            # Scaling underflowed (a state path below e^-700 of the best): exact log space.
        if first is not None:
            zero = torch.zeros(1, dtype=torch.long, device=unary.device)
            unary = unary.index_add(n_p, zero, first.unsqueeze(n_p))
        if T == 1:
            return total + torch.logsumexp(unary[..., 0, :], -1).sum()
        if shared is not None:
            pair = shared.expand(psizes + (T - 1, K, K)) if pair is None else pair + shared
        init = unary[..., 0, :]
        pots = unary[..., 1:, None, :]
        pots = pots + pair if pair is not None else pots.expand(psizes + (T - 1, K, K))
        method = "sequential" if T - 1 > 64 else self.chain_method
        if twice_differentiable:
            alpha = chain_contract(init, pots, LogSemiring, method=method)
            return total + torch.logsumexp(alpha, -1).sum()
        return total + ChainLogPartition.apply(init, pots, method).sum()

    def _generic_log_partition(self, tabs: Mapping[int, torch.Tensor]) -> torch.Tensor:
        tree: OrderedDict = OrderedDict()
        for i, t in tabs.items():
            g = self.groups[i]
            ordinal = frozenset(self.plate_symbol[p] for p in g.plates)
            for r in range(t.shape[0]):
                syms = [self.var_symbol[v] for v in g.roles[r]] + [
                    self.plate_symbol[p] for p in g.plates
                ]
                term = t[r]
                keep = [j for j in range(term.dim()) if term.shape[j] != 1]
                term = term.reshape([term.shape[j] for j in keep])
                term._pyro_dims = "".join(syms[j] for j in keep)
                tree.setdefault(ordinal, []).append(term)
        sum_dims = set(self.var_symbol.values())
        out = contract_to_tensor(tree, sum_dims, ring=LogRing())
        return out.sum()

    def e_step(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, dict[int, torch.Tensor]]:
        """Log-partition at θ and every table's posterior marginal weights ∂logZ/∂table.

        A mixture's weights are valid until the next E-step of this model, which reuses
        their memory (copy them to keep them longer)."""
        if self._is_mixture():
            ll, weights = self._mixture_e_step(theta)
            return ll, self.masked(weights)
        with torch.no_grad():
            tabs = self.tables(theta)
        leaves = {i: t.detach().requires_grad_() for i, t in tabs.items()}
        with torch.enable_grad():
            logz = self.log_partition(leaves)
            grads = torch.autograd.grad(logz, list(leaves.values()), allow_unused=True)
        weights = {
            i: (g if g is not None else torch.zeros_like(leaves[i]))
            for i, g in zip(leaves, grads, strict=True)
        }
        return float(logz.detach()), self.masked(weights)

    def masked(self, weights: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Weights of masked tables times their masks: a masked-out entry is a constant 0 in
        the table, so the M-step must not count it (the padded steps of a short sequence)."""
        out = dict(weights)
        for i, g in enumerate(self.groups):
            if g.mask is not None and i in out:
                out[i] = out[i] * g.mask
        return out

    def _is_mixture(self) -> bool:
        """One enumerated variable per element of its plates and every table over it alone
        (or over nothing), in those plates only: a mixture, whose posterior is a softmax."""
        plan = self.chain
        if plan is None or plan["T"] != 1:
            return False
        for info, g in zip(plan["groups"], self.groups, strict=True):
            if info["kind"] != "const" and (g.rows != 1 or info["extra"]):
                return False
        return True

    def _mixture_e_step(
        self, theta: Mapping[str, torch.Tensor]
    ) -> tuple[float, dict[int, torch.Tensor]]:
        """The E-step of a mixture without autograd: the responsibilities are the softmax
        over the K values of the summed unary tables, and log Z = Σ_n (m_n + log Σ_k
        exp(L_nk - m_n)). It runs a block of ``MIXTURE_BLOCK`` points at a time, so the block
        stays in cache across the passes of a stable softmax; a Gaussian table that is linear
        in cached features (:func:`linear_log_density`) is evaluated block by block too, and
        never written out whole. The responsibilities live in one buffer per model, which the
        next E-step overwrites (EM needs the weights of one E-step only)."""
        plan = self.chain
        K = plan["K"]
        psizes = tuple(self.plate_sizes[p] for p in plan["plates"])
        P = math.prod(psizes)
        with torch.no_grad():
            linear = {}
            for i in range(len(self.groups)):
                form = linear_log_density(self, i, theta)
                if form is not None:
                    linear[i] = form
            rest = [i for i in range(len(self.groups)) if i not in linear]
            tabs = self.tables(theta, rest)
        # The tables' dtype and device (a Gaussian's features, when every table is one).
        some = next(iter(tabs.values())) if tabs else next(iter(linear.values()))[0]
        total = 0.0
        weights: dict[int, torch.Tensor] = {}
        unary = []
        for i, t in tabs.items():
            g = self.groups[i]
            if plan["groups"][i]["kind"] == "const":
                full = (g.rows,) + g.shape
                total = total + float(t.expand(full).sum())
                # ∂/∂t of Σ expand(t): how many cells each entry of t stands for.
                weights[i] = t.new_ones(full).sum_to_size(t.shape)
                continue
            # (1, K, plates...) -> (points, K): a view (tables computed point-major stay so).
            unary.append(t[0].expand((K,) + psizes).reshape(K, P).T)
        R = self.__dict__.get("_responsibilities")
        if R is None or R.shape != (P, K) or R.dtype != some.dtype or R.device != some.device:
            R = torch.empty((P, K), dtype=some.dtype, device=some.device)
            self._responsibilities = R
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

    def expected_log_joint(
        self,
        theta: Mapping[str, torch.Tensor],
        weights: Mapping[int, torch.Tensor],
        which: list[int],
    ) -> torch.Tensor:
        """Q(θ) restricted to the groups ``which``: Σ ⟨weights, table(θ)⟩ (differentiable)."""
        tabs = self.tables(theta, which)
        total = 0.0
        for i, t in tabs.items():
            w = weights[i]
            # 0 * -inf would be nan: a table entry with no posterior mass contributes nothing.
            total = total + torch.where(w != 0, w * t, torch.zeros_like(t)).sum()
        return total

    def groups_using(self, names: set[str]) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g.depends & names]

    def log_prior(self, theta: Mapping[str, torch.Tensor]) -> float:
        """Σ log p(θ) over the MAP globals' own sites (0 for a model of pyro.params)."""
        which = [i for i, g in enumerate(self.groups) if g.value == "free"]
        tabs = self.tables(theta, which)
        return float(
            sum(
                t.expand((self.groups[i].rows,) + self.groups[i].shape).sum()
                for i, t in tabs.items()
            )
        )

    def label_weights(self, labels: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Table weights when the enumerated variables have independent marginals
        ``labels[v]`` of shape ``(plates of v..., card)``: the product over each table's roles
        (used to start EM from a labelling, as k-means initialisation does)."""
        out = {}
        for gi, g in enumerate(self.groups):
            full = (g.rows,) + g.shape
            w = None
            for a in range(len(g.cards)):
                v = self.vars[g.roles[0][a]]
                lab = torch.stack([labels[r[a]] for r in g.roles]).movedim(-1, 1)
                shape = [g.rows] + [1] * g.n_axes
                shape[1 + a] = v.card
                for p in v.plates:
                    shape[1 + len(g.cards) + g.plates.index(p)] = self.plate_sizes[p]
                lab = lab.reshape(shape)
                w = lab if w is None else w * lab
            if w is None:
                w = torch.ones((1,) * len(full), dtype=next(iter(labels.values())).dtype)
            out[gi] = w.expand(full)
        return self.masked(out)


# --------------------------------------------------------------------------- log-densities
# Each takes the slots as (view, pre-view tensors) in canonical layout, the value, and the
# group; it returns the elementwise log-density (event dims of the base distribution summed,
# reinterpreted batch dims not yet summed).
LOG_2PI = math.log(2 * math.pi)


def _categorical_lp(sv, x, g):
    view, (t,) = sv["probs"]
    logp = torch.log_softmax(t, -1) if view == "softmax" else t.log()
    shape = broadcast_shape(tuple(logp.shape[:-1]), tuple(x.shape))
    logp = logp.expand(shape + logp.shape[-1:])
    return logp.gather(-1, x.expand(shape).unsqueeze(-1)).squeeze(-1)


def _bernoulli_lp(sv, x, g):
    view, (t,) = sv["probs"]
    if view == "sigmoid":
        return x * torch.nn.functional.logsigmoid(t) + (1 - x) * torch.nn.functional.logsigmoid(-t)
    # xlogy: an exact 0 or 1 probability scores the matching value 0, not nan.
    return torch.xlogy(x, t) + torch.xlogy(1 - x, 1 - t)


def _poisson_lp(sv, x, g):
    view, (t,) = sv["rate"]
    if view == "exp":
        return x * t - t.exp() - torch.lgamma(x + 1)
    return torch.xlogy(x, t) - t - torch.lgamma(x + 1)


def _normal_lp(sv, x, g):
    _, (mu,) = sv["loc"]
    view, (s,) = sv["scale"]
    sd, log_sd = (s.exp(), s) if view == "exp" else (s, s.log())
    return -0.5 * ((x - mu) / sd) ** 2 - log_sd - 0.5 * LOG_2PI


def mvn_tril(view: str, ins: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Cholesky factor a full-covariance view describes."""
    if view == "scaled_corr":
        return ins[0].unsqueeze(-1) * ins[1]
    if view == "covariance":
        return torch.linalg.cholesky(ins[0])
    return ins[0]


def _mvn_lp(sv, x, g):
    _, (mu,) = sv["loc"]
    view, ins = sv["scale_tril"]
    D = x.shape[-1]
    if view in ("diag", "spherical"):
        s = ins[0] if view == "diag" else ins[0].unsqueeze(-1)
        z = (x - mu) / s
        return (-0.5 * z**2 - s.log()).sum(-1) - 0.5 * D * LOG_2PI
    L = mvn_tril(view, ins)
    logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    n_r, n_p = len(g.cards), len(g.plates)
    plates = slice(1 + n_r, 1 + n_r + n_p)
    fast = _per_cell(g, mu, L)
    if fast and g.value == "data" and x is g.data:
        form = _quadratic_log_density(g, x, mu, L, n_r)
        if form is not None:
            phi, coef = form
            lp = phi @ coef.T  # (points, cells): the layout a mixture's E-step normalises in
            return lp.T.reshape(L.shape[1 : 1 + n_r] + x.shape[plates]).unsqueeze(0)
    maha = None
    if fast:
        # One (points x D) @ (D x D) product per cell, as scikit-learn does with precision
        # Cholesky factors: no per-point triangular solves.
        eye = torch.eye(D, dtype=L.dtype, device=L.device)
        Lt = torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)
        Lt = Lt.reshape(Lt.shape[: 1 + n_r] + (D, D))
        xs = x.reshape(x.shape[: 1 + n_r] + (-1, D))
        m = mu.reshape(mu.shape[: 1 + n_r] + (-1, D))
        y = xs @ Lt - m @ Lt
        maha = y.square().sum(-1)
        maha = maha.reshape(maha.shape[: 1 + n_r] + x.shape[plates])
    elif maha is None:
        diff = x - mu
        Lb = L.expand(diff.shape + (D,))
        y = torch.linalg.solve_triangular(Lb, diff.unsqueeze(-1), upper=False).squeeze(-1)
        maha = y.square().sum(-1)
    return -0.5 * maha - logdet - 0.5 * D * LOG_2PI


def data_moments(g: Group, x: torch.Tensor):
    """Centre ``c`` and the features Φ = [(x_i - c_i)(x_j - c_j) for i <= j, x - c, 1] of
    every point, ``(points, D(D+1)/2 + D + 1)``, cached on the group (the observed values never
    change during a fit), and the largest squared distance from the centre. A Gaussian
    log-density is linear in Φ, and so are the sufficient statistics of its M-step: one matrix
    product each (the upper triangle only: the products are symmetric)."""
    key = (x.data_ptr(), tuple(x.shape), x.dtype, x.device)
    cached = g.__dict__.get("_moments")
    if cached is None or cached[0] != key:  # a group's data are replaced while stacking
        D = x.shape[-1]
        flat = x.reshape(-1, D)
        c = flat.mean(0)
        xc = flat - c
        i, j = torch.triu_indices(D, D, device=x.device)
        phi = torch.cat([xc[:, i] * xc[:, j], xc, torch.ones_like(xc[:, :1])], -1)
        cached = (key, (c, phi, float(xc.square().sum(-1).max())))
        g.__dict__["_moments"] = cached
    return cached[1]


def moment_parts(S: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split statistics Σ w Φ ``(..., F)`` into the scatter ``(..., D, D)``, the first moment
    ``(..., D)`` (both about the data's centre) and the mass ``(...)``."""
    n_u = D * (D + 1) // 2
    i, j = torch.triu_indices(D, D, device=S.device)
    m2 = S.new_zeros(S.shape[:-1] + (D, D))
    m2[..., i, j] = S[..., :n_u]
    m2[..., j, i] = S[..., :n_u]
    return m2, S[..., n_u : n_u + D], S[..., -1]


def _per_cell(g: Group, mu: torch.Tensor, L: torch.Tensor) -> bool:
    """A mean and a Cholesky factor per cell of the roles, the same for every row and point."""
    n_r, n_p = len(g.cards), len(g.plates)
    plates = slice(1 + n_r, 1 + n_r + n_p)
    return (
        g.n_event == 0
        and L.shape[0] == 1
        and mu.shape[0] == 1
        and all(n == 1 for n in L.shape[plates])
        and all(n == 1 for n in mu.shape[plates])
    )


def linear_log_density(fm: FactorModel, i: int, theta) -> tuple | None:
    """``(Φ, coef)`` with group ``i``'s table = Φ @ coef^T laid out ``(points, cells)``, for a
    full-covariance Gaussian of observed data with parameters per cell (a mixture's
    components); ``None`` for any other group. Lets a mixture's E-step evaluate its table a
    block of points at a time instead of writing the whole table out."""
    g = fm.groups[i]
    if g.kind != "recipe" or g.family != "mvn" or g.value != "data" or g.n_event:
        return None
    if g.mask is not None:
        return None
    sv = {k: fm.slot_inputs(g, k, theta) for k in g.slots}
    view, ins = sv["scale_tril"]
    if view in ("diag", "spherical", "const") or sv["loc"][0] == "const":
        return None
    mu, L = sv["loc"][1][0], mvn_tril(view, ins)
    cells = slice(1, 1 + len(g.cards))
    if not _per_cell(g, mu, L) or L.shape[cells] != g.cards or mu.shape[cells] != g.cards:
        return None
    return _quadratic_log_density(g, g.data, mu, L, len(g.cards))


def _quadratic_log_density(g: Group, x, mu, L, n_r: int):
    """Gaussian log-densities of every point under every cell as one matrix product with the
    cached features Φ (see :func:`data_moments`), returned as ``(Φ, coef)``:

        log N(x | mu, L L^T) = <(x-c)(x-c)^T, -P/2> + (x-c)^T P m - m^T P m / 2
                               - log|L| - D/2 log 2π,      P = (L L^T)^-1, m = mu - c,

    instead of passes over (cells x points x D) differences. Used only while the data's
    spread over the tightest component is below 1e8 (cancellation then costs < 1e-8 of a
    distance of order one); ``None`` otherwise."""
    D = x.shape[-1]
    if x.shape[0] != 1 or not torch.is_floating_point(x) or x.dtype != torch.float64:
        return None
    c, phi, spread = data_moments(g, x)
    eye = torch.eye(D, dtype=L.dtype, device=L.device)
    Lf = L.reshape(-1, D, D)
    Linv = torch.linalg.solve_triangular(Lf, eye, upper=False)  # (C, D, D)
    if spread * float(Linv.detach().square().sum((-1, -2)).max()) > 1e8:
        return None
    P = Linv.transpose(-1, -2) @ Linv
    mc = mu.reshape(-1, D).expand(P.shape[0], D) - c  # (C, D)
    Pm = (P @ mc.unsqueeze(-1)).squeeze(-1)
    logdet = Lf.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    const = -0.5 * (mc * Pm).sum(-1) - logdet - 0.5 * D * LOG_2PI
    i, j = torch.triu_indices(D, D, device=P.device)
    # <outer, -P/2> over the upper triangle: off-diagonal products stand for two entries.
    quad = -0.5 * P[:, i, j] * torch.where(i == j, 1.0, 2.0).to(P.dtype)
    coef = torch.cat([quad, Pm, const.unsqueeze(-1)], -1)  # (C, F)
    return phi, coef


def weighted_moments(g: Group, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
    """Σ_n W[cell, n] Φ_n per cell, ``(cells, F)``: the scatter, first moment and
    mass of every cell about the data's centre in one pass over the weights (the M-step's
    Gaussian updates all read it). Memoised for the weights tensor ``W``; ``None`` unless
    ``W`` is ``(1, *cells, points)`` over one plate of observations ``(1, 1.., points, D)``."""
    if len(g.plates) != 1 or x.dim() != W.dim() + 1 or W.shape[0] != 1 or x.shape[0] != 1:
        return None
    if W.shape[-1] != x.shape[-2] or any(n != 1 for n in x.shape[1:-2]):
        return None
    memo = g.__dict__.get("_weighted")
    if memo is not None and memo[0] is W:
        return memo[1]
    _, phi, _ = data_moments(g, x)
    cells = W.shape[1:-1]
    S = W.reshape(-1, W.shape[-1]) @ phi
    S = S.reshape(cells + (phi.shape[-1],))
    g.__dict__["_weighted"] = (W, S)
    return S


FAMILY_LOG_PROB = {
    "categorical": _categorical_lp,
    "bernoulli": _bernoulli_lp,
    "poisson": _poisson_lp,
    "normal": _normal_lp,
    "mvn": _mvn_lp,
}
