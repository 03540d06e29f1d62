"""Compiling a mixture that declares its structure, without probing it.

The generic compilation (:mod:`jointkl.inference.em.compile`) finds a model's factor groups
by running it: a plain run for the initial values, two enumerated probe traces, the
classification of every site and one more run to bind the groups to the whole data. For a
small mixture (the zoo ``BernoulliMixture()`` on the 1797 digits) that is most of a fit. A
zoo model whose structure is known in advance declares it (the hook ``em_mixture``, see
:func:`compile_declared_mixture`): one enumerated variable per data point, its prior the
weights, and observed sites each a family whose one slot is a free variable indexed by the
point's component (``probs[z]``, identity view). The compiled model is then built directly:

* the free variables and their initial values come from the model run as the generic
  initial trace runs it (the same initial values, the same draws of torch's random state),
  stopped at its first site inside the ``"data"`` plate; every sample site before it must be
  a continuous global, and its prior becomes a ``fixed`` group as the generic compilation
  makes it;
* the assignment's ``categorical`` group and one ``recipe`` group per declared emission,
  their observations read from the declaration.

Nothing is probed, so the declaration is trusted: only a zoo model declares one, and only for
its own ``model`` (a subclass that overrides ``model`` declares nothing).
``tests/test_em_declared.py`` pins the declared compilation to the probed one (the same
groups, data, initial values and fit, bitwise) for every variant of the declaring models.
When the declaration does not fit the model (its variable or parameters are not the model's,
shapes differ) :func:`compile_declared_mixture` returns ``False`` and the model is compiled
generically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import opt_einsum
import torch
from jointkl.inference.em.data_plate_prefix import compiled_or_restored, trace_to_data_plate
from jointkl.inference.em.estep import chain_plan
from jointkl.inference.em.factors import Free, Group, Slot, Var, plates_of, site_axes
from jointkl.inference.em.families import FAMILIES
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import constraints

from jointkl.sites import DATA_PLATE

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["compile_declared_mixture", "declared_globals", "DeclaredGlobals"]


def compile_declared_mixture(fm: FactorModel, declared: Mapping[str, Any]) -> bool:
    """Fill ``fm`` from the model's declaration of its mixture structure; ``False`` (``fm``
    untouched) when the declaration does not fit the model.

    :param fm: the model on its data.
    :param declared: the model's ``em_mixture(*args, **kwargs)``: ``"variable"``, the
        enumerated site (a Categorical over ``"components"`` values with probabilities the
        free variable ``"weights"``, one per element of the ``"data"`` plate, the plate's
        only enumerated site); ``"emissions"``, a list of observed sites, each a dict with
        ``"site"``, ``"family"`` (a key of :data:`~jointkl.inference.em.families.FAMILIES`),
        ``"slot"`` (its one parameter) fed by ``"param"`` indexed by the component
        (``param[z]``, shape ``(components, *event)``), ``"event_dims"`` (dims summed in the
        site's log-density), and ``"value"``, the observations ``(points, *event)``. Sites
        are listed in the model's order: the variable, then the emissions.
    """
    return compiled_or_restored(_compile, fm, declared)


def _compile(fm: FactorModel, declared: Mapping[str, Any]) -> bool:
    """:func:`compile_declared_mixture` without putting torch's random state back."""
    found = declared_globals(fm)
    if found is None:
        return False
    K = int(declared["components"])
    var, weights = declared["variable"], declared["weights"]
    free = found.free
    if weights not in free or tuple(free[weights].shape) != (K,):
        return False
    n = found.plate_sizes[DATA_PLATE]
    groups = list(found.priors)
    common = dict(roles=[(var,)], cards=(K,), plates=(DATA_PLATE,), shape=(K, n))
    groups.append(
        Group(
            kind="recipe",
            family="categorical",
            sites=[var],
            value="own",
            own=0,
            slots={"probs": Slot("identity", (weights,), ((),), (0,))},
            depends=frozenset({weights}),
            **common,
        )
    )
    for e in declared["emissions"]:
        family, param = FAMILIES.get(e["family"]), e["param"]
        if family is None or param not in free:
            return False
        family.slot(e["slot"])  # a KeyError for a slot the family does not have
        x, n_event = e["value"], int(e["event_dims"])
        event = tuple(x.shape[1:])
        if x.shape[0] != n or tuple(free[param].shape) != (K,) + event or n_event != len(event):
            return False
        groups.append(
            Group(
                kind="recipe",
                family=e["family"],
                sites=[e["site"]],
                value="data",
                slots={e["slot"]: Slot("identity", (param,), ((("role", 0),),), (0,))},
                n_event=n_event,
                data=x.reshape((1, 1, n) + event),
                depends=frozenset({param}),
                **common,
            )
        )
    found.fill(fm, {var: Var(var, K, (DATA_PLATE,))}, groups)
    return True


@dataclass
class DeclaredGlobals:
    """What a declared model's globals give its compilation: the free variables and their
    initial values (as the generic initial trace finds them), a ``fixed`` group per MAP
    global's prior, and the plates (the globals' and the ``"data"`` plate)."""

    free: dict[str, Free]
    init: dict[str, torch.Tensor]
    priors: list[Group]
    plate_dims: dict[str, int]
    plate_sizes: dict[str, int]

    def fill(self, fm: FactorModel, variables: dict[str, Var], groups: list[Group]) -> None:
        """Fill ``fm`` with these globals, the enumerated ``variables`` and ``groups``, and
        what the generic compilation derives from them (chain plan, einsum symbols)."""
        fm.free, fm.init = self.free, self.init
        fm.plate_dims, fm.plate_sizes = self.plate_dims, self.plate_sizes
        fm.plate_order = sorted(self.plate_dims, key=lambda p: self.plate_dims[p])
        fm.nesting = max(-d for d in self.plate_dims.values())
        fm.n_points = self.plate_sizes[DATA_PLATE]
        fm.vars = variables
        fm.groups = groups
        fm.chain = chain_plan(fm)
        fm.chain_method = "auto"
        fm.plate_symbol = {p: opt_einsum.get_symbol(2 * i) for i, p in enumerate(fm.plate_order)}
        fm.var_symbol = {v: opt_einsum.get_symbol(2 * i + 1) for i, v in enumerate(fm.vars)}


def declared_globals(fm: FactorModel) -> DeclaredGlobals | None:
    """The globals of ``fm``'s model, read from its run up to its first site inside the
    ``"data"`` plate, validated, as the generic initial trace runs it
    (:func:`~jointkl.inference.em.data_plate_prefix.trace_to_data_plate`); ``None`` when it
    has no such site, or a sample site before it that is not a continuous global, or a plate
    at two dims."""
    tr, constraints_of, frame = trace_to_data_plate(fm, validate=True)
    tr = prune_subsample_sites(tr)
    if frame is None:
        return None
    free: dict[str, Free] = {}
    init: dict[str, torch.Tensor] = {}
    sites: list[tuple[str, Any]] = []
    cast = _caster(fm)
    for name, s in tr.nodes.items():
        if s["type"] == "param":
            c = constraints_of.get(name, constraints.real)
            v = cast(s["value"].detach(), c)
            free[name], init[name] = Free(name, "param", c, v.shape), v.clone()
        elif s["type"] == "sample":
            if s["is_observed"] or s["infer"].get("enumerate") or s["fn"].support.is_discrete:
                return None
            v = cast(s["value"].detach(), s["fn"].support)
            free[name], init[name] = Free(name, "global", s["fn"].support, v.shape), v.clone()
            sites.append((name, s))
    plate_dims: dict[str, int] = {}
    plate_sizes: dict[str, int] = {}
    for _, s in sites:
        for f in plates_of(s):
            if plate_dims.setdefault(f.name, f.dim) != f.dim:
                return None
            plate_sizes[f.name] = f.size
    if plate_dims.setdefault(DATA_PLATE, frame.dim) != frame.dim:
        return None
    plate_sizes[DATA_PLATE] = frame.size
    order = sorted(plate_dims, key=lambda p: plate_dims[p])
    priors = []
    if sites:
        tr.symbolize_dims()
    for name, s in sites:
        plates = tuple(p for p in order if p in {f.name for f in plates_of(s)})
        axes = site_axes(s, (), plates, {}, plate_dims)
        priors.append(
            Group(
                kind="fixed",
                family=None,
                sites=[name],
                roles=[()],
                cards=(),
                plates=plates,
                shape=tuple(plate_sizes[p] for p in plates),
                value="free",
                free=name,
                fn=s["fn"],
                depends=frozenset({name}),
                dims=(s["infer"]["_dim_to_symbol"], axes),
            )
        )
    return DeclaredGlobals(free, init, priors, plate_dims, plate_sizes)


def _caster(fm: FactorModel):
    """The generic compilation's cast of an initial value to EM's dtype (put back on its
    constraint at that precision)."""
    from jointkl.inference.em.compile import Compiler

    return Compiler(fm, 0).cast
