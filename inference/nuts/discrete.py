"""Posterior draws of the enumerated discrete latents of a NUTS fit.

NUTS samples the continuous latents θ with the finite discrete latents z summed out of the
potential. The joint posterior p(θ, z | x) = p(θ | x) p(z | x, θ) is completed by drawing,
for each stored draw θ⁽ˢ⁾, one z⁽ˢ⁾ ~ p(z | x, θ⁽ˢ⁾) with Pyro's ``infer_discrete``
(temperature 1: forward filtering, backward sampling over the enumerated factor graph, so
a ``pyro.markov`` chain's states are drawn jointly, not marginal by marginal).

All draws go through one model run inside an outer plate of draws (dimension
−(max_plate_nesting + 1)) when the model broadcasts over it, checked first against one run
per draw at the most probable assignments (temperature 0, which is deterministic); a model
that fails the check, or raises, gets one run per draw.

An observed vector of independent Bernoullis (a Bernoulli mixture's pixels) has its
log-density under enumeration computed as one matrix product
(:mod:`jointkl.bernoulli_log_prob`) as the model runs, so that ``infer_discrete`` does not
expand it to (draws × components × points × dimensions) and take three elementwise
logarithms over all of it: on the digits, 126 of 129 CPU seconds of a 4 × 1,000-draw
``to_arviz``.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate, infer_discrete
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from jointkl.bernoulli_log_prob import fill_site_log_prob
from jointkl.sites import max_plate_nesting, trace_model

__all__ = ["discrete_draws", "enumerated_sites"]

DRAWS_PLATE = "_nuts_discrete_draws"
CHUNK_ELEMENTS = 2**24  # most (site elements × enumerated values) × draws per vectorised run


def enumerated_sites(model, args: tuple, kwargs: dict) -> dict[str, tuple[int, ...]]:
    """The latent sites with a finite discrete support, by name, with their value shapes."""
    tr = trace_model(model, args, kwargs)
    return {
        n: tuple(s["value"].shape)
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and not site_is_subsample(s)
        and not s["is_observed"]
        and s["fn"].support.is_discrete
    }


class MatrixBernoulli(Messenger):
    """Give an observed site that is a vector of independent Bernoullis its ``log_prob``
    (scaled and masked, as Pyro's ``Trace.compute_log_prob`` would) when the model makes it;
    ``compute_log_prob`` then keeps it. Sits outside the model's plates (their scale and mask
    are set by then) and inside the trace. Any other site is left to Pyro."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            fill_site_log_prob(msg)


def _run(model, args, kwargs, values, names, nesting, batch: int | None, temperature: int):
    """{site: value} of the ``names`` drawn by ``infer_discrete`` given the continuous
    ``values`` (batched along an outer plate of ``batch`` draws, or one draw)."""
    cond = poutine.condition(model, data=values)
    dim = -nesting - 1
    if batch is not None:
        inner = cond

        def cond(*a, **k):
            with pyro.plate(DRAWS_PLATE, batch, dim=dim):
                return inner(*a, **k)

        nesting += 1
    fn = infer_discrete(
        config_enumerate(MatrixBernoulli()(cond), default="parallel"),
        first_available_dim=-nesting - 1,
        temperature=temperature,
    )
    with torch.no_grad():
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    return {n: tr.nodes[n]["value"] for n in names}


def _rows(v: torch.Tensor, batch: int, shape: tuple[int, ...], nesting: int) -> torch.Tensor:
    """A value batched along dimension −(nesting + 1) as ``(batch, *shape)``."""
    lead = nesting + 1 - len(shape)
    full = (batch,) + (1,) * (lead - 1) + shape
    v = v.reshape((1,) * max(0, len(full) - v.dim()) + tuple(v.shape))
    return torch.broadcast_to(v, full).reshape(batch, *shape)


