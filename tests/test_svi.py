import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import SVI
from jointkl.models import GaussianMixture

from jointkl import Fit, FitDivergedError, InputError, Pair


def regression_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(w * x + b, 1.0), obs=y)


def line_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return x, 2.0 * x - 1.0 + torch.randn(n, generator=g)


def test_svi_gmm_recovers_separated_clusters(blobs):
    x, centres = blobs
    gmm = GaussianMixture(3, covariance="diag")
    fit = SVI(steps=300, lr=0.05, progress=False, seed=0).fit(gmm, x)
    locs = fit.params["locs"]
    # each true centre has a fitted location within 0.3
    d = torch.cdist(centres, locs).min(-1).values
    assert (d < 0.3).all(), d
    assert fit.history[-1] < fit.history[0]
    assert torch.allclose(fit.params["weights"], torch.full((3,), 1 / 3), atol=0.05)
    labels = gmm.predict(x, fit)
    # points of one true cluster share one label
    for k in range(3):
        assert labels[60 * k : 60 * (k + 1)].unique().numel() == 1


def test_minibatch_loss_is_unbiased_for_full_data_loss():
    """Mean of the N/B-scaled mini-batch losses over one epoch equals the full-batch loss."""
    x, y = line_data(64)
    guide_fixed = Pair(
        regression_model,
        lambda x, y: (
            pyro.sample("w", dist.Delta(torch.tensor(1.5))),
            pyro.sample("b", dist.Delta(torch.tensor(0.3))),
        ),
    )
    full = SVI(loss="trace", steps=1, lr=1e-30, progress=False).fit(guide_fixed, x, y)
    mini = SVI(loss="trace", steps=8, lr=1e-30, batch_size=8, progress=False).fit(guide_fixed, x, y)
    assert math.isclose(sum(mini.history) / 8, full.history[0], rel_tol=1e-5)
    # and a single batch alone is not the full loss (the test can fail)
    assert not math.isclose(mini.history[0], full.history[0], rel_tol=1e-3)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    x, y = line_data(64)
    kw = dict(steps=40, lr=0.05, batch_size=16, progress=False, seed=3, guide="normal")
    straight = SVI(**kw).fit(regression_model, x, y)

    def interrupt(step, loss):
        if step == 16:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    part = SVI(**kw, checkpoint_every=5, checkpoint_dir=ck, on_step=interrupt).fit(
        regression_model, x, y
    )
    assert part.n_iter == 17 and "interrupted" in part.info["stop_reason"]
    resumed = SVI(**kw, checkpoint_every=5, checkpoint_dir=ck, resume=True).fit(
        regression_model, x, y
    )
    assert resumed.n_iter == 40
    assert resumed.history == pytest.approx(straight.history, rel=0, abs=0)
    for k, v in straight.params.items():
        assert torch.equal(v, resumed.params[k]), k


def test_nan_objective_stops_with_message_and_keeps_last_good_params(tmp_path):
    def model(x):
        s = pyro.param("s", torch.tensor(1.0))
        with pyro.plate("data", len(x)):
            # sqrt of a parameter pushed negative by a large step: NaN
            pyro.sample("obs", dist.Normal(0.0, s.sqrt() + 1e-3), obs=x)

    x = torch.zeros(10)  # the likelihood wants s -> 0; SGD with a big step overshoots below
    engine = SVI(
        steps=200, lr=3.0, optim="sgd", progress=False, checkpoint_every=1, checkpoint_dir=tmp_path
    )
    with pytest.raises(FitDivergedError, match="non-finite") as e:
        engine.fit(model, x)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    # The parameters that met the NaN (those after `bad` updates) are never left as a
    # checkpoint: a resume from them diverges again whatever the lr (issue 16) ...
    assert not (tmp_path / f"step-{bad:08d}.pt").exists()
    for path in tmp_path.glob("step-*.pt"):  # ... and every checkpoint left is finite
        assert torch.isfinite(torch.load(path, weights_only=True)["params"]["s"]).all()
    assert torch.isfinite(pyro.param("s")).all()  # the bad step applied nothing


