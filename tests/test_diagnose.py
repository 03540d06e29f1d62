"""`jointkl diagnose` on whatever InferenceData it gets: no posterior, one chain, constant
entries, NaN, a point estimate; the Pareto-k table; every figure titled and labelled."""

from __future__ import annotations

import contextlib
import io
import json

import arviz as az
import numpy as np
import pytest

from jointkl import diagnostics
from jointkl.cli import main
from jointkl.diagnostics import diagnose, pareto_k_table


def _idata(chains=2, draws=30, n=40, posterior=True, seed=0, **extra):
    rng = np.random.default_rng(seed)
    groups = {}
    if isinstance(posterior, dict):
        groups["posterior"] = posterior
    elif posterior:
        chol = np.zeros((chains, draws, 2, 2))
        chol[..., 0, 0] = 1.0  # a Cholesky factor: unit diagonal entry, a structural zero
        chol[..., 1, 0] = rng.normal(0.3, 0.1, (chains, draws))
        chol[..., 1, 1] = np.sqrt(1 - chol[..., 1, 0] ** 2)
        groups["posterior"] = {"mu": rng.normal(size=(chains, draws)), "corr_chol": chol}
    ll = rng.normal(-1.0, 0.1, (chains, draws, n))
    obs = rng.normal(size=(n, 3))
    groups["log_likelihood"] = {"obs": ll}
    groups["observed_data"] = {"obs": obs}
    groups["posterior_predictive"] = {"obs": rng.normal(size=(chains, draws, n, 3))}
    groups.update(extra)
    with contextlib.redirect_stderr(io.StringIO()):
        return az.from_dict(**groups, dims={"obs": ["data", "feature"]})


class FakeFit:
    engine, objective, n_iter, converged = "svi", "loss", 3, False
    history = [3.0, 2.0, 1.5]
    params: dict = {}
    samples: dict = {}
    info: dict = {}
    pair = None
    final_objective = 1.5


def test_healthy_idata_gives_summary_loo_pareto_and_plots(tmp_path):
    d = diagnose(FakeFit(), _idata(), tmp_path)
    assert not d.failures, d.failures
    assert {"r_hat", "ess_bulk", "mean", "sd"} <= set(d.summary.columns)
    assert "corr_chol[0, 1]" not in d.summary.index  # constant in every draw: omitted ...
    assert any("corr_chol[0, 1]" in n and "constant" in n for n in d.notes)  # ... and said
    (loo,) = d.loo
    assert int(loo.pareto["count"].sum()) == 40
    names = sorted(p.name for p in d.plots)
    assert names == ["objective.png", "posterior-1.png", "ppc.png", "trace.png"]


def test_no_posterior_is_said_not_raised(tmp_path):
    fit = FakeFit()
    fit.engine, fit.params = "nce", {"log_Z": 0.0, "w": 1.0}
    ll = np.full((1, 20, 40), -1.0)  # a point estimate repeated: no spread
    idata = _idata(posterior=False, log_likelihood={"obs": ll})
    d = diagnose(fit, idata, tmp_path)
    assert not d.failures, d.failures
    assert d.summary is None and d.loo == []
    assert any(
        n.startswith("summary: none: NCE fits of this model are point estimates") for n in d.notes
    )
    assert any(
        n.startswith("LOO (obs): not computed: every draw is the same point") for n in d.notes
    )
    assert all("\n" not in n for n in d.notes)


def test_one_chain_drops_r_hat_and_says_so(tmp_path):
    d = diagnose(FakeFit(), _idata(chains=1), None)
    assert not d.failures
    assert "r_hat" not in d.summary.columns and "ess_bulk" in d.summary.columns
    assert any(n.startswith("R-hat: not computed") for n in d.notes)


def test_nan_and_too_few_draws(tmp_path):
    idata = _idata()
    idata.log_likelihood["obs"][0, 0, 0] = np.nan
    idata.posterior["mu"][0, 0] = np.nan
    d = diagnose(FakeFit(), idata, tmp_path)
    assert not d.failures, d.failures
    assert any("NaN or infinite" in n for n in d.notes)
    d = diagnose(FakeFit(), _idata(chains=1, draws=5), None)
    assert any("5 posterior draws; PSIS-LOO needs at least" in n for n in d.notes)


def test_arviz_warnings_are_collected_one_line_each():
    rng = np.random.default_rng(1)
    ll = rng.normal(-1, 1, (2, 15, 30))
    ll[:, :, 0] = rng.standard_cauchy((2, 15)) * 50  # one very influential point
    d = diagnose(FakeFit(), _idata(draws=15, n=30, log_likelihood={"obs": ll}), None)
    assert any("Pareto" in w for w in d.warnings), d.warnings
    assert all("\n" not in w for w in d.warnings)


