"""What ``Fit.to_arviz`` says about the posterior: chains, kinds of draws, deterministic
sites, point estimates, vectorised draws, and the VAE's / InfoMax's groups."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM, NCE, SVI, Langevin
from jointkl.models import VAE, GaussianMixture, InfoMax

from jointkl.inferencedata import _Passes

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _xy(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return x, 1.5 * x + 0.3 * torch.randn(n, generator=g)


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.deterministic("w2", 2 * w)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(w * x, s), obs=y)


def test_svi_gives_four_chains_of_independent_guide_draws_with_finite_rhat():
    x, y = _xy()
    fit = SVI(guide="normal", steps=200, lr=0.05, progress=False).fit(regression, x, y)
    idata = fit.to_arviz(num_samples=50)
    assert idata.posterior["w"].shape == (4, 50)
    assert idata.posterior.attrs["draws"] == "independent"
    assert idata.posterior.attrs["method"] == "variational"
    assert idata.log_likelihood.attrs["draws"] == "independent"
    rhat = az.rhat(idata, var_names=["w"])["w"].item()
    assert np.isfinite(rhat) and rhat < 1.1
    # the deterministic site is in the posterior and follows each draw
    np.testing.assert_allclose(idata.posterior["w2"].values, 2 * idata.posterior["w"].values)


def test_vectorised_log_likelihood_matches_the_one_draw_loop():
    x, y = _xy()
    fit = SVI(guide="normal", steps=50, lr=0.05, progress=False).fit(regression, x, y)
    idata = fit.to_arviz(num_samples=6, seed=3)
    w = torch.as_tensor(idata.posterior["w"].values).reshape(-1)
    s = torch.as_tensor(idata.posterior["s"].values).reshape(-1)
    expected = dist.Normal(w[:, None] * x.double(), s[:, None]).log_prob(y.double())
    got = idata.log_likelihood["y"].values.reshape(-1, len(x))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_model_that_indexes_batched_params_falls_back_to_the_loop():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(w[0] * x + w[1], 1.0), obs=y)  # w[0]: a batch breaks

    x, y = _xy(20)
    fit = SVI(guide="normal", steps=30, progress=False).fit(model, x, y)
    base = pyro.poutine.trace(model).get_trace(x, y)
    draws = {"w": fit.posterior_draws(5)["w"].reshape(-1, 2)}
    passes = _Passes(model, (x, y), {}, base, 1, frozenset(), False)
    from jointkl.inferencedata import _pointwise_log_likelihood

    outs = passes.run(
        draws,
        20,
        lambda d, lay: _pointwise_log_likelihood(model, (x, y), {}, d, ["y"], lay, frozenset()),
        lambda out, loop, rows: all(
            torch.allclose(out["y"][r], lo["y"][0]) for r, lo in zip(rows, loop, strict=True)
        ),
    )
    assert passes.vectorised is False
    got = torch.cat([o["y"] for o in outs])
    w = draws["w"]
    expected = dist.Normal(w[:, :1] * x + w[:, 1:], 1.0).log_prob(y)
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)


def test_em_laplace_draws_are_independent_chains():
    from pyro.distributions import constraints

    def model(x):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, generator=g) - 3, torch.randn(40, generator=g) + 3])
    fit = EM(progress=False).fit(model, x)
    idata = fit.to_arviz(num_samples=30)
    post = idata.posterior
    assert post["locs"].shape == (4, 30, 2) and post.attrs["method"] == "laplace"
    assert post.attrs["draws"] == "independent"
    assert float(post["locs"].std(("chain", "draw")).min()) > 0
    assert np.isfinite(az.rhat(idata, var_names=["locs"])["locs"].values).all()


def test_langevin_keeps_every_draw_unless_asked():
    x = torch.randn(30) + 1

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        pyro.deterministic("mu_sq", mu**2)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    fit = Langevin(num_samples=600, warmup=100, num_chains=2, progress=False).fit(model, x)
    idata = fit.to_arviz()
    assert idata.posterior["mu"].shape == (2, 600)
    assert idata.posterior.attrs["draws"] == "markov_chain"
    np.testing.assert_allclose(idata.posterior["mu_sq"].values, idata.posterior["mu"].values ** 2)
    assert fit.to_arviz(num_samples=50).posterior["mu"].shape == (2, 50)


def test_a_point_estimate_computes_its_log_likelihood_once():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    x = torch.randn(25)
    fit = SVI(steps=20, progress=False).fit(model, x)
    idata = fit.to_arviz()
    assert "posterior" not in idata.groups()
    assert idata.log_likelihood["obs"].shape == (1, 1, 25)
    assert idata.log_likelihood.attrs["draws"] == "point_estimate"
    assert idata.posterior_predictive["obs"].shape == (1, 100, 25)


def test_nce_fit_converts_without_a_posterior():
    def model(x):
        a = pyro.param("a", torch.tensor(0.5))
        with pyro.plate("data", len(x)):
            pyro.factor("g", -a * (x**2).sum(-1))

    x = torch.randn(200, 2)
    fit = NCE(steps=20, progress=False).fit(model, x)
    idata = fit.to_arviz()
    assert "posterior" not in idata.groups()
    assert idata.log_likelihood.attrs["draws"] == "point_estimate"
    assert idata.log_likelihood["g"].shape == (1, 1, 200)


def test_default_svi_guide_of_the_mixture_has_posterior_spread():
    gmm = GaussianMixture(2, "diag")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=g) - 3, torch.randn(40, 2, generator=g) + 3])
    fit = SVI(steps=150, lr=0.05, progress=False).fit(gmm, x)
    assert fit.config["resolved_guide"] == "normal"
    idata = fit.to_arviz(num_samples=50)
    assert float(idata.posterior["locs"].std(("chain", "draw")).min()) > 0
    loo = az.loo(idata)
    assert loo.p_loo > 0


def test_infomax_posterior_has_no_stray_variables_and_follows_the_data_plate():
    x = torch.rand(32, 64)
    im = InfoMax(latent_dim=3, hidden=16, critic_hidden=8, channels=(2, 2))
    fit = SVI(steps=2, progress=False).fit(im, x)
    idata = fit.to_arviz(num_samples=5)
    assert list(idata.posterior.data_vars) == ["z"]
    assert idata.posterior["z"].dims == ("chain", "draw", "data", "z_dim_1")


def test_vae_log_likelihood_is_an_importance_sampled_marginal():
    from jointkl.bounds import elbo_per_datum, iwae_per_datum

    x = (torch.rand(30, 16) > 0.5).float()
    vae = VAE(latent_dim=2, hidden=8)
    fit = SVI(steps=20, progress=False).fit(vae, x)
    idata = fit.to_arviz(num_samples=5, iwae_k=32, seed=4)
    ll = idata.log_likelihood
    assert ll.attrs["pointwise"] == "iwae" and ll.attrs["iwae_k"] == 32
    assert ll["x"].shape == (4, 5, 30)
    expected = iwae_per_datum(vae.model, vae.guide, x, k=32, chunk_size=16, seed=4)
    np.testing.assert_allclose(ll["x"].values[0, 0], expected.numpy(), rtol=1e-5)
    # IWAE_32 sits above the ELBO on average (log p(x) >= IWAE_k >= ELBO)
    elbo = elbo_per_datum(vae.model, vae.guide, x, num_samples=32, seed=4)
    assert ll["x"].values[0, 0].mean() > float(elbo.mean())


def test_mirror_entries_of_a_symmetric_posterior_are_drawn_once_and_named(tmp_path):
    from jointkl.diagnostics import draw_plots

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 30, 3, 3))
    sym = a + np.swapaxes(a, -1, -2)  # 6 distinct entries of 9
    d = draw_plots(None, az.from_dict(posterior={"prec": sym}), tmp_path)
    note = next(n for n in d.notes if n.startswith("posterior plots: 3 entries of prec"))
    assert "prec[1, 0] = prec[0, 1]" in note
    assert (tmp_path / "posterior-1.png").is_file() and (tmp_path / "trace.png").is_file()
    assert not (tmp_path / "posterior-2.png").exists()  # 6 panels: one page
