"""HMM sequences of different lengths (padded, with ``lengths``): the exact likelihood of the
unpadded sequences (and Pyro's), padding values that do not matter, hmmlearn's fit."""

import numpy as np
import pyro
import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel
from jointkl.models import HMM
from pyro.infer import TraceEnum_ELBO

from jointkl import InputError

F64 = torch.float64
LENGTHS = torch.tensor([40, 31, 18, 40, 7, 25, 1, 36])


def padded(emission="gaussian", fill=0.0):
    (x,), _ = HMM(3, emission=emission).default_data(0)
    x = x[: len(LENGTHS), :40].clone()
    x = x.to(F64) if emission == "gaussian" else x
    for i, n in enumerate(LENGTHS):
        x[i, n:] = fill
    return x


@pytest.mark.parametrize("emission", ["gaussian", "categorical"])
def test_padded_log_likelihood_is_the_sum_over_the_unpadded_sequences(emission):
    x = padded(emission)
    m = HMM(3, emission=emission, n_symbols=6 if emission == "categorical" else None)
    fm = FactorModel(m.model, (x,), {"lengths": LENGTHS}, dtype=F64)
    theta = {k: v.clone() for k, v in fm.init.items()}
    if "trans" in theta:  # not uniform, so that the transitions matter
        theta["trans"] = torch.tensor(
            [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], dtype=F64
        )
    ll, _ = fm.e_step(theta)
    total = 0.0
    for i, n in enumerate(LENGTHS):
        one = FactorModel(m.model, (x[i : i + 1, :n],), {}, dtype=F64)
        total += one.e_step(theta)[0]
    assert ll == pytest.approx(total, rel=1e-10)


def test_padding_values_do_not_matter_and_em_never_decreases():
    fits = []
    for fill in (0.0, 1e3):
        fit = EM(max_iter=15, tol=0, progress=False).fit(HMM(3), padded(fill=fill), lengths=LENGTHS)
        h = np.asarray(fit.history)
        assert (np.diff(h) >= -1e-9 * np.abs(h[:-1])).all()
        fits.append(fit)
    assert fits[0].history[-1] != pytest.approx(fits[0].history[0])
    # The initial values read the live steps only; the fits then agree to rounding.
    assert fits[0].history[-1] == pytest.approx(fits[1].history[-1], rel=1e-10)
    assert fits[0].info["closed_form"] == ["init", "trans", "locs", "scales"]
    assert fits[0].info["traced_sites"] == []


def test_em_with_lengths_reaches_hmmlearns_fit():
    # hmmlearn leaves the padded steps out; EM also counts their transitions (whose posterior
    # is the transition matrix itself), a valid EM with the same fixed points: both are run
    # to convergence from the same start.
    hmm = pytest.importorskip("hmmlearn.hmm", reason="hmmlearn not installed")
    x = padded()
    m = HMM(3)
    iv = m.init_values(x, LENGTHS)
    trans = torch.full((3, 3), 0.1, dtype=F64) + 0.7 * torch.eye(3, dtype=F64)
    init = {"init": iv["init"], "trans": trans, "locs": iv["locs"], "scales": iv["scales"]}
    ref = hmm.GaussianHMM(
        3, "diag", n_iter=3000, tol=1e-11, init_params="", params="stmc", min_covar=0
    )
    ref.startprob_, ref.transmat_ = init["init"].numpy(), trans.numpy()
    ref.means_, ref.covars_ = init["locs"].numpy(), init["scales"].numpy() ** 2
    X = np.concatenate([x[i, :n].numpy() for i, n in enumerate(LENGTHS)])
    ref.fit(X, LENGTHS.tolist())
    em = EM(max_iter=3000, tol=1e-12, init=lambda x, lengths, seed: init, progress=False)
    fit = em.fit(m, x, lengths=LENGTHS)
    assert fit.converged
    n = int(LENGTHS.sum())
    assert fit.history[-1] / n == pytest.approx(ref.score(X, LENGTHS.tolist()) / n, abs=1e-4)
    np.testing.assert_allclose(fit.params["trans"].numpy(), ref.transmat_, atol=1e-3)
    np.testing.assert_allclose(fit.params["locs"].numpy(), ref.means_, atol=1e-3)


def test_padded_log_likelihood_is_pyros_enumerated_one():
    x = padded()
    fm = FactorModel(HMM(3).model, (x,), {"lengths": LENGTHS}, dtype=F64)
    ll, _ = fm.e_step(fm.init)
    pyro.clear_param_store()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    ref = -elbo.loss(HMM(3).model, lambda *a, **k: None, x, lengths=LENGTHS)
    assert ll == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize(
    "lengths, match",
    [
        (torch.tensor([3, 2]), "8 integers"),
        (torch.full((8,), 41), r"1\.\.40"),
        (torch.zeros(8, dtype=torch.long), r"1\.\.40"),
        (torch.full((8,), 2.5), "8 integers"),
    ],
)
def test_hmm_refuses_bad_lengths(lengths, match):
    with pytest.raises(InputError, match=match):
        HMM(3).model(padded(), lengths=lengths)
