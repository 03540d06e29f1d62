"""The SVI step's fast path: ReparamELBO equals Pyro's ELBOs; FusedPyroOptim equals PyroOptim."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.optim
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference.reparam_elbo import ReparamELBO
from jointkl.models import VAE
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from jointkl.minibatch import ScaleDataPlate
from jointkl.optim.fused_pyro import FusedPyroOptim


def _vae_case():
    torch.manual_seed(0)
    vae = VAE(3, hidden=16, input_dim=12)
    x = (torch.rand(20, 12) > 0.5).double()
    for net in (vae.encoder, vae.decoder):
        net.double()
    # A mini-batch scale and a mask, as the engine and users wrap models.
    model = ScaleDataPlate(4.0)(vae.model)
    guide = ScaleDataPlate(4.0)(vae.guide)
    return model, guide, (x,)


def _regression_case():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 10.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)), poutine.mask(mask=x > -1.5):
            pyro.sample("obs", dist.Normal(w * x, s), obs=y)

    x = torch.linspace(-2, 2, 30, dtype=torch.float64)
    y = 1.7 * x + 0.1 * torch.randn(30, generator=torch.Generator().manual_seed(0)).double()
    # AutoNormal: auxiliary unconstrained sites and Delta sites with a log-Jacobian.
    return model, AutoNormal(model), (x, y)


@pytest.mark.parametrize("case", [_vae_case, _regression_case])
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_reparam_elbo_equals_pyro_elbo_and_its_gradient(case, analytic_kl):
    pyro.clear_param_store()
    model, guide, args = case()
    pyro.set_rng_seed(0)
    general = (TraceMeanField_ELBO if analytic_kl else Trace_ELBO)()
    general.loss(model, guide, *args)  # create the params
    params = list(pyro.get_param_store().values())
    fast = ReparamELBO(analytic_kl=analytic_kl)
    fast.loss(model, guide, *args)  # its first call is the general one (validation)
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        want = general.loss_and_grads(model, guide, *args)
        want_grads = [p.unconstrained().grad.clone() for p in params]
        for p in params:
            p.unconstrained().grad = None
        pyro.set_rng_seed(seed)
        got = fast.loss_and_grads(model, guide, *args)
        assert fast.reparameterised
        # what the engine steps: every param the two programs touched, once
        touched = [id(p) for p in fast.last_params]
        assert sorted(touched) == sorted(id(p.unconstrained()) for p in params)
        assert got == pytest.approx(want, rel=1e-6)
        for p, g in zip(params, want_grads, strict=True):
            torch.testing.assert_close(p.unconstrained().grad, g, rtol=1e-5, atol=1e-6)
            p.unconstrained().grad = None


def test_score_function_guides_are_handed_to_pyro_with_the_same_draws():
    def model(y):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Bernoulli(p), obs=y)

    def guide(y):
        k = pyro.param("k", torch.tensor(0.3))
        # no rsample: a score-function term
        c = pyro.sample("c", dist.Bernoulli(torch.sigmoid(k)), infer={"is_auxiliary": True})
        pyro.sample("p", dist.Beta(2.0 + c, 2.0))

    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    pyro.clear_param_store()
    fast, general = ReparamELBO(), Trace_ELBO()
    fast.loss(model, guide, y)
    for seed in (3, 4):
        pyro.set_rng_seed(seed)
        want = general.loss(model, guide, y)
        pyro.set_rng_seed(seed)
        assert fast.loss(model, guide, y) == want
        assert not fast.reparameterised


def _adam_pair():
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    return a, b


def _register(params, prefix):
    store = pyro.get_param_store()
    for i, p in enumerate(params):
        store._params[f"{prefix}{i}"] = p  # the store names params for get_state
        store._param_to_name[p] = f"{prefix}{i}"
        store._constraints[f"{prefix}{i}"] = dist.constraints.real


def test_fused_optimiser_equals_per_param_optimisers_and_shares_their_checkpoints():
    pyro.clear_param_store()
    a, b = _adam_pair()
    _register(a, "a")
    _register(b, "b")
    fused = FusedPyroOptim(torch.optim.Adam, {"lr": 0.1})
    single = pyro.optim.PyroOptim(torch.optim.Adam, {"lr": 0.1})
    for step in range(5):
        for p, q in zip(a, b, strict=True):
            g = torch.full_like(p, float(step + 1)) * torch.arange(p.numel()).reshape(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        # only the first tensor moves on odd steps: the other keeps its state untouched
        fused(a if step % 2 == 0 else a[:1])
        single(b if step % 2 == 0 else b[:1])
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # Checkpoints are interchangeable: PyroOptim's format, one state dict per param name.
    state = {k.replace("a", "b"): v for k, v in fused.get_state().items()}
    assert set(state) == set(single.get_state())
    resumed = FusedPyroOptim(torch.optim.Adam, {"lr": 0.1})
    resumed.set_state(single.get_state())
    for p, q in zip(a, b, strict=True):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    resumed(b)
    fused(a)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fused_adam_kernel_follows_per_param_adam_to_rounding():
    """The engine's Adam (one fused kernel for all tensors) makes PyroOptim's updates."""
    pyro.clear_param_store()
    a, b = _adam_pair()
    _register(a, "a")
    _register(b, "b")
    start = [p.detach().clone() for p in a]
    fused = FusedPyroOptim(torch.optim.Adam, {"lr": 0.1, "fused": True})
    single = pyro.optim.PyroOptim(torch.optim.Adam, {"lr": 0.1})
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for p, q in zip(a, b, strict=True):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused(a)
        single(b)
    assert fused._optim.param_groups[0]["fused"]
    for p, q, p0 in zip(a, b, start, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert (p - p0).abs().min() > 0.01  # every entry moved: the comparison can fail


def test_a_repeated_site_after_the_first_step_gets_pyros_own_error():
    """The one-handler pass does not check the traces itself: anything outside the plain
    case goes to Pyro's class, whose message names the mistake."""
    calls = []

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        calls.append(1)
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))
        if len(calls) > 1:  # the structure changes after the first (validated) call
            pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    fast = ReparamELBO()
    fast.loss_and_grads(model, guide)
    assert fast.last_params == [pyro.param("loc").unconstrained()]
    with pytest.raises(RuntimeError, match="Multiple sample sites named 'z'"):
        fast.loss_and_grads(model, guide)
    assert not fast.reparameterised


