"""Finding recipes by probing: which free variables, indexed how, make a distribution parameter.

The model is traced at the initial θ and at a random value of θ (the *probes*). A
distribution parameter is ``view(V[index])`` — a free variable ``V`` indexed by enumerated
values or constants, then a view (:data:`~jointkl.inference.em.families.VIEW_RANK`) — when
it equals that expression in every probe; a random probe makes an accidental match
practically impossible. The comparisons here are the ones the whole compilation uses.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jointkl.inference.em.factors import Free, Slot, Var, canonical
from jointkl.inference.em.families import VIEW_RANK, apply_view
from torch.distributions import constraints

from jointkl.chain import broadcast_shapes

__all__ = ["is_close", "all_close", "RecipeFinder"]

# At most this many index patterns per free variable (the constant indices of a large
# leading dim multiply quickly); constants are tried only for leading dims up to this size.
MAX_PATTERNS = 2048
MAX_CONSTANT_INDEX = 64


def is_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` broadcasts to ``a``'s shape and equals it (to rounding; equal infinities match).

    Plates expand distribution parameters without copying (stride-0 dims): those dims are
    compared once, after checking that ``b`` does not vary along them either.
    """
    try:
        if tuple(broadcast_shapes(tuple(a.shape), tuple(b.shape))) != tuple(a.shape):
            return False
    except RuntimeError:
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


# A candidate recipe: per free variable, (name, ((kind, a), ...) per indexed dim, pad), with
# kind "var" (a is an enumerated variable's name) or "const" (a is an index).
Choice = tuple[tuple[str, tuple[tuple[str, Any], ...], int], ...]


@dataclass
class RecipeFinder:
    """Searches recipes against the probes.

    :param free: the model's free variables.
    :param vars: its enumerated variables.
    :param thetas: θ of each probe trace.
    :param var_values: each probe's enumerated values by variable (Pyro's layout).
    :param sym_to_var: enumeration symbol -> variable, in the first probe.
    :param known: recipes found so far, by ``(family, slot, reinterpreted dims)``: the sites
        of a loop (an HMM's time steps) repeat one, which is tried first.
    """

    free: Mapping[str, Free]
    vars: Mapping[str, Var]
    thetas: Sequence[Mapping[str, torch.Tensor]]
    var_values: Sequence[Mapping[str, torch.Tensor]]
    sym_to_var: Mapping[str, str]
    known: dict[tuple, list[Slot]] = field(default_factory=dict)

    def match(
        self,
        key: tuple,
        tensors: list[torch.Tensor],
        n_trail: int,
        views: tuple[str, ...],
        d2s: Mapping[int, str],
        sym_to_axis: Mapping[str, int],
        roles: tuple[str, ...],
        name: str,
    ) -> Slot | None:
        """A :class:`Slot` reproducing ``tensors`` (the parameter in every probe), or
        ``None`` when no recipe does.

        :param key: ``(family, slot, reinterpreted dims)``, under which a found recipe is
            remembered.
        :param n_trail: the parameter's trailing (non-batch) dims.
        :param views: the views the slot allows.
        :param d2s, sym_to_axis: the site's dim -> symbol and symbol -> canonical axis maps.
        :param roles: the site's enumerated variables; ``name``: the site (for messages).
        """
        n_axes = len(sym_to_axis)
        if all(is_close(tensors[0], t) for t in tensors[1:]):
            const = canonical(tensors[0].detach(), n_trail, d2s, sym_to_axis, n_axes, name)
            return Slot(const=const)
        t0 = tensors[0]
        batch = t0.dim() - n_trail
        slot_vars = []  # the enumerated variables the parameter varies along
        for i in range(batch):
            v = self.sym_to_var.get(d2s.get(i - batch))
            if v is not None and t0.shape[i] > 1:
                slot_vars.append(v)
        if not set(slot_vars) <= set(roles):
            return None
        size = t0.shape[-1] if t0.dim() else None
        for known in self.known.get(key, []):
            if any(kind == "role" and a >= len(roles) for ix in known.index for kind, a in ix):
                continue
            idx = [
                tuple(("var", roles[a]) if kind == "role" else (kind, a) for kind, a in ix)
                for ix in known.index
            ]
            choice = tuple(zip(known.params, idx, known.pad, strict=True))
            if self.reproduces_all(choice, known.view, tensors, size):
                return known
        # A match that pads the variable's dims is kept only if no view matches without:
        # with D = 1 a (K, 1) vector of standard deviations also reproduces a 1 x 1 Cholesky
        # factor read as a padded matrix, and only the unpadded reading is its real shape.
        found: Slot | None = None
        for view in views:
            for combo in self.param_combos(view):
                for choice in self.patterns(combo, VIEW_RANK[view], n_trail, slot_vars):
                    if self.reproduces_all(choice, view, tensors, size):
                        slot = _slot(view, choice, roles)
                        if not any(slot.pad):
                            found = slot
                        elif found is None:
                            found = slot
                            continue
                        break
                else:
                    continue
                break
            if found is not None and not any(found.pad):
                break
        if found is not None:
            self.known.setdefault(key, []).append(found)
        return found

    def reproduces_all(
        self, choice: Choice, view: str, tensors: list[torch.Tensor], size: int | None
    ) -> bool:
        """Does the recipe give the parameter in every probe?"""
        return all(self.reproduces(choice, view, t, k, size) for k, t in enumerate(tensors))

    def reproduces(
        self, choice: Choice, view: str, target: torch.Tensor, k: int, size: int | None
    ) -> bool:
        """Does the recipe ``choice`` give ``target`` in probe ``k`` (Pyro's layout)?"""
        theta, var_values = self.thetas[k], self.var_values[k]
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
        return is_close(target, cand)

    def param_combos(self, view: str) -> list[tuple[str, ...]]:
        """Free variables (pairs for scaled_corr) that could feed ``view``."""
        names = list(self.free)
        if view == "scaled_corr":
            corr = [n for n in names if self.free[n].constraint is constraints.corr_cholesky]
            return [(a, b) for b in corr for a in names if a != b]
        return [(n,) for n in names]

    def patterns(
        self, combo: tuple[str, ...], offsets: tuple[int, ...], n_trail: int, slot_vars: list[str]
    ) -> list[Choice]:
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
                    if shape[j] <= MAX_CONSTANT_INDEX:
                        c += [("const", i) for i in range(shape[j])]
                    choices.append(c)
                for idx in itertools.product(*choices):
                    if {a for kind, a in idx if kind == "var"} != set(slot_vars):
                        continue
                    opts.append((pname, tuple(idx), pre - trail))
                    if len(opts) > MAX_PATTERNS:
                        break
            per_param.append(opts)
        out = list(itertools.product(*per_param))
        if len(combo) == 2:  # scales and correlations must be indexed the same way
            out = [c for c in out if c[0][1] == c[1][1]]
        return out


def _slot(view: str, choice: Choice, roles: tuple[str, ...]) -> Slot:
    """The :class:`Slot` of a matched recipe (variables by role position, not by name)."""
    index = tuple(
        tuple(("role", roles.index(a)) if kind == "var" else ("const", a) for kind, a in idx)
        for _, idx, _ in choice
    )
    return Slot(
        view=view,
        params=tuple(p for p, _, _ in choice),
        index=index,
        pad=tuple(pad for _, _, pad in choice),
    )