def test_early_stopping_converges_before_max_steps():
    x, y = line_data(64)
    fit = SVI(guide="delta", steps=5000, lr=0.1, early_stopping=1e-6, progress=False).fit(
        regression_model, x, y
    )
    assert fit.converged and fit.n_iter < 5000
    assert fit.params["w"] == pytest.approx(2.0, abs=0.3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="nope"), "loss must be one of"),
        (dict(guide="fancy"), "guide must be one of"),
        (dict(optim="adamax9"), "unknown optim"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(steps=0), "steps must be a positive"),
        (dict(batch_size=2.5), "batch_size must be a positive"),
        (dict(checkpoint_every=5), "needs checkpoint_dir"),
        (dict(lr_schedule="warp"), "lr_schedule must be one of"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(InputError, match=match):
        SVI(**kwargs)


def test_nan_in_data_is_refused_before_fitting():
    x, y = line_data(16)
    y[3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        SVI(steps=5, progress=False).fit(regression_model, x, y)


def test_minibatch_with_local_latents_needs_amortised_guide():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(InputError, match="amortised"):
        SVI(steps=2, batch_size=4, progress=False).fit(model, torch.randn(16))


def test_fit_save_load_roundtrip_and_arviz(tmp_path, blobs):
    x, _ = blobs
    gmm = GaussianMixture(3, covariance="spherical")
    fit = SVI(steps=100, lr=0.05, guide="normal", progress=False).fit(gmm, x)
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")  # pair rebuilt from the zoo spec
    assert loaded.history == fit.history and loaded.n_iter == fit.n_iter
    for k in fit.params:
        assert torch.equal(fit.params[k], loaded.params[k])
    a = fit.to_arviz(num_samples=30, seed=1)
    b = loaded.to_arviz(num_samples=30, seed=1)
    assert float(abs(a.posterior["locs"] - b.posterior["locs"]).max()) == 0.0
    assert set(a.groups()) >= {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    assert a.posterior["locs"].dims == ("chain", "draw", "components", "locs_dim_1")
    assert a.log_likelihood["obs"].dims == ("chain", "draw", "data")


def test_pointwise_log_likelihood_marginalises_the_assignment(blobs):
    """log_likelihood = log Σ_k π_k N(x_i | μ_k, Σ_k), computed here by hand."""
    x, _ = blobs
    gmm = GaussianMixture(3, covariance="diag", priors=None)
    fit = SVI(steps=30, lr=0.05, progress=False).fit(gmm, x)
    idata = fit.to_arviz(num_samples=2)
    got = torch.as_tensor(idata.log_likelihood["obs"].values[0, 0])
    w, mu, s = fit.params["weights"], fit.params["locs"], fit.params["scales"]
    comp = torch.distributions.Normal(mu, s).log_prob(x.unsqueeze(1)).sum(-1)
    want = torch.logsumexp(comp + w.log(), -1)
    # Stored in the model's dtype (float32 here): compare in float64.
    assert torch.allclose(got.double(), want.double(), atol=1e-4)


def test_cosine_schedule_changes_the_trajectory():
    x, y = line_data(32)
    a = SVI(guide="delta", steps=20, lr=0.1, progress=False).fit(regression_model, x, y)
    b = SVI(guide="delta", steps=20, lr=0.1, lr_schedule="cosine", progress=False).fit(
        regression_model, x, y
    )
    assert a.history[:1] == b.history[:1] and a.history[-1] != b.history[-1]


def test_svi_runs_jointkl_integrators_and_refuses_heun():
    x, y = line_data(64)
    fit = SVI(optim="heavyball", lr=0.05, steps=300, guide="delta", progress=False).fit(
        regression_model, x, y
    )
    assert fit.params["w"] == pytest.approx(2.0, abs=0.3)
    with pytest.raises(InputError, match="closure"):
        SVI(optim="heun")


def test_objective_only_model_converts_to_arviz_without_likelihood_groups():
    def model():
        pyro.param("a", torch.tensor(0.0))

    def loss(model, guide):
        model()
        return (pyro.param("a") - 3.0) ** 2

    fit = SVI(loss=loss, steps=200, lr=0.1, progress=False).fit(Pair(model))
    assert float(fit.params["a"]) == pytest.approx(3.0, abs=0.05)
    idata = fit.to_arviz(num_samples=3)
    assert "sample_stats" in idata.groups() and "log_likelihood" not in idata.groups()


def test_minibatch_fit_never_runs_the_model_on_the_full_data():
    """Parameters are created from one mini-batch: a large conditional model (a full softmax
    over a big vocabulary) must not pay a full-data pass before its first step."""
    g = torch.Generator().manual_seed(0)
    n, d, v, b = 300, 3, 7, 16
    x = torch.randn(n, d, generator=g)
    y = torch.distributions.Categorical(logits=x @ torch.randn(d, v, generator=g)).sample()
    seen = []

    def softmax_model(x, y):
        w = pyro.param("w", torch.zeros(d, v))
        with pyro.plate("data", len(x)):
            seen.append(len(x))  # the per-point work happens here
            pyro.sample("y", dist.Categorical(logits=x @ w), obs=y)

    fit = SVI(steps=60, lr=0.1, batch_size=b, progress=False, seed=0).fit(softmax_model, x, y)
    assert max(seen) == b
    assert fit.params["w"].shape == (d, v)
    assert sum(fit.history[-10:]) < sum(fit.history[:10])
    seen.clear()
    SVI(steps=2, lr=0.1, progress=False).fit(softmax_model, x, y)
    assert max(seen) == n  # full batch does see all of it (the check above can fail)
