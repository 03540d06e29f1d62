"""AutoNormal's step computed without Pyro's per-call machinery equals Pyro's own."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference import SVI
from jointkl.inference.reparam_elbo import ReparamELBO, _AutoNormalSites
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal


def _model(x, y):
    # an event-shaped latent, a positive one (log-Jacobian), a simplex one (a transform that
    # changes the event size), a per-datum latent in the data plate
    zero, one = x.new_zeros(()), x.new_ones(())
    w = pyro.sample("w", dist.Normal(zero, one).expand([x.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(zero, one))
    p = pyro.sample("p", dist.Dirichlet(x.new_ones(3)))
    with pyro.plate("data", len(x)):
        u = pyro.sample("u", dist.Normal(zero, one))
        pyro.sample("y", dist.Normal(x @ w + p[0] * u, s), obs=y)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64)
    return x, x @ torch.arange(1.0, 5.0, dtype=torch.float64) + 0.3


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_autonormal_sites_give_pyros_elbo_and_gradients_at_the_same_seed(analytic_kl):
    pyro.clear_param_store()
    args = _data()
    guide = AutoNormal(_model)
    general = (TraceMeanField_ELBO if analytic_kl else Trace_ELBO)()
    pyro.set_rng_seed(0)
    general.loss(_model, guide, *args)  # create the params
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    with torch.no_grad():  # move off the initial values so every gradient is non-trivial
        for i, p in enumerate(params):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    fast = ReparamELBO(analytic_kl=analytic_kl)
    fast.loss(_model, guide, *args)  # first call: Pyro's class
    for seed in (1, 2, 3):
        pyro.set_rng_seed(seed)
        want = general.loss_and_grads(_model, guide, *args)
        want_grads = [p.grad.clone() for p in params]
        after_want = torch.randn(())
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        got = fast.loss_and_grads(_model, guide, *args)
        assert torch.randn(()) == after_want  # the same draws consumed, in the same order
        assert fast._autonormal is not None and fast.reparameterised  # the fast sites ran
        assert sorted(map(id, fast.last_params)) == sorted(map(id, params))
        assert got == pytest.approx(want, rel=1e-10)
        for p, g in zip(params, want_grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
            p.grad = None


def test_autonormal_sites_equal_the_guide_run_through_pyro():
    """Against the same ELBO with the guide run through Pyro (the generic pass): the same
    loss bit for bit; gradients to rounding (autograd may add the paths in another order)."""
    pyro.clear_param_store()
    args = _data()
    guide = AutoNormal(_model)
    fast, slow = ReparamELBO(), ReparamELBO()
    fast.loss(_model, guide, *args)
    slow.loss(_model, guide, *args)
    slow._planned_for = guide  # the plan is never built: the guide goes through Pyro
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    for seed in (4, 5):
        results = []
        for elbo in (slow, fast):
            pyro.set_rng_seed(seed)
            loss = elbo.loss_and_grads(_model, guide, *args)
            results.append((loss, [p.grad.clone() for p in params]))
            for p in params:
                p.grad = None
        assert fast._autonormal is not None and slow._autonormal is None
        assert results[0][0] == results[1][0]
        for a, b in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_guides_autonormal_sites_cannot_reproduce_go_through_pyro():
    pyro.clear_param_store()
    args = _data()

    class Custom(AutoNormal):
        def _get_loc_and_scale(self, name):
            loc, scale = super()._get_loc_and_scale(name)
            return loc, 2 * scale

    guide = Custom(_model)
    elbo = ReparamELBO()
    elbo.loss(_model, guide, *args)
    elbo.loss(_model, guide, *args)
    assert elbo._autonormal is None  # an overridden method: Pyro runs the guide
    plain = AutoNormal(_model)
    elbo = ReparamELBO()
    elbo.loss(_model, plain, *args)
    elbo.loss(_model, plain, *args)
    plan = elbo._autonormal
    assert plan is not None and plan.applies(plain)
    with poutine.scale(scale=3.0):  # a user's handler must see the guide's messages
        assert not plan.applies(plain)
    assert _AutoNormalSites.plan(lambda *a: None) is None


def test_an_svi_fit_with_the_default_guide_uses_the_autonormal_sites_and_equals_pyros(
    monkeypatch,
):
    x, y = _data()
    x, y = x.float(), y.float()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    plans = []
    real_plan = _AutoNormalSites.plan
    monkeypatch.setattr(
        _AutoNormalSites, "plan", classmethod(lambda c, g: plans.append(real_plan(g)) or plans[-1])
    )
    fast = SVI(steps=30, batch_size=10, progress=False, seed=3).fit(model, x, y)
    assert plans and plans[-1] is not None
    monkeypatch.setattr(_AutoNormalSites, "plan", classmethod(lambda c, g: None))
    slow = SVI(steps=30, batch_size=10, progress=False, seed=3).fit(model, x, y)
    assert fast.history == slow.history
    for k, v in slow.params.items():
        assert torch.equal(fast.params[k], v), k
