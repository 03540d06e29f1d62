"""NUTS: the reference sampler. Exact posteriors (conjugate, enumerated mixture), a
correlated Gaussian, ArviZ's sample statistics, the compiled path, bad input, the CLI."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import NUTS
from jointkl.inference.nuts.adaptation import windows
from jointkl.inference.nuts.potential import Potential

from jointkl import InputError

QUICK = dict(num_chains=2, warmup=150, draws=300, progress=False)


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def mcse_mean(draws: np.ndarray) -> float:
    return float(az.mcse(az.convert_to_dataset({"v": draws}))["v"])


def test_conjugate_normal_posterior_mean_and_sd():
    """μ ~ N(0, 1), x_i ~ N(μ, 1): μ | x ~ N(Σx/(N + 1), 1/(N + 1)). The mean is within 4
    Monte-Carlo standard errors, the sd within 10 %."""
    x = torch.tensor([0.3, 1.2, 2.1, 0.7, 1.5, 0.9, 1.8, 0.4, 1.1, 1.0])
    fit = NUTS(**QUICK).fit(normal_model, x)
    mu = fit.samples["mu"].double().numpy()
    assert mu.shape == (2, 300)
    mean, sd = float(x.sum()) / 11, 1 / math.sqrt(11)
    assert abs(mu.mean() - mean) < 4 * mcse_mean(mu)
    assert abs(mu.std() / sd - 1) < 0.1
    assert fit.info["divergences"] == 0
    assert fit.info["vectorised"] and fit.info["compiled"]


LOCS = torch.tensor([-2.0, 2.0])
MIX_X = torch.tensor([-2.3, -1.1, 1.7, 2.4, 2.9, 0.2])


def mixture_model(x):
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.stack([1 - p, p], -1)))
        pyro.sample("obs", dist.Normal(LOCS[z], 1.0), obs=x)


def test_mixture_weight_matches_the_posterior_by_enumeration():
    """p ~ Beta(1, 1), z_i ~ Categorical(1 − p, p), x_i ~ N(±2, 1) on 6 points: z summed out
    in the potential; p's posterior mean and sd against quadrature of
    Π_i ((1 − p) N(x_i; −2, 1) + p N(x_i; 2, 1)) on a fine grid."""
    fit = NUTS(**QUICK).fit(mixture_model, MIX_X)
    assert fit.info["enumerated"] == ["z"]
    grid = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    like = dist.Normal(LOCS.double(), 1.0).log_prob(MIX_X.double()[:, None]).exp()  # (6, 2)
    log_post = ((1 - grid[:, None]) * like[:, 0] + grid[:, None] * like[:, 1]).log().sum(-1)
    w = (log_post - log_post.max()).exp()
    mean = float((w * grid).sum() / w.sum())
    sd = float(((w * (grid - mean) ** 2).sum() / w.sum()).sqrt())
    p = fit.samples["p"].double().numpy()
    assert abs(p.mean() - mean) < 4 * mcse_mean(p)
    assert abs(p.std() / sd - 1) < 0.1


def correlated_model():
    cov = torch.tensor([[1.0, 2.85], [2.85, 9.0]])  # sds 1 and 3, correlation 0.95
    pyro.sample("v", dist.MultivariateNormal(torch.zeros(2), cov))


def test_correlated_gaussian_moments():
    """A 2-D Gaussian with correlation 0.95 and sds 1, 3: means 0 (4 MCSE), sds within
    10 %, correlation within 0.03."""
    fit = NUTS(num_chains=4, warmup=200, draws=400, progress=False).fit(correlated_model)
    v = fit.samples["v"].double().numpy()
    for k, sd in enumerate((1.0, 3.0)):
        assert abs(v[..., k].mean()) < 4 * mcse_mean(v[..., k])
        assert abs(v[..., k].std() / sd - 1) < 0.1
    flat = v.reshape(-1, 2)
    assert abs(np.corrcoef(flat.T)[0, 1] - 0.95) < 0.03


def test_sample_stats_under_arviz_names_in_inference_data():
    x = torch.tensor([0.5, 1.5, -0.2])
    fit = NUTS(num_chains=2, warmup=30, draws=40, progress=False).fit(normal_model, x)
    idata = fit.to_arviz(num_samples=25)
    assert idata.posterior["mu"].shape == (2, 25)
    stats = idata.sample_stats
    for name in ("diverging", "tree_depth", "acceptance_rate", "energy", "step_size", "lp"):
        assert stats[name].dims == ("chain", "draw") and stats[name].shape == (2, 25)
    assert stats["diverging"].dtype == bool
    assert (stats["tree_depth"] >= 1).all() and (stats["acceptance_rate"] <= 1).all()
    # lp is the log density at the kept draws (with the log-Jacobian: μ is unconstrained).
    mu = fit.samples["mu"]
    lp = dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(x).sum(-1)
    assert torch.allclose(fit.state["sample_stats.lp"], lp, atol=1e-4)
    assert float(az.bfmi(idata).min()) > 0


def test_compiled_graph_gives_the_eager_draws():
    """The traced graph (potential, gradient, tree bookkeeping) reproduces the eager sampler
    draw for draw with the same seed."""
    x = torch.tensor([0.3, 1.2, 2.1])
    kw = dict(num_chains=2, warmup=30, draws=20, progress=False, seed=3)
    eager = NUTS(compile=False, **kw).fit(normal_model, x)
    compiled = NUTS(compile=True, **kw).fit(normal_model, x)
    assert compiled.info["compiled"] and not eager.info["compiled"]
    assert torch.allclose(eager.samples["mu"], compiled.samples["mu"], atol=1e-5)


def indexed_model(x):
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def singular_at_ten(x):
    """ρ ~ N(0, 3); a factor through M = I + (ρ/10)(J − I), singular at ρ = ±10, by the
    GMM's route (Cholesky, ``cholesky_inverse``, Cholesky): the frozen graph raises a
    RuntimeError at ρ = 10 exactly, where the eager model raises a LinAlgError."""
    rho = pyro.sample("rho", dist.Normal(0.0, 3.0))
    eye = torch.eye(2)
    m = eye + (rho / 10).unsqueeze(-1).unsqueeze(-1) * (1 - eye)
    cov = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)))
    pyro.factor("det", -cov.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    pyro.sample("obs", dist.Normal(rho, 1.0), obs=x)


def test_compiled_leaf_that_raises_counts_a_divergence():
    """A chain whose leapfrog lands where the compiled leaf raises (a singular matrix inside
    the frozen graph, out of reach of the potential's own guard) diverges with U = +inf;
    the other chains step as usual."""
    from jointkl.inference.nuts.trajectory import _checkpoint_masks, step_function

    pyro.set_rng_seed(0)
    x = torch.tensor(0.5)
    with pyro.validation_enabled(False):
        target = Potential(singular_at_ten, (x,), {}, 3)
        assert target.compile()
        step = step_function(target, 3, compile=True)
        C, D, K = 3, 1, 3
        theta = torch.tensor([[0.3], [10.0], [-1.2]])
        with pytest.raises(RuntimeError):
            target.graph(theta)  # the frozen potential itself raises here
        u, g = target.value_and_grad(torch.tensor([[0.3], [0.2], [-1.2]]))
        z = torch.zeros
        args = (
            theta, torch.ones(C, D), g, z(C), z(C, D), theta, u, g, u, z(C), z(C),
            z(C, dtype=torch.bool), z(C, dtype=torch.bool), z(K, C, D), z(K, C, D),
            z(C, 1), torch.ones(C, D), u + 1, torch.ones(C, dtype=torch.bool),
            torch.full((C,), 0.5), *_checkpoint_masks(0, K, torch.device("cpu")),
        )  # fmt: skip
        out = step(*args)  # step size 0: the new point is theta itself
        u_good, _ = target.eager_value_and_grad(theta[[0, 2]])
    assert step.fallbacks == 1
    theta_out, log_w, p_u, div = out[0], out[3], out[6], out[12]
    assert div.tolist() == [False, True, False]
    assert out[11].tolist() == [False, True, False]  # the diverged chain stops its subtree
    assert log_w[1] == 0 and p_u[1] == u[1]  # nothing of the bad state enters its proposal
    # the good chains moved to theta (a step of 0), weighted by exp(−(H − H₀)) at U(theta)
    assert torch.equal(theta_out[[0, 2]], theta[[0, 2]])
    expected = -(u_good + 0.5 - (u[[0, 2]] + 1))
    assert torch.allclose(log_w[[0, 2]], torch.logaddexp(torch.zeros(2), expected))


def test_a_model_that_is_not_plate_correct_gets_the_per_chain_loop():
    """``locs[z]`` indexes the first dimension, which an outer plate of chains would take:
    the check at distinct points sees it and the potential runs one model per chain (and
    still matches the per-chain potential)."""
    pot = Potential(indexed_model, (MIX_X,), {}, num_chains=3)
    assert not pot.vectorised
    theta = torch.randn(3, pot.dim)
    u, g = pot.value_and_grad(theta)
    for c in range(3):
        uc, gc = pot.eager_value_and_grad(theta[c : c + 1])
        assert torch.allclose(u[c], uc[0]) and torch.allclose(g[c], gc[0])
    with pytest.raises(InputError, match="broadcast"):
        Potential(indexed_model, (MIX_X,), {}, num_chains=3, mode="vectorised")


def poisson_latent(x):
    k = pyro.sample("k", dist.Poisson(3.0))
    pyro.sample("obs", dist.Normal(k.float(), 1.0), obs=x)


def test_bad_input_one_line_errors():
    with pytest.raises(InputError, match="'k' is discrete without a finite support"):
        NUTS(progress=False).fit(poisson_latent, torch.tensor(2.0))
    with pytest.raises(InputError, match="target_accept"):
        NUTS(target_accept=1.5)
    with pytest.raises(InputError, match="init"):
        NUTS(init="zeros")

    def no_latent(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(InputError, match="no continuous latent"):
        NUTS(progress=False).fit(no_latent, torch.tensor(0.5))


def test_stan_windows():
    assert windows(1000) == [(75, 99), (100, 149), (150, 249), (250, 449), (450, 949)]
    assert windows(100) == [(15, 89)]
    assert windows(10) == []


def test_cli_fit_gmm(tmp_path):
    """``jointkl fit gmm --engine nuts``: the mixture's assignments summed out, the globals
    (weights, locations, scales, LKJ correlations) sampled, one model run per chain (the
    zoo's ``locs[z]`` is not plate-correct); a run directory is written. Shallow trees keep
    the test short (the defaults take minutes here)."""
    from jointkl.cli import main
    from jointkl.fit import Fit

    out = tmp_path / "run"
    argv = [
        "fit", "gmm", "--engine", "nuts", "--out", str(out), "--set", "warmup=20",
        "--set", "draws=20", "--set", "progress=false", "--set", "num_chains=2",
        "--set", "max_tree_depth=4",
    ]  # fmt: skip
    assert main(argv) == 0
    fit = Fit.load(out)
    assert fit.engine == "nuts"
    assert fit.samples["locs"].shape == (2, 20, 3, 4)
    # the zoo mixture indexes with Vindex, so all chains run in one model call
    assert fit.info["enumerated"] == ["assignment"] and fit.info["vectorised"]
    assert (out / "inference_data.nc").exists()


def test_cli_resume_refused_names_the_engines_that_checkpoint(tmp_path, capsys):
    """``--resume`` with an engine that does not checkpoint: exit 2, and the message lists
    the engines that do (read from the registry: NUTS among them, EM not)."""
    import json

    from jointkl.cli import _resolve_model, main

    run = tmp_path / "run"
    run.mkdir()
    from jointkl.models import GaussianMixture

    spec = {**_resolve_model("gmm", None)[1], "settings": GaussianMixture().settings()}
    config = {"model": "gmm", "model_spec": spec, "engine": "em"}
    (run / "config.json").write_text(json.dumps({**config, "engine_config": {}, "seed": 0}))
    assert main(["fit", "gmm", "--engine", "em", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "engine 'em' does not checkpoint; --resume is for langevin, nce, nuts, svi" in err


def test_expected_cost_line_only_for_long_fits():
    """The line printed at the start of a long fit: the measured gradient time times 7
    (depth 3) to 2^max_tree_depth − 1 leapfrog steps per transition; nothing when even the
    worst case is under ten minutes."""
    from jointkl.inference.nuts.engine import NUTSSettings, expected_cost

    s = NUTSSettings()
    assert expected_cost(1e-4, 2000, s) is None  # worst case 2000 × 1023 × 0.1 ms = 205 s
    line = expected_cost(0.009, 2000, s)
    assert line == (
        "NUTS: one gradient of the 4 chains takes 9.0 ms here; 2000 transitions of 7 (depth "
        "3) to 1023 (max_tree_depth=10) leapfrog steps: 2 min to 5.1 h (lower warmup/draws "
        "or max_tree_depth to bound it)"
    )
