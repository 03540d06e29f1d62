"""The bad-input and fault matrix: every case a user meets exits 2 (or raises the documented
``InputError``) with one line naming what was wrong and what was expected, and changes
nothing that existed before; the cases that are valid give the right data.

Families: data files, engine settings (generated from each engine's Settings dataclass),
model files, run directories (incl. divergence and resume), text inputs. Signals are in
``test_faults_signals.py`` (they need a subprocess).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from jointkl.inference import EM, NCE, NUTS, SVI, Langevin

from jointkl.checkpoint import LoopState
from jointkl.cli import main
from jointkl.data.tables import PrecisionWarning, bind_arguments, load_table
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.runs import latest_checkpoint


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """These cases are about files, signals and refusals, not plots: ``jointkl fit`` writes
    every file of a run except the PNGs (drawing them is ~90 % of a small fit's time; the
    plots have tests of their own)."""
    import jointkl.diagnostics

    monkeypatch.setattr(jointkl.diagnostics, "write_plots", lambda fit, idata, out_dir: [])


# ---------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(argv, capsys, root: Path, needle: str, status: int = 2) -> str:
    """Run ``main(argv)``: the status, one stderr line holding ``needle``, nothing changed."""
    before = snapshot(root)
    assert main([str(a) for a in argv]) == status
    err = [line for line in capsys.readouterr().err.splitlines() if "jointkl:" in line]
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert snapshot(root) == before
    return err[0]


def fit_argv(data, out, engine="em", *extra):
    return ["fit", "gmm", "--engine", engine, "--data", data, "--out", out, *extra]


# ---------------------------------------------------------------------- data files
def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        content(path)
    return path


def _npz(**arrays):
    return lambda p: np.savez(p, **arrays)


def _npy(a, **kw):
    return lambda p: np.save(p, a, **kw)


def _mkdir(p):
    p.mkdir()


DATA_REFUSED = [
    ("missing.csv", None, "not found"),
    ("empty.csv", "", "the file is empty"),
    ("blank.csv", "\n\n  \n", "the file is empty"),
    ("header_only.csv", "a,b\n", "no data rows"),
    ("ragged.csv", "1,2\n3,4\n5\n", "line 3 has 1 columns, expected 2"),
    ("text.csv", "1,2\n3,four\n", "line 2 has a non-numeric value"),
    ("nan.csv", "a,b\n1,2\n3,nan\n5,6\n", "row 2 (line 3), column 'b'"),
    ("inf.csv", "1,2\n3,4\n-inf,6\n", "row 3 (line 3), column 'x0'"),
    ("missing_cell.csv", "a,b\n1,2\n3,\n", "missing/NaN/inf"),
    ("one_row.csv", "a,b\n1,2\n", "1 row(s); expected at least 2"),
    ("latin1.csv", b"a,b\n1,2\n3,4\n" + "é,5\n".encode("latin-1"), "not UTF-8"),
    ("junk.csv", bytes(range(256)) * 4, "binary content"),
    ("folder.csv", _mkdir, "is a directory"),
    ("junk.npy", b"\x93NUMPY garbage" * 10, "cannot read as .npy"),
    ("junk.npz", b"PK\x03\x04 not a zip", "cannot read as .npz"),
    ("table.txt", "1,2\n3,4\n", "unknown format '.txt'"),
    ("complex.npy", _npy(np.ones((5, 2), complex)), "complex128; expected real numbers"),
    ("object.npy", _npy(np.array([{"a": 1}] * 5, object), allow_pickle=True), "cannot read"),
    ("text.npy", _npy(np.array(["a", "b", "c"])), "expected real numbers"),
    ("scalar.npy", _npy(np.float64(3.0)), "a single number"),
    ("no_rows.npy", _npy(np.zeros((0, 2))), "has no rows"),
    ("rank3.npy", _npy(np.zeros((6, 3, 2))), "must be (N, D)"),
    ("nan.npy", _npy(np.array([[1.0, 2.0], [np.nan, 1.0], [3.0, 4.0]])), "index (1, 0)"),
    ("empty.npz", _npz(), "holds no arrays"),
    ("wrong_keys.npz", _npz(x=np.ones((5, 2)), colour=np.ones(5)), "['colour'] name no argument"),
    ("ranks.npz", _npz(a=np.ones((5, 2)), b=np.ones(5)), "different ranks"),
]


@pytest.mark.parametrize("name, content, needle", DATA_REFUSED, ids=[c[0] for c in DATA_REFUSED])
def test_bad_data_file_exits_2_naming_the_problem(tmp_path, capsys, name, content, needle):
    data = tmp_path / name
    if content is not None:
        _write(data, content)
    refused(fit_argv(data, tmp_path / "run", "em", "--set", "max_iter=2"), capsys, tmp_path, needle)


@pytest.mark.parametrize(
    "value, needle",
    [("1e300", "exceeds torch.float32's range"), ("1e-300", "below torch.float32's smallest")],
)
def test_magnitudes_float32_cannot_hold_are_refused_with_row_and_column(
    tmp_path, capsys, value, needle
):
    data = _write(tmp_path / "m.csv", f"a,b\n1,2\n3,{value}\n5,6\n")
    err = refused(fit_argv(data, tmp_path / "r", "svi"), capsys, tmp_path, needle)
    assert "row 2 (line 3), column 'b'" in err and "--dtype float64" in err


VALID = [
    ("bom_header.csv", "\ufeffa,b\n" + "".join(f"{i},{i + 1}\n" for i in range(40)), 40, True),
    ("bom_no_header.csv", "\ufeff" + "".join(f"{i},{i + 1}\n" for i in range(40)), 40, False),
    ("crlf.csv", "a,b\r\n" + "".join(f"{i},{i + 1}\r\n" for i in range(40)), 40, True),
    ("one_column.csv", "".join(f"{i}\n" for i in range(40)), 40, False),
]


@pytest.mark.parametrize("name, text, n, named", VALID, ids=[v[0] for v in VALID])
def test_bom_crlf_and_one_column_read_right(tmp_path, name, text, n, named):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    table = load_table(path)
    assert table.named is named
    m = table.matrix()
    assert len(m) == n and float(m.reshape(n, -1)[0, 0]) == 0.0  # the first row is data
    if named:
        assert list(table.columns) == ["a", "b"]


def test_float64_data_stay_float64_and_a_narrowing_cast_warns(tmp_path):
    rng = np.random.default_rng(0)
    x = 1e6 + rng.normal(0, 0.01, (60, 1))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    table = load_table(tmp_path / "x.csv")
    (t,), _ = bind_arguments(table, lambda x: None)
    assert t.dtype == torch.float64 and len(torch.unique(t)) == 60
    with pytest.warns(PrecisionWarning, match="merges 60 distinct values"):
        (t32,), _ = bind_arguments(table, lambda x: None, dtype=torch.float32)
    assert t32.dtype == torch.float32
    big = tmp_path / "big.csv"
    big.write_text("1e300,1\n2,3\n")
    (b,), _ = bind_arguments(load_table(big), lambda x: None)
    assert b[0, 0].item() == 1e300  # finite in float64: not "missing/NaN/inf"


@pytest.mark.parametrize(
    "array, dtype",
    [
        (np.array([[True, False], [False, True], [True, True]]), torch.float64),
        (np.array([[1, 2], [3, 4], [5, 6]], np.int32), torch.int64),
        (np.array([[1, 2], [3, 4], [5, 6]], np.uint8), torch.int64),
        (np.ones((3, 2), np.float32), torch.float32),
    ],
    ids=["bool", "int32", "uint8", "float32"],
)
def test_bool_int_and_float32_arrays_bind(tmp_path, array, dtype):
    np.save(tmp_path / "a.npy", array)
    (t,), _ = bind_arguments(load_table(tmp_path / "a.npy"), lambda x: None)
    assert t.dtype == dtype and torch.equal(t.double(), torch.as_tensor(array).double())


def test_em_fits_float64_csv_without_loss(tmp_path, capsys):
    """EM works in float64: data that float32 would collapse fit and keep their spread."""
    rng = np.random.default_rng(1)
    x = 1e6 + np.concatenate([rng.normal(-0.05, 0.01, (30, 1)), rng.normal(0.05, 0.01, (30, 1))])
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    out = tmp_path / "run"
    argv = fit_argv(tmp_path / "x.csv", out, "em", "--set", "n_components=2", "--draws", "2")
    argv += ["--set", "covariance=diag"]
    assert main([*map(str, argv), "--set", "progress=false"]) == 0
    assert "warning" not in capsys.readouterr().err
    fit = Fit.load(out)
    assert fit.args[0].dtype == torch.float64 and len(torch.unique(fit.args[0])) == 60


# ---------------------------------------------------------------------- settings
def _base_checks(check) -> set[str]:
    """Names of the plain checks a (possibly wrapped) settings check is built from."""
    names, todo, seen = set(), [check], set()
    while todo:
        c = todo.pop()
        if id(c) in seen or not callable(c):
            continue
        seen.add(id(c))
        names.add(getattr(c, "__name__", ""))
        for cell in getattr(c, "__closure__", None) or ():
            todo.append(cell.cell_contents)
    return names


POSITIVE = {"positive_int", "positive_float", "nonnegative_int", "nonnegative_float"}
WHOLE = {"positive_int", "nonnegative_int", "integer"}


def _setting_cases():
    bad_always = {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "dict": {"a": 1},
        "object": object(),
    }
    cases = []
    for engine in (EM, SVI, NCE, Langevin, NUTS):
        for f in dataclasses.fields(engine.Settings):
            base = _base_checks(f.metadata.get("check"))
            values = dict(bad_always)
            if "path_or_none" not in base:
                values["wrong type 'abc'"] = "abc"
            if base & POSITIVE:
                values["wrong sign -1"] = -1
            if base & WHOLE:
                values["fraction 2.5"] = 2.5
                values["out of range 1e300"] = 1e300
            if "boolean" not in base:
                values["bool True"] = True
            if f.default is True or f.default is False:
                values["int 2 for a bool"] = 2
            for label, value in values.items():
                cases.append(
                    pytest.param(engine, f.name, value, id=f"{engine.name}-{f.name}-{label}")
                )
    return cases


SETTING_CASES = _setting_cases()


@pytest.mark.parametrize("engine, name, value", SETTING_CASES)
def test_every_engine_setting_refuses_bad_values(engine, name, value):
    with pytest.raises(InputError) as e:
        engine(**{name: value})
    msg = str(e.value)
    expected = any(w in msg for w in ("must be", "known:", "expected"))
    assert len(msg.splitlines()) == 1 and name in msg and expected, msg


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("steps=abc", "steps must be a positive int, got 'abc'"),
        ("lr=Infinity", "lr must be a positive float, got inf"),
        ("lr=NaN", "lr must be a positive float, got nan"),
        ("steps=-5", "steps must be a positive int, got -5"),
        ("steps=1e300", "steps must be a positive int"),
        ("n_components=0", "n_components"),
        ("guide=nonsense", "guide must be"),
        ("steps", "malformed --set"),
        ("colour=red", "unknown setting 'colour'"),
    ],
)
def test_bad_settings_on_the_command_line_create_nothing(tmp_path, capsys, setting, needle):
    argv = ["fit", "gmm", "--engine", "svi", "--out", tmp_path / "run", "--set", setting]
    refused(argv, capsys, tmp_path, needle)


@pytest.mark.parametrize(
    "flags, needle",
    [([], "--engine is required")],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, needle):
    argv = ["fit", "gmm", "--out", tmp_path / "run", *flags]
    if flags:
        argv += ["--engine", "em"]
    refused(argv, capsys, tmp_path, needle)


def test_a_bad_draws_count_is_refused_by_the_parser_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "gmm", "--engine", "em", "--out", str(tmp_path / "run"), "--draws", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["jointkl fit: error: argument --draws: expected a whole number >= 1, got '0'"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- model files
MODEL_FILES = [
    ("syntax.py", "def model(x):\n    return (\n", "failed to import (line 2): SyntaxError"),
    ("raises_on_import.py", "raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("forty_two.py", "model = 42\n", "model is a int; expected a model function"),
    ("nothing.py", "x = 1\n", "defines no 'pair' or 'model'"),
    (
        "bad_class.py",
        "class pair:\n    def __init__(self):\n        raise ValueError('needs data')\n",
        "pair() failed (line 3): ValueError: needs data",
    ),
    (
        "raising_model.py",
        "import pyro\ndef model(x):\n    raise ValueError('the model is broken')\n",
        "raising_model.py (line 3) raised ValueError: the model is broken",
    ),
]


@pytest.mark.parametrize("name, source, needle", MODEL_FILES, ids=[m[0] for m in MODEL_FILES])
def test_bad_model_file_exits_2_in_one_line(tmp_path, capsys, name, source, needle):
    (tmp_path / name).write_text(source)
    np.savetxt(tmp_path / "x.csv", np.arange(20.0).reshape(10, 2), delimiter=",")
    argv = ["fit", tmp_path / name, "--engine", "svi", "--data", tmp_path / "x.csv"]
    refused([*argv, "--out", tmp_path / "run", "--set", "progress=false"], capsys, tmp_path, needle)


USER_MODEL = """
import pyro, pyro.distributions as dist

