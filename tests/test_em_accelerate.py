"""EM(accelerate="squarem"): fewer iterations, the same optimum, and still monotone."""

import numpy as np
import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel, squarem_point
from jointkl.models import HMM, BernoulliMixture, GaussianMixture

from jointkl import InputError

F64 = torch.float64


def overlapping(n=600, seed=0):
    """Three overlapping 2-D clusters: plain EM converges slowly (linearly) here."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [1.5, 0.5], [0.5, 1.8]], dtype=F64)
    z = torch.randint(3, (n,), generator=g)
    return centres[z] + 0.8 * torch.randn(n, 2, generator=g, dtype=F64)


def models():
    (hx,), _ = HMM(3).default_data(0)
    (bx,), _ = BernoulliMixture.default_data()
    return {
        "gmm-full": (GaussianMixture(3, "full", priors=None), overlapping()),
        "gmm-diag-weak": (GaussianMixture(3, "diag"), overlapping()),
        "hmm-gaussian": (HMM(3), hx[:6, :40].to(F64)),
        "bmm": (BernoulliMixture(3, priors=None), bx[:200].to(F64)),
    }


@pytest.mark.parametrize("name", ["gmm-full", "gmm-diag-weak", "hmm-gaussian", "bmm"])
def test_squarem_log_likelihood_never_decreases(name):
    pair, x = models()[name]
    fit = EM(max_iter=40, tol=0, accelerate="squarem", progress=False).fit(pair, x)
    h = np.asarray(fit.history)
    assert np.isfinite(h).all() and h[-1] > h[0]
    assert (np.diff(h) >= -1e-9 * np.abs(h[:-1])).all(), np.diff(h).min()
    assert fit.info["decreases"] == 0


def test_squarem_reaches_the_plain_em_optimum_in_fewer_iterations():
    pair, x = models()["gmm-full"]
    plain = EM(max_iter=2000, tol=1e-9, progress=False).fit(pair, x)
    fast = EM(max_iter=2000, tol=1e-9, accelerate="squarem", progress=False).fit(pair, x)
    assert plain.converged and fast.converged
    # The same local maximum, to 1e-6 nats per point.
    assert abs(plain.history[-1] - fast.history[-1]) / len(x) < 1e-6
    for k in ("weights", "locs"):
        torch.testing.assert_close(plain.params[k], fast.params[k], atol=1e-3, rtol=1e-3)
    assert fast.info["extrapolations"] > 0
    assert fast.n_iter < plain.n_iter


def test_squarem_point_extrapolates_a_linear_sequence_exactly():
    # Iterates θ_k = θ* + ρ^k d of a linearly convergent map: the S3 step lands on θ*.
    x = overlapping(60)
    fm = FactorModel(GaussianMixture(3, "full", priors=None).model, (x,), {}, dtype=F64)
    star = {"locs": torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 3.0]], dtype=F64)}
    d = {"locs": torch.tensor([[0.5, -0.2], [0.1, 0.3], [0.4, 0.4]], dtype=F64)}
    seq = [{"locs": star["locs"] + 0.9**k * d["locs"]} for k in range(3)]
    fm.free = {"locs": fm.free["locs"]}
    out = squarem_point(fm, *seq)
    torch.testing.assert_close(out["locs"], star["locs"])


def test_em_refuses_an_unknown_accelerator():
    with pytest.raises(InputError, match="accelerate"):
        EM(accelerate="anderson")
