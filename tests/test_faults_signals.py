"""Signals during ``jointkl fit`` (a subprocess each): SIGINT and SIGTERM stop at a step
boundary, write a checkpoint, mark the run interrupted and exit 130 / 143; after kill -9 the
run resumes from its newest checkpoint. Each resumed run gives the numbers of a run that
never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from jointkl.cli import main
from jointkl.fit import Fit
from jointkl.runs import latest_checkpoint


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
        "--set", "checkpoint_every=5", "--set", "progress=false", "--draws", "5",
    ]  # fmt: skip


def start_and_signal(data, out, signum):
    """A long fit in a subprocess, sent ``signum`` once its first checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jointkl.cli", *argv(data, out, 100_000)],
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
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


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


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_at_a_step_boundary_and_resume_exactly(
    tmp_path, csv2, signum, status
):
    out = tmp_path / "run"
    code, stderr = start_and_signal(csv2, out, signum)
    name = signal.Signals(signum).name
    assert code == status, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("jointkl:")]
    assert len(lines) == 1 and f"interrupted by {name}" in lines[0], stderr
    meta = json.loads((out / "fit.json").read_text())
    assert meta["info"]["interrupted"] == name
    assert meta["info"]["stop_reason"].startswith(f"interrupted by {name} after step")
    assert json.loads((out / "config.json").read_text())["status"] == f"interrupted by {name}"
    n = meta["n_iter"]
    assert latest_checkpoint(out / "checkpoints").name == f"step-{n:08d}.pt"  # at the stop
    assert_resumes_exactly(tmp_path, csv2, out, n)


def test_kill_9_then_resume_continues_from_the_newest_checkpoint(tmp_path, csv2):
    out = tmp_path / "run"
    code, _ = start_and_signal(csv2, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "fit.json").exists()
    assert json.loads((out / "config.json").read_text())["status"] == "running"
    newest = latest_checkpoint(out / "checkpoints")
    step = int(newest.stem.split("-")[1])
    assert_resumes_exactly(tmp_path, csv2, out, step)
