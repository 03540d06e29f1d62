"""The post-fit fast paths give what the plain paths give: the matrix form of a Bernoulli
vector's log-density against Pyro's ``log_prob``, and a Bernoulli mixture's InferenceData
with and without it."""

from __future__ import annotations

import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM
from jointkl.models import BernoulliMixture

from jointkl import inferencedata
from jointkl.bernoulli_log_prob import independent_bernoulli_log_prob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("by", ["probs", "logits"])
def test_matrix_log_prob_equals_pyro_bernoulli(dtype, by):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 7, generator=g) > 0.4).to(dtype)
    if by == "probs":
        p = torch.rand(5, 3, 1, 7, generator=g, dtype=dtype)
        p[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 1e-12], dtype=dtype)  # the clamped ends
        fn = dist.Bernoulli(probs=p).to_event(1)
    else:
        fn = dist.Bernoulli(logits=8 * torch.randn(5, 3, 1, 7, generator=g, dtype=dtype))
        fn = fn.to_event(1)
    fn = fn.expand((5, 3, 30))  # as a plate of 30 points broadcasts it
    fast = independent_bernoulli_log_prob(fn, x)
    plain = fn.log_prob(x)
    assert fast is not None and fast.shape == plain.shape == (5, 3, 30)
    assert fast.dtype == plain.dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(fast, plain, rtol=tol, atol=tol)


def test_matrix_log_prob_declines_what_it_does_not_cover():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(4, 1, 6, generator=g)
    x = (torch.rand(10, 6, generator=g) > 0.5).float()
    fn = dist.Bernoulli(p).to_event(1).expand((4, 10))
    # values that differ per draw (a predictive's samples) are not one (N, D) matrix
    per_draw = (torch.rand(4, 10, 6, generator=g) > 0.5).float()
    assert independent_bernoulli_log_prob(fn, per_draw) is None
    # probabilities that differ per point
    fn_points = dist.Bernoulli(torch.rand(4, 10, 6, generator=g)).to_event(1)
    assert independent_bernoulli_log_prob(fn_points, x) is None
    # not 0/1 values, other families, other event ranks
    assert independent_bernoulli_log_prob(fn, x * 0.5) is None
    assert independent_bernoulli_log_prob(dist.Normal(p, 1.0).to_event(1), x) is None
    assert independent_bernoulli_log_prob(dist.Bernoulli(p.expand(4, 10, 6)), x) is None


def test_bernoulli_mixture_inference_data_is_the_plain_paths():
    """The whole converter on a small Bernoulli mixture: the log-likelihood with the matrix
    form equals Pyro's own log_prob path, and the posterior predictive still runs
    vectorised (its check passes on the sub-batch it scores)."""
    g = torch.Generator().manual_seed(0)
    protos = torch.tensor([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    x = torch.bernoulli(protos[torch.randint(2, (40,), generator=g)], generator=g)
    fit = EM(max_iter=10, progress=False).fit(BernoulliMixture(2), x)

    def convert():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit.to_arviz(num_samples=6, seed=0)

    seen = []
    real_run = inferencedata._Passes.run

    def spy(self, *a, **k):
        out = real_run(self, *a, **k)
        seen.append(self.vectorised)
        return out

    fast_calls = []
    real_fast = inferencedata.independent_bernoulli_log_prob

    def counted(fn, value):
        out = real_fast(fn, value)
        fast_calls.append(out is not None)
        return out

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(inferencedata._Passes, "run", spy)
        mp.setattr(inferencedata, "independent_bernoulli_log_prob", counted)
        fast = convert()
        assert any(fast_calls), "the matrix form was never used"
        assert seen and all(seen), "a pass fell back to one draw at a time"
        mp.setattr(inferencedata, "independent_bernoulli_log_prob", lambda fn, value: None)
        plain = convert()
    finally:
        mp.undo()
    a, b = fast.log_likelihood["obs"].values, plain.log_likelihood["obs"].values
    assert a.shape == (4, 6, 40)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        fast.posterior_predictive["obs"].values, plain.posterior_predictive["obs"].values
    )
