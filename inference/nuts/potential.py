"""The potential energy U(θ) = −log p(x, T(θ)) − log|det ∂T/∂θ| of a Pyro model, for a batch
of chains at once.

θ is one flat unconstrained vector per chain (every continuous latent site mapped by Pyro's
``biject_to`` of its support, T its inverse). Discrete latents with finite support are summed
out exactly: the model is traced under parallel enumeration (``poutine.enum`` to the left of
its ``max_plate_nesting`` plate dimensions) and the factors are contracted by tensor-variable
elimination, as Pyro's HMC does; U is then −log Σ_z p(x, z, T(θ)) − log|det ∂T/∂θ|.

Two ways to evaluate it for C chains:

* **vectorised**: one run of the model inside an extra outer plate of size C (dimension
  −(max_plate_nesting + 1), the way Pyro's ``vectorize_particles`` adds particles), each
  site's value carrying the chains along that dimension; one trace, one backward pass for
  all chains. It is right only when the model broadcasts correctly over an extra batch
  dimension (plate-correct code: ``Vindex`` indexing, no ``x[z]`` on a batched global);
* **per chain**: C runs of the model, one per chain.

:class:`Potential` checks the vectorised form against the per-chain one at C distinct points
before trusting it (``mode="auto"``); a model that fails the check, or raises, gets the loop.
Per-call Pyro tracing is the fixed cost of a potential, so one trace for all chains is most
of the speed.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer import config_enumerate
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
    init_to_uniform,
    init_to_value,
)
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_subsample

from jointkl.device import data_device
from jointkl.errors import InputError
from jointkl.sites import max_plate_nesting, trace_model

__all__ = ["Potential", "INIT_STRATEGIES"]

CHAIN_PLATE = "_nuts_chains"
INIT_STRATEGIES = {
    "uniform": lambda: init_to_uniform(radius=2.0),
    "median": lambda: init_to_median(num_samples=15),
    "sample": lambda: init_to_sample,
}


class Potential:
    """U and ∇U of ``model(*args, **kwargs)`` at a batch of flat unconstrained points.

    :param model: a Pyro model; its continuous latent sites are sampled, its discrete latents
        with finite support are enumerated, any other discrete latent is refused.
    :param args: the model's positional data.
    :param kwargs: the model's keyword data.
    :param int num_chains: C, the batch size of :meth:`value_and_grad`.
    :param str mode: ``"auto"`` (vectorised if it passes the check, else per chain),
        ``"vectorised"`` (required: an ``InputError`` if the check fails) or ``"loop"``.
    """

    def __init__(self, model, args: tuple, kwargs: dict, num_chains: int, mode: str = "auto"):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.num_chains = num_chains
        tr = trace_model(model, args, kwargs)
        self.nesting = max_plate_nesting(tr)
        self.names: list[str] = []
        self.transforms, self.shapes, self.slices, self.site_shapes = {}, {}, {}, {}
        self.enumerated: list[str] = []
        start = 0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                if not fn.has_enumerate_support or site["infer"].get("enumerate") == "sequential":
                    raise InputError(
                        f"NUTS: latent site {name!r} is discrete without a finite support to "
                        "enumerate; NUTS samples continuous latents and sums out finite "
                        "discrete ones (marginalise it in the model, or use SVI)"
                    )
                self.enumerated.append(name)
                continue
            t = biject_to(fn.support)
            u = t.inv(site["value"])
            self.names.append(name)
            self.transforms[name] = t
            self.shapes[name] = u.shape
            self.site_shapes[name] = site["value"].shape
            self.slices[name] = slice(start, start + u.numel())
            start += u.numel()
        if not self.names:
            raise InputError(
                "NUTS: the model has no continuous latent sample site to draw "
                "(its parameters are pyro.param; give it priors)"
            )
        self.dim = start
        self.graph = None
        self.dtype = next(iter(tr.nodes[n]["value"] for n in self.names)).dtype
        # the chains live with the data (a prior written with Python numbers, Normal(0., 10.),
        # draws its values on the CPU even when the engine moved the data to a GPU)
        self.device = data_device(args, kwargs, tr.nodes[self.names[0]]["value"].device)
        if mode == "loop" or num_chains == 1:
            self.vectorised = False
        else:
            self.vectorised = self._vectorisation_holds()
            if mode == "vectorised" and not self.vectorised:
                raise InputError(
                    "NUTS: the model does not broadcast over an extra batch dimension of "
                    "chains (vectorise=True needs plate-correct code); use vectorise=False"
                )

    # ------------------------------------------------------------------ coordinates
    def constrained(self, theta: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Site values for ``theta`` of shape (..., dim) and log|det ∂T/∂θ|, shape (...)."""
        batch = theta.shape[:-1]
        values, log_det = {}, theta.new_zeros(batch)
        for name in self.names:
            u = theta[..., self.slices[name]].reshape(batch + self.shapes[name])
            t = self.transforms[name]
            values[name] = x = t(u)
            log_det = log_det + t.log_abs_det_jacobian(u, x).reshape(*batch, -1).sum(-1)
        return values, log_det

    def unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.transforms[n].inv(values[n]).reshape(-1) for n in self.names])

    # ------------------------------------------------------------------ U
    def _log_joint(self, values: dict[str, torch.Tensor], chains: int | None) -> torch.Tensor:
        """log p(x, values) with enumerated sites summed out: shape (chains,) inside the
        chain plate, () without it (``chains=None``)."""
        model = poutine.condition(self.model, data=values)
        nesting = self.nesting
        if chains is not None:
            inner, dim = model, -nesting - 1

            def model(*a, **k):
                with pyro.plate(CHAIN_PLATE, chains, dim=dim):
                    return inner(*a, **k)

            nesting += 1
        if self.enumerated:
            # Every finite discrete latent is summed out, marked for enumeration or not.
            model = config_enumerate(model, default="parallel")
            model = poutine.enum(model, first_available_dim=-nesting - 1)
        tr = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        if not self.enumerated:
            right = nesting - 1  # batch dimensions right of the chain plate's
            total = torch.zeros((), dtype=self.dtype, device=self.device)
            for site in tr.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                lp = site["fn"].log_prob(site["value"])
                lp = torch.as_tensor(scale_and_mask(lp, site["scale"], site["mask"]))
                if chains is None or lp.dim() <= right:
                    total = total + lp.sum()  # no chain dimension: the same for every chain
                else:
                    lead = lp.shape[: lp.dim() - right]
                    total = total + lp.reshape(*lead, -1).sum(-1).reshape(-1)
            return total if chains is None else total.expand(chains)
        return _contracted(tr, chains)

    def potentials(self, theta: torch.Tensor) -> torch.Tensor:
        """U at each row of ``theta`` (C, dim), shape (C,)."""
        values, log_det = self.constrained(theta)
        if self.vectorised:
            C = theta.shape[0]
            pad = {n: self._chain_shape(n, C) for n in self.names}
            batched = {n: v.reshape(pad[n]) for n, v in values.items()}
            return -(self._log_joint(batched, C) + log_det)
        rows = [
            self._log_joint({n: v[c] for n, v in values.items()}, None)
            for c in range(theta.shape[0])
        ]
        return -(torch.stack(rows) + log_det)

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U (C,) and ∇U (C, dim) at the rows of ``theta`` (chains are independent, so the
        gradient of ΣU gives every chain's own gradient in one backward pass); by the
        compiled graph when :meth:`compile` made one for this batch size."""
        try:
            if self.graph is not None and theta.shape[0] == self.num_chains:
                return self.graph(theta)
            return self.eager_value_and_grad(theta)
        except RuntimeError:
            # The model cannot be evaluated at some chain's point (e.g. a precision matrix
            # that is singular in floating point far out in the tails): that chain's
            # potential is +inf, which the sampler treats as a divergence, as Stan does.
            return self.guarded_value_and_grad(theta)

    def guarded_value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`eager_value_and_grad` chain by chain, with U = +inf and ∇U = 0 where the
        model raises."""
        us, gs = [], []
        for c in range(theta.shape[0]):
            try:
                u, g = self.one_chain_value_and_grad(theta[c])
            except (RuntimeError, ValueError):
                u, g = theta.new_full((1,), math.inf), torch.zeros_like(theta[c : c + 1])
            us.append(u)
            gs.append(g)
        return torch.cat(us), torch.cat(gs)

    def one_chain_value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U (1,) and ∇U (1, dim) at one point ``theta`` (dim,), by one model run of its own."""
        with torch.enable_grad():
            t = theta.detach()[None].requires_grad_()
            values, log_det = self.constrained(t)
            u = -(self._log_joint({n: v[0] for n, v in values.items()}, None) + log_det)
            (g,) = torch.autograd.grad(u.sum(), t)
        return u.detach().reshape(1), g

    def eager_value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            theta = theta.detach().requires_grad_()
            u = self.potentials(theta)
            (g,) = torch.autograd.grad(u.sum(), theta)
        return u.detach(), g

    def compile(self, checks: int = 3) -> bool:
        """Record U and ∇U for C chains once as a graph of tensor operations (``make_fx``:
        the model, Pyro's handlers, the distributions and the backward pass traced into one
        FX graph, then frozen by TorchScript), so that a call runs only the tensor
        operations, with no Python of Pyro.

        A trace fixes the model's Python control flow at the traced point, so the graph is
        kept only if it agrees with the eager potential and gradient at ``checks`` further
        sets of C random points (relative 1e-5); otherwise, or if tracing fails (data-
        dependent shapes), the eager path is used. Returns whether the graph is in use."""
        from torch.fx.experimental.proxy_tensor import make_fx

        gen = torch.Generator(device="cpu").manual_seed(54321)

        def points() -> torch.Tensor:
            theta = torch.rand(self.num_chains, self.dim, generator=gen, dtype=self.dtype)
            return (theta * 4 - 2).to(self.device)

        self.graph = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = make_fx(lambda theta: self.eager_value_and_grad(theta))(points())
            graph.graph.eliminate_dead_code()
            graph.recompile()
            graph = _frozen(graph, points())
            for _ in range(checks):
                theta = points()
                u, g = graph(theta)
                u0, g0 = self.eager_value_and_grad(theta)
                if not (_close(u, u0) and _close(g, g0)):
                    return False
        except Exception:  # any failure to trace means: stay eager
            return False
        self.graph = graph
        return True

    def _chain_shape(self, name: str, chains: int) -> tuple[int, ...]:
        """A site's value shape inside the chain plate: the chains at dimension
        −(nesting + 1), size-1 dimensions padding the site's own batch dimensions."""
        shape = self.site_shapes[name]
        fn_event = self._event_dims[name]
        batch = shape[: len(shape) - fn_event]
        pad = self.nesting - len(batch)
        if pad < 0:
            raise _NotVectorisable
        return (chains,) + (1,) * pad + tuple(shape)

    def _vectorisation_holds(self) -> bool:
        """Does one vectorised run give every chain's own U, at C distinct random points?"""
        tr = trace_model(self.model, self.args, self.kwargs)
        self._event_dims = {n: tr.nodes[n]["fn"].event_dim for n in self.names}
        gen = torch.Generator(device="cpu").manual_seed(12345)
        theta = torch.rand(self.num_chains, self.dim, generator=gen, dtype=self.dtype)
        theta = (theta * 2 - 1).to(self.device)
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                self.vectorised = True
                fast = self.potentials(theta)
                self.vectorised = False
                slow = self.potentials(theta)
        except Exception:  # any failure of the broadcast run means: use the loop
            self.vectorised = False
            return False
        self.vectorised = False
        if fast.shape != slow.shape:
            return False
        both = torch.isfinite(slow)
        if not torch.equal(both, torch.isfinite(fast)):
            return False
        scale = slow[both].abs().clamp_min(1.0)
        return bool(((fast[both] - slow[both]).abs() <= 1e-5 * scale + 1e-6).all())

    # ------------------------------------------------------------------ starts
    def initial(
        self,
        num_chains: int,
        strategy: str,
        max_tries: int = 100,
        chain_values: Callable[[int], dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """One start per chain from Pyro's init strategy ``strategy`` (uniform in (−2, 2)
        unconstrained, the prior median, or a prior draw), redrawn until U and ∇U are
        finite (at most ``max_tries`` times). With ``chain_values``, chain c first tries
        the values ``chain_values(c)`` gives by site (the model's own seeding; sites it does
        not name from ``strategy``), and ``strategy`` alone when U or ∇U is not finite
        there."""
        rows = []
        for c in range(num_chains):
            for attempt in range(max_tries):
                init = INIT_STRATEGIES[strategy]()
                if chain_values is not None and attempt == 0:
                    init = init_to_value(values=dict(chain_values(c)), fallback=init)
                try:
                    with torch.no_grad(), InitMessenger(init):
                        # The init strategies refuse discrete sites: hide the enumerated ones.
                        visible = poutine.block(self.model, hide=self.enumerated)
                        tr = poutine.trace(visible).get_trace(*self.args, **self.kwargs)
                    theta = self.unconstrained({n: tr.nodes[n]["value"] for n in self.names})
                    vectorised, self.vectorised = self.vectorised, False
                    try:
                        u, g = self.eager_value_and_grad(theta.unsqueeze(0))
                    finally:
                        self.vectorised = vectorised
                except Exception:
                    if attempt > 0 or chain_values is None:
                        raise
                    continue  # the model's own seeding does not fit these sites: the strategy
                if torch.isfinite(u).all() and torch.isfinite(g).all():
                    break
            else:
                raise InputError(
                    f"NUTS: no start with a finite potential in {max_tries} tries of "
                    f"init={strategy!r} (chain {c}); check the model and its data"
                )
            rows.append(theta)
        return torch.stack(rows)


def _frozen(graph, example: torch.Tensor | None, examples: tuple | None = None):
    """The FX graph as a frozen TorchScript module (its operations run by TorchScript's
    interpreter, without a Python call per operation: about 3x faster on small models), or
    the FX graph itself if TorchScript cannot take it.

    Either way the linear-algebra checks of the traced computation are kept: a TorchScript
    trace drops ``aten._linalg_check_errors`` (it returns nothing), so a Cholesky factor of
    a matrix that is not positive-definite would give a finite but wrong U where the eager
    model raises. :func:`_error_flagged` turns those checks into one extra boolean output,
    and :class:`_Checked` raises as the eager model does when it is set."""
    flagged = _error_flagged(graph)
    scripted = _traced(graph, examples if examples is not None else (example,))
    try:
        module = graph if scripted is None else torch.jit.freeze(scripted.eval())
    except Exception:  # TorchScript is optional: the FX graph is exact too
        module = graph
    return module if flagged is None else _Checked(module, flagged == "several")


def _traced(graph, args: tuple):
    """The FX graph traced by TorchScript at the example ``args`` (not frozen, so that it
    can be a submodule of a scripted module), or ``None`` if TorchScript cannot take it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(graph, args, check_trace=False)
    except Exception:  # TorchScript is optional: the FX graph is exact too
        return None


_CHECKS = (torch.ops.aten._linalg_check_errors.default,)


def _error_flagged(graph) -> str | None:
    """Rewrite ``graph`` (in place) so that its error checks become data: each
    ``_linalg_check_errors(info, …)`` is replaced by ``info ≠ 0`` reduced to one boolean,
    the checks or-ed together and appended to the graph's outputs. Returns ``None`` when
    the graph had no check (and so no extra output), else ``"one"`` or ``"several"``: the
    form of its own outputs (one tensor, or a tuple)."""
    g = graph.graph
    checks = [n for n in g.nodes if n.op == "call_function" and n.target in _CHECKS]
    if not checks:
        return None
    flag = None
    for node in checks:
        with g.inserting_before(node):
            bad = g.call_function(torch.ops.aten.ne.Scalar, (node.args[0], 0))
            bad = g.call_function(torch.ops.aten.any.default, (bad,))
            flag = (
                bad
                if flag is None
                else g.call_function(torch.ops.aten.logical_or.default, (flag, bad))
            )
        g.erase_node(node)
    out = next(n for n in g.nodes if n.op == "output")
    results = out.args[0]
    several = isinstance(results, (tuple, list))
    with g.inserting_before(out):
        out.args = ((*(results if several else (results,)), flag),)
    graph.recompile()
    return "several" if several else "one"


class _Checked:
    """A compiled graph whose last output says whether a linear-algebra check failed
    (:func:`_error_flagged`): returns the other outputs, or raises ``RuntimeError`` as the
    eager computation would, so that the callers' guards (U = +inf for the chain that
    cannot be evaluated, a divergence) take over.

    :param module: the graph, returning its outputs and then the flag.
    :param bool several: the graph's own outputs were a tuple (else one tensor).
    """

    def __init__(self, module, several: bool):
        self.module = module
        self.several = several

    def __call__(self, *args):
        *outputs, failed = self.module(*args)
        if bool(failed):
            raise RuntimeError("NUTS: a linear-algebra check failed in the compiled graph")
        return tuple(outputs) if self.several else outputs[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relative 1e-5 where finite, and finite at the same places."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if a.shape != b.shape or not torch.equal(fa, fb):
        return False
    scale = b[fb].abs().clamp_min(1.0)
    return bool(((a[fa] - b[fb]).abs() <= 1e-5 * scale).all())


class _NotVectorisable(Exception):
    pass


def _contracted(tr, chains: int | None) -> torch.Tensor:
    """log Σ_z Π_sites p of an enumerated trace (tensor-variable elimination over the
    enumerated dimensions, product over plates), keeping the chain plate when present."""
    tr.compute_log_prob()
    tr.pack_tensors()
    sym = tr.plate_to_symbol.get(CHAIN_PLATE) if chains is not None else None
    tree: OrderedDict = OrderedDict()
    sum_dims: set = set()
    for site in tr.nodes.values():
        if site["type"] != "sample":
            continue
        ordinal = frozenset(
            tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        lp = site["packed"]["log_prob"]
        tree.setdefault(ordinal, []).append(lp)
        if site["infer"].get("_enumerate_dim") is not None:
            sum_dims.update(lp._pyro_dims)
    sum_dims -= set(tr.plate_to_symbol.values())
    target = frozenset({sym}) if sym is not None else frozenset()
    t = contract_to_tensor(tree, sum_dims, target_ordinal=target)
    if sym is None:
        return t.sum()
    t = packed.unpack(t, tr.symbol_to_dim)
    return t.reshape(-1).expand(chains) if t.numel() == 1 else t.reshape(chains)


def describe(potential: Potential) -> dict[str, Any]:
    """What the potential is made of, for ``Fit.info``."""
    return {
        "vectorised": potential.vectorised,
        "compiled": potential.graph is not None,
        "enumerated": list(potential.enumerated),
        "dim": potential.dim,
    }
