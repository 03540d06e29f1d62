"""The pieces of a compiled model: free variables, enumerated variables, factor groups, and
the canonical layout every factor table is kept in.

Traced once under :func:`pyro.poutine.enum`, a model is a product of factors, one per sample
site: the site's log-density as a table over the enumerated variables it depends on (its
*roles*) and the plates it sits in. Every table sits in one *canonical layout*,
``(rows, role axes..., plate axes...)``: sites that compute the same thing for different
variables (the 500 emission sites of a ``pyro.markov`` HMM, say) are stacked as rows of one
:class:`Group` and computed in one vectorised call. A group's table is computed in one of
three ways, decided once per fit (:mod:`jointkl.inference.em.compile`):

``recipe``  the site's distribution is one of the families of
            :mod:`jointkl.inference.em.families` whose parameters are free variables indexed
            by enumerated values (``locs[z]``, ``trans[z_prev]``, ``weights``) or constants.
            The table is recomputed from θ without running the model, and the closed-form
            M-steps (:mod:`jointkl.inference.em.mstep`) read the recipe.
``fixed``   the distribution does not depend on θ (a prior of a MAP global, a known noise
            model): the table is constant, or the prior's log-density at the global's value.
``traced``  anything else: the table is read from a fresh trace of the model at θ.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.distributions import Distribution, biject_to

from jointkl.errors import InputError

if TYPE_CHECKING:
    from jointkl.inference.em.gaussian import GaussianMoments

__all__ = [
    "Free",
    "Var",
    "Slot",
    "Group",
    "transform_for",
    "site_log_prob",
    "plates_of",
    "site_axes",
    "canonical",
    "index_part",
    "index_part_adjoint",
    "role_index",
]


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
    enumerated variables ``roles[r]``. Tables are ``(rows, *cards, *plate_sizes)``.

    ``moments``, ``weighted`` and ``features`` are caches of the linear fast paths
    (:mod:`jointkl.inference.em.gaussian`): the data's moment features, and the last
    weighted sums of them with the weights tensor they were computed for. Each records what
    it was computed from, so a group whose ``data`` are replaced (stacking) recomputes it.
    """

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
    moments: GaussianMoments | None = field(default=None, repr=False, compare=False)
    weighted: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )
    # Other linear-feature caches ("diagonal": [(x-c)^2, x-c, 1]; "bernoulli": [x, 1]), each
    # (data it was computed from, features, weights tensor, weighted sums or None).
    features: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return len(self.sites)

    @property
    def n_axes(self) -> int:
        return len(self.cards) + len(self.plates)


def transform_for(constraint: Any) -> torch.distributions.transforms.Transform:
    """Unconstrained -> constrained map of a free variable: a bijection where torch has one,
    else the transform Pyro's param store uses (e.g. lower_cholesky ignores the upper part)."""
    try:
        return biject_to(constraint)
    except NotImplementedError:
        return torch.distributions.transform_to(constraint)


def site_log_prob(site: Mapping[str, Any]) -> torch.Tensor:
    """A site's factor as Pyro's TraceEnum_ELBO sees it: an enumerated latent's own
    log-density is taken unscaled and unmasked (Pyro applies masks and scales to the factors
    of observations and other sites only); every other site's is scaled and masked."""
    if site["infer"].get("_enumerate_dim") is not None and not site["is_observed"]:
        return site["unscaled_log_prob"]
    return site["log_prob"]


def plates_of(site: Mapping[str, Any]) -> list[Any]:
    """The vectorised plates a site sits in."""
    return [f for f in site["cond_indep_stack"] if f.vectorized]


