"""A mixture's E-step (blocked softmax, Gaussian tables from cached features) against the
generic one (autograd of the log-partition), and M-step statistics against direct sums."""

import pytest
import torch
from jointkl.inference.em import FactorModel, m_step, plan_updates, weighted_moments
from jointkl.models import BernoulliMixture, GaussianMixture

F64 = torch.float64


def data(n=5000, d=3, seed=0):
    # More points than one block of the E-step (4096), so block edges are exercised.
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0], [-1.0, 2.0, 1.0]], dtype=F64)
    z = torch.randint(3, (n,), generator=g)
    return centres[z, :d] + torch.randn(n, d, generator=g, dtype=F64)


def autograd_e_step(fm, theta):
    tabs = {i: t.detach().requires_grad_() for i, t in fm.tables(theta).items()}
    with torch.enable_grad():
        logz = fm.log_partition(tabs)
        grads = torch.autograd.grad(logz, list(tabs.values()), allow_unused=True)
    return float(logz.detach()), dict(zip(tabs, grads, strict=True))


@pytest.mark.parametrize(
    "model, x",
    [
        (GaussianMixture(3, "full", priors=None), data()),
        (GaussianMixture(3, "full"), data()),
        (GaussianMixture(3, "diag", priors=None), data()),
        (BernoulliMixture(3, priors=None), (data() > 0.5).to(F64)),
    ],
)
def test_mixture_e_step_equals_autograd_of_the_log_partition(model, x):
    fm = FactorModel(model.model, (x,), {}, dtype=F64)
    assert fm._is_mixture()
    closed, grad = plan_updates(fm)
    _, W0 = fm.e_step(fm.init)
    theta = m_step(fm, fm.init, W0, closed, grad)  # away from the symmetric start
    ll, W = fm.e_step(theta)
    ref_ll, ref_W = autograd_e_step(fm, theta)
    assert ll == pytest.approx(ref_ll, rel=1e-12)
    for i, w in ref_W.items():
        if w is not None:
            torch.testing.assert_close(W[i].expand(w.shape), w, rtol=1e-9, atol=1e-12)


def test_weighted_moments_are_the_direct_weighted_sums():
    x = data(300)
    fm = FactorModel(GaussianMixture(3, "full", priors=None).model, (x,), {}, dtype=F64)
    gi = next(i for i, g in enumerate(fm.groups) if g.family == "mvn")
    g = fm.groups[gi]
    _, W = fm.e_step(fm.init)
    S = weighted_moments(g, g.data, W[gi])
    w = W[gi][0]  # (K, N)
    xc = x - x.mean(0)
    outer = xc.unsqueeze(-1) * xc.unsqueeze(-2)
    i, j = torch.triu_indices(3, 3)
    torch.testing.assert_close(S[:, :6], torch.einsum("kn,nij->kij", w, outer)[:, i, j])
    torch.testing.assert_close(S[:, 6:9], w @ xc)
    torch.testing.assert_close(S[:, -1], w.sum(-1))
