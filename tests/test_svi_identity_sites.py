"""A real-valued AutoNormal latent (identity transform) skips its zero log-Jacobian term in
the pathwise ELBO: the loss, the gradients and a whole fit are the same, to the bit, as with
the transform applied and its zero term subtracted (the path before the shortcut), and as
Pyro's run of the guide to rounding."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import SVI, reparam_elbo
from jointkl.inference.reparam_elbo import ReparamELBO, _AutoNormalSites
from pyro.infer.autoguide import AutoNormal


def _model(x, y):
    # two real-valued latents (a vector and a scalar) and a positive one, which keeps its
    # transform: the shortcut must apply to the first two only
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w + b, s), obs=y)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 + 0.3 * torch.randn(40, generator=g)


def _losses_and_grads(analytic_kl: bool, identity_shortcut: bool | None, monkeypatch):
    """(loss, gradients) at seeds 2 and 3 after moving the params off their start; the guide
    through the fast sites with or without the shortcut, or (None) through Pyro."""
    pyro.clear_param_store()
    args = _data()
    guide = AutoNormal(_model)
    elbo = ReparamELBO(analytic_kl)
    with monkeypatch.context() as m:
        if identity_shortcut is False:
            m.setattr(reparam_elbo, "_is_identity", lambda t: False)
        pyro.set_rng_seed(0)
        elbo.loss(_model, guide, *args)
        if identity_shortcut is None:
            elbo._planned_for = guide  # the plan is never built: the guide goes through Pyro
        elbo.data_scale = 2.5  # the data plate's mini-batch factor too
        params = [p.unconstrained() for p in pyro.get_param_store().values()]
        with torch.no_grad():  # off the initial values, so every gradient is non-trivial
            for i, p in enumerate(params):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        out = []
        for seed in (2, 3):
            pyro.set_rng_seed(seed)
            loss = elbo.loss_and_grads(_model, guide, *args)
            out.append((loss, [p.grad.clone() for p in params]))
            for p in params:
                p.grad = None
    plan = elbo._autonormal
    if identity_shortcut is None:
        assert plan is None
    else:
        identity = {entry[0] for entry in plan.entries if entry[3] is None}
        # s (positive) keeps its exp transform
        assert identity == ({"w", "b"} if identity_shortcut else set())
    return out


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_identity_sites_give_the_same_loss_and_gradients_to_the_bit(analytic_kl, monkeypatch):
    shortcut = _losses_and_grads(analytic_kl, True, monkeypatch)
    transformed = _losses_and_grads(analytic_kl, False, monkeypatch)
    through_pyro = _losses_and_grads(analytic_kl, None, monkeypatch)
    for (loss, grads), (loss0, grads0), (loss1, grads1) in zip(
        shortcut, transformed, through_pyro, strict=True
    ):
        assert loss == loss0 == loss1
        for g, g0, g1 in zip(grads, grads0, grads1, strict=True):
            assert torch.equal(g, g0)
            # Pyro's run of the guide: autograd may add the paths in another order
            torch.testing.assert_close(g, g1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", ["trace", "meanfield"])
def test_a_fit_with_real_valued_latents_is_unchanged_by_the_shortcut(loss, monkeypatch):
    x, y = _data()
    settings = dict(loss=loss, guide="normal", steps=40, batch_size=16, progress=False, seed=5)
    fast = SVI(**settings).fit(_model, x, y)
    with monkeypatch.context() as m:
        m.setattr(reparam_elbo, "_is_identity", lambda t: False)
        transformed = SVI(**settings).fit(_model, x, y)
    assert fast.history == transformed.history
    for k, v in transformed.params.items():
        assert torch.equal(fast.params[k], v), k
    monkeypatch.setattr(_AutoNormalSites, "plan", classmethod(lambda c, g: None))
    slow = SVI(**settings).fit(_model, x, y)  # the guide through Pyro
    torch.testing.assert_close(torch.tensor(fast.history), torch.tensor(slow.history))