def model(x):
    m = pyro.sample("m", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(m, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)
"""


def test_loading_a_run_never_imports_its_model_file(tmp_path, capsys):
    model_file = tmp_path / "m.py"
    model_file.write_text(USER_MODEL)
    np.savetxt(tmp_path / "x.csv", np.random.default_rng(0).normal(size=(20, 2)), delimiter=",")
    out = tmp_path / "run"
    argv = ["fit", f"{model_file}:model", "--engine", "svi", "--data", tmp_path / "x.csv"]
    argv += ["--out", out, "--set", "steps=5", "--set", "progress=false", "--draws", "2"]
    assert main([str(a) for a in argv]) == 0
    spec = json.loads((out / "fit.json").read_text())["model_spec"]
    assert spec["sha256"].startswith("sha256:") and spec["file"] == str(model_file)
    # A run naming a file that would run code when imported: nothing runs unless trusted.
    marker = tmp_path / "ran"
    model_file.write_text(USER_MODEL + f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(InputError, match="never runs code"):
        Fit.load(out)
    with pytest.raises(InputError, match="changed since the fit was saved"):
        Fit.load(out, trust=True)
    assert main(["diagnose", str(out)]) == 2
    assert not marker.exists()
    model_file.write_text(USER_MODEL)  # the recorded content again: trusted, it loads
    assert Fit.load(out, trust=True).pair is not None


# ---------------------------------------------------------------------- run directories
@pytest.fixture
def csv2(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (20, 2)), rng.normal(3, 0.5, (20, 2))])
    np.savetxt(tmp_path / "d.csv", x, delimiter=",", header="a,b", comments="")
    return tmp_path / "d.csv"


def svi_argv(data, out, steps=20, *extra):
    return [
        "fit", "gmm", "--engine", "svi", "--data", str(data), "--out", str(out),
        "--set", "n_components=2", "--set", "covariance=diag", "--set", f"steps={steps}",
        "--set", "checkpoint_every=5", "--set", "progress=false", "--draws", "2", *extra,
    ]  # fmt: skip


def test_out_naming_a_file_or_lying_under_one_is_refused(tmp_path, capsys, csv2):
    f = tmp_path / "afile"
    f.write_text("keep me")
    refused(svi_argv(csv2, f), capsys, tmp_path, "is an existing file")
    refused(svi_argv(csv2, f / "sub" / "run"), capsys, tmp_path, "is a file, not a directory")


def test_non_run_directory_is_refused_even_with_overwrite(tmp_path, capsys, csv2):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    refused(svi_argv(csv2, d), capsys, tmp_path, "is not a run directory")
    refused(svi_argv(csv2, d, 20, "--overwrite"), capsys, tmp_path, "is not a run directory")
    refused(svi_argv(csv2, d, 20, "--resume"), capsys, tmp_path, "holds no run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_refused(tmp_path, capsys, csv2):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(svi_argv(csv2, ro / "run"), capsys, tmp_path, "permission denied")
    finally:
        ro.chmod(0o700)


def test_one_run_per_directory_overwrite_is_atomic_and_resume_checks(tmp_path, capsys, csv2):
    out = tmp_path / "run"
    assert main(svi_argv(csv2, out)) == 0
    capsys.readouterr()
    # an existing run: refused without a flag, unchanged
    refused(svi_argv(csv2, out, 30), capsys, tmp_path, "already holds a run")
    # resume: the model and engine settings that matter must match, the data too
    refused(
        [*svi_argv(csv2, out, 30, "--resume"), "--set", "n_components=3"],
        capsys,
        tmp_path,
        "model setting n_components=3 differs from the run's 2",
    )
    refused(
        [*svi_argv(csv2, out, 30, "--resume"), "--set", "guide=delta"],
        capsys,
        tmp_path,
        "guide='delta' differs",
    )
    refused(svi_argv(csv2, out, 30, "--resume", "--seed", "4"), capsys, tmp_path, "--seed 4")
    other = tmp_path / "other.csv"
    other.write_text(csv2.read_text().replace("a,b", "a,b\n0,0", 1))
    refused(svi_argv(other, out, 30, "--resume"), capsys, tmp_path, "the data")
    refused(svi_argv(csv2, out, 30, "--resume", "--overwrite"), capsys, tmp_path, "exclude")
    # a failed overwrite (divergence) leaves the good run as it was
    before = snapshot(out)
    argv = [*svi_argv(csv2, out, 30, "--overwrite"), "--set", "lr=1e30"]
    assert main(argv) == 1
    assert "the earlier run at" in capsys.readouterr().err
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    # a good overwrite replaces it whole (no checkpoints of the old run remain)
    assert main(svi_argv(csv2, out, 10, "--overwrite")) == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step-00000005.pt",
        "step-00000010.pt",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["engine_config"]["steps"] == 10 and config["status"] == "finished"
    assert config["engine_config"]["checkpoint_dir"] == str(out / "checkpoints")


def test_resume_reuses_saved_settings_and_continues_exactly(tmp_path, capsys, csv2):
    """The README's case: a run with --set n_components=2, resumed without repeating it."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(svi_argv(csv2, whole, 30)) == 0
    assert main(svi_argv(csv2, cut, 15)) == 0
    capsys.readouterr()
    argv = ["fit", "gmm", "--out", str(cut), "--resume", "--set", "steps=30", "--draws", "2"]
    assert main(argv) == 0
    assert "resuming from" in capsys.readouterr().err
    a, b = Fit.load(whole), Fit.load(cut)
    assert a.history == b.history
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    config = json.loads((cut / "config.json").read_text())
    assert config["model_spec"]["settings"]["n_components"] == 2 and config["resumed"]


DIVERGING_MODEL = """
import pyro, pyro.distributions as dist, torch

def model(x):
    w = pyro.param("w", torch.zeros(x.shape[-1]))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(w, 1.0).to_event(1), obs=x)
"""


def test_divergence_keeps_only_good_checkpoints_and_resume_with_smaller_lr_works(
    tmp_path, capsys, csv2
):
    """SGD at lr=1e30 throws w to ~1e31 after one step; the next loss overflows. The
    checkpoint of the parameters that met the overflow is not kept; resuming from the newest
    one left with a sane lr works (the issue's case: it used to diverge again at once)."""
    (tmp_path / "w.py").write_text(DIVERGING_MODEL)
    out = tmp_path / "run"
    argv = ["fit", f"{tmp_path / 'w.py'}:model", "--engine", "svi", "--data", str(csv2)]
    argv += ["--out", str(out), "--set", "optim=sgd", "--set", "checkpoint_every=1"]
    argv += ["--set", "progress=false", "--draws", "2"]
    assert main([*argv, "--set", "steps=10", "--set", "lr=0.001"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--set", "steps=40", "--set", "lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "last good checkpoint" in err and "--resume with a smaller lr" in err
    kept = sorted((out / "checkpoints").glob("step-*.pt"))
    assert kept and all(LoopState.load(p).finite() for p in kept)
    # update 11 threw w to ~1e31 and its loss overflowed: step-00000011.pt is gone
    assert LoopState.load(kept[-1]).step == 10
    assert json.loads((out / "config.json").read_text())["engine_config"]["lr"] == 0.001
    assert main([*argv, "--resume", "--set", "steps=20", "--set", "lr=0.001"]) == 0
    fit = Fit.load(out, trust=True)
    assert fit.n_iter == 20 and all(np.isfinite(fit.history))


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    LoopState(3, params={"w": torch.ones(2)}).save(tmp_path)
    with pytest.raises(FitDivergedError, match="not checkpointed"):
        LoopState(4, params={"w": torch.tensor([1.0, float("inf")])}).save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003.pt"]


def test_truncated_latest_checkpoint_falls_back_and_says_which(tmp_path, capsys, csv2):
    out = tmp_path / "run"
    assert main([*svi_argv(csv2, out, 20), "--keep-checkpoints", "0"]) == 0
    newest = out / "checkpoints" / "step-00000020.pt"
    newest.write_bytes(newest.read_bytes()[:300])
    with pytest.warns(UserWarning, match="step-00000020.pt"):
        assert latest_checkpoint(out / "checkpoints").name == "step-00000015.pt"
    capsys.readouterr()
    assert main(svi_argv(csv2, out, 25, "--resume")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "step-000000" in line]
    assert len(err) == 1, err  # one line says where the resume starts and what it skipped
    assert "step-00000015.pt" in err[0] and "step-00000020.pt" in err[0] and "unreadable" in err[0]


def test_checkpoints_are_pruned_and_files_get_the_usual_mode(tmp_path, csv2):
    out = tmp_path / "run"
    assert main(svi_argv(csv2, out, 40)) == 0
    assert len(list((out / "checkpoints").glob("step-*.pt"))) == 3
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # fit.json like inference_data.nc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 5-step SVI run, fitted once for the cases that damage a copy of it."""
    root = tmp_path_factory.mktemp("finished")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (20, 2)), rng.normal(3, 0.5, (20, 2))])
    np.savetxt(root / "d.csv", x, delimiter=",", header="a,b", comments="")
    with pytest.MonkeyPatch.context() as patch:  # no PNGs, as in no_plots
        import jointkl.diagnostics

        patch.setattr(jointkl.diagnostics, "write_plots", lambda fit, idata, out_dir: [])
        assert main(svi_argv(root / "d.csv", root / "run", 5)) == 0
    return root / "run"


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("truncate tensors", "tensors.pt could not be read"),
        ("drop keys", "lacks ['history'"),
        ("not json", "is not valid JSON"),
        ("remove fit.json", "fit.json not found"),
    ],
)
def test_damaged_run_loads_with_one_line_errors(tmp_path, finished_run, damage, needle):
    out = shutil.copytree(finished_run, tmp_path / "run")
    if damage == "truncate tensors":
        (out / "tensors.pt").write_bytes((out / "tensors.pt").read_bytes()[:200])
    elif damage == "drop keys":
        meta = json.loads((out / "fit.json").read_text())
        del meta["history"], meta["n_iter"]
        (out / "fit.json").write_text(json.dumps(meta))
    elif damage == "not json":
        (out / "fit.json").write_text("{not json")
    else:
        (out / "fit.json").unlink()
    with pytest.raises(InputError, match=needle.replace("[", r"\[")):
        Fit.load(out)


