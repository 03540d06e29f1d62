"""Classifying a model's sites into factor groups: ``recipe``, ``fixed`` or ``traced``.

Each sample site of the probe traces (:mod:`jointkl.inference.em.compile`) is read once
(:class:`SiteInfo`: its roles, plates, log-density in canonical layout, and a *signature*)
and classified:

* ``fixed`` when its distribution is the same in every probe (and the site is unscaled);
* ``recipe`` when it is a family of :mod:`jointkl.inference.em.families` and every slot has
  a recipe (:mod:`jointkl.inference.em.recipes`) that reproduces Pyro's log-density;
* ``traced`` otherwise (and then probed for the free variables it depends on).

Sites with one signature (the iterations of a loop) are classified once, on the first of
them, and the others are checked together against that recipe: a 500-step HMM is classified
in two tries, not 1,000.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from jointkl.inference.em.factors import (
    Group,
    canonical,
    plates_of,
    site_axes,
    site_log_prob,
    transform_for,
)
from jointkl.inference.em.families import FAMILIES, family_of, unwrap
from jointkl.inference.em.recipes import RecipeFinder, all_close, is_close

from jointkl.errors import InputError

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["SiteInfo", "Classifier"]

# Seed of the dependence probes of traced sites (any fixed value does).
DEPENDENCE_SEED = 104729


@dataclass
class SiteInfo:
    """What the classification reads of one site.

    :param roles: the enumerated variables its table is over (its own last, if enumerated).
    :param plates: its plates, in canonical order.
    :param cards: the roles' cardinalities; ``shape``: the table's shape without rows.
    :param axes: per probe trace, symbol -> canonical axis.
    :param lps: per probe trace, its log-density in canonical layout.
    :param value: what the table scores: ``"data"``, ``"own"`` (the enumerated value) or
        ``"free"`` (a MAP global's value); ``own``, ``free``: which.
    :param data: observed values in canonical layout (``value == "data"``).
    :param plain: unscaled, and masked (if at all) by a mask that has a canonical layout.
    :param mask: that mask, or ``None``.
    :param signature: what sites computed by one recipe share.
    """

    roles: tuple[str, ...]
    plates: tuple[str, ...]
    cards: tuple[int, ...]
    shape: tuple[int, ...]
    axes: list[dict[str, int]]
    lps: list[torch.Tensor]
    value: str
    own: int | None
    free: str | None
    data: torch.Tensor | None
    plain: bool
    mask: torch.Tensor | None
    signature: tuple

    def group_fields(self, name: str) -> dict[str, Any]:
        """The :class:`Group` fields of a one-site group of this site."""
        return dict(
            data=self.data,
            mask=self.mask,
            sites=[name],
            roles=[self.roles],
            cards=self.cards,
            plates=self.plates,
            shape=self.shape,
            value=self.value,
            own=self.own,
            free=self.free,
        )


class Classifier:
    """Classifies the sites of the probe traces of ``fm`` (whose free variables, plates and
    enumerated variables are known).

    :param traces: the enumerated probe traces; ``thetas``: θ in each.
    """

    def __init__(self, fm: FactorModel, traces: Sequence[Any], thetas: Sequence[Mapping]):
        self.fm, self.traces, self.thetas = fm, traces, thetas
        self.var_order = {v: i for i, v in enumerate(fm.vars)}
        self.var_symbols = [
            {v: tr_.nodes[v]["infer"]["_enumerate_symbol"] for v in fm.vars} for tr_ in traces
        ]
        self.sym_to_var = [{s: v for v, s in vs.items()} for vs in self.var_symbols]
        self.recipes = RecipeFinder(
            free=fm.free,
            vars=fm.vars,
            thetas=thetas,
            var_values=[{v: tr_.nodes[v]["value"] for v in fm.vars} for tr_ in traces],
            sym_to_var=self.sym_to_var[0],
        )

    def classify(self, sites: list[str]) -> list[Group]:
        """One group per site, or per run of sites a recipe (or fixed table) covers, in the
        model's order; ``traced`` groups know which free variables they depend on."""
        infos = {n: self.site_info(n) for n in sites}
        buckets: dict[tuple, list[str]] = {}
        for n in sites:
            buckets.setdefault(infos[n].signature, []).append(n)
        candidates = []
        for names in buckets.values():
            first = self.site_group(names[0], infos[names[0]])
            failed = names[1:]
            if failed and (first.kind == "recipe" or (first.kind == "fixed" and first.fn is None)):
                first, failed = self.extend(first, failed, infos)
            candidates.append(first)
            candidates += [self.site_group(n, infos[n]) for n in failed]
        order = {n: i for i, n in enumerate(sites)}
        candidates.sort(key=lambda c: order[c.sites[0]])
        if any(c.kind == "traced" for c in candidates):
            depends = self.dependence(sites)
            for c in candidates:
                if c.kind == "traced":
                    c.depends = depends[c.sites[0]]
        return candidates

    def dependence(self, sites: list[str]) -> dict[str, frozenset[str]]:
        """Which free variables change each site's log-density (one trace per variable)."""
        fm, t0 = self.fm, self.traces[0]
        deps: dict[str, set[str]] = {n: set() for n in sites}
        g = torch.Generator().manual_seed(DEPENDENCE_SEED)
        for k, f in fm.free.items():
            t = transform_for(f.constraint)
            u = t.inv(fm.init[k])
            theta = dict(fm.init)
            theta[k] = t(u + torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device))
            with torch.no_grad():
                tr = fm.trace(theta)
            for n in sites:
                if not is_close(site_log_prob(t0.nodes[n]), site_log_prob(tr.nodes[n])):
                    deps[n].add(k)
        return {n: frozenset(v) for n, v in deps.items()}

    def site_info(self, name: str) -> SiteInfo:
        """A site's roles, plates, canonical log-density in each trace, value and signature."""
        fm, traces = self.fm, self.traces
        site = traces[0].nodes[name]
        d2s = site["infer"]["_dim_to_symbol"]
        lp = site_log_prob(site)
        deps = []
        for i, size in enumerate(lp.shape):
            v = self.sym_to_var[0].get(d2s.get(i - lp.dim()))
            if v is not None and v != name and size > 1:
                deps.append(v)
        deps.sort(key=self.var_order.get)
        roles = tuple(deps) + ((name,) if name in fm.vars else ())
        plates = tuple(p for p in fm.plate_order if p in {f.name for f in plates_of(site)})
        n_axes = len(roles) + len(plates)
        axes = [
            site_axes(tr.nodes[name], roles, plates, vs, fm.plate_dims)
            for tr, vs in zip(traces, self.var_symbols, strict=True)
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
        cards = tuple(fm.vars[r].card for r in roles)
        shape = tuple(lps[0].shape[1:])
        shape = cards + shape[len(cards) :]  # a role the table is constant along still counts
        if name in fm.vars:
            value, own, free = "own", roles.index(name), None
        elif name in fm.free:
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
        if name in fm.vars:  # ignored for an enumerated latent's own factor, as by Pyro
            mask = None
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            try:
                mask = canonical(mask.detach(), 0, d2s, axes[0], n_axes, name)
            except InputError:
                mask = False
        plain = (mask is None or isinstance(mask, torch.Tensor)) and (
            name in fm.vars
            or site["scale"] is None
            or (not isinstance(site["scale"], torch.Tensor) and site["scale"] == 1.0)
        )
        mask = mask if isinstance(mask, torch.Tensor) else None
        signature = (
            value,
            own,
            cards,
            plates,
            shape,
            None if data is None else (tuple(data.shape), data.dtype),
            *_distribution_signature(site["fn"]),
            plain,
            None if mask is None else tuple(mask.shape),
        )
        return SiteInfo(
            roles, plates, cards, shape, axes, lps, value, own, free, data, plain, mask, signature
        )

    def site_group(self, name: str, info: SiteInfo) -> Group:
        """Classify one site: a recipe, a fixed table or prior, or a traced site."""
        per_trace = [tr.nodes[name] for tr in self.traces]
        site = per_trace[0]
        d2s = site["infer"]["_dim_to_symbol"]
        base = info.group_fields(name)
        fns = [s["fn"] for s in per_trace]

        # fixed: the distribution is the same at every probe. With the same value in every
        # trace (data, enumerated values) that is the same log-density; a MAP global's value
        # moves with θ, so its prior is scored at one value under each trace's distribution.
        v0 = site["value"]
        if info.value != "free":
            same = all(is_close(info.lps[0], lp) for lp in info.lps[1:])
        else:
            try:
                same = all(is_close(fns[0].log_prob(v0), f.log_prob(v0)) for f in fns[1:])
            except Exception:  # noqa: BLE001 (a distribution that cannot score that value)
                same = False
        if same and info.plain:
            if info.value == "free":
                return Group(
                    kind="fixed",
                    family=None,
                    fn=fns[0],
                    depends=frozenset([name]),
                    dims=(d2s, info.axes[0]),
                    **base,
                )
            return Group(kind="fixed", family=None, table=info.lps[0], **base)

        fam_fn, r = unwrap(fns[0])
        family = family_of(fam_fn)
        if (
            family is None
            or not info.plain
            or info.value == "free"
            or (info.value == "own" and family == "poisson")
        ):
            return Group(kind="traced", family=None, **base)
        slots = {}
        for spec in FAMILIES[family].slots:
            tensors = [getattr(unwrap(f)[0], spec.attr) for f in fns]
            slot = self.recipes.match(
                (family, spec.name, r),
                tensors,
                r + spec.rank,
                spec.views,
                d2s,
                info.axes[0],
                info.roles,
                name,
            )
            if slot is None:
                return Group(kind="traced", family=None, **base)
            slots[spec.name] = slot
        if family == "categorical" and base["data"] is not None:
            base["data"] = base["data"].long()
        depends = frozenset(p for s in slots.values() for p in s.params)
        g = Group(kind="recipe", family=family, slots=slots, n_event=r, depends=depends, **base)
        # The recipe must give the log-densities Pyro computed (a last check, e.g. that the
        # value is scored as the family's own log_prob would).
        if not self.rows_match(g, [info], traces=(0,))[0]:
            return Group(kind="traced", family=None, **base)
        return g

    def rows_match(
        self, g: Group, infos: list[SiteInfo], traces: tuple[int, ...] = (0, 1)
    ) -> list[bool]:
        """Per row: does the recipe reproduce the site's log-density in the given traces?"""
        ok = torch.ones(g.rows, dtype=torch.bool, device=self.fm.device)
        for k in traces:
            with torch.no_grad():
                tab = self.fm.recipe_table(g, self.thetas[k])
            ref = torch.cat([info.lps[k] for info in infos])
            tab = tab.expand(ref.shape) if tab.dim() == ref.dim() else tab
            tol = 1e-8 if ref.dtype == torch.float64 else 1e-3
            if all_close(tab.expand(ref.shape), ref, rtol=tol, atol=tol):
                continue  # every row matches (the usual case), in three passes
            close = torch.isclose(tab, ref, rtol=tol, atol=tol)
            ok &= close.reshape(g.rows, -1).all(-1)
        return ok.tolist()

    def extend(
        self, first: Group, names: list[str], infos: Mapping[str, SiteInfo]
    ) -> tuple[Group, list[str]]:
        """Add the sites ``names`` (same signature) to ``first`` as rows where its recipe (or
        fixed-ness) holds for them too; returns the group and the sites that did not fit."""
        if first.kind == "fixed":
            fits = [n for n in names if is_close(infos[n].lps[0], infos[n].lps[1])]
            g = _copy_group(first)
            g.sites = [first.sites[0], *fits]
            _take_rows(g, infos)
            g.table = torch.cat([infos[n].lps[0] for n in g.sites])
            return g, [n for n in names if n not in set(fits)]
        consts = {k: s for k, s in first.slots.items() if s.const is not None}
        family = FAMILIES[first.family]
        cand = []
        for n in names:
            site_fns = [tr.nodes[n]["fn"] for tr in self.traces]
            c = {}
            for k in consts:
                spec = family.slot(k)
                ts = [getattr(unwrap(f)[0], spec.attr) for f in site_fns]
                if not all(is_close(ts[0], t) for t in ts[1:]):
                    break
                c[k] = canonical(
                    ts[0].detach(),
                    first.n_event + spec.rank,
                    self.traces[0].nodes[n]["infer"]["_dim_to_symbol"],
                    infos[n].axes[0],
                    first.n_axes,
                    n,
                )
            else:
                cand.append((n, c))
        rows = [(first.sites[0], {k: s.const for k, s in consts.items()})] + cand
        g = _copy_group(first)
        g.slots = {k: dataclasses.replace(s) for k, s in first.slots.items()}
        g.sites = [n for n, _ in rows]
        _take_rows(g, infos)
        for k in consts:
            g.slots[k].const = torch.cat([c[k] for _, c in rows])
        ok = self.rows_match(g, [infos[n] for n in g.sites])
        if not all(ok):
            keep = [n for n, good in zip(g.sites, ok, strict=True) if good]
            if first.sites[0] not in keep:
                return first, names
            idx = torch.tensor([i for i, good in enumerate(ok) if good])
            g.sites, g.roles = keep, [infos[n].roles for n in keep]
            if g.data is not None:
                g.data = g.data[idx]
            if g.mask is not None:
                g.mask = g.mask[idx]
            for k in consts:
                g.slots[k].const = g.slots[k].const[idx]
        return g, [n for n in names if n not in set(g.sites)]


def _distribution_signature(fn: Any) -> tuple[tuple, tuple]:
    """The wrapper classes (and reinterpreted dims) around a site's distribution, and the
    shapes of its family's parameters (empty for a family EM does not compute)."""
    chain = []
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
        slot_shapes = tuple(tuple(getattr(fn, s.attr).shape) for s in FAMILIES[family].slots)
    return tuple(chain), slot_shapes


def _copy_group(g: Group) -> Group:
    """A shallow copy of a group's fields, without its caches (its data will change)."""
    return dataclasses.replace(g, moments=None, weighted=None, features={})


def _take_rows(g: Group, infos: Mapping[str, SiteInfo]) -> None:
    """Set a group's per-row roles, data and mask from its ``sites``' infos."""
    g.roles = [infos[n].roles for n in g.sites]
    if g.data is not None:
        data = torch.cat([infos[n].data for n in g.sites])
        g.data = data.long() if g.family == "categorical" else data
    if g.mask is not None:
        g.mask = torch.cat([infos[n].mask for n in g.sites])
