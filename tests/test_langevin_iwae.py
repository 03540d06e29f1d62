"""Langevin's pointwise log-likelihood of a model with per-datum latents is an importance-
sampled log p(x_i) (IWAE, proposal moment-matched to the chains' draws), checked against
the exact marginal of a linear-Gaussian model; not log p(x_i | z_i) at each draw."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from jointkl.inference import Langevin

from jointkl.moment_guide import moment_guide

W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]])
B = torch.tensor([0.5, -0.2, 0.1])
SIGMA = 0.7


def linear_gaussian(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + B, SIGMA).to_event(1), obs=x)


def test_langevin_log_likelihood_is_the_marginal_of_each_point():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 2, generator=g) @ W.T + B + SIGMA * torch.randn(15, 3, generator=g)
    fit = Langevin(num_samples=300, warmup=100, num_chains=2, progress=False, seed=0).fit(
        linear_gaussian, x
    )
    idata = fit.to_arviz(iwae_k=2000)
    ll = idata.log_likelihood
    assert ll.attrs["pointwise"] == "iwae" and ll.attrs["iwae_k"] == 2000
    values = ll["x"].values
    assert values.shape == (2, 300, 15)
    assert (values == values[:1, :1]).all()  # one estimate of log p(x_i), not per draw
    exact = dist.MultivariateNormal(B, W @ W.T + SIGMA**2 * torch.eye(3)).log_prob(x)
    np.testing.assert_allclose(values[0, 0], exact.numpy(), atol=0.02)
    # the conditional log p(x_i | z_i) at a draw is not it (it is larger: no prior cost)
    z = fit.samples["z"][0, 0]
    conditional = dist.Normal(z @ W.T + B, SIGMA).to_event(1).log_prob(x)
    assert (conditional - exact).abs().mean() > 0.3


def test_moment_guide_declines_sites_a_normal_cannot_propose():
    def positive(x):
        with pyro.plate("data", x.shape[0]):
            r = pyro.sample("r", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Poisson(r), obs=x)

    x = torch.tensor([1.0, 3.0, 0.0])
    assert moment_guide(positive, (x,), {}, {"r": torch.ones(2, 5, 3)}) is None

    def global_only(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    assert moment_guide(global_only, (x,), {}, {"mu": torch.zeros(2, 5)}) is None
    assert moment_guide(global_only, (x,), {}, {}) is None