def test_resume_with_a_corrupt_config_is_refused(tmp_path, capsys, csv2, finished_run):
    out = shutil.copytree(finished_run, tmp_path / "run")
    (out / "config.json").write_text("{}")
    refused(svi_argv(csv2, out, 10, "--resume"), capsys, tmp_path, "lacks")


def test_a_fit_that_fails_before_any_checkpoint_leaves_no_directory(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((6, 3, 2)))
    refused(
        ["fit", "gmm", "--engine", "svi", "--data", tmp_path / "x.npy", "--out", tmp_path / "r"],
        capsys,
        tmp_path,
        "must be (N, D)",
    )


# ---------------------------------------------------------------------- text inputs
TEXT_CASES = [
    ("empty", ""),
    ("binary", "\x00\x01\x02\xff"),
    ("one huge line", "的" * 200_000),
    ("a long sentence", "我们 在 这里 " * 300),
]


@pytest.mark.parametrize("label, text", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_commands_on_odd_input_answer_in_one_line_or_work(tmp_path, capsys, label, text):
    """``words`` on a corpus file holding the text: exit 0 with a lexicon, or 2 and one line;
    never a traceback."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(text.encode("utf-8", "surrogatepass"))
    before = snapshot(tmp_path)
    code = main(["words", str(corpus), "--out", str(tmp_path / "lex.tsv"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (0, 2), code
    if code == 2:
        assert len(err) == 1 and err[0].startswith("jointkl: error:"), err
        assert snapshot(tmp_path) == before
    else:
        assert (tmp_path / "lex.tsv").is_file()


def test_license_ships_in_the_repository_and_the_wheel_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the jointkl authors" in text
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


def test_a_step_count_far_beyond_the_default_is_warned_about(tmp_path, capsys):
    argv = ["fit", "gmm", "--engine", "svi", "--set", "steps=1e9", "--out", str(tmp_path / "r")]
    assert main([*argv, "--data", str(tmp_path / "missing.csv")]) == 2  # stops before work
    err = capsys.readouterr().err
    assert "warning: 1000000000 steps is 1e+06 times svi's default" in err
    assert not (tmp_path / "r").exists()
