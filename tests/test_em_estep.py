"""Every E-step path of the EM engine against the generic one (Pyro's contract_to_tensor):
the same log-partition and the same posterior weights (its gradient) on small models."""

import re
from pathlib import Path

import pytest
import torch
from jointkl.inference.em import FactorModel, m_step, plan_updates
from jointkl.inference.em.estep import (
    PATHS,
    chain_potentials,
    contract_log_partition,
    is_mixture,
    mixture_e_step,
)
from jointkl.inference.em.gaussian import linear_log_density
from jointkl.models import HMM, BernoulliMixture, GaussianMixture

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def blobs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [2.5, 1.0], [-1.0, 2.5]], dtype=F64)
    z = torch.randint(3, (n,), generator=g)
    return centres[z] + 0.7 * torch.randn(n, 2, generator=g, dtype=F64)


def generic(fm, tables):
    """log Z and its gradient by the generic contraction, on the tables' natural shapes."""
    leaves = {i: t.detach().requires_grad_() for i, t in tables.items()}
    with torch.enable_grad():
        full = {i: t.expand((fm.groups[i].rows,) + fm.groups[i].shape) for i, t in leaves.items()}
        logz = contract_log_partition(fm, full)
        grads = torch.autograd.grad(logz, list(leaves.values()), allow_unused=True)
    return float(logz.detach()), {i: g for i, g in zip(leaves, grads, strict=True) if g is not None}


def moved(fm):
    """θ after one M-step from the model's initial values (away from a symmetric start)."""
    closed, gradient = plan_updates(fm)
    _, W = fm.e_step(fm.init)
    return m_step(fm, fm.init, W, closed, gradient)


@pytest.mark.parametrize(
    "model, x",
    [
        (GaussianMixture(3, "full", priors=None), blobs()),
        (GaussianMixture(3, "diag"), blobs()),  # MAP globals: constant (prior) tables too
        (BernoulliMixture(3, priors=None), (blobs() > 0.5).to(F64)),
        (GaussianMixture(3, "spherical"), blobs()),
        (GaussianMixture(3, "diag", priors=None), blobs()),
        (BernoulliMixture(3), (blobs() > 0.5).to(F64)),
    ],
)
def test_mixture_softmax_path_equals_the_generic_contraction(model, x):
    fm = FactorModel(model.model, (x,), {}, dtype=F64)
    assert is_mixture(fm)
    theta = moved(fm)
    ll, weights = mixture_e_step(fm, theta)
    weights = {i: w.clone() for i, w in weights.items()}  # the next E-step reuses the buffer
    with torch.no_grad():
        tables = fm.tables(theta)
    ref_ll, ref_weights = generic(fm, tables)
    # Every one of these observation tables takes the matrix-product form (cached features).
    obs = [i for i, g in enumerate(fm.groups) if g.kind == "recipe" and g.value == "data"]
    assert obs and all(linear_log_density(fm, i, theta) is not None for i in obs)
    assert ll == pytest.approx(ref_ll, rel=1e-12)
    for i, w in ref_weights.items():
        torch.testing.assert_close(weights[i].expand(w.shape), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", ["scaled-hmm", "log-chain", "chain-hessian"])
@pytest.mark.parametrize("emission", ["gaussian", "categorical"])
def test_chain_paths_equal_the_generic_contraction(path, emission):
    (x,), _ = HMM(3, emission=emission).default_data(0)
    x = x.to(F64) if x.is_floating_point() else x
    fm = FactorModel(HMM(3, emission=emission).model, (x[:4, :12],), {}, dtype=F64)
    assert fm.chain is not None and not is_mixture(fm)
    theta = moved(fm)
    with torch.no_grad():
        tables = fm.tables(theta)
    leaves = {i: t.detach().requires_grad_() for i, t in tables.items()}
    with torch.enable_grad():
        c = chain_potentials(fm, leaves)
        assert c.shared is not None  # a homogeneous HMM: every path applies
        logz = c.total + PATHS[path].run(c, fm.chain_method)
        grads = torch.autograd.grad(logz, list(leaves.values()), allow_unused=True)
    ref_ll, ref_weights = generic(fm, tables)
    assert float(logz.detach()) == pytest.approx(ref_ll, rel=1e-12)
    weights = dict(zip(leaves, grads, strict=True))
    for i, w in ref_weights.items():
        torch.testing.assert_close(weights[i], w, rtol=1e-9, atol=1e-12)


def test_every_e_step_path_names_the_test_that_pins_it():
    for name, path in PATHS.items():
        assert path.name == name and path.reason
        file, test = path.pinned_by.split("::")
        text = (ROOT / file).read_text()
        assert re.search(rf"^def {test}\(", text, re.M), path.pinned_by
