"""The zoo models EM brought (BernoulliMixture, HMM): data, validation, both engines, CLI."""

import math

import numpy as np
import pytest
import torch
from jointkl.inference import EM, SVI
from jointkl.models import HMM, BernoulliMixture

from jointkl import InputError
from jointkl.cli import main


def test_bernoulli_mixture_default_data_is_binarised_digits():
    (x,), kwargs = BernoulliMixture().default_data()
    assert kwargs == {} and x.shape == (1797, 64)
    assert set(torch.unique(x).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "emission, shape", [("gaussian", (20, 100, 1)), ("categorical", (20, 100))]
)
def test_hmm_default_data_comes_from_a_sticky_three_state_chain(emission, shape):
    (x,), _ = HMM(3, emission=emission).default_data(seed=2)
    assert x.shape == shape
    (again,), _ = HMM(3, emission=emission).default_data(seed=2)
    assert torch.equal(x, again)
    if emission == "categorical":
        assert x.dtype == torch.long and 0 <= int(x.min()) and int(x.max()) <= 5
    else:
        # Regimes persist (stay probability 0.9): neighbouring values correlate strongly.
        v = x[..., 0]
        corr = np.corrcoef(v[:, 1:].reshape(-1), v[:, :-1].reshape(-1))[0, 1]
        assert corr > 0.6


def test_zoo_models_refuse_bad_data():
    with pytest.raises(InputError, match="only 0 and 1"):
        BernoulliMixture(2).model(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(InputError, match="integers"):
        HMM(2, emission="categorical").model(torch.tensor([[0.0, 1.5]]))
    with pytest.raises(InputError, match="symbols must lie in 0..2"):
        HMM(2, emission="categorical", n_symbols=3).model(torch.tensor([[0, 3]]))
    with pytest.raises(InputError, match="emission"):
        HMM(2, emission="poisson")


@pytest.mark.parametrize(
    "pair, data",
    [
        (BernoulliMixture(3), lambda: BernoulliMixture.default_data()[0][0][:150]),
        (HMM(2), lambda: HMM(2).default_data()[0][0][:4, :10]),
        (
            HMM(2, emission="categorical", priors="weak"),
            lambda: HMM(2, emission="categorical").default_data()[0][0][:4, :10],
        ),
    ],
    ids=["bmm", "hmm-gaussian", "hmm-categorical-weak"],
)
def test_zoo_models_fit_with_both_engines(pair, data):
    x = data()
    em = EM(max_iter=10, progress=False).fit(pair, x)
    assert math.isfinite(em.history[-1]) and em.history[-1] >= em.history[0]
    svi = SVI(steps=25, lr=0.05, progress=False).fit(pair, x)
    assert all(math.isfinite(v) for v in svi.history)
    assert np.mean(svi.history[-5:]) < np.mean(svi.history[:5])
    # Exact EM reaches a likelihood the same model's short SVI run does not beat.
    assert -svi.history[-1] <= em.history[-1] + 1e-6 * abs(em.history[-1])


def test_cli_fits_the_hmm_with_em(tmp_path, capsys):
    """``jointkl fit hmm --engine em``: engine settings arrive through ``--set``."""
    rng = np.random.default_rng(0)
    data = np.repeat(rng.normal(0, 1, (3, 4)), 2, axis=1) * 3  # 3 sequences x 8 steps
    csv = tmp_path / "data.csv"
    np.savetxt(csv, data, delimiter=",")
    out = tmp_path / "hmm"
    code = main(
        [
            "fit",
            "hmm",
            "--engine",
            "em",
            "--data",
            str(csv),
            "--set",
            "n_states=2",
            "--set",
            "max_iter=5",
            "--set",
            "progress=false",
            "--set",
            "n_init=2",
            "--set",
            "init=random",
            "--draws",
            "5",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "engine='em'" in captured.out and "n_init=2" in captured.err
    for name in ("fit.json", "tensors.pt", "inference_data.nc", "metrics.jsonl"):
        assert (out / name).is_file(), name
