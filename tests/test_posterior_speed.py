"""The post-fit paths made cheap: the zoo's mixtures and HMM convert in vectorised passes
(checked against the one-draw loop), the Laplace Hessian row by row equals autograd's dense
Hessian, and EM fits a model with a ``pyro.deterministic`` site."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM
from jointkl.models import HMM, BernoulliMixture, GaussianMixture
from pyro.distributions import constraints

from jointkl import inferencedata

laplace_module = importlib.import_module("jointkl.inference.em.laplace")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def vectorised_flags(monkeypatch):
    """Records, per converter pass, whether it ran vectorised."""
    flags = []
    run = inferencedata._Passes.run

    def recording(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        flags.append(self.vectorised)
        return out

    monkeypatch.setattr(inferencedata._Passes, "run", recording)
    return flags


def _blobs(n=40, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0] * d, [3.0] * d])
    return centres[torch.arange(n) % 2] + torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    "model",
    [
        GaussianMixture(2),
        GaussianMixture(2, priors=None),
        GaussianMixture(2, covariance="diag"),
        GaussianMixture(2, covariance="spherical", priors=None),
    ],
    ids=["weak-full", "ml-full", "weak-diag", "ml-spherical"],
)
def test_gaussian_mixture_converts_vectorised(model, vectorised_flags):
    fit = EM(max_iter=5, progress=False).fit(model, _blobs())
    idata = fit.to_arviz(num_samples=5)
    assert vectorised_flags == [True, True]  # log-likelihood, posterior predictive
    assert idata.log_likelihood["obs"].shape == (4, 5, 40)
    assert np.isfinite(idata.log_likelihood["obs"].values).all()


@pytest.mark.parametrize("priors", ["weak", None])
def test_bernoulli_mixture_converts_vectorised(priors, vectorised_flags):
    x = (_blobs(30, 6) > 0).double()
    fit = EM(max_iter=5, progress=False).fit(BernoulliMixture(2, priors=priors), x)
    idata = fit.to_arviz(num_samples=5)
    assert vectorised_flags == [True, True]
    assert idata.log_likelihood["obs"].shape == (4, 5, 30)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"priors": "weak"}, {"emission": "categorical"}, {"priors": "weak", "covariance": "full"}],
    ids=["ml-gauss", "weak-gauss", "ml-categorical", "weak-full"],
)
def test_hmm_converts_vectorised(kwargs, vectorised_flags):
    model = HMM(2, **kwargs)
    g = torch.Generator().manual_seed(1)
    if kwargs.get("emission") == "categorical":
        x = torch.randint(0, 3, (6, 5), generator=g)
    else:
        x = torch.randn(6, 5, 2, generator=g)
    fit = EM(max_iter=3, progress=False).fit(model, x)
    idata = fit.to_arviz(num_samples=4)
    assert vectorised_flags == [True, True]
    assert idata.log_likelihood["obs"].shape == (4, 4, 6)


def test_row_by_row_hessian_equals_the_dense_autograd_hessian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)

    def f(v):
        return -(v @ a @ a.T @ v) / 2 + torch.logsumexp(a @ v, 0) + (v**3).sum()

    v0 = torch.randn(5, generator=g, dtype=torch.float64)
    expected = torch.autograd.functional.hessian(f, v0)
    torch.testing.assert_close(laplace_module._hessian(f, v0), expected)


def test_laplace_factor_of_a_small_mixture_matches_the_dense_hessian(monkeypatch):
    x = (_blobs(30, 4) > 0).double()
    fit = EM(max_iter=20, progress=False).fit(BernoulliMixture(2), x)
    new = laplace_module.laplace(fit)["factor"]
    fit.state.pop("laplace:factor")
    monkeypatch.setattr(
        laplace_module,
        "_hessian",
        lambda f, v0: torch.autograd.functional.hessian(f, v0.detach().clone()),
    )
    old = laplace_module.laplace(fit)["factor"]
    # F F^T is the covariance (the factor's columns are defined up to sign)
    torch.testing.assert_close(new @ new.T, old @ old.T)


def _deterministic_mixture(x):
    w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    pyro.deterministic("gap", locs[1] - locs[0])
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def test_em_fits_a_model_with_a_deterministic_site_and_keeps_it_in_the_posterior():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, generator=g) - 3, torch.randn(50, generator=g) + 3])
    fit = EM(progress=False).fit(_deterministic_mixture, x)
    locs = fit.params["locs"].sort().values
    assert abs(locs[0].item() + 3) < 0.5 and abs(locs[1].item() - 3) < 0.5
    idata = fit.to_arviz(num_samples=10)
    gap = idata.posterior["gap"].values
    assert gap.shape == (4, 10)
    np.testing.assert_allclose(
        gap, idata.posterior["locs"].values[..., 1] - idata.posterior["locs"].values[..., 0]
    )
