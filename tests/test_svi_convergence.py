"""SVI's convergence verdict: the README's regression converges with the defaults, and a fit
that stops while its loss still falls says so in one line (Python warning, CLI stderr)."""

import re
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import SVI

from jointkl import ConvergenceWarning
from jointkl.cli import main
from jointkl.optim.stationarity import loss_trend, trend_window

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_regression_snippet() -> str:
    """The README's code block after "a bare model function gets an autoguide"."""
    text = README.read_text()
    after = text.split("a bare model function gets an autoguide", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def line_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)


def test_readme_regression_snippet_converges_to_the_slope_with_the_defaults():
    code = readme_regression_snippet()
    assert "steps=" not in code and "lr=" not in code  # the defaults are what is shown
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a converged fit does not warn
        exec(compile(code, str(README), "exec"), scope)
    fit, x, y = scope["fit"], scope["x"], scope["y"]
    w = float(fit.params["w"])
    least_squares = float((x * y).sum() / (x * x).sum())
    posterior_sd = float((x * x).sum().rsqrt())  # noise sd 1, prior sd 10: negligible
    assert fit.converged
    assert abs(w - least_squares) < 2 * posterior_sd, (w, least_squares)
    assert abs(w - 2.5) < 0.25, w
    assert len(x) == 200


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_fit_converges_for_other_data_and_seeds(seed):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(200, generator=g)
    y = 2.5 * x + torch.randn(200, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = SVI(guide="normal", batch_size=64, seed=seed, progress=False).fit(line_model, x, y)
    least_squares = float((x * y).sum() / (x * x).sum())
    assert fit.converged
    assert abs(float(fit.params["w"]) - least_squares) < 2 * float((x * x).sum().rsqrt())


@pytest.mark.parametrize("steps", [200, 500])
def test_an_unconverged_fit_warns_in_one_line_with_the_remedy(steps):
    # The setting (500 steps, batch 64) and a shorter one: Adam at lr 0.01 moves w
    # about 0.01 a step from its start at 0, so the loss is still falling at the end.
    torch.manual_seed(0)
    x = torch.randn(200)
    y = 2.5 * x + torch.randn(200)
    with pytest.warns(ConvergenceWarning) as caught:
        fit = SVI(guide="normal", batch_size=64, steps=steps, progress=False).fit(line_model, x, y)
    assert not fit.converged
    message = str(caught[0].message)
    assert "\n" not in message
    assert f"not converged after {steps} steps" in message
    assert "raise steps" in message and "lr" in message
    assert fit.info["convergence"]["loss_fall"] > fit.info["convergence"]["threshold"]


def test_early_stopping_converges_without_a_warning():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g)
    y = 2.5 * x + torch.randn(200, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = SVI(guide="delta", lr=0.05, steps=3000, early_stopping=1e-3, progress=False).fit(
            line_model, x, y
        )
    assert fit.converged and fit.n_iter < 3000
    assert fit.info["stop_reason"] == "early stopping"


def test_too_few_steps_to_judge_say_so():
    x = torch.randn(20)
    with pytest.warns(ConvergenceWarning, match="too few to test"):
        fit = SVI(steps=5, progress=False).fit(line_model, x, 2 * x)
    assert not fit.converged and fit.info["convergence"] == {"tested": False}


def test_the_autoguide_starts_at_the_prior_mean_not_a_random_median():
    x = torch.randn(50)
    a = SVI(guide="normal", steps=1, lr=1e-9, seed=0, progress=False)
    b = SVI(guide="normal", steps=1, lr=1e-9, seed=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        wa, wb = (float(e.fit(line_model, x, 2 * x).params["w"]) for e in (a, b))
    assert abs(wa) < 1e-6 and abs(wb) < 1e-6  # Normal(0, 10): mean 0, whatever the seed


def heavy_tailed_model(x):
    s = pyro.sample("s", dist.HalfCauchy(1.0))  # no finite mean: the median is used
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(0.0, s), obs=x)


def test_a_prior_without_a_finite_mean_starts_at_its_median():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = SVI(steps=1, lr=1e-9, progress=False).fit(heavy_tailed_model, torch.randn(30))
    s = float(fit.params["s"])
    assert 0.0 < s < 20.0 and np.isfinite(s)


def test_trend_sees_a_fall_through_noise_and_not_noise_alone():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 10.0, size=500)
    flat = loss_trend(list(300 + noise), data_size=200)
    falling = loss_trend(list(300 - 0.5 * np.arange(500) + noise), data_size=200)
    assert not flat.descending
    assert falling.descending and falling.window == 250
    assert abs(falling.fall - 0.5 * 249) < 3 * falling.stderr
    # a deterministic loss that creeps down by rounding-level amounts has settled
    creeping = loss_trend(list(1000 - 1e-6 * np.arange(500)), data_size=200)
    assert creeping.fall > 0 and not creeping.descending
    assert (
        trend_window(9) == 0
        and trend_window(12) == 10
        and trend_window(100) == 50
        and trend_window(10_000) == 250
    )


USER_MODEL = """
import pyro
import pyro.distributions as dist


def model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)
"""


def test_cli_prints_one_warning_line_for_an_unconverged_fit(tmp_path, capsys):
    (tmp_path / "line.py").write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    np.savez(tmp_path / "xy.npz", x=x, y=2.5 * x + rng.normal(size=200))
    argv = ["fit", f"{tmp_path / 'line.py'}:model", "--engine", "svi"]
    argv += ["--data", str(tmp_path / "xy.npz"), "--out", str(tmp_path / "run"), "--draws", "10"]
    argv += ["--set", "steps=200", "--set", "progress=false"]
    assert main(argv) == 0
    lines = [
        ln
        for ln in capsys.readouterr().err.splitlines()
        if "ConvergenceWarning" in ln or "not converged" in ln
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: SVI: not converged after 200 steps")
    assert "raise steps" in lines[0]