def discrete_draws(
    model,
    args: tuple,
    kwargs: dict,
    draws: dict[str, torch.Tensor],
    seed: int,
    temperature: int = 1,
) -> dict[str, torch.Tensor]:
    """One draw of every finite discrete latent per continuous draw.

    :param model: the Pyro model NUTS ran on.
    :param args: its positional data.
    :param kwargs: its keyword data.
    :param draws: the continuous latents' draws by site, each ``(chain, draw, *shape)``.
    :param seed: seeds the discrete draws (Pyro's global generator is restored after).
    :param temperature: 1: z ~ p(z | x, θ); 0: the most probable z given x and θ.
    :returns: ``{site: (chain, draw, *shape)}`` of the discrete sites (long), empty when the
        model has none.
    """
    sites = enumerated_sites(model, args, kwargs)
    if not sites or not draws:
        return {}
    names = list(sites)
    tr = trace_model(model, args, kwargs)
    nesting = max_plate_nesting(tr)
    C, S = next(iter(draws.values())).shape[:2]
    B = C * S
    flat = {n: v.reshape(B, *v.shape[2:]) for n, v in draws.items()}
    shapes = {n: tuple(v.shape[1:]) for n, v in flat.items()}
    # a site's batch dimensions padded to the model's plates, the draws left of them
    pads = {n: nesting - (len(shapes[n]) - tr.nodes[n]["fn"].event_dim) for n in flat}

    def batched(idx: slice) -> dict[str, torch.Tensor]:
        out = {}
        for n, v in flat.items():
            v = v[idx]
            out[n] = v.reshape(v.shape[0], *(1,) * pads[n], *shapes[n])
        return out

    def one_by_one(rows: range, temp: int) -> dict[str, torch.Tensor]:
        outs = [
            _run(
                model, args, kwargs, {n: v[r] for n, v in flat.items()}, names, nesting, None, temp
            )
            for r in rows
        ]
        return {n: torch.stack([o[n].reshape(sites[n]) for o in outs]) for n in names}

    def vectorised(idx: slice, temp: int) -> dict[str, torch.Tensor]:
        k = idx.stop - idx.start
        out = _run(model, args, kwargs, batched(idx), names, nesting, k, temp)
        return {n: _rows(out[n], k, sites[n], nesting) for n in names}

    with pyro.validation_enabled(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fast = min(pads.values()) >= 0 and _vectorisation_holds(vectorised, one_by_one, min(B, 3))
        if fast:
            # an observed site's density is computed for every enumerated value of the
            # assignment it depends on: its elements times the largest support bound it
            per_draw = max(1, _elements(tr) * _largest_support(tr, names))
            chunk = max(1, CHUNK_ELEMENTS // per_draw)
            parts = [
                vectorised(slice(i, min(B, i + chunk)), temperature) for i in range(0, B, chunk)
            ]
            out = {n: torch.cat([p[n] for p in parts]) for n in names}
        else:
            out = one_by_one(range(B), temperature)
    return {n: v.reshape(C, S, *sites[n]).long() for n, v in out.items()}


def _elements(tr) -> int:
    """Elements of all sample sites' values in one run of the model."""
    return sum(
        int(s["value"].numel())
        for s in tr.nodes.values()
        if s["type"] == "sample" and not site_is_subsample(s)
    )


def _largest_support(tr, names: list[str]) -> int:
    """The most values any one enumerated site takes."""
    return max(int(tr.nodes[n]["fn"].enumerate_support(expand=False).shape[0]) for n in names)


def _vectorisation_holds(vectorised, one_by_one, k: int) -> bool:
    """Do the most probable assignments of the first ``k`` draws agree between one run
    over an outer plate of draws and one run per draw?"""
    try:
        fast = vectorised(slice(0, k), 0)
    except Exception:  # any failure of the broadcast run means: use the loop
        return False
    slow = one_by_one(range(k), 0)
    return all(torch.equal(fast[n], slow[n]) for n in slow)