def site_axes(
    site: Mapping[str, Any],
    roles: tuple[str, ...],
    plates: tuple[str, ...],
    var_symbol: Mapping[str, str],
    plate_dims: Mapping[str, int],
) -> dict[str, int]:
    """symbol -> canonical axis, for one site of a symbolised trace.

    :param roles: the enumerated variables of the table (its first axes).
    :param plates: the plates of the table (its last axes).
    :param var_symbol: each enumerated variable's symbol in that trace.
    :param plate_dims: each plate's (negative) batch dim.
    """
    d2s = site["infer"]["_dim_to_symbol"]
    out = {var_symbol[r]: i for i, r in enumerate(roles)}
    for j, p in enumerate(plates):
        out[d2s[plate_dims[p]]] = len(roles) + j
    return out


def canonical(
    t: torch.Tensor,
    n_trail: int,
    dim_to_symbol: Mapping[int, str],
    sym_to_axis: Mapping[str, int],
    n_axes: int,
    where: str,
) -> torch.Tensor:
    """Move a tensor from Pyro's layout (batch dims at global negative positions: plates and
    enumeration dims) to ``(1, *axes, *trailing)``; dims of size 1 become broadcast axes.

    :param n_trail: trailing (event or parameter) dims that are kept as they are.
    :param where: the site's name, for the error message.
    """
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
    a recipe; the view is applied by the family). ``value`` may carry extra trailing dims.

    :param which: which of the slot's free variables ``value`` is.
    :param role_index: :func:`role_index` of the group.
    """
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


def index_part_adjoint(
    slot: Slot,
    which: int,
    shape: tuple[int, ...],
    grad: torch.Tensor,
    role_index: list[torch.Tensor],
    n_axes: int,
) -> torch.Tensor:
    """The adjoint of :func:`index_part` for a variable of shape ``shape``: ``grad`` (in
    canonical layout, broadcast over any of its axes) summed back onto the cells of ``V`` it
    was gathered from, i.e. the vector-Jacobian product of ``V -> V[index]`` at ``grad``.

    Written out rather than taken by ``torch.autograd.grad`` (the M-step maps statistics
    back this way several times per iteration; autograd's graph costs more than the sums):
    ``grad`` is summed to the gather's output shape, the padding and leading reshapes are
    undone, and the gathered cells are scattered back with accumulation (cells read by
    several table entries, tied or shared parameters, receive the sum), which is what the
    backward of an advanced index computes.
    """
    idx = slot.index[which]
    n_idx = len(idx)
    if idx:
        ix = tuple(
            (role_index[a] if kind == "role" else torch.tensor(a)).to(grad.device)
            for kind, a in idx
        )
        nb = max(i.dim() for i in ix)  # the indices' broadcast shape (torch's own is slow)
        bshape = [1] * nb
        for i in ix:
            for a, n in enumerate(i.shape, start=nb - i.dim()):
                bshape[a] = max(bshape[a], n)
        gathered = tuple(bshape) + tuple(shape[n_idx:])
        lead = len(gathered) - (len(shape) - n_idx)
        t_shape = (1,) * max(0, 1 + n_axes - lead) + gathered
    else:
        t_shape = (1,) * (1 + n_axes) + tuple(shape)
    pad = slot.pad[which]
    out_shape = t_shape
    if pad:
        trail = len(shape) - n_idx
        cut = len(t_shape) - trail
        out_shape = t_shape[:cut] + (1,) * pad + t_shape[cut:]
    g = grad.sum_to_size(out_shape).reshape(t_shape)
    if not idx:
        return g.reshape(shape)
    out = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    return out.index_put_(ix, g.reshape(gathered), accumulate=True)


@functools.lru_cache(maxsize=256)
def role_index(cards: tuple[int, ...], n_axes: int) -> list[torch.Tensor]:
    """``arange(card)`` placed on each role axis of a table with role sizes ``cards`` and
    ``n_axes`` axes in all (canonical layout). Shared and never written to."""
    n = 1 + n_axes
    out = []
    for a, k in enumerate(cards):
        shape = [1] * n
        shape[1 + a] = k
        out.append(torch.arange(k).reshape(shape))
    return out
