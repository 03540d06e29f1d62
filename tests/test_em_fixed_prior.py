"""The fixed-prior log-density EM evaluates each iteration equals the distribution's own."""

import pyro.distributions as dist
import pytest
import torch
from jointkl.inference.em.fixed_prior import fixed_prior_log_prob


@pytest.mark.parametrize(
    "fn, value",
    [
        (
            dist.Beta(torch.tensor(1.001), torch.tensor(1.7)).expand([3, 4]).to_event(1),
            torch.rand(3, 4, dtype=torch.float64).float(),
        ),
        (dist.Beta(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])), torch.tensor([0.3, 0.0])),
        (dist.Dirichlet(torch.tensor([1.0, 2.5, 0.7])), torch.tensor([0.2, 0.5, 0.3])),
        (dist.Dirichlet(torch.tensor([1.0, 2.0])), torch.tensor([0.0, 1.0])),
        (dist.Normal(0.0, 2.0).expand([5]).to_event(1), torch.randn(5)),
    ],
)
def test_fixed_prior_log_prob_equals_log_prob(fn, value):
    want = fn.log_prob(value)
    for _ in range(2):  # the second call uses the cached normaliser
        got = fixed_prior_log_prob(fn, value)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_fixed_prior_log_prob_is_differentiable_in_the_value():
    fn = dist.Beta(torch.tensor(2.0), torch.tensor(3.0)).expand([4]).to_event(1)
    v = torch.rand(4, requires_grad=True)
    (g,) = torch.autograd.grad(fixed_prior_log_prob(fn, v), v)
    (h,) = torch.autograd.grad(fn.log_prob(v), v)
    torch.testing.assert_close(g, h)
