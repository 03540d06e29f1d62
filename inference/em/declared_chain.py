"""Compiling a hidden Markov chain that declares its structure, without probing it.

The zoo ``HMM`` declares its identical time steps (``em_time_steps``), and EM compiles its
first few steps and stamps them out (:mod:`jointkl.inference.em.time_steps`); that still
runs and classifies the prefix model three times, most of a small fit's compiling. The
declaration here (the hook ``em_chain``, see :func:`compile_declared_chain`) says the whole
structure instead: T enumerated states ``{stem}_t`` per sequence, the first Categorical with
probabilities ``init``, each later one Categorical with probabilities ``trans[s_{t-1}]``,
and per step an observed site ``{obs}_t`` of one family whose slots are free variables
indexed by the state (``locs[s_t]``, ``emit[s_t]``, identity views), its observations and
masks given per step. The groups are built directly, as the generic compilation groups
them (the initial state's factor, the emissions stacked over the steps, the transitions
stacked over steps 1..T-1), after the globals, read as in
:func:`~jointkl.inference.em.declared_mixture.declared_globals`.

Nothing is probed, so the declaration is trusted: only the zoo model declares one, for its
own ``model``. ``tests/test_em_declared.py`` pins the declared compilation to the probed one
(groups, data, masks, initial values and the fit, bitwise) for every variant the HMM
declares (Gaussian diagonal and categorical emissions, padded sequences, priors or none).
A declaration that does not fit the model's globals (names, shapes) returns ``False``, and
the model is compiled as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from jointkl.inference.em.data_plate_prefix import compiled_or_restored
from jointkl.inference.em.declared_mixture import declared_globals
from jointkl.inference.em.factors import Group, Slot, Var
from jointkl.inference.em.families import FAMILIES

from jointkl.sites import DATA_PLATE

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["compile_declared_chain"]


def compile_declared_chain(fm: FactorModel, declared: Mapping[str, Any]) -> bool:
    """Fill ``fm`` from the model's declaration of its chain; ``False`` (``fm`` untouched,
    torch's random state put back) when the declaration does not fit the model.

    :param fm: the model on its data.
    :param declared: the model's ``em_chain(*args, **kwargs)``: ``"stem"`` (the states'
        site names ``f"{stem}_{t}"``), ``"steps"`` T, ``"states"`` K, ``"init"`` and
        ``"trans"`` (the free variables of the first state's and the transitions'
        probabilities, shapes (K,) and (K, K)), and ``"emission"``: ``"stem"``,
        ``"family"``, ``"slots"`` (slot -> free variable, each ``(K, *event)``),
        ``"event_dims"``, ``"values"`` (every step's observations stacked on a leading
        axis, ``(T, sequences, *event)``) and ``"masks"`` (``(T, sequences)`` booleans, or
        ``None``).
    """
    return compiled_or_restored(_compile, fm, declared)


def _compile(fm: FactorModel, declared: Mapping[str, Any]) -> bool:
    found = declared_globals(fm)
    if found is None:
        return False
    stem, T, K = declared["stem"], int(declared["steps"]), int(declared["states"])
    init, trans, e = declared["init"], declared["trans"], declared["emission"]
    free = found.free
    S = found.plate_sizes[DATA_PLATE]
    if T < 2 or init not in free or trans not in free:
        return False
    if tuple(free[init].shape) != (K,) or tuple(free[trans].shape) != (K, K):
        return False
    family = FAMILIES.get(e["family"])
    values, masks, n_event = e["values"], e["masks"], int(e["event_dims"])
    if family is None or values.shape[:2] != (T, S) or n_event > values.dim() - 2:
        return False
    event = tuple(values.shape[2:])
    for slot, param in e["slots"].items():
        family.slot(slot)  # a KeyError for a slot the family does not have
        if param not in free or tuple(free[param].shape)[:1] != (K,):
            return False
    if masks is not None and tuple(masks.shape) != (T, S):
        return False
    # Observations in their family's support (no Pyro site validates them here).
    if e["family"] == "categorical":
        (param,) = e["slots"].values()
        if values.is_floating_point() or values.numel() == 0:
            return False
        if int(values.min()) < 0 or int(values.max()) >= free[param].shape[-1]:
            return False
    elif e["family"] != "normal" or not bool(torch.isfinite(values).all()):
        return False
    names = [f"{stem}_{t}" for t in range(T)]
    plates = (DATA_PLATE,)
    groups = list(found.priors)
    groups.append(
        Group(
            kind="recipe",
            family="categorical",
            sites=[names[0]],
            roles=[(names[0],)],
            cards=(K,),
            plates=plates,
            shape=(K, S),
            value="own",
            own=0,
            slots={"probs": Slot("identity", (init,), ((),), (0,))},
            depends=frozenset({init}),
        )
    )
    by_state = ((("role", 0),),)
    groups.append(
        Group(
            kind="recipe",
            family=e["family"],
            sites=[f"{e['stem']}_{t}" for t in range(T)],
            roles=[(n,) for n in names],
            cards=(K,),
            plates=plates,
            shape=(K, S),
            value="data",
            slots={k: Slot("identity", (p,), by_state, (0,)) for k, p in e["slots"].items()},
            n_event=n_event,
            data=values.reshape((T, 1, S) + event),
            depends=frozenset(e["slots"].values()),
            mask=None if masks is None else masks.reshape(T, 1, S),
        )
    )
    groups.append(
        Group(
            kind="recipe",
            family="categorical",
            sites=names[1:],
            roles=[(names[t - 1], names[t]) for t in range(1, T)],
            cards=(K, K),
            plates=plates,
            shape=(K, K, S),
            value="own",
            own=1,
            slots={"probs": Slot("identity", (trans,), by_state, (0,))},
            depends=frozenset({trans}),
        )
    )
    found.fill(fm, {n: Var(n, K, plates) for n in names}, groups)
    return True
