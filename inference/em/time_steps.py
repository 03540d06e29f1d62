"""Compiling a model of many identical time steps on its first few, then stamping the
factor groups found out over every step.

A ``pyro.markov`` chain of T steps (the zoo :class:`~jointkl.models.HMM`) has sites
``state_t`` and ``obs_t`` for every t; the generic compilation
(:mod:`jointkl.inference.em.compile`) traces all 2T of them three times and classifies each,
which for T = 100 is most of a small fit. A model that declares its steps (the zoo hook
``em_time_steps``, see :func:`compile_by_time_steps`) is compiled instead on its first
``PREFIX_STEPS`` steps, and every group whose rows are the steps ``a..PREFIX_STEPS-1`` of one
site stem is extended to the steps ``a..T-1``: the same recipe, the roles shifted with the
step, the observations and masks of each step read from the declaration. What is stamped is
checked against what the prefix's compilation found (its rows must be exactly what the
declaration gives for those steps), the initial values are the whole data's (the model run
until its first site inside the ``"data"`` plate), and observations must lie in their
distribution's support; when anything does not match, :func:`compile_by_time_steps` returns
``False`` and the model is compiled generically.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import opt_einsum
import torch
from jointkl.inference.em.data_plate_prefix import trace_to_data_plate
from jointkl.inference.em.estep import chain_plan
from jointkl.inference.em.factors import Group, Var

from jointkl.sites import DATA_PLATE

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["compile_by_time_steps", "PREFIX_STEPS"]

# Steps the prefix model has: enough that every step after the first few is a row of a
# stacked group (with 3, Pyro's alternating markov dims leave one step's emission apart).
PREFIX_STEPS = 4


def compile_by_time_steps(
    fm: FactorModel, seed: int, steps: Mapping[str, Any], compiler: type
) -> bool:
    """Fill ``fm`` from a compilation of its first ``PREFIX_STEPS`` steps, stamped over all
    of them; ``False`` (``fm`` untouched) when the declaration does not match the model.

    :param fm: the model on the whole data.
    :param seed: seeds the prefix's probes.
    :param steps: the model's declaration (its ``em_time_steps`` hook on ``fm``'s data):
        ``"steps"`` T; ``"stems"``, the names whose sites ``f"{stem}_{t}"`` repeat per step;
        ``"short"``, ``n -> (args, kwargs)`` the same model's arguments cut to its first n
        steps; ``"values"``, stem -> the observed value of every step stacked on a leading
        axis (``values[stem][t]`` is site ``f"{stem}_{t}"``'s value); ``"masks"``, stem -> the
        sites' masks stacked the same way (a stem left out: unmasked).
    :param compiler: :class:`~jointkl.inference.em.compile.Compiler` (passed in: that module
        imports this one).
    """
    T = int(steps["steps"])
    if T <= PREFIX_STEPS:
        return False
    stems = tuple(steps["stems"])
    pattern = re.compile(rf"^({'|'.join(map(re.escape, stems))})_(\d+)$")
    short = copy.copy(fm)
    short.args, short.kwargs = steps["short"](PREFIX_STEPS)
    try:
        # the whole data's run first, as the generic initial trace runs it (initial values
        # of MAP globals are medians of random draws); the prefix's compilation then leaves
        # torch's random state as that run left it
        whole, size = _whole_data_trace(fm)
        with torch.random.fork_rng(devices=[]):
            c = compiler(short, seed)
            c.run()
        init = _whole_data_init(whole, c)
    except Exception:  # noqa: BLE001 (the generic compilation decides, and says why)
        return False
    if init is None or short.plate_sizes.get(DATA_PLATE) != size:
        return False

    def step_of(name: str) -> tuple[str, int] | None:
        m = pattern.match(name)
        return (m.group(1), int(m.group(2))) if m else None

    # Every enumerated variable is one per step; the prefix must have all of its steps.
    var_steps = [step_of(v) for v in short.vars]
    if any(s is None for s in var_steps) or len(short.vars) != PREFIX_STEPS:
        return False
    stem_v = var_steps[0][0]
    if [s for s in var_steps] != [(stem_v, t) for t in range(PREFIX_STEPS)]:
        return False
    template = short.vars[f"{stem_v}_{PREFIX_STEPS - 1}"]
    groups = []
    for g in short.groups:
        at = [step_of(n) for n in g.sites]
        if all(s is None for s in at):
            if DATA_PLATE in g.plates:  # a per-sequence site: its data were cut too
                return False
            groups.append(g)
            continue
        if any(s is None for s in at) or g.kind != "recipe":
            return False
        stamped = _stamped(g, at, T, stem_v, steps, c)
        if stamped is None:
            return False
        groups.append(stamped)
    fm.free, fm.init = short.free, init
    fm.nesting = short.nesting
    fm.plate_dims, fm.plate_sizes = short.plate_dims, dict(short.plate_sizes)
    fm.plate_order, fm.n_points = short.plate_order, short.n_points
    fm.vars = {
        f"{stem_v}_{t}": Var(f"{stem_v}_{t}", template.card, template.plates) for t in range(T)
    }
    fm.groups = groups
    fm.chain = chain_plan(fm)
    fm.chain_method = "auto"
    fm.plate_symbol = {p: opt_einsum.get_symbol(2 * i) for i, p in enumerate(fm.plate_order)}
    fm.var_symbol = {v: opt_einsum.get_symbol(2 * i + 1) for i, v in enumerate(fm.vars)}
    return True


def _whole_data_trace(fm: FactorModel) -> tuple[Any, int | None]:
    """The model on the whole data run as the initial trace runs it (validation off), stopped
    at its first site inside the data plate (a model's initial values may depend on its
    data), and that plate's size."""
    tr, _, frame = trace_to_data_plate(fm, validate=False)
    return tr, None if frame is None else frame.size


def _whole_data_init(whole: Any, c: Any) -> dict[str, torch.Tensor] | None:
    """θ0 on the whole data, read from its trace ``whole``; ``None`` unless it has the
    prefix's free variables (of compiler ``c``), of the same shapes."""
    init = {}
    for name, free in c.fm.free.items():
        if name not in whole.nodes:
            return None
        v = c.cast(whole.nodes[name]["value"].detach(), free.constraint)
        if v.shape != free.shape:
            return None
        init[name] = v.clone()
    return init


def _stamped(
    g: Group,
    at: list[tuple[str, int]],
    T: int,
    stem_v: str,
    steps: Mapping[str, Any],
    c: Any,
) -> Group | None:
    """Group ``g`` of the prefix (its rows the steps ``at``) over every step, or ``None``
    when its rows are not one stem's steps ``a..PREFIX_STEPS-1`` as declared."""
    stem = at[0][0]
    ts = [t for _, t in at]
    if any(s != stem for s, _ in at) or ts != list(range(ts[0], ts[0] + len(ts))):
        return None
    # each row's roles: the variables of steps t + offset, the same offsets in every row
    offsets = []
    for (_, t), roles in zip(at, g.roles, strict=True):
        off = []
        for r in roles:
            m = re.fullmatch(rf"{re.escape(stem_v)}_(\d+)", r)
            if m is None:
                return None
            off.append(int(m.group(1)) - t)
        offsets.append(tuple(off))
    if len(set(offsets)) != 1 or any(s.const is not None for s in g.slots.values()):
        return None
    if ts[-1] != PREFIX_STEPS - 1:
        return g  # steps at the start only (the first state's own factor)
    new = list(range(ts[0], T))
    if any(not 0 <= t + o < T for t in new for o in offsets[0]):
        return None
    out = copy.copy(g)
    out.slots = copy.deepcopy(g.slots)
    out.sites = [f"{stem}_{t}" for t in new]
    out.roles = [tuple(f"{stem_v}_{t + o}" for o in offsets[0]) for t in new]
    out.moments, out.weighted, out.features = None, None, {}
    if g.value == "data":
        data = _rows(steps["values"].get(stem), g.data, ts, new)
        if data is None or not _in_support(c, g.sites[0], steps["values"][stem]):
            return None
        out.data = data
    elif stem in steps["values"]:
        return None
    masks = steps.get("masks", {}).get(stem)
    if (g.mask is None) != (masks is None):
        return None
    if masks is not None:
        out.mask = _rows(masks, g.mask, ts, new)
        if out.mask is None:
            return None
    return out


def _rows(
    per_step: torch.Tensor | None, prefix: torch.Tensor, ts: list[int], new: list[int]
) -> torch.Tensor | None:
    """``per_step[t]`` laid out as the prefix's rows are, for the steps ``new``; ``None``
    unless that layout gives the prefix's rows exactly."""
    if per_step is None or len(per_step) < new[-1] + 1:
        return None
    shape = prefix.shape[1:]
    if per_step[0].numel() != prefix[0].numel():
        return None
    rows = per_step[new].reshape((len(new),) + shape).to(prefix.dtype)
    if not torch.equal(rows[: len(ts)], prefix):
        return None
    return rows.to(prefix.device)


def _in_support(c: Any, site: str, values: torch.Tensor) -> bool:
    """Whether every step's observations lie in the support of the prefix site ``site``'s
    distribution (the whole data's sites are not run through Pyro's validation)."""
    fn = c.traces[0].nodes[site]["fn"]
    try:
        return bool(fn.support.check(values.to(c.traces[0].nodes[site]["value"].dtype)).all())
    except Exception:  # noqa: BLE001 (a support that cannot check these values: not stamped)
        return False
