"""NUTS with a dense mass matrix (``dense_mass``): Stan's regularised window covariance,
the draws' moments on a strongly correlated Gaussian, shallower trees than a diagonal
metric there, the compiled leaf, the metric's algebra and bad values."""

from __future__ import annotations

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import NUTS
from jointkl.inference.nuts.adaptation import WindowVariance
from jointkl.inference.nuts.metric import AUTO_MAX_DIM, dense_metric, kinetic, momentum, velocity

from jointkl import InputError

COV = torch.tensor([[1.0, 2.85], [2.85, 9.0]])  # sds 1 and 3, correlation 0.95


def correlated_model():
    pyro.sample("v", dist.MultivariateNormal(torch.zeros(2), COV))


def mcse_mean(draws: np.ndarray) -> float:
    return float(az.mcse(az.convert_to_dataset({"v": draws}))["v"])


def test_dense_metric_learns_the_covariance_and_shortens_the_trees():
    """After warmup every chain's dense M⁻¹ is the posterior covariance (from the last
    window's 100 autocorrelated draws: entries within 40 %, correlation within 0.05), and the trees are shallower than with the diagonal
    metric, which cannot undo a correlation of 0.95, at the same seed and settings."""
    kw = dict(num_chains=2, warmup=300, draws=100, progress=False)
    dense = NUTS(dense_mass=True, **kw).fit(correlated_model)
    diagonal = NUTS(dense_mass=False, **kw).fit(correlated_model)
    inv_mass = dense.state["inverse_mass_matrix"].double()
    assert inv_mass.shape == (2, 2, 2)
    for m in inv_mass:
        assert torch.allclose(m, COV.double(), rtol=0.4)
        assert abs(float(m[0, 1] / (m[0, 0] * m[1, 1]).sqrt()) - 0.95) < 0.05
    assert diagonal.state["inverse_mass_matrix"].shape == (2, 2)
    assert dense.info["mean_tree_depth"] < diagonal.info["mean_tree_depth"] - 0.5
    assert dense.info["divergences"] == 0
    assert dense.info["compiled"]


def test_dense_draws_have_the_posterior_moments():
    """Means 0 within 4 Monte-Carlo standard errors, sds within 10 %, correlation within
    0.03."""
    fit = NUTS(num_chains=4, warmup=200, draws=300, progress=False, dense_mass=True).fit(
        correlated_model
    )
    v = fit.samples["v"].double().numpy()
    for k, sd in enumerate((1.0, 3.0)):
        assert abs(v[..., k].mean()) < 4 * mcse_mean(v[..., k])
        assert abs(v[..., k].std() / sd - 1) < 0.1
    assert abs(np.corrcoef(v.reshape(-1, 2).T)[0, 1] - 0.95) < 0.03
    assert fit.info["max_rhat"] < 1.05


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=x)


def test_compiled_dense_leaf_gives_the_eager_draws():
    """The traced leaf with a dense M⁻¹ reproduces the eager sampler draw for draw."""
    x = torch.tensor([[0.3, -1.0], [1.2, 0.4], [2.1, 0.0]])
    kw = dict(num_chains=2, warmup=30, draws=20, progress=False, seed=3, dense_mass=True)
    eager = NUTS(compile=False, **kw).fit(normal_model, x)
    compiled = NUTS(compile=True, **kw).fit(normal_model, x)
    assert compiled.info["compiled"] and not eager.info["compiled"]
    assert torch.allclose(eager.samples["mu"], compiled.samples["mu"], atol=1e-5)


def test_the_window_covariance_is_stans_regularised_sample_covariance():
    """(n/(n + 5)) Σ̃ + 10⁻³ · 5/(n + 5) · I per chain, Σ̃ = (1 − λ) Σ̂ + λ diag(Σ̂) with
    λ = D/n, Σ̂ the unbiased sample covariance; its diagonal is the diagonal metric's
    estimate; a window of n ≤ D draws gives that diagonal."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, 4, generator=g, dtype=torch.float64)  # 30 draws, 3 chains, D = 4
    x = x @ torch.tensor([[1.0, 0.5, 0, 0], [0, 1, 0.3, 0], [0, 0, 2, 0], [0, 0, 0, 1]]).double()
    dense = WindowVariance((3, 4), torch.float64, "cpu", dense=True)
    diagonal = WindowVariance((3, 4), torch.float64, "cpu")
    for row in x:
        dense.add(row)
        diagonal.add(row)
    n = 30
    for c in range(3):
        cov = np.cov(x[:, c].numpy().T)
        cov = (1 - 4 / n) * cov + 4 / n * np.diag(np.diag(cov))
        expected = n / (n + 5) * cov + 1e-3 * 5 / (n + 5) * np.eye(4)
        np.testing.assert_allclose(dense.regularised()[c].numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(diagonal.regularised(), dense.regularised().diagonal(0, -2, -1))
    short = WindowVariance((3, 4), torch.float64, "cpu", dense=True)
    for row in x[:4]:
        short.add(row)
    off = short.regularised() - torch.diag_embed(short.regularised().diagonal(0, -2, -1))
    assert torch.equal(off, torch.zeros_like(off))


def test_momentum_has_covariance_m_and_the_kinetic_energy_uses_its_inverse():
    """r = L⁻ᵀ z for M⁻¹ = L Lᵀ: Cov r = M; K(r) = ½ rᵀ M⁻¹ r; velocity M⁻¹ r."""
    inv_mass = torch.tensor([[[2.0, 0.9], [0.9, 1.0]]], dtype=torch.float64)
    z = torch.randn(200_000, 1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = momentum(z, inv_mass)
    cov = (r.squeeze(1).T @ r.squeeze(1)) / len(r)
    torch.testing.assert_close(cov, torch.linalg.inv(inv_mass[0]), rtol=0.02, atol=0.01)
    rr = r[:3]
    expected = 0.5 * torch.einsum("nci,cij,ncj->nc", rr, inv_mass, rr)
    torch.testing.assert_close(kinetic(rr, inv_mass), expected)
    torch.testing.assert_close(velocity(rr, inv_mass), torch.einsum("cij,ncj->nci", inv_mass, rr))


def test_auto_is_dense_up_to_the_limit():
    assert dense_metric("auto", AUTO_MAX_DIM) and not dense_metric("auto", AUTO_MAX_DIM + 1)
    assert dense_metric(True, 10_000) and not dense_metric(False, 2)


@pytest.mark.parametrize("bad", ["yes", 1, None, "dense"])
def test_bad_dense_mass_is_a_one_line_error(bad):
    with pytest.raises(InputError, match="dense_mass must be true, false or 'auto'") as err:
        NUTS(dense_mass=bad)
    assert "\n" not in str(err.value)
