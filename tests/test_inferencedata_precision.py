"""The InferenceData keeps the model's precision (float32 draws stay float32 in memory and
in the netCDF file), and a log-likelihood constant over draws, repeated over a posterior,
still goes through ``az.from_netcdf`` + ``az.loo``."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from jointkl.inference import SVI, Langevin

W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]])


def linear_gaussian(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, 0.7).to_event(1), obs=x)


def regression(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def _data(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(12, 2, generator=g) @ W.T).to(dtype)


def test_float32_draws_and_log_likelihood_stay_float32_through_netcdf(tmp_path):
    x = _data(torch.float32)
    fit = Langevin(num_samples=30, warmup=20, num_chains=2, progress=False, seed=0).fit(
        linear_gaussian, x
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = fit.to_arviz(iwae_k=8)
    assert idata.posterior["z"].dtype == np.float32
    assert idata.log_likelihood["x"].dtype == np.float32
    assert idata.log_likelihood.attrs["constant_over_draws"] == 1
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert back.posterior["z"].dtype == np.float32
    np.testing.assert_array_equal(back.posterior["z"].values, fit.samples["z"].numpy())
    ll = back.log_likelihood["x"].values
    assert ll.shape == (2, 30, 12) and (ll == ll[:1, :1]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(back)  # the file's log-likelihood works with ArviZ's own LOO
    np.testing.assert_allclose(loo.elpd_loo, ll[0, 0].sum(dtype=np.float64), rtol=1e-5)


def test_float64_models_keep_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    fit = SVI(steps=5, progress=False, seed=0).fit(regression, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = fit.to_arviz(num_samples=11)
    assert idata.posterior["w"].dtype == np.float64
    assert idata.log_likelihood["y"].dtype == np.float64
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
