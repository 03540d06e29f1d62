"""The Laplace approximation's exact Hessian: the Bernoulli tables' matmul form (the cheap
path) gives the same Hessian as autograd's dense Hessian through the family's own tables,
on a small Bernoulli mixture and a small Gaussian mixture (where the cheap form does not
apply), and is not taken where a probability is exactly 0 or 1."""

from __future__ import annotations

import importlib

import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em.factor_model import FactorModel
from jointkl.models import BernoulliMixture, GaussianMixture

laplace_module = importlib.import_module("jointkl.inference.em.laplace")


def _data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0] * 5, [2.0] * 5])
    x = centres[torch.arange(40) % 2] + torch.randn(40, 5, generator=g)
    return (x > 0).double() if kind == "bmm" else x


def _factor_model(fit) -> tuple[FactorModel, dict[str, torch.Tensor]]:
    fm = FactorModel(fit.pair.model, fit.args, fit.kwargs, seed=0, dtype=torch.float64)
    return fm, {n: fit.params[n].double() for n in fm.free if n in fit.params}


@pytest.mark.parametrize(
    ("kind", "model", "cheap"),
    [("bmm", lambda: BernoulliMixture(3), True), ("gmm", lambda: GaussianMixture(2), False)],
)
def test_laplace_covariance_equals_the_dense_hessian_through_the_family_tables(
    monkeypatch, kind, model, cheap
):
    fit = EM(max_iter=20, progress=False).fit(model(), _data(kind))
    fm, theta = _factor_model(fit)
    fast = laplace_module._bernoulli_matmul_groups(fm, theta)
    assert bool(fast) == cheap
    for i, t in laplace_module._tables(fm, theta, fast).items():
        torch.testing.assert_close(t, fm.tables(theta)[i])
    new = laplace_module.laplace(fit)["factor"]
    fit.state.pop("laplace:factor")
    # the reference: the family's broadcast tables, autograd's dense Hessian
    monkeypatch.setattr(laplace_module, "_bernoulli_matmul_groups", lambda fm, theta: [])
    monkeypatch.setattr(
        laplace_module,
        "_hessian",
        lambda f, v0: torch.autograd.functional.hessian(f, v0.detach().clone()),
    )
    old = laplace_module.laplace(fit)["factor"]
    torch.testing.assert_close(new @ new.T, old @ old.T)


def test_matmul_form_is_not_taken_at_a_probability_of_exactly_zero():
    fit = EM(max_iter=20, progress=False).fit(BernoulliMixture(3), _data("bmm"))
    fm, theta = _factor_model(fit)
    assert laplace_module._bernoulli_matmul_groups(fm, theta)
    theta["probs"] = theta["probs"].clone()
    theta["probs"][0, 0] = 0.0
    assert laplace_module._bernoulli_matmul_groups(fm, theta) == []
