"""The ArviZ converter: parameter draws reach the likelihood, readable variable names, and
the zoo GMM's lazy initialisation."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import torch
from jointkl.inference import EM
from jointkl.models import HMM, GaussianMixture

F64 = torch.float64


def _blobs(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=F64)
    z = torch.randint(3, (n,), generator=g)
    return centres[z] + 0.7 * torch.randn(n, 2, generator=g, dtype=F64)


def test_pointwise_log_likelihood_follows_each_parameter_draw():
    """EM's Laplace draws of pyro.param globals must reach the likelihood: the pointwise
    log-likelihood varies across draws and averages near its value at the estimate."""
    x = _blobs()
    fit = EM(max_iter=30, progress=False).fit(GaussianMixture(3, "full", priors=None), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = fit.to_arviz(num_samples=20, seed=2)
    ll = idata.log_likelihood["obs"].values  # (chain, draw, data)
    assert ll.shape == (4, 20, len(x))  # four chains of independent Laplace draws
    per_draw = ll.sum(-1).ravel()
    assert per_draw.std() > 1e-3, "every draw gave the same log-likelihood"
    # The estimate maximises the likelihood: no draw beats it (up to rounding).
    assert per_draw.max() <= fit.history[-1] + 1e-6
    assert per_draw.mean() > fit.history[-1] - 50.0


def _hmm_run(sequences: int, steps: int, draws: int):
    model = HMM(2, priors=None)
    (x,), _ = model.default_data()
    x = x[:sequences, :steps].to(F64)
    fit = EM(max_iter=5, progress=False).fit(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x, fit, fit.to_arviz(num_samples=draws, seed=0)


def test_markov_chain_log_likelihood_is_one_variable_named_for_its_sites():
    x, fit, idata = _hmm_run(6, 20, 3)
    assert list(idata.log_likelihood.data_vars) == ["obs"]
    assert idata.log_likelihood["obs"].shape == (4, 3, 6)
    total = idata.log_likelihood["obs"].values.sum(-1)
    assert np.all(total <= fit.history[-1] + 1e-6)


def test_gmm_param_initialisation_runs_once(monkeypatch):
    model = GaussianMixture(3, "diag", priors=None)
    calls = []
    original = model.init_values
    monkeypatch.setattr(model, "init_values", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = _blobs()
    pyro.clear_param_store()
    for _ in range(3):
        pyro.poutine.trace(pyro.infer.config_enumerate(model.model)).get_trace(x)
    assert len(calls) == 1


def test_markov_chain_sites_become_one_variable_with_a_step_dimension():
    x, _, idata = _hmm_run(5, 12, 4)
    obs = idata.observed_data["obs"]
    assert obs.dims == ("data", "obs_step", "obs_dim_2")
    np.testing.assert_allclose(obs.values, x.numpy())
    assert idata.posterior_predictive["obs"].shape == (4, 4, 5, 12, 1)
    assert list(idata.observed_data.data_vars) == ["obs"]
