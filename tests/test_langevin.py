"""Langevin: draws from the right posterior, out of the box, with honest diagnostics."""

from __future__ import annotations

import math
import shutil

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import Langevin
from jointkl.inference.langevin import LangevinSettings, LogJoint, _Sampler

from jointkl import InputError
from jointkl.checkpoint import LoopState, latest_checkpoint
from jointkl.errors import FitDivergedError

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


# ---------------------------------------------------------------- checkpoints and resume
def _fit_facts(fit):
    """What a resumed fit must reproduce bit for bit (all but the wall-clock seconds)."""
    info = {k: v for k, v in fit.info.items() if k != "seconds"}
    return fit.samples, fit.history, info, fit.state, fit.n_iter


def _assert_same_fit(a, b):
    samples_a, history_a, info_a, state_a, n_a = _fit_facts(a)
    samples_b, history_b, info_b, state_b, n_b = _fit_facts(b)
    assert samples_a.keys() == samples_b.keys()
    for k in samples_a:
        assert torch.equal(samples_a[k], samples_b[k]), k
    assert history_a == history_b  # every potential, bit for bit
    assert info_a.keys() == info_b.keys()
    for k in info_a:  # NaN-safe equality (max_rhat may be NaN for short runs)
        assert info_a[k] == info_b[k] or (info_a[k] != info_a[k] and info_b[k] != info_b[k]), k
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert n_a == n_b


RESUME_CASES = {
    # Tuned step on mini-batches: Adam (steps 0-7), two tunings (probe batches), Langevin
    # warmup (8-19), sampling (20-29). Cut in Adam, in the tuning warmup, and in sampling.
    "tuned-minibatch": (dict(warmup=20, num_samples=10, batch_size=10), [5, 12, 17, 24]),
    # Fixed step with the polynomial schedule: the schedule's clock must resume too.
    "fixed-polynomial": (
        dict(step_size=0.05, schedule="polynomial", warmup=6, num_samples=12),
        [3, 11],
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES, ids=list(RESUME_CASES))
def test_fit_resumed_from_any_checkpoint_matches_one_that_never_stopped(tmp_path, case):
    """The sampler's progress after a step is one LoopState; a fit resumed from the
    checkpoint of any step continues exactly: the same draws, potentials, tuning and info."""
    settings, cuts = RESUME_CASES[case]
    x = normal_data(40)
    common = dict(num_chains=2, seed=5, progress=False, **settings)
    whole = Langevin(checkpoint_every=1, checkpoint_dir=tmp_path / "whole", **common).fit(
        normal_model, x
    )
    total = settings["warmup"] + settings["num_samples"]
    assert latest_checkpoint(tmp_path / "whole").name == f"step-{total:08d}.pt"
    for cut in cuts:
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        name = f"step-{cut:08d}.pt"
        shutil.copy(tmp_path / "whole" / name, folder / name)
        pyro.set_rng_seed(123)  # the checkpoint, not the caller's RNG, decides what follows
        resumed = Langevin(checkpoint_dir=folder, resume=True, **common).fit(normal_model, x)
        _assert_same_fit(resumed, whole)
    # Resuming a finished fit gives the fit again, without a step.
    again = Langevin(checkpoint_dir=tmp_path / "whole", resume=True, **common).fit(normal_model, x)
    _assert_same_fit(again, whole)


def test_checkpoint_is_one_loop_state_that_loads_without_unpickling(tmp_path):
    x = normal_data(40)
    Langevin(
        num_samples=6, warmup=20, num_chains=2, batch_size=10, checkpoint_every=25,
        checkpoint_dir=tmp_path, progress=False,
    ).fit(normal_model, x)  # fmt: skip
    raw = torch.load(tmp_path / "step-00000025.pt", weights_only=True)  # mid-sampling
    assert raw["step"] == 25 and len(raw["history"]) == 25
    assert raw["params"]["theta"].shape == (2, 1)
    assert raw["params"]["draws"].shape == (2, 6, 1)
    assert set(raw["rng"]) == {"torch", "chains"}
    extra = raw["extra"]
    assert extra["stage_step"] == 5 and extra["noise"].shape == (2, 1)
    assert extra["eps"] > 0 and extra["precond"].shape == (1,)
    state = LoopState.load(tmp_path / "step-00000025.pt")
    assert state.step == 25 and state.history == raw["history"].tolist()


class InterruptAt:
    """A normal model that raises KeyboardInterrupt on its ``at``-th call (Ctrl-C mid-step)."""

    def __init__(self, at: int | None):
        self.at, self.calls = at, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        normal_model(x)


def test_ctrl_c_keeps_the_last_completed_step_and_resumes_exactly(tmp_path):
    x = normal_data(40)
    common = dict(num_samples=10, warmup=20, num_chains=2, batch_size=10, progress=False)
    whole = Langevin(**common).fit(normal_model, x)
    with pytest.raises(KeyboardInterrupt):
        Langevin(checkpoint_dir=tmp_path, **common).fit(InterruptAt(140), x)
    saved = LoopState.load(latest_checkpoint(tmp_path))
    assert 20 < saved.step < 30  # in sampling: the state before the interrupted step
    resumed = Langevin(checkpoint_dir=tmp_path, resume=True, **common).fit(InterruptAt(None), x)
    _assert_same_fit(resumed, whole)


def test_divergence_in_sampling_keeps_the_last_good_checkpoint(tmp_path):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    # ε = 1e30 throws the chains to |z| ~ 1e30 after one step: U = z²/2 overflows.
    engine = Langevin(
        step_size=1e30, warmup=0, num_samples=5, num_chains=2, checkpoint_every=1,
        checkpoint_dir=tmp_path, progress=False,
    )  # fmt: skip
    with pytest.raises(FitDivergedError, match="sampling step 1"):
        engine.fit(model)
    # The chains of step 1 (|z| ~ 1e30) met the overflow: their checkpoint is removed, so no
    # checkpoint holds a state a resume would diverge from at once.
    assert latest_checkpoint(tmp_path) is None


def test_resume_with_other_settings_is_refused(tmp_path):
    x = normal_data(20)
    common = dict(num_samples=5, num_chains=2, checkpoint_dir=tmp_path, progress=False)
    Langevin(warmup=20, **common).fit(normal_model, x)
    with pytest.raises(InputError, match="warmup=20, not 25: resume with the same settings"):
        Langevin(warmup=25, resume=True, **common).fit(normal_model, x)


def test_chains_draw_their_own_minibatches():
    """One BatchOrder per chain, a function of (seed, step): the chains' batches differ, and
    the same seed gives the same batches."""
    x = normal_data(40)
    target = LogJoint(normal_model, (x,), {}, batch_size=10)
    settings = LangevinSettings(num_chains=3, warmup=20, batch_size=10)
    a, b = _Sampler(target, settings), _Sampler(target, settings)
    for step in (0, 3, 7):  # 7: the second epoch (4 batches of 10 per epoch)
        rows = [a.batch(c, step) for c in range(3)]
        assert all(len(r) == 10 for r in rows)
        assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
        assert all(torch.equal(r, b.batch(c, step)) for c, r in enumerate(rows))
    # The probes of a tuning never reuse a step's batch index.
    assert a.probe_batch(0, 0, 0) is not None
    assert a.total == 1020


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"checkpoint_every": 5}, "needs checkpoint_dir"),
        ({"resume": True}, "needs checkpoint_dir"),
        ({"checkpoint_every": 0, "checkpoint_dir": "ck"}, "checkpoint_every"),
    ],
)
def test_bad_checkpoint_settings_are_refused(settings, match):
    with pytest.raises(InputError, match=match):
        Langevin(**settings)