def _vae_case_unscaled():
    torch.manual_seed(0)
    vae = VAE(3, hidden=16, input_dim=12)
    x = (torch.rand(20, 12) > 0.5).double()
    for net in (vae.encoder, vae.decoder):
        net.double()
    return vae.model, vae.guide, (x,)


@pytest.mark.parametrize("case", [_vae_case_unscaled, _regression_case])
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_data_scale_equals_pyro_elbo_on_the_scaled_data_plate(case, analytic_kl):
    """The engine hands ReparamELBO the unwrapped model and guide with data_scale = N/B: the
    loss and gradients are Pyro's ELBO on ScaleDataPlate(N/B)-wrapped ones (the global
    sites unscaled), including its first, general call."""
    pyro.clear_param_store()
    model, guide, args = case()
    scaled_model, scaled_guide = ScaleDataPlate(4.0)(model), ScaleDataPlate(4.0)(guide)
    general = (TraceMeanField_ELBO if analytic_kl else Trace_ELBO)()
    fast = ReparamELBO(analytic_kl=analytic_kl)
    fast.data_scale = 4.0
    general.loss(model, guide, *args)  # create the params (an autoguide draws as it does)
    pyro.set_rng_seed(0)
    first = fast.loss(model, guide, *args)  # the general class, on the scaled pair
    pyro.set_rng_seed(0)
    assert first == pytest.approx(general.loss(scaled_model, scaled_guide, *args), rel=1e-6)
    params = list(pyro.get_param_store().values())
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        want = general.loss_and_grads(scaled_model, scaled_guide, *args)
        want_grads = [p.unconstrained().grad.clone() for p in params]
        for p in params:
            p.unconstrained().grad = None
        pyro.set_rng_seed(seed)
        got = fast.loss_and_grads(model, guide, *args)
        assert fast.reparameterised
        assert got == pytest.approx(want, rel=1e-6)
        unscaled = general.loss(model, guide, *args)
        assert abs(got - unscaled) > 1e-3 * abs(got)  # the factor did change the loss
        for p, g in zip(params, want_grads, strict=True):
            torch.testing.assert_close(p.unconstrained().grad, g, rtol=1e-5, atol=1e-6)
            p.unconstrained().grad = None