def test_pareto_k_classes():
    table = pareto_k_table(np.array([0.1, 0.55, 0.6, 0.8, 1.5, np.nan]), good_k=0.7)
    assert list(table.index) == ["good", "ok", "bad", "very bad"]
    assert list(table["count"]) == [1, 2, 1, 2]  # NaN counts as very bad


def test_many_entries_are_paged_and_nothing_dropped_silently(tmp_path):
    rng = np.random.default_rng(2)
    idata = _idata(posterior={"locs": rng.normal(size=(2, 20, 5, 6))})
    d = diagnose(FakeFit(), idata, tmp_path)
    pages = sorted(p.name for p in d.plots if p.name.startswith("posterior-"))
    assert pages == ["posterior-1.png", "posterior-2.png", "posterior-3.png"]  # 30 panels
    big = _idata(posterior={"z": rng.normal(size=(2, 20, 40, 8))})
    d = diagnose(FakeFit(), big, tmp_path)
    assert any(n.startswith("posterior plots: z (40, 8) left out: 320 entries") for n in d.notes)
    assert not (tmp_path / "posterior-1.png").exists()  # the earlier pages are gone


def test_every_figure_has_a_title_and_labelled_axes(tmp_path, monkeypatch):
    seen = []
    real = diagnostics._save

    def record(fig, path):
        axes = [a for a in fig.axes if a.get_visible()]
        titled = bool(fig._suptitle and fig._suptitle.get_text()) or all(
            a.get_title() for a in axes
        )
        unlabelled = [a.get_title() for a in axes if not (a.get_xlabel() and a.get_ylabel())]
        seen.append((path.name, titled, unlabelled))
        return real(fig, path)

    monkeypatch.setattr(diagnostics, "_save", record)
    diagnose(FakeFit(), _idata(), tmp_path)
    assert {s[0] for s in seen} == {"objective.png", "trace.png", "posterior-1.png", "ppc.png"}
    for name, titled, unlabelled in seen:
        assert titled and not unlabelled, (name, unlabelled)
    objective = next(s for s in seen if s[0] == "objective.png")
    assert objective  # named from fit.objective: checked below through the axes text


def test_objective_plot_names_the_recorded_objective(tmp_path, monkeypatch):
    texts = []
    monkeypatch.setattr(
        diagnostics,
        "_save",
        lambda fig, path: texts.append((fig.axes[0].get_title(), fig.axes[0].get_ylabel())),
    )
    diagnostics.objective_plot([1.0, 2.0], "log_posterior", tmp_path / "o.png", "em")
    title, ylabel = texts[0]
    assert "log_posterior" in title and "higher is better" in title and "EM" in title
    assert ylabel.startswith("log_posterior")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_nce_run_diagnoses_and_says_why_there_is_no_posterior(tmp_path):
    run = tmp_path / "nce"
    code, _, err = _run(
        [
            "fit",
            "energy",
            "--engine",
            "nce",
            "--out",
            str(run),
            "--draws",
            "12",
            "--set",
            "steps=3",
            "--set",
            "progress=false",
        ]
    )
    assert code == 0, err
    code, out, err = _run(["diagnose", str(run)])
    assert code == 0, err
    assert "point estimates: no posterior" in out
    assert not [x for x in out.splitlines() if x.startswith("failed:")], out
    assert (run / "report.html").is_file()


def test_interrupted_fit_is_said(tmp_path):
    run = tmp_path / "em"
    code, _, err = _run(
        [
            "fit",
            "gmm",
            "--engine",
            "em",
            "--out",
            str(run),
            "--draws",
            "12",
            "--set",
            "max_iter=2",
            "--set",
            "progress=false",
            "--set",
            "covariance=diag",
        ]
    )
    assert code == 0, err
    meta = json.loads((run / "fit.json").read_text())
    meta["info"]["interrupted"] = True
    (run / "fit.json").write_text(json.dumps(meta))
    code, out, _ = _run(["diagnose", str(run)])
    assert code == 0 and "interrupted: the results are those of the last saved state" in out


@pytest.mark.parametrize("make", ["missing", "empty", "config-only"])
def test_a_directory_that_is_not_a_run_exits_2(tmp_path, make, capsys):
    path = tmp_path / "x"
    if make != "missing":
        path.mkdir()
    if make == "config-only":
        (path / "config.json").write_text("{}")
    assert main(["diagnose", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("not found" in err or "no fit.json" in err), err
