"""Signals during ``jointkl fit``: SIGINT and SIGTERM stop at a step boundary, write a
checkpoint, mark the run interrupted and exit 130 / 143; after kill -9 the run resumes from its
newest checkpoint. Each resumed run gives the numbers of a run that never stopped.

SIGINT/SIGTERM are sent to this very process while ``main`` runs in it (the CLI's handler is
installed in the main thread for the length of the fit), so no interpreter is started per
case; kill -9 needs a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from jointkl.cli import main
from jointkl.fit import Fit
from jointkl.runs import latest_checkpoint


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """These cases are about files, signals and refusals, not plots: ``jointkl fit`` writes
    every file of a run except the PNGs (drawing them is ~90 % of a small fit's time; the
    plots have tests of their own)."""
    import jointkl.diagnostics

    monkeypatch.setattr(jointkl.diagnostics, "write_plots", lambda fit, idata, out_dir: [])


@pytest.fixture
def csv2(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (20, 2)), rng.normal(3, 0.5, (20, 2))])
    np.savetxt(tmp_path / "d.csv", x, delimiter=",", header="a,b", comments="")
    return tmp_path / "d.csv"


def argv(data, out, steps):
    return [
        "fit", "gmm", "--engine", "svi", "--data", str(data), "--out", str(out),
        "--set", "n_components=2", "--set", "covariance=diag", "--set", f"steps={steps}",
        "--set", "checkpoint_every=5", "--set", "progress=false", "--draws", "2",
    ]  # fmt: skip


def signal_once_checkpointed(out, signum) -> threading.Thread:
    """A thread that sends ``signum`` to this process once ``out`` has a checkpoint (the fit
    is then running, with the CLI's handler installed)."""

    def send():
        deadline = time.monotonic() + 300
        while latest_checkpoint(out / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def assert_resumes_exactly(tmp_path, data, out, from_step):
    """Resume ``out`` to ``from_step + 5`` steps; compare with a run that never stopped."""
    target = from_step + 5
    assert main([*argv(data, out, target), "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(argv(data, whole, target)) == 0
    a, b = Fit.load(out), Fit.load(whole)
    assert a.n_iter == b.n_iter == target and a.history == b.history
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "finished" and config["resumed"]


def assert_marked_interrupted(out, name, stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("jointkl:")]
    assert len(lines) == 1 and f"interrupted by {name}" in lines[0], stderr
    meta = json.loads((out / "fit.json").read_text())
    assert meta["info"]["interrupted"] == name
    assert meta["info"]["stop_reason"].startswith(f"interrupted by {name} after step")
    assert json.loads((out / "config.json").read_text())["status"] == f"interrupted by {name}"
    n = meta["n_iter"]
    assert latest_checkpoint(out / "checkpoints").name == f"step-{n:08d}.pt"  # at the stop
    return n


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_at_a_step_boundary_and_resume_exactly(
    tmp_path, capsys, csv2, signum, status
):
    out = tmp_path / "run"
    sender = signal_once_checkpointed(out, signum)
    code = main(argv(csv2, out, 100_000))
    sender.join()
    name = signal.Signals(signum).name
    stderr = capsys.readouterr().err
    assert code == status, stderr
    n = assert_marked_interrupted(out, name, stderr)
    assert_resumes_exactly(tmp_path, csv2, out, n)


def langevin_argv(data, out):
    return [
        "fit", "vae", "--engine", "langevin", "--data", str(data), "--out", str(out),
        "--set", "hidden=[4]", "--set", "latent_dim=1", "--set", "warmup=20",
        "--set", "num_samples=20", "--set", "num_chains=2", "--set", "checkpoint_every=5",
        "--set", "progress=false", "--draws", "2",
    ]  # fmt: skip


@pytest.mark.parametrize("stop_after", [10, 30], ids=["in warmup", "in sampling"])
def test_langevin_stops_on_sigterm_at_a_step_boundary_and_resumes_exactly(
    tmp_path, capsys, monkeypatch, stop_after
):
    from jointkl.inference import langevin

    rng = np.random.default_rng(0)
    data = tmp_path / "bits.csv"
    np.savetxt(data, (rng.random((8, 3)) < 0.5).astype(int), delimiter=",", fmt="%d")
    advance = langevin._Sampler.advance

    def advance_then_signal(self, state):  # SIGTERM arrives during step ``stop_after``
        new = advance(self, state)
        if new.step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return new

    out = tmp_path / "run"
    monkeypatch.setattr(langevin._Sampler, "advance", advance_then_signal)
    assert main(langevin_argv(data, out)) == 143
    monkeypatch.setattr(langevin._Sampler, "advance", advance)
    assert assert_marked_interrupted(out, "SIGTERM", capsys.readouterr().err) == stop_after
    stopped = Fit.load(out)
    assert stopped.n_iter == stop_after and not stopped.converged
    kept = max(0, stop_after - 20)  # the draws taken before the stop, and no others
    assert all(v.shape[:2] == (2, kept) for v in stopped.samples.values())
    assert main(["diagnose", str(out), "--draws", "2"]) == 0
    facts = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("interrupted: SIGTERM") for line in facts) == 1, facts

    assert main([*langevin_argv(data, out), "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(langevin_argv(data, whole)) == 0
    a, b = Fit.load(out), Fit.load(whole)
    assert a.n_iter == b.n_iter == 40 and a.history == b.history
    assert "interrupted" not in a.info
    for k in b.samples:
        assert torch.equal(a.samples[k], b.samples[k]), k


def test_kill_9_then_resume_continues_from_the_newest_checkpoint(tmp_path, csv2):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jointkl.cli", *argv(csv2, out, 100_000)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "fit.json").exists()
    assert json.loads((out / "config.json").read_text())["status"] == "running"
    newest = latest_checkpoint(out / "checkpoints")
    step = int(newest.stem.split("-")[1])
    assert_resumes_exactly(tmp_path, csv2, out, step)
