"""The initial trace's value of a Beta global: its median, computed rather than drawn."""

import torch
from jointkl.inference.em.compile import beta_median


def test_beta_median_is_the_median_where_closed_form():
    a = torch.tensor([1.001, 2.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.001, 2.0, 4.0, 1.0, 1.0], dtype=torch.float64)
    m = beta_median(a, b)
    # The CDF at the median is 1/2: Beta(1, b): 1 - (1 - x)^b; Beta(a, 1): x^a; a = b: symmetry.
    assert m[0] == 0.5 and m[1] == 0.5 and m[4] == 0.5
    assert torch.isclose(1 - (1 - m[2]) ** 4, torch.tensor(0.5, dtype=torch.float64))
    assert torch.isclose(m[3] ** 3, torch.tensor(0.5, dtype=torch.float64))
    draws = torch.distributions.Beta(a, b).sample((200_000,))
    assert torch.allclose(draws.median(0).values, m, atol=5e-3)


def test_beta_median_elsewhere_is_the_mean_and_inside_the_support():
    a = torch.tensor([0.5, 2.0, 5.0])
    b = torch.tensor([3.0, 0.3, 2.0])
    m = beta_median(a, b)
    assert torch.allclose(m, a / (a + b))
    assert bool(((m > 0) & (m < 1)).all())


def test_beta_median_of_one_prior_expanded_is_that_of_its_copies():
    """A prior written Beta(a, b).expand(shape) takes a shortcut when a = b; the values are
    those of the same concentrations written out."""
    for a, b in [(1.001, 1.001), (2.0, 3.0), (1.0, 4.0), (3.0, 1.0)]:
        ca = torch.tensor(a, dtype=torch.float64).expand(3, 4)
        cb = torch.tensor(b, dtype=torch.float64).expand(3, 4)
        shortcut = beta_median(ca, cb)
        assert torch.equal(shortcut, beta_median(ca.clone(), cb.clone()))
        assert shortcut.shape == (3, 4)
