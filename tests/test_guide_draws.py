"""Guide draws under a plate of draws: used where the check passes, and a guide that a
batch dimension breaks (loudly or silently) is run one draw at a time instead."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from jointkl import guide_draws as module
from jointkl.guide_draws import guide_draws

LOC = torch.tensor([0.5, -1.0, 2.0])


def _plain_guide():
    w = pyro.sample("w", dist.Normal(torch.tensor(1.0), 0.5))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(LOC * w, 0.1))


def _loud_guide():
    # .item() has no batch dimension to keep: the batched run raises
    w = pyro.sample("w", dist.Normal(torch.tensor(1.0), 0.5))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(LOC * w.item(), 0.1))


def _silent_guide():
    # w.sum() adds up every draw of a batched run: no error, a wrong distribution
    w = pyro.sample("w", dist.Normal(torch.tensor(1.0), 0.5))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(LOC * w.sum(), 0.1))


def _loop(guide, total):
    out = []
    for _ in range(total):
        tr = poutine.trace(guide).get_trace()
        out.append({n: tr.nodes[n]["value"] for n in ("w", "z")})
    return {n: torch.stack([o[n] for o in out]) for n in ("w", "z")}


def _spied(monkeypatch):
    seen = []
    real = module._batched

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(module, "_batched", spy)
    return seen


def test_batched_draws_have_the_guides_distribution(monkeypatch):
    seen = _spied(monkeypatch)
    pyro.set_rng_seed(0)
    d = guide_draws(_plain_guide, (), {}, ["w", "z"], 4000)
    assert seen == [True]
    assert d["w"].shape == (4000,) and d["z"].shape == (4000, 3)
    assert abs(d["w"].mean() - 1.0) < 4 * 0.5 / 4000**0.5
    assert abs(d["w"].std() - 0.5) < 0.03
    # z given w: the draws keep their pairing (z ≈ LOC·w, noise sd 0.1)
    resid = d["z"] - LOC * d["w"].unsqueeze(-1)
    assert abs(resid.std() - 0.1) < 0.01


@pytest.mark.parametrize("guide", [_loud_guide, _silent_guide])
def test_a_guide_that_batching_breaks_runs_one_draw_at_a_time(monkeypatch, guide):
    seen = _spied(monkeypatch)
    pyro.set_rng_seed(3)
    d = guide_draws(guide, (), {}, ["w", "z"], 7)
    assert seen == [False]
    pyro.set_rng_seed(3)
    ref = _loop(guide, 7)
    for n in ("w", "z"):
        torch.testing.assert_close(d[n], ref[n], rtol=0, atol=0)


def test_sites_not_asked_for_are_left_out():
    pyro.set_rng_seed(0)
    d = guide_draws(_plain_guide, (), {}, ["z", "absent"], 5)
    assert list(d) == ["z"] and d["z"].shape == (5, 3)
