"""NUTS's scripted transition (one TorchScript call per transition) against the eager
transition driving the same compiled leaf: the same draws and statistics bit for bit, for
a dense and a diagonal metric; and a transition where the compiled leaf raises replayed
eagerly from the same generator state."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference.nuts.chains import Chains
from jointkl.inference.nuts.compiled_transition import transition_graph
from jointkl.inference.nuts.engine import NUTSSettings
from jointkl.inference.nuts.potential import Potential

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("data", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def singular_at_ten(x):
    """A Cholesky factor of a matrix that is singular at ρ = 10 exactly (the compiled leaf
    flags the failed check there)."""
    rho = pyro.sample("rho", dist.Normal(0.0, 3.0))
    eye = torch.eye(2)
    m = eye + (rho / 10).unsqueeze(-1).unsqueeze(-1) * (1 - eye)
    cov = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)))
    pyro.factor("det", -cov.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    pyro.sample("obs", dist.Normal(rho, 1.0), obs=x)


def fitted_chains(model, args, scripted: bool, **settings) -> Chains:
    """The chains after a short fit, by the scripted transition or by the eager one."""
    s = NUTSSettings(progress=False, **settings)
    with pyro.validation_enabled(False):
        target = Potential(model, args, {}, s.num_chains)
        assert target.compile()
        chains = Chains(target, s)
        assert chains.graph is not None  # the scripted transition was built
        if not scripted:
            chains.graph = None
        pyro.set_rng_seed(0)
        chains.start()
        chains.run(None)
    return chains


@pytest.mark.parametrize("dense_mass", [True, False])
def test_scripted_transition_gives_the_eager_draws_bit_for_bit(dense_mass):
    """Same seed, same draws, same sample statistics, same gradient count and the same
    generator state at the end: the scripted loop is the eager loop, operation for
    operation and random draw for random draw."""
    settings = dict(num_chains=3, warmup=60, draws=40, seed=5, dense_mass=dense_mass)
    ours = fitted_chains(schools, (Y, SIGMA), True, **settings)
    eager = fitted_chains(schools, (Y, SIGMA), False, **settings)
    assert ours.inv_mass.dim() == (3 if dense_mass else 2)
    assert torch.equal(ours.draws, eager.draws)
    for name in ours.stats:
        assert torch.equal(ours.stats[name], eager.stats[name]), name
    assert torch.equal(ours.eps, eager.eps)
    assert ours.gradients == eager.gradients
    assert torch.equal(ours.gen.get_state(), eager.gen.get_state())
    assert int(ours.stats["n_steps"].sum()) > 3 * 40  # trees of more than one leaf


def test_transition_where_the_compiled_leaf_raises_is_replayed_eagerly():
    """At ρ = 10 the compiled leaf's check fails and the scripted transition raises; the
    chains replay that transition eagerly from the same generator state (the bad chain
    diverges there, as the eager leaf's guard makes it), and the result is the eager
    transition's."""
    x = torch.tensor(0.5)
    s = NUTSSettings(progress=False, num_chains=3, warmup=0, draws=1, max_tree_depth=3)
    with pyro.validation_enabled(False):
        target = Potential(singular_at_ten, (x,), {}, 3)
        assert target.compile()
        runs = []
        for scripted in (True, False):
            chains = Chains(target, s)
            assert chains.graph is not None and transition_graph(chains.step_fn, 3) is not None
            if not scripted:
                chains.graph = None
            chains.start()
            chains.theta = torch.tensor([[0.3], [10.0], [-1.2]])
            chains.u, chains.grad = target.eager_value_and_grad(
                torch.tensor([[0.3], [9.0], [-1.2]])
            )
            chains.eps = torch.zeros(3)  # a step of 0: the leaf evaluates ρ = 10 itself
            chains.gen.manual_seed(11)
            if scripted:
                with pytest.raises((RuntimeError, torch.jit.Error)):
                    chains.graph(
                        chains.theta, chains.u, chains.grad, chains.eps, chains.inv_mass,
                        torch.Generator().manual_seed(11),
                    )  # fmt: skip
            runs.append((chains.transition(), chains.gen.get_state()))
    (ours, ours_rng), (eager, eager_rng) = runs
    assert torch.equal(ours_rng, eager_rng)
    assert ours.diverging.tolist() == [False, True, False]
    for name in ("theta", "potential", "grad", "accept_prob", "diverging", "num_steps"):
        assert torch.equal(getattr(ours, name), getattr(eager, name)), name
