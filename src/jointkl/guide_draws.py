"""Independent draws from a fitted guide: all at once under a plate of draws, or one by one.

Running the guide once per draw repeats all of its deterministic work each time: a VAE's or
InfoMax's encoder over every image, 400 times for 4 chains × 100 draws (InfoMax on the
digits: ~30 s of a conversion). Pyro's ``Predictive(parallel=True)`` instead runs the
guide once inside a plate of size ``total`` to the left of every plate the model and guide
use: the encoder's outputs do not depend on the draw, and each sample site draws
``total`` values at once.

Whether a guide may run so is checked, not assumed: the batched run's values must have the
one-draw shapes behind a draws dimension of size ``total``, and at its first and last draw
each site's log-density under the batched run must equal its log-density under a plain
one-draw run of the guide conditioned on that draw's values (every sample site, auxiliary
ones included). A guide that fails (it indexes its parameters in a way a batch dimension
breaks, say) is run one draw at a time, from the random state the attempt started from (the same
numbers as a plain loop). The two ways consume the random stream differently: both give
independent draws from the guide, not the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from pyro.util import get_rng_state, set_rng_state

from jointkl.sites import max_plate_nesting

__all__ = ["guide_draws"]

_DRAWS = "_jointkl_guide_draws"
_ERRORS = (ValueError, RuntimeError, IndexError, TypeError, NotImplementedError)


def _sites(tr) -> dict[str, Any]:
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def _rows(value: torch.Tensor, shape: tuple[int, ...], total: int) -> torch.Tensor:
    """A batched value as ``(total, *shape)``; ValueError where it has no draws dimension."""
    event = len(shape)
    if value.dim() < event or tuple(value.shape[value.dim() - event :]) != shape:
        raise ValueError(f"shape {tuple(value.shape)} does not end in {shape}")
    lead = value.shape[: value.dim() - event]
    if lead.numel() != total or (total > 1 and lead[0] != total):
        raise ValueError(f"shape {tuple(value.shape)} has no draws dimension of size {total}")
    return value.reshape(total, *shape)


def _batched(
    guide: Callable, args: tuple, kwargs: Mapping[str, Any], one, total: int
) -> dict[str, torch.Tensor] | None:
    """Every sample site of ``guide`` drawn ``total`` times in one run, ``(total, *shape)``,
    or None where the run or its check fails (see the module docstring)."""
    nesting = max_plate_nesting(one)
    one_sites = _sites(one)
    try:
        with pyro.plate(_DRAWS, total, dim=-(nesting + 1)):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)
        sites = _sites(tr)
        if set(sites) != set(one_sites):
            return None
        rows = {
            n: _rows(s["value"], tuple(one_sites[n]["value"].shape), total)
            for n, s in sites.items()
        }
        batch_lp = {
            n: _rows(
                s["fn"].log_prob(s["value"]).expand(s["fn"].batch_shape),
                tuple(one_sites[n]["fn"].batch_shape),
                total,
            )
            .reshape(total, -1)
            .sum(-1)
            for n, s in sites.items()
        }
        for r in sorted({0, total - 1}):
            cond = poutine.condition(guide, data={n: v[r] for n, v in rows.items()})
            single = poutine.trace(cond).get_trace(*args, **kwargs)
            for n, s in _sites(single).items():
                lp = s["fn"].log_prob(s["value"]).sum().double()
                b = batch_lp[n][r].double()
                if not torch.allclose(b, lp, rtol=1e-4, atol=1e-5 * (1 + lp.abs().item())):
                    return None
    except _ERRORS:
        return None
    return rows


def guide_draws(
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    names: Iterable[str],
    total: int,
) -> dict[str, torch.Tensor]:
    """``total`` independent draws of the guide's sample sites ``names``, ``(total, *shape)``
    (sites of ``names`` the guide does not sample are left out), from the current RNG state.

    :param guide: the fitted guide (its params in Pyro's param store).
    :param args: the model's (and guide's) data arguments; ``kwargs`` likewise.
    :param names: the model's latent sites to keep.
    :param total: the number of draws.
    """
    names = set(names)
    with torch.no_grad():
        one = poutine.trace(guide).get_trace(*args, **kwargs)
        keep = [n for n in _sites(one) if n in names]
        if not keep:
            return {}
        if total > 1:
            state = get_rng_state()
            rows = _batched(guide, args, kwargs, one, total)
            if rows is not None:
                return {n: rows[n] for n in keep}
            # the failed attempt's draws are not used: the loop gives what it always gave
            set_rng_state(state)
        draws = [{n: one.nodes[n]["value"] for n in keep}]
        for _ in range(total - 1):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)
            draws.append({n: tr.nodes[n]["value"] for n in keep})
    return {n: torch.stack([d[n] for d in draws]) for n in keep}
