"""Combinations of a model with flags that it cannot take, and a file model's run used by
``segment``: each either works or is refused in one line (exit 2), leaving nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from jointkl.cli import main


@pytest.fixture
def bits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "bits.csv"
    np.savetxt(path, (rng.random((8, 3)) < 0.5).astype(int), delimiter=",", fmt="%d")
    return path


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jointkl:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "engine, needle",
    [
        ("svi", "model 'vae' takes float32 data (its networks' weights are float32)"),
        ("langevin", "model 'vae' takes float32 data (its networks' weights are float32)"),
        ("nce", "jointkl: error: "),  # refused (VAE has latents NCE cannot fit)
    ],
)
def test_float64_data_for_a_network_model_is_refused_in_one_line(
    tmp_path, capsys, bits, engine, needle
):
    out = tmp_path / "run"
    argv = ["fit", "vae", "--engine", engine, "--data", str(bits), "--out", str(out)]
    argv += ["--dtype", "float64", "--set", "hidden=[4]", "--set", "latent_dim=1"]
    argv += ["--set", "progress=false", "--draws", "2"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert needle in line, line
    if engine != "nce":
        assert "--dtype float64" in line and "omit --dtype" in line
    assert not out.exists()


def test_vae_on_em_exits_2_in_one_line(tmp_path, capsys, bits):
    out = tmp_path / "run"
    argv = ["fit", "vae", "--engine", "em", "--data", str(bits), "--out", str(out)]
    assert main([*argv, "--set", "hidden=[4]", "--set", "latent_dim=1"]) == 2
    line = one_error_line(capsys)
    assert "continuous latent" in line and "SVI" in line, line
    assert not out.exists()


SEGMENTER = """
import pyro
import pyro.distributions as dist


class pair:
    def model(self, x):
        m = pyro.sample("m", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(m, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)

    def segment(self, lines, fit=None):
        return [list(line) for line in lines]
"""


def test_segment_with_a_file_model_run_needs_trust_model_file(tmp_path, capsys):
    source = tmp_path / "seg.py"
    source.write_text(SEGMENTER)
    marker = tmp_path / "imported"
    np.savetxt(tmp_path / "x.csv", np.random.default_rng(0).normal(size=(6, 2)), delimiter=",")
    out = tmp_path / "run"
    argv = ["fit", f"{source}:pair", "--engine", "svi", "--data", str(tmp_path / "x.csv")]
    argv += ["--out", str(out), "--set", "steps=2", "--set", "progress=false", "--draws", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    # Without the flag nothing from the file runs: refused in one line.
    source.write_text(SEGMENTER + f"\nopen({str(marker)!r}, 'w').close()\n")
    assert main(["segment", "--model", str(out), "天气好"]) == 2
    assert "never runs code" in one_error_line(capsys) and not marker.exists()
    # Trusted, a changed file is still refused (its hash differs from the recorded one) ...
    assert main(["segment", "--model", str(out), "--trust-model-file", "天气好"]) == 2
    assert "changed since the fit was saved" in one_error_line(capsys)
    assert not marker.exists()
    # ... and the recorded content, trusted, segments.
    source.write_text(SEGMENTER)
    assert main(["segment", "--model", str(out), "--trust-model-file", "天气好"]) == 0
    assert capsys.readouterr().out == "天 气 好\n"
