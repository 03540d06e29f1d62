"""A Pyro model with enumerated discrete latents, compiled into factor tables.

EM needs nothing of the model but its factor tables (:mod:`jointkl.inference.em.factors`):

* the **E-step** is a sum-product over them (:mod:`jointkl.inference.em.estep`);
* the **M-step** maximises Q(θ) = Σ_tables ⟨posterior marginal, table(θ)⟩
  (:mod:`jointkl.inference.em.mstep`).

:class:`FactorModel` holds the compiled structure (:mod:`jointkl.inference.em.compile` finds
it) and evaluates the tables at any θ, re-running the model only for ``traced`` groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from jointkl.inference.em import estep
from jointkl.inference.em.compile import compile_model
from jointkl.inference.em.factors import (
    Free,
    Group,
    Var,
    canonical,
    index_part,
    role_index,
    site_axes,
    site_log_prob,
)
from jointkl.inference.em.families import FAMILIES
from jointkl.inference.em.fixed_prior import fixed_prior_log_prob
from pyro.poutine.util import prune_subsample_sites

from jointkl.device import data_device

__all__ = ["FactorModel"]


class FactorModel:
    """A Pyro model compiled into factor groups.

    :param model: the Pyro model.
    :param args, kwargs: the data, passed as ``model(*args, **kwargs)``.
    :param seed: seeds the probes (and nothing else).
    :param dtype: floating dtype of parameter values (initial values are cast to it).
    :param time_steps: the model's declaration of its identical time steps (the zoo hook
        ``em_time_steps``; see :mod:`jointkl.inference.em.time_steps`), or ``None``.
    :param mixture: the model's declaration of its mixture structure (the zoo hook
        ``em_mixture``; see :mod:`jointkl.inference.em.declared_mixture`), or ``None``.
    :param chain: the model's declaration of its hidden Markov chain (the zoo hook
        ``em_chain``; see :mod:`jointkl.inference.em.declared_chain`), or ``None``.

    Compiled structure: ``free`` and ``init`` (θ's variables and initial values), ``vars``
    (the enumerated variables), ``groups`` (the factor groups), ``plate_order``,
    ``plate_dims``, ``plate_sizes``, ``n_points`` (the size of the ``"data"`` plate),
    ``nesting`` (Pyro's max plate nesting), ``chain`` (:func:`~.estep.chain_plan`, or
    ``None``), ``chain_method`` (the chain recursion's scan), ``plate_symbol`` and
    ``var_symbol`` (einsum symbols of the generic contraction).
    """

    free: dict[str, Free]
    init: dict[str, torch.Tensor]
    vars: dict[str, Var]
    groups: list[Group]
    plate_order: list[str]
    plate_dims: dict[str, int]
    plate_sizes: dict[str, int]
    n_points: int
    nesting: int
    chain: dict[str, Any] | None
    chain_method: str
    plate_symbol: dict[str, str]
    var_symbol: dict[str, str]
    # The mixture E-step's (points, K) responsibilities, overwritten by each E-step.
    responsibilities: torch.Tensor | None

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: Mapping[str, Any],
        seed: int = 0,
        dtype: torch.dtype | None = None,
        time_steps: Mapping[str, Any] | None = None,
        mixture: Mapping[str, Any] | None = None,
        chain: Mapping[str, Any] | None = None,
    ):
        self.model, self.args, self.kwargs = model, args, dict(kwargs)
        self.dtype = dtype
        # where the data are (the engine moved them there): every table and statistic
        self.device = data_device(args, kwargs)
        self.responsibilities = None
        compile_model(self, seed, time_steps, mixture, chain)

    # ------------------------------------------------------------------ running the model
    def _substituted(self, theta: Mapping[str, torch.Tensor]) -> Callable:
        params = {k: v for k, v in theta.items() if self.free[k].kind == "param"}
        globs = {k: v for k, v in theta.items() if self.free[k].kind == "global"}
        return poutine.condition(poutine.substitute(self.model, data=params), data=globs)

    def trace(
        self,
        theta: Mapping[str, torch.Tensor],
        enum: bool = True,
        log_prob: Callable[[str, Any], bool] | None = None,
    ):
        """A trace of the model at θ (enumerated, log-densities computed, dims symbolised).

        :param log_prob: ``(name, site) -> bool``: compute only those sites' log-densities
            (``None``: all of them)."""
        m = self._substituted(theta)
        if enum:
            m = poutine.enum(m, first_available_dim=-self.nesting - 1)
        # The first, plain run of the model (in compile) is validated; these repeat it at
        # other parameter values, and Pyro's argument checks would be a third of their time.
        with pyro.validation_enabled(False):
            tr = poutine.trace(m).get_trace(*self.args, **self.kwargs)
            tr = prune_subsample_sites(tr)
            # Log-densities without Pyro's per-site nan/inf warnings (checked by the caller:
            # a non-finite log-likelihood stops the fit).
            tr.compute_log_prob(log_prob or (lambda name, site: True))
        tr.symbolize_dims()
        return tr

    # ------------------------------------------------------------------ tables
    def _g(self, g: int | Group) -> Group:
        return self.groups[g] if isinstance(g, int) else g

    def role_index(self, g: int | Group) -> list[torch.Tensor]:
        """arange(card) placed on each role axis of a group (canonical layout)."""
        g = self._g(g)
        return role_index(g.cards, g.n_axes)

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
            var_symbol = {v: tr.nodes[v]["infer"]["_enumerate_symbol"] for v in self.vars}
        for i in which:
            g = self.groups[i]
            if g.kind == "fixed":
                if g.fn is None:
                    out[i] = g.table
                else:
                    d2s, axes = g.dims
                    lp = fixed_prior_log_prob(g.fn, theta[g.free])
                    out[i] = canonical(lp, 0, d2s, axes, g.n_axes, g.sites[0])
            elif g.kind == "traced":
                site = tr.nodes[g.sites[0]]
                axes = site_axes(site, g.roles[0], g.plates, var_symbol, self.plate_dims)
                out[i] = canonical(
                    site_log_prob(site),
                    0,
                    site["infer"]["_dim_to_symbol"],
                    axes,
                    g.n_axes,
                    g.sites[0],
                )
            else:
                out[i] = self.recipe_table(i, theta)
        return out

    def recipe_table(self, g: int | Group, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A recipe group's table at θ, computed by its family without running the model."""
        g = self._g(g)
        dtype = next(iter(theta.values())).dtype if theta else torch.get_default_dtype()
        x = self.value(g, dtype)
        sv = {k: self.slot_inputs(g, k, theta) for k in g.slots}
        lp = FAMILIES[g.family].log_prob(sv, x, g)
        if g.n_event:
            lp = lp.sum(tuple(range(-g.n_event, 0)))
        if g.mask is not None:  # Pyro's semantics: a masked-out entry scores 0
            lp = torch.where(g.mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        return lp

    # ------------------------------------------------------------------ E-step
    def log_partition(
        self, tables: Mapping[int, torch.Tensor], twice_differentiable: bool = False
    ) -> torch.Tensor:
        """log Σ_z Π tables (see :func:`jointkl.inference.em.estep.log_partition`)."""
        return estep.log_partition(self, tables, twice_differentiable)

    def e_step(
        self, theta: Mapping[str, torch.Tensor], hard: bool = False
    ) -> tuple[float, dict[int, torch.Tensor]]:
        """Log-partition at θ and every table's posterior marginal weights ∂logZ/∂table
        (``hard``: one-hot weights; see :func:`jointkl.inference.em.estep.e_step`)."""
        return estep.e_step(self, theta, hard)

    def _is_mixture(self) -> bool:
        """Whether the E-step takes the mixture path (see :func:`.estep.is_mixture`)."""
        return estep.is_mixture(self)

    def masked(self, weights: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Weights of masked tables times their masks: a masked-out entry is a constant 0 in
        the table, so the M-step must not count it (the padded steps of a short sequence)."""
        out = dict(weights)
        for i, g in enumerate(self.groups):
            if g.mask is not None and i in out:
                out[i] = out[i] * g.mask
        return out

    # ------------------------------------------------------------------ M-step
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
        """The groups whose tables depend on any of the free variables ``names``."""
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
                w = torch.ones(
                    (1,) * len(full), dtype=next(iter(labels.values())).dtype, device=self.device
                )
            out[gi] = w.expand(full)
        return self.masked(out)
