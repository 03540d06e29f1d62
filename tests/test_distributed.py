"""Data-parallel SVI and NCE on torch.distributed: two gloo processes on the CPU give the
parameters of one process (same global batches, seed and data); rank 0 alone writes; a rank
that dies ends the run with one line and the last good checkpoint intact; a run resumes
under another number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from jointkl.models.energy import energy_data

from jointkl import distributed
from jointkl.checkpoint import LoopState
from jointkl.cli import _without_nproc, main
from jointkl.fit import Fit

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    return subprocess.run(
        [*cmd, "--nproc-per-node=2", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_processes_give_the_parameters_of_one(tmp_path):
    """SVI and NCE, mini-batched and full-batch, 63 rows split 32/31: every parameter and
    every step's loss of the 2-process gloo run equal the 1-process run's to float-summation
    tolerance, and are identical on both ranks."""
    done = _torchrun(str(HERE / "distributed_fits.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    sys.path.insert(0, str(HERE))
    try:
        import distributed_fits as fits
    finally:
        sys.path.remove(str(HERE))
    x, y = fits.data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = fits.fits(x, y)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert set(one) == set(ranks[0]) == set(ranks[1])
    assert {k.split("/")[0] for k in one} == {"svi", "svi_full", "nce", "nce_full"}
    for k, v in one.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the same Fit on every rank
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the fits moved: equality is not of two untouched initialisations
    assert float(one["nce/mu"].abs().max()) > 1e-3
    assert float(one["svi/w"].abs().max()) > 0.1


def _fit_cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jointkl", "fit", *args],
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_rank_death_then_resume_with_one_process(tmp_path):
    """`jointkl fit --nproc 2` with rank 1 killed (SIGKILL) at step 12: one line says which
    rank, how, and the last good checkpoint (step 10, readable); rank 0 alone wrote (one
    'fitting' line, no stray files). Resumed with one process, the run ends with the
    parameters of an uninterrupted 1-process fit: the checkpoint does not depend on P."""
    data = tmp_path / "ring.npy"
    np.save(data, energy_data("ring", 256, 3).numpy())
    out = tmp_path / "run"
    common = ["energy", "--data", str(data), "--out", str(out), "--draws", "5"]
    sets = ["--set", "steps=16", "--set", "batch_size=32", "--set", "checkpoint_every=5"]
    died = _fit_cli(
        *common,
        "--engine",
        "nce",
        *sets,
        "--nproc",
        "2",
        JOINTKL_TEST_KILL_RANK_AT_STEP="1:12",
    )
    assert died.returncode != 0
    lines = [ln for ln in died.stderr.splitlines() if ln.startswith("jointkl: rank 1 of 2")]
    assert len(lines) == 1, died.stderr[-2000:]
    assert "killed by SIGKILL" in lines[0] and "step-00000010.pt" in lines[0]
    assert died.stderr.count("fitting energy on 2 processes") == 1
    assert "Traceback" not in died.stderr
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["step-00000005.pt", "step-00000010.pt"]
    assert LoopState.load(out / "checkpoints" / "step-00000010.pt").step == 10
    assert not (out / "fit.json").exists()

    resumed = _fit_cli("energy", "--resume", "--out", str(out), "--draws", "5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "step-00000010.pt" in resumed.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "finished"
    fit = Fit.load(out)
    assert fit.n_iter == 16

    from jointkl.inference import NCE
    from jointkl.models import EnergyModel

    settings = {
        k: v
        for k, v in config["engine_config"].items()
        if k not in ("checkpoint_dir", "checkpoint_every", "resume")
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = NCE(**settings, progress=False).fit(
            EnergyModel(), torch.as_tensor(np.load(data), dtype=torch.float32)
        )
    for k, v in one.params.items():
        torch.testing.assert_close(fit.params[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert fit.history[:10] == pytest.approx(one.history[:10], rel=1e-4, abs=1e-5)


def test_em_on_two_processes_from_the_command_line(tmp_path):
    """`jointkl fit gmm --engine em --nproc 2`: EM is handed the whole data on each rank and
    sums its E-step statistics over the ranks' rows, so the run's parameters are those of a
    1-process fit (float-summation tolerance); rank 0 alone writes."""
    from jointkl.inference import EM
    from jointkl.models import GaussianMixture

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (150, 2)), rng.normal(3, 0.5, (151, 2))])
    data = tmp_path / "blobs.npy"
    np.save(data, x)
    out = tmp_path / "run"
    done = _fit_cli(
        "gmm", "--engine", "em", "--data", str(data), "--out", str(out),
        "--set", "n_components=2", "--draws", "5", "--nproc", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("fitting gmm on 2 processes") == 1, done.stderr[-2000:]
    two = Fit.load(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = EM(progress=False).fit(GaussianMixture(n_components=2), torch.as_tensor(x))
    assert two.n_iter == one.n_iter
    for k, v in one.params.items():
        torch.testing.assert_close(two.params[k], v, rtol=1e-9, atol=1e-10, msg=k)


def test_nproc_refusals_and_launcher(capsys, monkeypatch):
    """--nproc 0 and a non-data-parallel engine are refused in one line (exit 2) before
    anything starts; --nproc is taken out of the relaunched command; P > cores is said."""
    with pytest.raises(SystemExit) as e:
        main(["fit", "gmm", "--engine", "svi", "--nproc", "0"])
    assert e.value.code == 2
    assert "--nproc: expected a whole number >= 1" in capsys.readouterr().err
    assert main(["fit", "gmm", "--engine", "langevin", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "engine 'langevin' does not run data-parallel" in err and len(err.splitlines()) == 1
    assert _without_nproc(["fit", "m", "--nproc", "3", "--nproc=4", "--seed", "1"]) == [
        "fit",
        "m",
        "--seed",
        "1",
    ]
    import torch.distributed.run as torchrun

    calls = []
    monkeypatch.setattr(torchrun, "run", lambda a: calls.append(a.nproc_per_node))
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert distributed.launch(["fit", "gmm"], 3) == 0
    assert calls == ["3"]
    assert "--nproc 3 exceeds this machine's 1 core(s)" in capsys.readouterr().err
    with pytest.raises(distributed.InputError):
        distributed.launch(["fit", "gmm"], 0)


def test_shards_and_batch_parts():
    """Contiguous shards cover the rows once, sizes within one; the ranks' parts of a
    global batch are, together, that batch; no process group answers rank 0 of 1."""
    assert distributed.rank() == 0 and distributed.world_size() == 1
    for n, p in [(10, 3), (63, 2), (5, 5)]:
        bounds = [distributed.shard_bounds(n, r, p) for r in range(p)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    idx = torch.randperm(63)[:16]
    parts = [distributed.Shard(63, lo, hi).part(idx) for lo, hi in [(0, 32), (32, 63)]]
    rows = torch.cat([local + lo for (_, local), lo in zip(parts, (0, 32), strict=False)])
    assert sorted(rows.tolist()) == sorted(idx.tolist())
    pos = torch.cat([p for p, _ in parts])
    assert sorted(pos.tolist()) == list(range(16))


def test_python_m_jointkl():
    """`python -m jointkl` is the command line (what `torchrun -m jointkl` runs per rank)."""
    done = subprocess.run(
        [sys.executable, "-m", "jointkl", "--version"], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("jointkl ")


def test_a_rank_maps_only_its_rows_of_a_file(tmp_path):
    """row_range (what local_shard gives a rank of a memory-mapped file): rows [lo, hi) of a
    folder of three .npy shards, cut across shard boundaries, read as slices, gathers and
    tensors, equal those rows of the whole data; the view maps only the files (and the
    bytes) its rows lie in; the read dtype is the parent's."""
    from jointkl.data.arrays import open_rows

    x = np.arange(3 * 40 * 3, dtype=np.float64).reshape(120, 3)
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        np.save(folder / f"part{k}.npy", x[40 * k : 40 * (k + 1)])
    rows = open_rows(folder).astype(torch.float32)
    for lo, hi in [(0, 61), (61, 120), (45, 75), (41, 42)]:
        view = distributed.row_range(rows, lo, hi)
        assert len(view) == hi - lo and view.shape == (hi - lo, 3)
        assert view.dtype == np.float32
        np.testing.assert_array_equal(view[:], x[lo:hi].astype(np.float32))
        idx = torch.tensor([hi - lo - 1, 0, (hi - lo) // 2, 0])
        torch.testing.assert_close(view.tensor(idx), torch.as_tensor(x[lo:hi][idx.numpy()]).float())
        files = {p.name for p in view.paths}
        assert files == {f"part{k}.npy" for k in range(3) if 40 * k < hi and 40 * (k + 1) > lo}
        assert sum(s.size for s in view.shards) == (hi - lo) * 3  # only its rows mapped
    with pytest.raises(ValueError):
        distributed.row_range(rows, 5, 5)
    # without a process group local_shard hands the data back untouched
    (same,), _ = distributed.local_shard((rows,), {}, len(rows))
    assert same is rows


def _rank_pid(parent: int, r: int) -> int | None:
    """The pid of rank ``r`` among ``parent``'s children (its RANK in /proc/PID/environ)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={r}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank 1"])
def test_sigterm_stops_every_rank_after_one_step(tmp_path, target):
    """SIGTERM to `jointkl fit --nproc 2` (torchrun forwards it to both ranks) or to rank 1
    alone, mid-fit: the ranks agree on the stop step through the step's all-reduce, rank 0
    writes that step's checkpoint and marks the run interrupted, the command exits 143 with
    one line, as a 1-process run does; the run then resumes to the end."""
    import signal
    import time

    data = tmp_path / "ring.npy"
    np.save(data, energy_data("ring", 256, 3).numpy())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jointkl", "fit", "energy", "--engine", "nce"]
    cmd += ["--data", str(data), "--out", str(out), "--draws", "5", "--nproc", "2"]
    cmd += ["--set", "steps=200000", "--set", "batch_size=32", "--set", "checkpoint_every=5"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mid-fit: a checkpoint is written (retention keeps the last three, so any one)
        def started() -> bool:
            return (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())

        deadline = time.monotonic() + 120
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started(), "the run never reached step 5"
        pid = proc.pid if target == "torchrun" else _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "stopped (" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if "interrupted by SIGTERM" in ln]
    assert len(lines) == 1 and "continue with --resume" in lines[0], err[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "interrupted by SIGTERM"
    fit = Fit.load(out)
    last = LoopState.load(max((out / "checkpoints").iterdir()))
    assert 5 <= fit.n_iter == last.step < 200000  # the agreed step, checkpointed
    assert "SIGTERM" in fit.info["stop_reason"]
