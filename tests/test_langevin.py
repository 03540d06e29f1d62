"""Langevin: draws from the right posterior, out of the box, with honest diagnostics."""

from __future__ import annotations

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import Langevin
from jointkl.inference.langevin import LogJoint

from jointkl import InputError

PRIOR_SD, NOISE_SD = 3.0, 2.0


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, NOISE_SD), obs=x)


def poisson_model(x):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Poisson(rate), obs=x)


def normal_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + NOISE_SD * torch.randn(n, generator=g)


def ess(draws: torch.Tensor) -> float:
    return float(az.ess(draws.double().numpy()))


def assert_matches(draws: torch.Tensor, mean: float, var: float) -> None:
    """Sample mean and variance within 4 Monte-Carlo standard errors of the truth (the
    variance's error for a near-Gaussian posterior is var·√(2/ESS))."""
    n_eff = ess(draws)
    assert n_eff > 200, n_eff
    assert abs(draws.mean().item() - mean) < 4 * math.sqrt(var / n_eff)
    assert abs(draws.var().item() - var) < 4 * var * math.sqrt(2 / n_eff)


def test_normal_normal_posterior_mean_variance_and_rhat():
    x = normal_data()
    precision = 1 / PRIOR_SD**2 + len(x) / NOISE_SD**2
    mean, var = (x.sum() / NOISE_SD**2).item() / precision, 1 / precision
    fit = Langevin(num_samples=400, warmup=100, progress=False).fit(normal_model, x)

    draws = fit.samples["mu"]
    assert draws.shape == (4, 400)
    assert_matches(draws, mean, var)
    assert fit.converged and fit.info["max_rhat"] < 1.05
    idata = fit.to_arviz(num_samples=100)
    assert idata.posterior.sizes["chain"] == 4
    assert float(az.rhat(idata)["mu"]) < 1.05
    assert "obs" in idata.log_likelihood


def test_constrained_site_gets_its_jacobian():
    """Gamma–Poisson: the rate is sampled as log-rate, so the log|dT/dθ| term is needed; without
    it the draws would follow Gamma(a − 1, b), a mean shift of 1/b ≈ 6 Monte-Carlo errors."""
    x = torch.tensor([3.0, 1.0, 4.0, 2.0, 2.0])
    a, b = 2.0 + x.sum().item(), 1.0 + len(x)
    fit = Langevin(num_samples=400, warmup=100, seed=1, progress=False).fit(poisson_model, x)
    draws = fit.samples["rate"]
    assert (draws > 0).all()
    assert_matches(draws, a / b, a / b**2)


@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_leimkuhler_matthews_step_is_exact_on_a_gaussian_where_euler_is_not(schedule):
    """Standard normal target, fixed ε = 1.5 with no preconditioner. Euler–Maruyama's
    stationary variance would be 1/(1 − ε/2) = 4; the averaged-noise step gives exactly 1, and
    still does as the polynomial schedule shrinks the step."""

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    engine = Langevin(step_size=1.5, schedule=schedule, num_samples=500, warmup=20, progress=False)
    fit = engine.fit(model)
    assert_matches(fit.samples["z"], 0.0, 1.0)
    assert fit.info["step_size"] == 1.5


def test_minibatch_potential_is_unbiased():
    """Over a partition of the data into batches, the N/B-scaled potentials average to the
    full-data one (the prior counted once per batch, the likelihood N/B times)."""
    x = normal_data(40)
    full = LogJoint(normal_model, (x,), {})
    mini = LogJoint(normal_model, (x,), {}, batch_size=10)
    theta = torch.tensor([0.7])
    parts = [mini.potential(theta, idx) for idx in torch.arange(40).reshape(4, 10)]
    assert torch.stack(parts).mean().item() == pytest.approx(full.potential(theta).item())
    assert not parts[0].item() == pytest.approx(full.potential(theta).item())


def test_minibatch_step_size_keeps_gradient_noise_small():
    x = normal_data(400)
    fit = Langevin(num_samples=10, warmup=20, batch_size=20, num_chains=2, progress=False).fit(
        normal_model, x
    )
    pv = fit.info["gradient_noise_pv"]
    assert pv > 1.0  # batches of 20 of 400 points are noisy ...
    assert fit.info["step_size"] * pv <= 0.05 + 1e-9  # ... so the step is capped


@pytest.mark.parametrize("dim", [3, 20])
def test_jacobi_preconditioner_makes_independent_gaussian_isotropic(dim):
    """For independent coordinates of very different scales, P = 1/diag ∇²U makes the
    preconditioned curvature exactly 1 in every direction (exact diagonal for 3 coordinates,
    Hutchinson's estimator for 20, exact here too as the Hessian is diagonal)."""
    scales = torch.logspace(-2, 2, dim)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(dim), scales).to_event(1))

    fit = Langevin(num_samples=5, warmup=20, num_chains=2, progress=False).fit(model)
    assert fit.info["kappa_max"] == pytest.approx(1.0, rel=1e-3)
    assert fit.state["preconditioner"] == pytest.approx(scales**2, rel=1e-3)


def test_same_seed_same_draws():
    x = normal_data(20)
    kw = dict(num_samples=20, warmup=20, num_chains=2, progress=False)
    a = Langevin(seed=3, **kw).fit(normal_model, x).samples["mu"]
    b = Langevin(seed=3, **kw).fit(normal_model, x).samples["mu"]
    c = Langevin(seed=4, **kw).fit(normal_model, x).samples["mu"]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "settings, match",
    [
        ({"step_size": -0.1}, "step_size"),
        ({"step_size": 0.0}, "step_size"),
        ({"schedule": "cosine"}, "schedule"),
        ({"num_chains": 0}, "num_chains"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"warmup": -1}, "warmup"),
        ({"warmup": 5}, "warmup must be >= 20"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": "0"}, "seed"),
        ({"noise_tolerance": 0.0}, "noise_tolerance"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(InputError, match=match):
        Langevin(**settings)


def test_models_it_cannot_sample_are_refused_before_any_step():
    x = normal_data(20)

    def discrete(x):
        k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(k.float(), 1.0), obs=x)

    def no_latent(x):
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    def local_latent(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def no_plate(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu, 1.0).expand([len(x)]).to_event(1), obs=x)

    quick = dict(num_samples=5, warmup=20, progress=False)
    with pytest.raises(InputError, match="'k' is discrete"):
        Langevin(**quick).fit(discrete, x)
    with pytest.raises(InputError, match="no latent"):
        Langevin(**quick).fit(no_latent, x)
    with pytest.raises(InputError, match="local latent site.*'z'"):
        Langevin(batch_size=5, **quick).fit(local_latent, x)
    with pytest.raises(InputError, match="needs a pyro.plate"):
        Langevin(batch_size=5, **quick).fit(no_plate, x)
    with pytest.raises(InputError, match="data as model arguments"):
        Langevin(batch_size=5, **quick).fit(lambda: normal_model(x))
    with pytest.raises(InputError, match="exceeds the data size 20"):
        Langevin(batch_size=50, **quick).fit(normal_model, x)
    with pytest.raises(InputError, match="NaN"):
        Langevin(**quick).fit(normal_model, torch.tensor([1.0, float("nan")]))
