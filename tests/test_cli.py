"""End-to-end CLI checks: the console script as a subprocess, and main() in-process."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jointkl.cli import main
from jointkl.errors import InputError

JOINTKL = [sys.executable, "-m", "jointkl.cli"]


def run(*args, cwd=None):
    return subprocess.run([*JOINTKL, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def small_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-4, 0.5, (30, 2)), rng.normal(4, 0.5, (30, 2))])
    path = tmp_path / "points.csv"
    np.savetxt(path, x, delimiter=",", header="a,b", comments="")
    return path


def test_fit_then_diagnose_end_to_end(tmp_path, small_csv):
    import arviz as az

    out = tmp_path / "run"
    r = run(
        "fit",
        "gmm",
        "--engine",
        "svi",
        "--data",
        str(small_csv),
        "--out",
        str(out),
        "--set",
        "n_components=2",
        "--set",
        "covariance=diag",
        "--set",
        "steps=60",
        "--set",
        "guide=normal",
        "--set",
        "progress=false",
        "--draws",
        "40",
    )
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    for name in ("config.json", "metrics.jsonl", "fit.json", "tensors.pt", "inference_data.nc"):
        assert (out / name).is_file(), name
    assert sorted((out / "checkpoints").glob("step-*.pt"))
    r = run("diagnose", str(out))
    assert r.returncode == 0, r.stderr
    assert "elpd_loo" in r.stdout and "locs" in r.stdout
    for png in ("objective.png", "trace.png", "ppc.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    idata = az.from_netcdf(str(out / "inference_data.nc"))
    assert {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    } <= set(idata.groups())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 60


USER_MODEL = """
import pyro
import pyro.distributions as dist


def model(x, y):
    slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
    noise = pyro.sample("noise", dist.HalfNormal(5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(slope * x, noise), obs=y)
"""


def test_user_model_file_fits_through_the_cli(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    rng = np.random.default_rng(1)
    x = rng.normal(size=80)
    np.savez(tmp_path / "xy.npz", x=x, y=3.0 * x + 0.1 * rng.normal(size=80))
    out = tmp_path / "run"
    code = main(
        [
            "fit",
            f"{tmp_path / 'mymodel.py'}:model",
            "--engine",
            "svi",
            "--data",
            str(tmp_path / "xy.npz"),
            "--out",
            str(out),
            "--draws",
            "20",
            "--set",
            "steps=400",
            "--set",
            "lr=0.05",
            "--set",
            "progress=false",
        ]
    )
    assert code == 0
    from jointkl import Fit

    with pytest.raises(InputError, match="never runs code"):
        Fit.load(out)  # a run directory is data: its model file is not imported unasked
    fit = Fit.load(out, trust=True)  # rebuilt from the file spec, its hash checked
    assert abs(float(fit.params["slope"]) - 3.0) < 0.2
    assert main(["diagnose", str(out)]) == 2
    assert main(["diagnose", str(out), "--trust-model-file"]) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["fit", "gmm", "--engine", "svi", "--data", "no/such.csv"], "not found"),
        (["fit", "nosuchmodel", "--engine", "svi"], "unknown model"),
        (["fit", "gmm", "--engine", "warp"], "unknown engine"),
        (["fit", "gmm", "--engine", "svi", "--set", "steps"], "malformed --set"),
        (["fit", "gmm", "--engine", "svi", "--set", "colour=red"], "unknown setting"),
        (["diagnose", "no/such/run"], "not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    argv = [a if a != "no/such.csv" else str(tmp_path / "no/such.csv") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_nan_and_ragged_csv_exit_2(tmp_path, capsys):
    nan = tmp_path / "nan.csv"
    nan.write_text("1.0,2.0\n3.0,nan\n5.0,6.0\n")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1.0,2.0\n3.0\n5.0,6.0\n")
    for path, needle in ((nan, "NaN"), (ragged, "line 2 has 1 columns, expected 2")):
        assert (
            main(
                ["fit", "gmm", "--engine", "svi", "--data", str(path), "--out", str(tmp_path / "r")]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_console_script_exit_status_for_bad_input(tmp_path):
    r = run("fit", "gmm", "--engine", "svi", "--data", str(tmp_path / "missing.npy"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("jointkl: error:")


def test_models_and_engines_are_listed(capsys):
    assert main(["models"]) == 0 and "gmm" in capsys.readouterr().out
    assert main(["engines"]) == 0 and "svi" in capsys.readouterr().out


def test_hmm_em_run_with_many_observed_sites_plots_a_few(tmp_path):
    """A pyro.markov chain has one observed site per step; the run still gets one
    log-likelihood variable and a posterior predictive plot of a few of them."""
    import arviz as az

    out = tmp_path / "hmm"
    code = main(
        [
            "fit",
            "hmm",
            "--engine",
            "em",
            "--out",
            str(out),
            "--draws",
            "10",
            "--threads",
            "1",
            "--set",
            "n_states=2",
            "--set",
            "max_iter=5",
            "--set",
            "progress=false",
        ]
    )
    assert code == 0
    idata = az.from_netcdf(str(out / "inference_data.nc"))
    assert list(idata.log_likelihood.data_vars) == ["obs"]
    assert (out / "plots" / "ppc.png").stat().st_size > 1000


def test_threads_must_be_a_positive_whole_number():
    r = run("fit", "gmm", "--engine", "em", "--threads", "0")
    assert r.returncode == 2
    assert "--threads" in r.stderr and "expected a whole number >= 1" in r.stderr
