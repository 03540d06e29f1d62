"""Compiling a Pyro model into factor groups, once per fit.

:func:`compile_model` fills a :class:`~jointkl.inference.em.factor_model.FactorModel` in
these steps:

1. **initial trace**: the model runs once (validated) with MAP globals at their prior's
   median, from an empty param store; it gives the free variables θ (``pyro.param``\\s and
   continuous globals outside the ``"data"`` plate) and their initial values, and every
   requirement EM has is checked here, with a message naming the site;
2. **probes**: two enumerated traces, at θ0 and at a random θ (θ0 alone can be special, e.g.
   uniform transition rows are all equal);
3. **plates and enumerated variables**;
4. **classification**: each site becomes a ``recipe``, ``fixed`` or ``traced`` group
   (:mod:`jointkl.inference.em.classify`);
5. **stacking**: single-site recipe groups that compute the same thing become rows of one;
6. **E-step plan**: whether the variables form a chain
   (:func:`~jointkl.inference.em.estep.chain_plan`), and the einsum symbols of the generic
   contraction.

Steps 2-4 run on the first ``SLICE_ROWS`` elements of the ``"data"`` plate when it has at
least ``SLICE_MIN_POINTS``, and the groups found are bound to the whole data and checked on
it (:meth:`Compiler.on_a_slice`); when that cannot be done they run on the whole data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import opt_einsum
import pyro
import pyro.poutine as poutine
import torch
from jointkl.inference.em.classify import Classifier, _distribution_signature
from jointkl.inference.em.declared_chain import compile_declared_chain
from jointkl.inference.em.declared_mixture import compile_declared_mixture
from jointkl.inference.em.estep import chain_plan
from jointkl.inference.em.factors import (
    Free,
    Group,
    Var,
    canonical,
    plates_of,
    site_axes,
    site_log_prob,
    transform_for,
)
from jointkl.inference.em.families import FAMILIES, family_of, unwrap
from jointkl.inference.em.time_steps import compile_by_time_steps
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible, init_to_median
from pyro.poutine.util import prune_subsample_sites
from torch import distributions as tdist
from torch.distributions import constraints

from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE, max_plate_nesting

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["compile_model"]

# Seed offset of the random probe of θ from the fit's seed (any fixed value does).
PROBE_SEED_OFFSET = 7919
# Probing and classifying run on the first SLICE_ROWS elements of the "data" plate (then
# are checked on all of them) when it has at least SLICE_MIN_POINTS.
SLICE_ROWS = 32
SLICE_MIN_POINTS = 128


def compile_model(
    fm: FactorModel,
    seed: int,
    time_steps: Mapping[str, Any] | None = None,
    mixture: Mapping[str, Any] | None = None,
    chain: Mapping[str, Any] | None = None,
) -> None:
    """Find ``fm.model``'s factor groups on ``fm``'s data (the steps of the module
    docstring); ``seed`` seeds the probes. ``time_steps``: the model's declaration of its
    identical time steps (:func:`~jointkl.inference.em.time_steps.compile_by_time_steps`,
    which compiles the first few and stamps them out, or leaves ``fm`` to the steps above
    when the declaration does not match). ``mixture``: the model's declaration of its
    mixture structure (:func:`~jointkl.inference.em.declared_mixture.compile_declared_mixture`,
    which builds the groups without probing, or leaves ``fm`` to the steps above); ``chain``:
    the same for a hidden Markov chain
    (:func:`~jointkl.inference.em.declared_chain.compile_declared_chain`)."""
    if mixture is not None and compile_declared_mixture(fm, mixture):
        return
    if chain is not None and compile_declared_chain(fm, chain):
        return
    if time_steps is not None and compile_by_time_steps(fm, seed, time_steps, Compiler):
        return
    Compiler(fm, seed).run()


def _initial_value(site: Mapping[str, Any]) -> torch.Tensor:
    """A site's value in the initial trace: an enumerated site's first value, one for all
    its batch elements (size-1 batch dims, as an enumerated value has them: a value only runs
    the model, and a draw of every data point's value would be a third of this trace's time,
    while expanded to every point it makes the model gather, and Pyro validate, per-point
    copies of one component's parameters, e.g. 20k Cholesky factors); a draw for another discrete site; a global's prior median, unless
    that leaves the support (an elementwise median of Dirichlet draws does not sum to one):
    then the transform of zero (uniform probabilities, identity correlations, ...)."""
    fn = site["fn"]
    if site["infer"].get("enumerate") == "parallel" and fn.has_enumerate_support:
        return fn.enumerate_support(expand=False)[0].clone()
    if site["infer"].get("enumerate") == "parallel" or fn.support.is_discrete:
        return fn.sample()
    base = fn
    while isinstance(base, tdist.Independent):
        base = base.base_dist
    if isinstance(base, tdist.Beta):
        return beta_median(base.concentration1, base.concentration0).expand(fn.shape()).clone()
    v = init_to_median(site)
    if not bool(site["fn"].support.check(v).all()):
        v = init_to_feasible(site)
    return v


def beta_median(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The median of Beta(a, b), elementwise, where it has a closed form, else its mean:

        a = b:  1/2;   a = 1:  1 - 2^(-1/b);   b = 1:  2^(-1/a);   otherwise a / (a + b).

    Computed rather than taken from draws (a Beta prior's median of 15 draws per
    coordinate was a third of a small mixture's compilation); it only starts the trace
    EM reads the model's structure from, whose globals EM's initialisation then sets.

    :param a: the concentration of the ones (``concentration1``).
    :param b: the concentration of the zeros (``concentration0``), broadcastable with ``a``.
    """
    a, b = torch.broadcast_tensors(a, b)
    if a.dim() and not any(a.stride() + b.stride()):
        # one (a, b) expanded over every coordinate (a prior written Beta(a, b).expand(...)):
        # one value, and the symmetric case's 1/2 needs no arithmetic at all
        first = (0,) * a.dim()
        if bool(a[first] == b[first]):
            return torch.full_like(a, 0.5)
    half = torch.full_like(a, 0.5)
    median = torch.where(a == 1, 1 - torch.pow(2.0, -1 / b), a / (a + b))
    median = torch.where(b == 1, torch.pow(2.0, -1 / a), median)
    return torch.where(a == b, half, median)


def _is_deterministic(site: Mapping[str, Any]) -> bool:
    """A ``pyro.deterministic`` site: a function of other sites with no density of its own,
    so no factor of the model (the converter computes it per posterior draw)."""
    return bool(site["infer"].get("_deterministic", False))


def refuse_continuous_latent(name: str, site: Mapping[str, Any]) -> None:
    """Raise InputError if ``site`` is a continuous latent inside the data plate."""
    in_data = any(f.name == DATA_PLATE for f in site["cond_indep_stack"])
    if in_data and site["infer"].get("enumerate") is None and not site["fn"].support.is_discrete:
        raise InputError(
            f"EM: site {name!r} is a continuous latent inside the {DATA_PLATE!r} plate; "
            "EM handles discrete enumerable latents (and MAP point estimates of "
            "globals) only — fit this model with the SVI engine"
        )


class Compiler:
    """The state of one compilation (the probes, and the recipes found so far)."""

    def __init__(self, fm: FactorModel, seed: int):
        self.fm = fm
        self.seed = seed

    def run(self) -> None:
        fm = self.fm
        tr = self.initial_trace()
        enumerated = self.free_variables(tr)
        fm.nesting = max_plate_nesting(tr)
        found = self.on_a_slice(tr, enumerated)
        if found is None:  # the whole data, as the module docstring says
            self.traces = self.probe_traces(fm)
            sites = self.sample_sites()
            self.plates(sites)
            self.enumerated_variables(enumerated)
            candidates = Classifier(fm, self.traces, self.thetas).classify(sites)
        else:
            sites, candidates = found
        order = {n: i for i, n in enumerate(sites)}
        fm.groups = self.stack(candidates, order)
        fm.chain = chain_plan(fm)
        fm.chain_method = "auto"
        # Einsum symbols for the generic contraction: plates even, variables odd.
        fm.plate_symbol = {p: opt_einsum.get_symbol(2 * i) for i, p in enumerate(fm.plate_order)}
        fm.var_symbol = {v: opt_einsum.get_symbol(2 * i + 1) for i, v in enumerate(fm.vars)}

    # ------------------------------------------------------------------ 1. the initial trace
    def initial_trace(self):
        """The model's plain trace at its own initial parameter values, from an empty param
        store (stale values of another fit must not leak in; the caller's store is put back
        afterwards). Also keeps the param store's constraints."""
        fm = self.fm
        store = pyro.get_param_store()
        saved = store.get_state()
        store.clear()
        tracer = poutine.trace(InitMessenger(_initial_value)(fm.model))
        try:
            with torch.no_grad():
                tr = tracer.get_trace(*fm.args, **fm.kwargs)
            self.store_constraints = dict(store.get_state()["constraints"])
        except InputError:
            raise
        except Exception as e:
            # A model EM cannot take often fails further on (a network fed the data cast to
            # float64): name the site EM refuses, if the partial trace reached one.
            for name, s in tracer.trace.nodes.items():
                if s["type"] == "sample" and not s["is_observed"]:
                    refuse_continuous_latent(name, s)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise InputError(
                f"EM: the model failed when run on the data (cast to {fm.dtype}): "
                f"{type(e).__name__}: {first}"
            ) from e
        finally:
            store.set_state(saved)
        return prune_subsample_sites(tr)

    def free_variables(self, tr) -> list[str]:
        """Set ``fm.free`` and ``fm.init`` from the initial trace; the enumerated sites.
        Refuses a site EM cannot handle, naming it and what to do instead."""
        fm = self.fm
        fm.free, fm.init = {}, {}
        observed, enumerated = [], []
        for name, s in tr.nodes.items():
            if s["type"] == "param":
                c = self.store_constraints.get(name, constraints.real)
                v = self.cast(s["value"].detach(), c)
                fm.free[name] = Free(name, "param", c, v.shape)
                fm.init[name] = v.clone()
            if s["type"] != "sample" or _is_deterministic(s):
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
                refuse_continuous_latent(name, s)
            else:
                v = self.cast(s["value"].detach(), s["fn"].support)
                fm.free[name] = Free(name, "global", s["fn"].support, v.shape)
                fm.init[name] = v.clone()
        if not enumerated:
            latent = [n for n in tr.nodes if n in fm.free and fm.free[n].kind == "global"]
            what = f" (its latents {latent} are continuous)" if latent else ""
            raise InputError(
                "EM: the model has no enumerated discrete latent site"
                f"{what}; EM needs at least one — fit it with the SVI engine instead"
            )
        if not observed:
            raise InputError("EM: the model has no observed sample site: nothing to fit")
        return enumerated

    def cast(self, v: torch.Tensor, constraint: Any) -> torch.Tensor:
        """An initial value in the EM dtype, put back on its constraint at that precision (a
        float32 simplex is off by 1e-7 in float64, and Categorical would renormalise it)."""
        if self.fm.dtype is not None and v.dtype.is_floating_point:
            v = v.to(self.fm.dtype)
            t = transform_for(constraint)
            return t(t.inv(v))
        return v

    # ------------------------------------------------------------------ 2-4 on a slice
    def on_a_slice(self, tr, enumerated: list[str]) -> tuple[list[str], list[Group]] | None:
        """Steps 2-4 on the first ``SLICE_ROWS`` elements of the ``"data"`` plate, then
        bound to the whole data and checked on it; ``(sites, groups)``, or ``None`` when
        that cannot be done (the caller then runs them on the whole data).

        Probing and classifying score every site on every point (for a mixture, Pyro's
        log-density of all N points, once per probe); on a slice they cost the same for any
        N. The slice is the model run on its arguments cut to their first ``SLICE_ROWS``
        rows: every tensor argument whose leading dim is the data plate's size. It is taken
        only when the model's structure survives the cut (the same sites, the same plates
        but the data plate's size), every factor group is a recipe (or a fixed table
        outside the data plate), and one enumerated trace of the whole data, at the random
        probe of θ, gives every site's log-density the compiled groups compute (to
        rounding). Per-point constants, observed values and masks are read from that trace.
        """
        fm = self.fm
        n = next(
            (
                f.size
                for s in tr.nodes.values()
                if s["type"] == "sample"
                for f in s["cond_indep_stack"]
                if f.name == DATA_PLATE
            ),
            None,
        )
        if n is None or n < SLICE_MIN_POINTS:
            return None
        cut = [False]

        def head(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == n:
                cut[0] = True
                return a[:SLICE_ROWS]
            return a

        part = copy.copy(fm)
        part.args = tuple(head(a) for a in fm.args)
        part.kwargs = {k: head(a) for k, a in fm.kwargs.items()}
        if not cut[0]:
            return None
        try:
            self.traces = self.probe_traces(part)
            sites = self.sample_sites()
            self.plates(sites)
            if fm.plate_sizes.get(DATA_PLATE) != SLICE_ROWS or any(
                f.name != DATA_PLATE and fm.plate_sizes.get(f.name, f.size) != f.size
                for s in tr.nodes.values()
                if s["type"] == "sample"
                for f in s["cond_indep_stack"]
            ):
                return None
            self.enumerated_variables(enumerated)
            args, kwargs = part.args, part.kwargs
            part = copy.copy(fm)  # now with the slice's plates and variables
            part.args, part.kwargs = args, kwargs
            part.plate_sizes = dict(fm.plate_sizes)
            candidates = Classifier(part, self.traces, self.thetas).classify(sites)
        except Exception:  # noqa: BLE001 (the whole data's compilation decides, and says why)
            return None
        fm.plate_sizes[DATA_PLATE] = n
        fm.n_points = n
        try:
            bound = self.bind(sites, candidates)
        except Exception:  # noqa: BLE001 (as above)
            bound = False
        if not bound:
            return None
        return sites, candidates

    def bind(self, sites: list[str], groups: list[Group]) -> bool:
        """Give the groups classified on a slice the whole data's values (observations,
        masks, per-point constants, fixed tables, table shapes), read from one enumerated
        trace of the whole data at the random probe; ``True`` if every site of it is what its
        group computes: the same distribution classes, unscaled, and every parameter the
        recipe's (the family's log-density of given parameters and values was checked
        against Pyro's on the slice; Pyro's log-densities of the whole data, which would
        cost as much as the whole compilation, are not computed)."""
        fm = self.fm
        if any(
            g.kind == "traced" or (g.kind == "fixed" and DATA_PLATE in g.plates) for g in groups
        ):
            return False
        theta = self.thetas[1]
        tables = {n for g in groups if g.kind == "fixed" and g.fn is None for n in g.sites}
        with torch.no_grad():
            whole = fm.trace(theta, log_prob=lambda name, site: name in tables)
        names = [
            n
            for n, s in whole.nodes.items()
            if s["type"] == "sample" and n != "_RETURN" and not _is_deterministic(s)
        ]
        if names != sites:
            return False
        reader = Classifier(fm, [whole], [theta])
        var_symbol = reader.var_symbols[0]
        n_points = fm.plate_sizes[DATA_PLATE]
        for g in groups:
            if DATA_PLATE in g.plates:  # the data plate's axis: SLICE_ROWS, or 1 (broadcast)
                a = len(g.cards) + g.plates.index(DATA_PLATE)
                if g.shape[a] == SLICE_ROWS:
                    g.shape = g.shape[:a] + (n_points,) + g.shape[a + 1 :]
            rows = []
            for n, roles in zip(g.sites, g.roles, strict=True):
                site, part = whole.nodes[n], self.traces[0].nodes[n]
                if _distribution_signature(site["fn"])[0] != _distribution_signature(part["fn"])[0]:
                    return False
                axes = site_axes(site, roles, g.plates, var_symbol, fm.plate_dims)
                rows.append((n, site, site["infer"]["_dim_to_symbol"], axes))
            if g.kind == "fixed":
                n, site, d2s, axes = rows[0]
                if g.fn is None:
                    g.table = torch.cat(
                        [canonical(site_log_prob(s), 0, d, ax, g.n_axes, m) for m, s, d, ax in rows]
                    )
                else:
                    g.fn, g.dims = site["fn"], (d2s, axes)
                continue
            if not all(self.bound_rows(g, rows, reader)):
                return False
        return True

    def bound_rows(self, g: Group, rows: list[tuple], reader: Classifier) -> list[bool]:
        """Bind a recipe group's rows ``(site name, whole-data site, dim -> symbol, symbol ->
        axis)`` to the whole data (its observations, masks and constant slots) and say, per
        row, whether the site is unscaled, of the group's family, and has the recipe's
        parameters at the probe."""
        family = FAMILIES[g.family]
        ok = []
        data, masks = [], []
        consts: dict[str, list[torch.Tensor]] = {
            k: [] for k, s in g.slots.items() if s.const is not None
        }
        for (n, site, d2s, axes), roles in zip(rows, g.roles, strict=True):
            fn, r = unwrap(site["fn"])
            good = family_of(fn) == g.family and r == g.n_event
            own = g.value == "own"
            scale = site["scale"]
            good = good and (
                own or scale is None or (not isinstance(scale, torch.Tensor) and scale == 1.0)
            )
            if g.value == "data":
                x = canonical(
                    site["value"], len(site["fn"].event_shape), d2s, axes, g.n_axes, n
                ).detach()
                data.append(x.long() if g.family == "categorical" else x)
            mask = None if own else site["mask"]
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
                masks.append(canonical(mask.detach(), 0, d2s, axes, g.n_axes, n))
            else:
                good = good and mask is None
            for k, slot in g.slots.items():
                spec = family.slot(k)
                target = getattr(fn, spec.attr)
                if slot.const is not None:
                    consts[k].append(
                        canonical(target.detach(), g.n_event + spec.rank, d2s, axes, g.n_axes, n)
                    )
                    continue
                index = [
                    tuple(("var", roles[a]) if kind == "role" else (kind, a) for kind, a in ix)
                    for ix in slot.index
                ]
                choice = tuple(zip(slot.params, index, slot.pad, strict=True))
                size = target.shape[-1] if target.dim() else None
                good = good and reader.recipes.reproduces(choice, slot.view, target, 0, size)
            ok.append(bool(good))
        if (g.mask is None) != (not masks) or (masks and len(masks) != g.rows):
            return [False]
        g.data = torch.cat(data) if data else g.data
        g.mask = torch.cat(masks) if masks else None
        for k, parts in consts.items():
            g.slots[k].const = torch.cat(parts)
        return ok

    # ------------------------------------------------------------------ 2. the probes
    def probe_traces(self, fm: FactorModel) -> list:
        """Enumerated traces of ``fm`` (the model on the whole data, or on a slice) at θ0
        and at a random probe of θ (random values make an accidental match of a wrong
        recipe a measure-zero event)."""
        g = torch.Generator().manual_seed(self.seed + PROBE_SEED_OFFSET)
        probe = {}
        for k, f in fm.free.items():
            t = transform_for(f.constraint)
            u = t.inv(fm.init[k])
            probe[k] = t(torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device))
        with torch.no_grad():
            traces = [fm.trace(fm.init), fm.trace(probe)]
        self.thetas = [fm.init, probe]
        return traces

    def sample_sites(self) -> list[str]:
        """The sample sites, checked to be the same, with the same shapes, in every probe."""
        t0 = self.traces[0]
        sites = [
            n
            for n, s in t0.nodes.items()
            if s["type"] == "sample" and n not in ("_RETURN",) and not _is_deterministic(s)
        ]
        for tr_ in self.traces[1:]:
            other = [
                n
                for n, s in tr_.nodes.items()
                if s["type"] == "sample" and not _is_deterministic(s)
            ]
            if other != sites or any(
                tr_.nodes[n]["log_prob"].shape != t0.nodes[n]["log_prob"].shape for n in sites
            ):
                raise InputError(
                    "EM: the model's sites or their shapes change with the parameter values; "
                    "EM needs a fixed structure for given data"
                )
        return sites

    # ------------------------------------------------------------------ 3. plates, variables
    def plates(self, sites: list[str]) -> None:
        """``fm.plate_dims``, ``plate_sizes``, ``plate_order`` and ``n_points``."""
        fm = self.fm
        fm.plate_dims, fm.plate_sizes = {}, {}
        for n in sites:
            for f in plates_of(self.traces[0].nodes[n]):
                if fm.plate_dims.setdefault(f.name, f.dim) != f.dim:
                    raise InputError(f"EM: plate {f.name!r} is used at two different dims")
                fm.plate_sizes[f.name] = f.size
        fm.plate_order = sorted(fm.plate_dims, key=lambda p: fm.plate_dims[p])
        fm.n_points = fm.plate_sizes.get(DATA_PLATE, 1)

    def enumerated_variables(self, enumerated: list[str]) -> None:
        """``fm.vars``."""
        fm = self.fm
        fm.vars = {}
        for n in enumerated:
            s = self.traces[0].nodes[n]
            plates = tuple(p for p in fm.plate_order if p in {f.name for f in plates_of(s)})
            fm.vars[n] = Var(n, s["value"].shape[0], plates)

    # ------------------------------------------------------------------ 5. stacking
    def stack(self, candidates: list[Group], order: Mapping[str, int]) -> list[Group]:
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
