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


def mixture_weights(model, x, seed: int = 1):
    """A compiled mixture, θ after a k-means start, and the E-step's weights there."""
    from jointkl.inference.em.engine import Steps
    from jointkl.inference.em.initial import initial_theta
    from jointkl.inference.em.mstep import plan_updates

    fm = FactorModel(model.model, (x,), {}, dtype=F64)
    steps = Steps(fm, *plan_updates(fm), 0.0, 20)
    theta = initial_theta(steps, "kmeans++", 300, seed, (x,), {})
    return fm, steps, theta, fm.e_step(theta)[1]


@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("priors", ["weak", None])
def test_mixture_m_step_sums_are_the_general_sums_bit_for_bit(priors, k):
    """The Bernoulli mixture's M-step statistics taken directly (component_bernoulli_sums,
    own_counts) are the general einsum statistics mapped back by the index adjoint, to the
    bit, at the mixture E-step's weights: the fit's iterates do not change."""
    from jointkl.inference.em.statistics import (
        component_bernoulli_sums,
        counts,
        own_counts,
        weighted_sums,
    )

    (x,), _ = BernoulliMixture().default_data()
    x = x[:700].double()
    fm, steps, theta, W = mixture_weights(BernoulliMixture(k, priors=priors), x)
    (bern,) = [u for u in steps.closed if u.kind == "bernoulli"]
    (cat,) = [u for u in steps.closed if u.kind == "categorical"]
    shape = tuple(theta["probs"].shape)
    fast = component_bernoulli_sums(fm, W, bern.uses[0], shape)
    s0, s1 = weighted_sums(fm, theta, W, bern.uses, shape, F64, lambda i: (None, fm.value(i, F64)))
    assert fast is not None
    assert torch.equal(fast[0], s0) and torch.equal(fast[1], s1)
    own = own_counts(fm, W, cat.uses[0], (k,), F64)
    assert own is not None
    # the general counts, by the one-hot einsum and the index adjoint (own_counts bypassed)
    gi, slot, which = cat.uses[0]
    onehot = torch.nn.functional.one_hot(fm.value(gi, F64).long(), k).to(F64)
    target = target_shape(fm, gi, slot, which, theta)
    from jointkl.inference.em.statistics import trailing, wsum

    general = to_param(fm, gi, slot, which, (k,), wsum(target, trailing(W[gi], 1), onehot))
    assert torch.equal(own, general)
    assert torch.equal(counts(fm, theta, W, "weights", cat.uses, F64), general)


def test_direct_statistics_leave_other_uses_to_the_general_sums():
    """Stacked Bernoulli sites, the HMM's per-sequence initial state, a shape that is not the
    variable's: None (the general statistics apply)."""
    from jointkl.inference.em.mstep import plan_updates
    from jointkl.inference.em.statistics import component_bernoulli_sums, own_counts

    g = torch.Generator().manual_seed(1)
    x = (torch.rand(150, 6, generator=g) < 0.5).double()
    fm = FactorModel(two_bernoulli_sites, (x,), {}, dtype=F64)
    (up,) = [u for u in plan_updates(fm)[0] if u.kind == "bernoulli"]
    (use,) = up.uses
    assert fm.groups[use[0]].rows == 2
    W = {use[0]: torch.full((2, 3, 150), 1 / 3, dtype=F64)}
    assert component_bernoulli_sums(fm, W, use, (3, 3)) is None

    args, kwargs = HMM().default_data()
    hmm = FactorModel(HMM().model, args, kwargs, dtype=F64)
    (init,) = [u for u in plan_updates(hmm)[0] if u.names == ("init",)]
    gi = init.uses[0][0]
    W = {gi: torch.full((1, 3, 20), 1 / 3, dtype=F64)}  # one state per sequence: summed
    assert own_counts(hmm, W, init.uses[0], (3,), F64) is None

    (bx,), _ = BernoulliMixture().default_data()
    fm, steps, theta, W = mixture_weights(BernoulliMixture(3), bx[:200].double())
    (up,) = [u for u in steps.closed if u.kind == "bernoulli"]
    assert component_bernoulli_sums(fm, W, up.uses[0], (3, 64)) is not None
    assert component_bernoulli_sums(fm, W, up.uses[0], (3, 63)) is None


def two_bernoulli_sites(x):
    """Two Bernoulli vectors per point share the component's probabilities (stacked as two
    rows of one group)."""
    weights = pyro.param(
        "weights", torch.ones(3, dtype=F64) / 3, constraint=dist.constraints.simplex
    )
    h = x.shape[1] // 2
    probs = pyro.param(
        "probs", torch.full((3, h), 0.4, dtype=F64), constraint=dist.constraints.unit_interval
    )
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("a", dist.Bernoulli(probs[z]).to_event(1), obs=x[:, :h])
        pyro.sample("b", dist.Bernoulli(probs[z]).to_event(1), obs=x[:, h:])
