"""NUTS checkpoints: a fit stopped at an iteration boundary (Ctrl-C in Python; SIGINT or
SIGTERM under ``jointkl fit``, which then marks the run interrupted and exits 130 / 143) and
resumed gives exactly the draws, statistics and history of a fit that never stopped, whether
it stopped in warmup (the adaptation state mid-window) or while sampling."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import NUTS
from jointkl.inference.nuts import chains

from jointkl import InputError
from jointkl.runs import latest_checkpoint

# warmup 40 has slow windows at iterations 6-25 and 26-35: stopping at 15 cuts one.
QUICK = dict(num_chains=2, warmup=40, draws=20, max_tree_depth=5, progress=False)


def regression(x, y):
    slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
    noise = pyro.sample("noise", dist.HalfNormal(5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(slope * x, noise), obs=y)


def data(n=30):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    return x, 2.0 * x + 0.5 * torch.randn(n, generator=g)


def assert_same_fit(a, b):
    assert a.n_iter == b.n_iter and a.history == b.history
    assert a.samples.keys() == b.samples.keys()
    for k in b.samples:
        assert torch.equal(a.samples[k], b.samples[k]), k
    for k in b.state:
        assert torch.equal(a.state[k], b.state[k]), k
    for k in ("divergences", "warmup_divergences", "step_size", "gradients"):
        assert a.info[k] == b.info[k], k


@pytest.mark.parametrize("dense", [False, True], ids=["diagonal", "dense"])
@pytest.mark.parametrize("stop", [15, 50], ids=["in warmup", "in sampling"])
def test_a_fit_interrupted_and_resumed_gives_the_uninterrupted_draws(
    tmp_path, monkeypatch, stop, dense
):
    """Also with a dense metric: its M⁻¹ (C, D, D) and the window's outer-product sums are
    in the checkpoint."""
    x, y = data()
    quick = {**QUICK, "dense_mass": dense}
    whole = NUTS(**quick).fit(regression, x, y)
    assert whole.state["inverse_mass_matrix"].dim() == (3 if dense else 2)
    iterate = chains.Chains.iterate

    def interrupted(self):  # Ctrl-C arrives during iteration ``stop + 1``
        if self.step == stop:
            raise KeyboardInterrupt
        iterate(self)

    monkeypatch.setattr(chains.Chains, "iterate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        NUTS(**quick, checkpoint_dir=str(tmp_path), checkpoint_every=7).fit(regression, x, y)
    monkeypatch.setattr(chains.Chains, "iterate", iterate)
    # the state of the last whole iteration is kept, past the periodic checkpoints
    assert latest_checkpoint(tmp_path).name == f"step-{stop:08d}.pt"
    resumed = NUTS(**quick, checkpoint_dir=str(tmp_path), resume=True).fit(regression, x, y)
    assert_same_fit(resumed, whole)
    assert latest_checkpoint(tmp_path).name == f"step-{60:08d}.pt"


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    x, y = data()
    NUTS(**QUICK, checkpoint_dir=str(tmp_path)).fit(regression, x, y)
    other = {**QUICK, "target_accept": 0.9}
    with pytest.raises(InputError, match="target_accept=0.8"):
        NUTS(**other, checkpoint_dir=str(tmp_path), resume=True).fit(regression, x, y)
    # the default ("auto") is dense on this 2-coordinate model; a diagonal fit refuses it
    diagonal = {**QUICK, "dense_mass": False}
    with pytest.raises(InputError, match="holds a dense mass matrix; this fit adapts a diagonal"):
        NUTS(**diagonal, checkpoint_dir=str(tmp_path), resume=True).fit(regression, x, y)


def test_checkpoint_settings_are_checked():
    with pytest.raises(InputError, match="checkpoint_every needs checkpoint_dir"):
        NUTS(checkpoint_every=5)
    with pytest.raises(InputError, match="resume=True needs checkpoint_dir"):
        NUTS(resume=True)


USER_MODEL = """
import pyro
import pyro.distributions as dist


def model(x, y):
    slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
    noise = pyro.sample("noise", dist.HalfNormal(5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(slope * x, noise), obs=y)
"""


@pytest.fixture
def user_run(tmp_path, monkeypatch):
    """A model file and its data, and the ``jointkl fit`` arguments of a tiny NUTS run."""
    import jointkl.diagnostics

    # files, signals and resumes are at stake here, not plots (they have tests of their own)
    monkeypatch.setattr(jointkl.diagnostics, "write_plots", lambda fit, idata, out_dir: [])
    (tmp_path / "m.py").write_text(USER_MODEL)
    x, y = data()
    np.savez(tmp_path / "xy.npz", x=x.numpy(), y=y.numpy())

    def argv(out):
        return [
            "fit", f"{tmp_path / 'm.py'}:model", "--engine", "nuts", "--out", str(out),
            "--data", str(tmp_path / "xy.npz"), "--draws", "20",
            *[a for k, v in QUICK.items() for a in ("--set", f"{k}={str(v).lower()}")],
            "--set", "checkpoint_every=5",
        ]  # fmt: skip

    return argv


@pytest.mark.parametrize(
    "signum, status, stop",
    [(signal.SIGINT, 130, 12), (signal.SIGTERM, 143, 47)],
    ids=["SIGINT in warmup", "SIGTERM in sampling"],
)
def test_cli_stops_on_a_signal_marks_the_run_and_resumes_exactly(
    tmp_path, capsys, monkeypatch, user_run, signum, status, stop
):
    from jointkl.cli import main
    from jointkl.fit import Fit

    iterate = chains.Chains.iterate

    def iterate_then_signal(self):  # the signal arrives during iteration ``stop``
        iterate(self)
        if self.step == stop:
            os.kill(os.getpid(), signum)

    out = tmp_path / "run"
    monkeypatch.setattr(chains.Chains, "iterate", iterate_then_signal)
    assert main(user_run(out)) == status
    monkeypatch.setattr(chains.Chains, "iterate", iterate)
    name = signal.Signals(signum).name
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jointkl:")]
    assert len(err) == 1 and f"interrupted by {name}" in err[0] and "--resume" in err[0], err
    assert json.loads((out / "config.json").read_text())["status"] == f"interrupted by {name}"
    assert latest_checkpoint(out / "checkpoints").name == f"step-{stop:08d}.pt"
    stopped = Fit.load(out, trust=True)
    assert stopped.n_iter == stop and not stopped.converged
    assert stopped.info["interrupted"] == name
    assert stopped.info["stop_reason"] == f"interrupted by {name} after step {stop}"
    kept = max(0, stop - QUICK["warmup"])  # the draws taken before the stop, and no others
    assert all(v.shape[:2] == (2, kept) for v in stopped.samples.values())
    assert bool(stopped.samples) == (kept > 0)
    assert main(["diagnose", str(out), "--trust-model-file"]) == 0
    facts = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(f"interrupted: {name}") for line in facts) == 1, facts

    assert main([*user_run(out), "--resume"]) == 0
    assert main(user_run(tmp_path / "whole")) == 0
    a, b = Fit.load(out, trust=True), Fit.load(tmp_path / "whole", trust=True)
    assert "interrupted" not in a.info and "stop_reason" not in a.info
    assert_same_fit(a, b)
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "finished" and config["resumed"]
