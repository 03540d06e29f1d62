"""NUTS with enumerated discrete latents: their posterior draws (``infer_discrete`` given each
continuous draw) against exact marginals, and the zoo's Bernoulli mixture and HMM through
``jointkl fit`` → ArviZ → ``jointkl diagnose``."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from jointkl.inference import NUTS
from jointkl.inference.nuts.discrete import discrete_draws

LOCS = torch.tensor([-2.0, 2.0])
X = torch.tensor([-2.3, -1.1, 1.7, 2.4, 2.9, 0.2, -0.4])


def mixture(x):
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample(
            "z", dist.Categorical(torch.stack([1 - p, p], -1)), infer={"enumerate": "parallel"}
        )
        pyro.sample("obs", dist.Normal(LOCS[z], 1.0), obs=x)


def mixture_sampled_locs(x):
    """The same mixture with sampled locations indexed as ``locs[z]``: not plate-correct
    over an outer batch of draws, so the discrete draws take one model run per draw."""
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    locs = pyro.sample("locs", dist.Normal(LOCS, 0.1).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample(
            "z", dist.Categorical(torch.stack([1 - p, p], -1)), infer={"enumerate": "parallel"}
        )
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def responsibilities(p: torch.Tensor, x: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """P(z_i = 1 | x_i, p, locs) by enumeration, (draws, N); ``locs`` (draws, 2)."""
    lp1 = torch.log(p)[:, None] + dist.Normal(locs[:, 1:2], 1.0).log_prob(x)
    lp0 = torch.log1p(-p)[:, None] + dist.Normal(locs[:, 0:1], 1.0).log_prob(x)
    return torch.sigmoid(lp1 - lp0)


def test_assignment_frequencies_match_the_exact_marginals():
    """Each point's frequency of z_i = 1 across the draws equals the exact conditional
    marginal P(z_i = 1 | x, p) averaged over the draws of p, within 4 Monte-Carlo standard
    errors (the z draws are independent given p: variance mean(r(1 − r)) / n)."""
    fit = NUTS(num_chains=2, warmup=100, draws=300, progress=False).fit(mixture, X)
    draws = NUTS.posterior_draws(fit, None, seed=1)
    z = draws["z"]
    assert z.shape == (2, 300, len(X)) and z.dtype == torch.long
    assert set(z.unique().tolist()) <= {0, 1}
    p = draws["p"].reshape(-1).double()
    r = responsibilities(p, X.double(), LOCS.double().expand(len(p), 2))
    freq = z.reshape(-1, len(X)).double().mean(0)
    exact = r.mean(0)
    se = (r * (1 - r)).mean(0).div(len(p)).sqrt().clamp_min(1e-3)
    assert ((freq - exact).abs() <= 4 * se).all(), (freq, exact, se)
    # the points in between are genuinely uncertain: the test could fail
    assert ((exact > 0.05) & (exact < 0.95)).sum() >= 2
    idata = fit.to_arviz()
    assert idata.posterior["z"].shape == (2, 300, len(X))
    assert idata.log_likelihood.attrs["pointwise"] == "marginal"
    # the pointwise log-likelihood sums z out: the enumerated mixture density at each draw
    ll = idata.log_likelihood["obs"].values.reshape(-1, len(X))
    pp = p[:, None]
    lo = torch.logaddexp(
        torch.log1p(-pp) + dist.Normal(-2.0, 1.0).log_prob(X.double()),
        torch.log(pp) + dist.Normal(2.0, 1.0).log_prob(X.double()),
    )
    np.testing.assert_allclose(ll, lo.numpy(), rtol=1e-4, atol=1e-4)


def test_per_draw_path_when_the_model_does_not_broadcast():
    """``locs[z]`` with sampled locs cannot run over an outer plate of draws: the per-draw
    path gives the same law (the most probable z at temperature 0 is the exact argmax; the
    frequencies at temperature 1 match the exact marginals)."""
    gen = torch.Generator().manual_seed(0)
    C, S = 2, 150
    values = {
        "p": torch.rand(C, S, generator=gen) * 0.8 + 0.1,
        "locs": LOCS + 0.5 * torch.randn(C, S, 2, generator=gen),
    }
    r = responsibilities(values["p"].reshape(-1), X, values["locs"].reshape(-1, 2))
    zmap = discrete_draws(mixture_sampled_locs, (X,), {}, values, seed=0, temperature=0)["z"]
    assert torch.equal(zmap.reshape(-1, len(X)), (r > 0.5).long())
    z = discrete_draws(mixture_sampled_locs, (X,), {}, values, seed=3)["z"]
    freq = z.reshape(-1, len(X)).double().mean(0)
    exact = r.double().mean(0)
    se = (r * (1 - r)).double().mean(0).div(C * S).sqrt().clamp_min(1e-3)
    assert ((freq - exact).abs() <= 4 * se).all(), (freq, exact, se)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from jointkl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


TINY = ["--set", "num_chains=2", "--set", "warmup=30", "--set", "draws=30"]
TINY += ["--set", "max_tree_depth=4", "--set", "progress=false"]


def _fit_and_diagnose(tmp_path, model: str, data: np.ndarray, settings: list[str]):
    from jointkl.fit import Fit

    path = tmp_path / "data.npy"
    np.save(path, data)
    run = tmp_path / "run"
    argv = ["fit", model, "--engine", "nuts", "--data", str(path), "--out", str(run)]
    code, _, err = _cli(argv + TINY + settings)
    assert code == 0, err
    code, out, err = _cli(["diagnose", str(run)])
    assert code == 0, err
    assert not [x for x in out.splitlines() if x.startswith("failed:")], out
    import arviz as az

    return Fit.load(run), az.from_netcdf(run / "inference_data.nc")


SAMPLE_STATS = {"lp", "acceptance_rate", "diverging", "energy", "step_size", "tree_depth"}


def test_cli_bernoulli_mixture(tmp_path):
    rng = np.random.default_rng(0)
    proto = np.array([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    data = (rng.random((24, 8)) < proto[rng.integers(0, 2, 24)]).astype(np.float32)
    fit, idata = _fit_and_diagnose(tmp_path, "bmm", data, ["--set", "n_components=2"])
    assert fit.info["enumerated"] == ["assignment"]
    post = idata.posterior
    assert post["assignment"].shape == (2, 30, 24)
    assert set(np.unique(post["assignment"].values)) <= {0, 1}
    continuous = [v for v in post.data_vars if v != "assignment"]
    assert continuous and all(post[v].dtype.kind == "f" for v in continuous)
    assert SAMPLE_STATS <= set(idata.sample_stats.data_vars)
    assert idata.log_likelihood.attrs["pointwise"] == "marginal"


def test_cli_hmm(tmp_path):
    rng = np.random.default_rng(1)
    states = np.cumsum(rng.random((6, 6)) < 0.2, axis=1) % 2
    data = (np.where(states == 1, 3.0, -3.0) + rng.normal(size=(6, 6))).astype(np.float32)
    # shallower trees than the other tests: each leaf traces the whole pyro.markov chain
    settings = ["--set", "n_states=2", "--set", "priors=weak", "--set", "max_tree_depth=3"]
    fit, idata = _fit_and_diagnose(tmp_path, "hmm", data, settings)
    assert fit.info["enumerated"] == [f"state_{t}" for t in range(6)]
    post = idata.posterior
    # the states drawn along the pyro.markov chain are one variable, like the observations
    assert post["state"].dims == ("chain", "draw", "data", "state_step")
    assert post["state"].shape == (2, 30, 6, 6)
    assert not [v for v in post.data_vars if v.startswith("state_")]
    # a well-separated chain: the states follow the data's signs in most draws
    drawn = post["state"].values
    assert {"init", "trans", "locs", "scales"} <= set(post.data_vars)
    agree = (drawn == states).mean()
    assert max(agree, 1 - agree) > 0.9, agree
    assert SAMPLE_STATS <= set(idata.sample_stats.data_vars)


def test_vectorised_path_in_chunks(monkeypatch):
    """The outer plate of draws split into chunks (a small memory budget) gives each draw's
    own most probable assignment."""
    from jointkl.inference.nuts import discrete

    # 15 site elements per draw (p, z, obs) × 2 values of z: 2 draws per run
    monkeypatch.setattr(discrete, "CHUNK_ELEMENTS", 60)
    gen = torch.Generator().manual_seed(1)
    values = {"p": torch.rand(2, 9, generator=gen) * 0.8 + 0.1}
    r = responsibilities(values["p"].reshape(-1), X, LOCS.expand(18, 2))
    runs = []
    real = discrete._run
    monkeypatch.setattr(discrete, "_run", lambda *a: runs.append(a[6]) or real(*a))
    z = discrete_draws(mixture, (X,), {}, values, seed=0, temperature=0)["z"]
    assert torch.equal(z.reshape(-1, len(X)), (r > 0.5).long())
    batched = [b for b in runs if b is not None]
    assert batched == [3] + [2] * 9  # the check on 3 draws, then 18 draws in chunks of 2


def test_label_switching_is_named_in_one_line():
    """Chains that disagree (high R-hat) at the same log density on a model with enumerated
    labels: one line saying label switching; not when the chains agree or when nothing is
    enumerated; when one chain sits in a worse mode, one line saying separate modes."""
    from types import SimpleNamespace

    from jointkl.inference.nuts.engine import _label_switching

    g = torch.Generator().manual_seed(0)
    lp = -100 + torch.randn(4, 200, generator=g)  # four chains at the same log density
    mixture = SimpleNamespace(enumerated=["assignment"])
    line = _label_switching(mixture, lp, 1.8)
    assert line.startswith("label switching") and "assignment" in line and "\n" not in line
    assert _label_switching(mixture, lp, 1.01) is None
    assert _label_switching(SimpleNamespace(enumerated=[]), lp, 1.8) is None
    lp[0] -= 30  # one chain in a worse mode: a convergence failure, not label switching
    line = _label_switching(mixture, lp, 1.8)
    assert line.startswith("separate modes") and "\n" not in line
    assert "highest: chain" in line and "highest: chain 0" not in line
    assert "label switching" not in line


def test_bernoulli_pixels_by_one_matrix_product_give_the_same_draws(monkeypatch):
    """The zoo's Bernoulli mixture: its observed pixels' log-density under enumeration is
    filled by one matrix product as the model runs (``MatrixBernoulli``), not expanded over
    draws × components × points × pixels; the assignments drawn are those of Pyro's own
    ``log_prob`` (same seed, temperatures 0 and 1), and the site really takes the product."""
    from jointkl.inference.nuts import discrete
    from jointkl.models import BernoulliMixture

    model = BernoulliMixture(n_components=4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(60, 12, generator=g) < 0.4).double()
    C, S = 2, 3
    draws = {
        "weights": dist.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((C, S)),
        "probs": torch.rand(C, S, 4, 12, generator=g, dtype=torch.float64).clamp(0.05, 0.95),
    }
    filled = []
    plain = discrete.MatrixBernoulli._process_message

    def counting(self, msg):
        plain(self, msg)
        if msg["is_observed"] and "log_prob" in msg:
            filled.append(msg["name"])

    monkeypatch.setattr(discrete.MatrixBernoulli, "_process_message", counting)
    fast = {t: discrete_draws(model.model, (x,), {}, draws, seed=3, temperature=t) for t in (0, 1)}
    assert "obs" in filled
    monkeypatch.setattr(discrete.MatrixBernoulli, "_process_message", lambda self, msg: None)
    slow = {t: discrete_draws(model.model, (x,), {}, draws, seed=3, temperature=t) for t in (0, 1)}
    for t in (0, 1):
        assert fast[t]["assignment"].shape == (C, S, 60)
        assert torch.equal(fast[t]["assignment"], slow[t]["assignment"]), t
