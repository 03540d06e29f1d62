"""The M-step's adjoint of a recipe's indexing (``statistics.to_param``, written out in
``factors.index_part_adjoint``) equals the vector-Jacobian product autograd takes through
``index_part``, for every slot input of the zoo's mixtures and HMM and of models with constant
indices and tied parameters."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference.em import FactorModel
from jointkl.inference.em.statistics import target_shape, to_param, to_param_by_autograd
from jointkl.models import HMM, BernoulliMixture, GaussianMixture

F64 = torch.float64


def blobs(n=200, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) + 3 * torch.randint(2, (n, 1), generator=g).to(
        F64
    )


def constant_index(x):
    """The second row of a (2, K) table of locations, indexed by the component: a constant
    index followed by a role index."""
    weights = pyro.param(
        "weights", torch.ones(3, dtype=F64) / 3, constraint=dist.constraints.simplex
    )
    locs = pyro.param("locs", torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 2.0]], dtype=F64))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[1][z], 1.0), obs=x)


def tied(x):
    """Two observations of a point share the component's location (statistics of both sites
    summed onto one cell)."""
    weights = pyro.param(
        "weights", torch.ones(3, dtype=F64) / 3, constraint=dist.constraints.simplex
    )
    locs = pyro.param("locs", torch.tensor([-1.0, 0.5, 2.0], dtype=F64))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("a", dist.Normal(locs[z], 1.0), obs=x[:, 0])
        pyro.sample("b", dist.Normal(locs[z], 2.0), obs=x[:, 1])


def cases():
    (bx,), _ = BernoulliMixture().default_data()
    hmm_args, hmm_kwargs = HMM().default_data()
    x = blobs()
    return [
        ("gmm-full", GaussianMixture(3, "full").model, (x,), {}),
        ("gmm-diag", GaussianMixture(3, "diag").model, (x,), {}),
        ("gmm-spherical", GaussianMixture(3, "spherical").model, (x,), {}),
        ("bmm", BernoulliMixture().model, (bx[:200],), {}),
        ("hmm", HMM().model, hmm_args, hmm_kwargs),
        ("constant-index", constant_index, (x[:, 0],), {}),
        ("tied", tied, (x,), {}),
    ]


@pytest.mark.parametrize(
    "name, model, args, kwargs", cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_to_param_is_the_autograd_adjoint(name, model, args, kwargs):
    pyro.clear_param_store()
    fm = FactorModel(model, args, kwargs, seed=0, dtype=F64)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for gi, grp in enumerate(fm.groups):
        if grp.kind != "recipe":
            continue
        for slot, s in grp.slots.items():
            for which, p in enumerate(s.params):
                shape = tuple(fm.init[p].shape)
                target = target_shape(fm, gi, slot, which, fm.init)
                stat = torch.randn(target, generator=g, dtype=F64)
                want = to_param_by_autograd(fm, gi, slot, which, shape, stat)
                got = to_param(fm, gi, slot, which, shape, stat)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                checked += 1
    assert checked >= 2, name