def test_cli_fit_then_resume_from_a_mid_warmup_checkpoint(tmp_path):
    """``jointkl fit vae --engine langevin`` checkpoints (every tenth of warmup +
    num_samples by default); ``--resume`` from a checkpoint inside the tuning warmup gives the
    run that never stopped. The VAE is the zoo's model with continuous latents (its z, one
    per digit; the decoder's weights stay as initialised)."""
    from jointkl.cli import main
    from jointkl.fit import Fit

    out = tmp_path / "run"
    argv = [
        "fit", "vae", "--engine", "langevin", "--out", str(out), "--draws", "5",
        "--set", "latent_dim=1", "--set", "hidden=[4]", "--set", "warmup=20",
        "--set", "num_samples=10", "--set", "num_chains=2", "--set", "progress=false",
        "--keep-checkpoints", "0",  # all ten: the test resumes from an early one
    ]  # fmt: skip
    assert main(argv) == 0
    whole = Fit.load(out)
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-00000030.pt"
    assert len(list(checkpoints.glob("step-*.pt"))) == 10
    for path in checkpoints.glob("step-*.pt"):
        if int(path.stem.split("-")[1]) > 12:  # keep 3, 6, 9, 12: stop inside stage 2
            path.unlink()
    pyro.clear_param_store()
    assert main([*argv, "--resume"]) == 0
    resumed = Fit.load(out)
    assert latest_checkpoint(checkpoints).name == "step-00000030.pt"
    assert torch.equal(resumed.samples["z"], whole.samples["z"])
    assert resumed.history == whole.history
    assert resumed.info["gradients"] == whole.info["gradients"]
