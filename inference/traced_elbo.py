"""The pathwise ELBO's forward pass as a frozen ``torch.jit`` graph, one per batch signature.

After the first steps of a fit have run eagerly (the first through Pyro's checked ELBO, the
next ones through :class:`~jointkl.inference.reparam_elbo.ReparamELBO`), the −ELBO of one step
is a fixed sequence of tensor operations on (the unconstrained parameters, this batch's
tensors): model and guide make the same sites, in the same order, with the same shapes,
every step. :class:`TracedELBO` records that sequence once with :func:`torch.jit.trace` and
replays it on later steps with the same batch signature (tensor shapes, dtypes and devices,
the non-tensor arguments, the mini-batch factor N/B), skipping the Python that built it:
Pyro's messages, distribution objects, the ELBO's per-site bookkeeping. The random draws are
nodes of the graph: each replay draws fresh ε from torch's generator, as the eager step
would, and in the same order (checked below), so a replay gives the eager step's numbers.

A trace freezes Python control flow, so a graph is used only where it is shown to stand for
the model:

* two consecutive eager pathwise steps must make the same sites (name, distribution type,
  value shape, observed or not, scale, mask or none), and the step that builds a graph
  must make them again (shapes excepted for a new batch shape, e.g. an epoch's short last
  batch);
* tracing must raise no ``TracerWarning`` (a Python branch on a tensor's value, a tensor
  turned into a number) and no error;
* on the step that builds it, the graph is run from the random state the eager step started
  from, and must give the eager loss and gradients (to rounding) and leave the generator
  in the state the eager step left it (the same draws, consumed in the same order).

Anything else, and every step of a signature that failed, runs eagerly; :attr:`TracedELBO.note`
says which path ran and why. The step that builds a graph is the eager step itself (its
loss and gradients are the ones applied), so a fit's numbers do not depend on when graphs
were built. A graph replays with Pyro's argument validation off (the build step validated
the distributions; a non-finite parameter still reaches the loss or a gradient, which the
engine checks every step).
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Hashable
from typing import Any

import pyro
import torch

__all__ = ["TracedELBO", "site_signature"]

# Graphs kept per fit: one per batch signature (a mini-batched fit has two, the full batch and
# the epoch's short last one); a model fed ever-new shapes runs eagerly past this.
MAX_GRAPHS = 4
# Every this many graph steps (and on the first) the eager forward pass is run from the same
# random state and compared with the graph's loss: about 1 % of a step's time.
AUDIT_EVERY = 100


def site_signature(model_sites: dict, guide_sites: dict) -> tuple:
    """The structure of one pathwise step: per model site and per guide site (in order)
    its name, distribution type, value shape, observed or not, scale (a number, or
    ``"tensor"``) and whether it has a mask. Two steps with equal signatures ran the same
    sites; a graph traced on one stands for the other only then."""

    def one(name: str, site: dict) -> tuple:
        scale = site["scale"]
        return (
            name,
            type(site["fn"]),
            tuple(site["value"].shape),
            bool(site["is_observed"]),
            "tensor" if torch.is_tensor(scale) else float(scale),
            site["mask"] is not None,
            tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
        )

    return (
        tuple(one(n, s) for n, s in model_sites.items()),
        tuple(one(n, s) for n, s in guide_sites.items()),
    )


def _shapeless(signature: tuple) -> tuple:
    """A signature without value shapes and plate sizes (the parts a batch size changes)."""
    return tuple(
        tuple((n, t, obs, scale, mask) for n, t, _, obs, scale, mask, _ in part)
        for part in signature
    )


def _same_sites(traced: tuple, eager: tuple) -> bool:
    """Do a traced step's sites (shapeless signature) match an eager step's? Under tracing
    Pyro makes a plate's scale a tensor (so the graph can take a traced size): a ``"tensor"``
    scale matches any number there, its value being checked with the loss."""
    if len(traced) != len(eager):
        return False
    for part_t, part_e in zip(traced, eager, strict=True):
        if len(part_t) != len(part_e):
            return False
        for (n, t, obs, scale, mask), (n2, t2, obs2, scale2, mask2) in zip(
            part_t, part_e, strict=True
        ):
            if (n, t, obs, mask) != (n2, t2, obs2, mask2) or (
                scale != scale2 and scale != "tensor"
            ):
                return False
    return True


def _batch_key(args: tuple, kwargs: dict) -> tuple | None:
    """(the tensors' descriptors and the other arguments, the tensors in order), or None when
    an argument is neither a tensor nor a hashable plain value (a row array, a list):
    such calls run eagerly."""
    tensors: list[torch.Tensor] = []
    parts: list[Any] = []
    for where, value in [*enumerate(args), *sorted(kwargs.items())]:
        if torch.is_tensor(value):
            tensors.append(value)
            parts.append((where, "T", tuple(value.shape), value.dtype, value.device))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((where, "V", value))
        else:
            return None
    return tuple(parts), tensors


def _rebuild(args: tuple, kwargs: dict, tensors: tuple) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their tensors replaced, in order, by ``tensors``."""
    it = iter(tensors)
    new_args = tuple(next(it) if torch.is_tensor(a) else a for a in args)
    new_kwargs = {k: next(it) if torch.is_tensor(kwargs[k]) else kwargs[k] for k in sorted(kwargs)}
    return new_args, new_kwargs


class _Graph:
    """One traced −ELBO: the graph, the model and guide it was traced for, and the names of
    its parameter inputs (unconstrained tensors of Pyro's param store, in input order)."""

    def __init__(self, fn, model, guide, names: list[str]):
        self.fn, self.model, self.guide, self.names = fn, model, guide, names


class TracedELBO:
    """The compiled steps of one :class:`~jointkl.inference.reparam_elbo.ReparamELBO`.

    The ELBO calls :meth:`observe` with the signature of every eager pathwise step, and
    :meth:`step` before each one: it returns the step's loss (gradients accumulated into the
    parameters' ``.grad``) when a graph ran or was built, or None for an eager step.

    :attr:`note` is a one-line account of the path (``"compiled"``, ``"eager: <why>"``),
    :attr:`graph_steps` the number of steps a graph ran, :attr:`graphs_built` how many
    graphs were built and verified.
    """

    def __init__(self, elbo):
        self.elbo = elbo
        self.graphs: dict[Hashable, _Graph | None] = {}
        self.previous: tuple | None = None  # the last eager step's site signature
        self.confirmed: tuple | None = None  # a signature two consecutive steps agreed on
        self.note = "eager: no pathwise step yet"
        self.graph_steps = 0
        self.graphs_built = 0
        self.disabled = False

    # ------------------------------------------------------------------ bookkeeping
    def observe(self, signature: tuple) -> None:
        """An eager pathwise step ran with this site signature."""
        if self.previous is not None and signature == self.previous:
            self.confirmed = signature
        elif self.confirmed is None:
            self.note = "eager: waiting for two steps with the same sites"
        self.previous = signature

    def disable(self, why: str) -> None:
        """Eager for the rest of the fit."""
        self.disabled = True
        self.graphs.clear()
        self.note = f"eager: {why}"

    def info(self) -> dict[str, Any]:
        """What ran, for the fit's ``info``."""
        return {
            "path": self.note,
            "graph_steps": self.graph_steps,
            "graphs_built": self.graphs_built,
        }

    # ------------------------------------------------------------------ a step
    def step(self, model, guide, args: tuple, kwargs: dict) -> float | None:
        """The loss of this step through a graph (run, or built on this very step), or None
        when the step must run eagerly."""
        from pyro.poutine.runtime import _PYRO_STACK

        if self.disabled or self.confirmed is None or _PYRO_STACK:
            return None  # a user's poutine context would not see a graph's messages
        found = _batch_key(args, kwargs)
        if found is None:
            return None
        parts, tensors = found
        key = (id(model), id(guide), self.elbo.data_scale, parts)
        graph = self.graphs.get(key, False)
        if graph is None:
            return None  # this signature failed its check: eager
        if graph is not False and graph.model is model and graph.guide is guide:
            return self._run(graph, tensors, model, guide, args, kwargs)
        if len(self.graphs) >= MAX_GRAPHS:
            return None
        return self._build(key, model, guide, args, kwargs, tensors)

    def _run(self, graph: _Graph, tensors, model, guide, args, kwargs) -> float | None:
        from .reparam_elbo import _rng_state, _set_rng_state

        raw = pyro.get_param_store()._params
        params = [raw[n] for n in graph.names]
        start = _rng_state()
        audit = None
        if self.graph_steps % AUDIT_EVERY == 0:
            # Now and then the eager forward pass from the same state, to compare: a Python
            # value the graph froze (an annealing factor read from a global) that has
            # changed since shows up here, and the rest of the fit runs eagerly.
            with torch.no_grad():
                audit = self.elbo._pathwise(model, guide, args, kwargs)
            same = audit is not None and _same_sites(
                self.elbo.last_signature_shapeless(), _shapeless(self.confirmed)
            )
            _set_rng_state(start)
            if not same:
                self.disable(f"the model's sites changed after graph step {self.graph_steps}")
                return None
        try:
            with _plain_interpreter():
                loss = graph.fn(*params, *tensors)
            value = float(loss.detach())
        except Exception:  # noqa: BLE001 - redone eagerly below, which raises its own error
            value = math.nan
        if not math.isfinite(value):
            # Redo the step eagerly from the same state: the model's own checks and the
            # engine's diagnosis (Pyro's validation, the non-finite-loss message) see it.
            _set_rng_state(start)
            return None
        if audit is not None and not _close(loss.detach(), audit):
            self.disable(f"the model's step changed after graph step {self.graph_steps}")
            _set_rng_state(start)
            return None
        loss.backward()
        self.elbo.last_params = params
        self.graph_steps += 1
        return value

    def _build(self, key, model, guide, args, kwargs, tensors) -> float | None:
        """The eager step (its loss and gradients are this step's), then the graph traced
        and checked against it from the same random state."""
        from .reparam_elbo import _rng_state, _set_rng_state

        elbo = self.elbo
        start = _rng_state()
        value = elbo._negative_elbo(model, guide, args, kwargs)
        if value is None:
            return None  # the general class takes this step (and the rest: reparameterised off)
        named = dict(elbo.last_named)
        sig = elbo.last_signature
        params = list(named.values())
        if not value.requires_grad:
            self.graphs[key] = None
            self.note = "eager: the loss has no parameter gradient"
            return float(value.detach())
        grads = torch.autograd.grad(value, params, allow_unused=True)
        after = _rng_state()
        loss = float(value.detach())
        why = None
        if sig != self.confirmed and _shapeless(sig) != _shapeless(self.confirmed):
            why = "the model's sites changed between steps"
        else:
            _set_rng_state(start)
            fn, why = self._trace(model, guide, args, kwargs, named, tensors)
            if fn is not None:
                _set_rng_state(start)  # tracing ran the step once: from the start again
                why = self._verify(fn, params, tensors, value, grads, after)
        _set_rng_state(after)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        elbo.last_params = params
        if why is None:
            self.graphs[key] = _Graph(fn, model, guide, list(named))
            self.graphs_built += 1
            self.note = "compiled"
        else:
            self.graphs[key] = None
            self.note = f"eager: {why}"
        return loss

    def _trace(self, model, guide, args, kwargs, named, tensors):
        """(the traced graph, None) or (None, why it could not be traced)."""
        elbo = self.elbo
        n = len(named)

        def negative_elbo(*inputs):
            # The params are the param store's own tensors (inputs by identity: the model
            # reads them through pyro.param or its modules); the batch is rebuilt around the
            # traced tensors.
            b_args, b_kwargs = _rebuild(args, kwargs, inputs[n:])
            value = elbo._pathwise(model, guide, b_args, b_kwargs)
            if value is None or not _same_sites(
                elbo.last_signature_shapeless(), _shapeless(self.confirmed)
            ):
                raise _Untraceable("the traced step's sites differ")
            return value

        inputs = (*named.values(), *tensors)
        reads: list[str] = []
        try:
            with _ValueReads(reads), warnings.catch_warnings(), pyro.validation_enabled(False):
                # The tracer's warnings are about shapes read in Python (safe: a graph is
                # kept per exact shape) or about values, which _ValueReads sorts out itself.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch 2.13 marks torch.jit.trace deprecated; the fit is no place to say so
                warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated")
                fn = torch.jit.trace(negative_elbo, inputs, check_trace=False)
        except _Untraceable as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: run eagerly
            return None, f"tracing failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        # Three passes that leave every value as it was: the step's repeated work folded
        # once (the same constrained param read by several sites, the same broadcast made
        # twice). Common-subexpression elimination leaves random draws alone; the check
        # that follows (loss, gradients, generator state) covers the result. Measured: a
        # regression fit's CPU time −13 %, the VAE's unchanged, the iterates identical.
        graph = fn.graph
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_cse(graph)
        torch._C._jit_pass_dce(graph)
        if reads:
            # a Python branch on a tensor's value (or a value turned into a number): the
            # graph would freeze the outcome of this one step
            return None, f"the step reads a tensor's value in Python ({reads[0]})"
        return fn, None

    def _verify(self, fn, params, tensors, value, grads, after) -> str | None:
        """None when the graph, run from the eager step's starting state (already set), gives
        its loss and gradients and consumes the generator as it did; else why not."""
        from .reparam_elbo import _rng_state

        try:
            with _plain_interpreter():
                traced = fn(*params, *tensors)
            traced_grads = torch.autograd.grad(traced, params, allow_unused=True)
        except Exception as e:  # noqa: BLE001
            return f"the traced graph failed ({type(e).__name__})"
        now = _rng_state()
        if not torch.equal(now[0], after[0]) or (
            now[1] is not None and not all(map(torch.equal, now[1], after[1]))
        ):
            return "the traced graph draws differently from the eager step"
        if not _close(traced.detach(), value.detach()):
            return "the traced loss differs from the eager loss"
        for g, t in zip(grads, traced_grads, strict=True):
            if (g is None) != (t is None) or (g is not None and not _close(t, g)):
                return "the traced gradients differ from the eager gradients"
        return None


# Graph nodes whose output depends on their input's shape only, not its values.
_SHAPE_OPS = frozenset({"aten::size", "aten::numel", "aten::dim", "prim::shape"})
# Tensor methods that hand a tensor's value to Python.
_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")


def _reads_data(value: torch.Tensor) -> bool:
    """Does this traced tensor's value depend on the values (not only the shapes) of the
    traced inputs, or on a random draw? Walks its producers in the trace graph: a path to
    an input that does not pass through a shape op, or through a node with no inputs that
    is not a constant (a draw from the generator), reads data."""
    try:
        start = torch._C._get_value_trace(value)
    except RuntimeError:
        return False  # not in the graph: a constant made outside the trace
    seen, stack = set(), [start]
    while stack:
        v = stack.pop()
        node = v.node()
        kind = node.kind()
        if kind == "prim::Param":
            return True  # an input's values
        if kind in _SHAPE_OPS or id(node) in seen:
            continue
        seen.add(id(node))
        inputs = list(node.inputs())
        if not inputs and kind not in ("prim::Constant", "prim::ListConstruct"):
            return True  # a fresh draw (aten::randn with constant arguments, ...)
        if kind.startswith(("aten::normal", "aten::rand", "aten::bernoulli", "aten::multinomial")):
            return True
        stack.extend(inputs)
    return False


class _ValueReads:
    """While tracing: note each place a tensor whose value depends on the data or on a
    draw is read into Python (``bool(t)``, ``float(t)``, ``t.item()``, ...). Reads of
    values computed from shapes alone are fine: a graph is kept per exact batch shape."""

    def __init__(self, reads: list[str]):
        self.reads = reads
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> _ValueReads:
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original
            setattr(torch.Tensor, name, self._watch(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _watch(self, name: str, original):
        reads = self.reads

        def read(tensor, *args, **kwargs):
            if torch._C._get_tracing_state() is not None and _reads_data(tensor):
                frame = traceback.extract_stack(limit=3)[0]
                reads.append(f"Tensor.{name} at {frame.filename}:{frame.lineno}")
            return original(tensor, *args, **kwargs)

        return read


class _plain_interpreter:  # noqa: N801 - used as a context manager, like torch's own
    """Run a graph in TorchScript's plain interpreter, without the graph executor's
    optimisation (profiling runs, differentiable subgraphs, fusion). Measured on the digits
    VAE and a small regression (CPU, 1 thread): the optimising executor made a step slower
    than eager code (1.04–1.07× eager), the plain interpreter faster (0.66–0.78×). The
    process-wide flag is restored on exit, so a user's own TorchScript is unaffected."""

    def __enter__(self) -> None:
        self.saved = torch._C._get_graph_executor_optimize()
        torch._C._set_graph_executor_optimize(False)

    def __exit__(self, *exc) -> None:
        torch._C._set_graph_executor_optimize(self.saved)


class _Untraceable(Exception):
    """The step cannot be traced (raised inside the traced function)."""


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to rounding: |a − b| ≤ 1e-5·max|b| + 1e-6 (a graph may order a sum
    differently from eager code)."""
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= 1e-5 * scale + 1e-6).all())
