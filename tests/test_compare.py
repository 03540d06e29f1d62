"""`jointkl compare` and `jointkl.compare`: az.compare over runs of the same data."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import jointkl
from jointkl.cli import main
from jointkl.errors import InputError

COLUMNS = ["elpd_loo", "p_loo", "elpd_diff", "weight", "dse", "warning"]


def _quiet(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _csv(path, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-4, 0.5, (30, 2)), rng.normal(4, 0.5, (30, 2))])
    np.savetxt(path, x, delimiter=",", header="a,b", comments="")
    return path


def _fit(tmp_path, name, data, k, draws=20):
    run = tmp_path / name
    code, _, err = _quiet(
        ["fit", "gmm", "--engine", "svi", "--data", str(data), "--out", str(run),
         "--draws", str(draws), "--set", f"n_components={k}", "--set", "covariance=diag",
         "--set", "steps=40", "--set", "lr=0.05", "--set", "guide=normal",
         "--set", "progress=false"]
    )  # fmt: skip
    assert code == 0, err
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = _csv(tmp / "a.csv", 0)
    return {
        "one": _fit(tmp, "one", data, 1),
        "two": _fit(tmp, "two", data, 2),
        "other": _fit(tmp, "other", _csv(tmp / "b.csv", 1), 2),
        "few": _fit(tmp, "few", data, 2, draws=2),  # 4 chains x 2 = 8 draws < 11
        "tmp": tmp,
    }


def test_compare_prints_the_table_and_writes_the_plot(runs, tmp_path):
    code, out, err = _quiet(["compare", str(runs["one"]), str(runs["two"]), "--out", str(tmp_path)])
    assert code == 0, err
    header = out.splitlines()[0]
    for c in COLUMNS:
        assert c in header, c
    assert out.splitlines()[1].startswith("two")  # two clusters beat one on two-cluster data
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_python_compare_takes_run_dirs_and_fits(runs):
    table = jointkl.compare([runs["one"], runs["two"]])
    assert list(table.index) == ["two", "one"]
    assert abs(float(table["weight"].sum()) - 1.0) < 1e-6
    assert table.loc["two", "elpd_diff"] == 0 and table.loc["one", "elpd_diff"] > 0
    fits = {"k1": jointkl.Fit.load(runs["one"]), "k2": jointkl.Fit.load(runs["two"])}
    table = jointkl.compare(fits, draws=20)
    assert set(table.index) == {"k1", "k2"}


@pytest.mark.parametrize(
    "which, needle",
    [
        (["one"], "at least two runs"),
        (["one", "other"], "fitted to different data"),
        (["one", "few"], "PSIS-LOO needs at least"),
        (["one", "missing"], "not found"),
        (["one", "tmp"], "no fit.json"),
    ],
)
def test_bad_input_exits_2_with_one_line(runs, which, needle, tmp_path):
    paths = [str(runs.get(w, tmp_path / w)) for w in which]
    code, _, err = _quiet(["compare", *paths, "--out", str(tmp_path)])
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "compare.png").exists()


def test_python_compare_refuses_other_data(runs):
    with pytest.raises(InputError, match="different data"):
        jointkl.compare([runs["one"], runs["other"]])
