"""The EM engine: exact E-step, monotone M-steps, agreement with scikit-learn and hmmlearn,
models it was never told about, ArviZ output, and refusals of what it cannot fit."""

import itertools
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jointkl.inference import EM
from jointkl.inference.em import (
    ChainLogPartition,
    FactorModel,
    SharedChainLogPartition,
    aic,
    bic,
    m_step,
    n_parameters,
    plan_updates,
)
from jointkl.models import HMM, BernoulliMixture, GaussianMixture
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

from jointkl import Fit, FitDivergedError, InputError
from jointkl.chain import chain_contract
from jointkl.semiring import LogSemiring

F64 = torch.float64


def quiet(**kw):
    return EM(progress=False, **kw)


# --------------------------------------------------------------------------- test-only models
def poisson_mixture(x):
    """A model the engine was never told about: counts from two Poisson rates."""
    w = pyro.param("w", torch.ones(2, dtype=F64) / 2, constraint=constraints.simplex)
    rate = pyro.param("rate", torch.tensor([1.0, 5.0], dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


def regression_mixture(x, y):
    """Two regression lines: the mean is arithmetic on parameters (no closed form)."""
    w = pyro.param("w", torch.ones(2, dtype=F64) / 2, constraint=constraints.simplex)
    coef = pyro.param("coef", torch.tensor([[0.5], [-0.5]], dtype=F64))
    b = pyro.param("b", torch.zeros(2, dtype=F64))
    s = pyro.param("s", torch.ones(2, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal((x * coef[z]).sum(-1) + b[z], s[z]), obs=y)


def poisson_data():
    g = torch.Generator().manual_seed(3)
    return torch.cat(
        [
            torch.poisson(torch.full((150,), 2.0, dtype=F64), generator=g),
            torch.poisson(torch.full((100,), 12.0, dtype=F64), generator=g),
        ]
    )


def regression_data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(240, 1, generator=g, dtype=F64)
    first = torch.rand(240, generator=g) < 0.4
    y = torch.where(first, 2 * x[:, 0] + 1, -1.5 * x[:, 0] - 1)
    return x, y + 0.3 * torch.randn(240, generator=g, dtype=F64)


def hmm_data(emission="gaussian", seed=0, S=8, T=30):
    (x,), _ = HMM(3, emission=emission).default_data(seed)
    return x[:S, :T]


def hmm_data_2d(S=8, T=30):
    x = hmm_data(S=S, T=T)
    g = torch.Generator().manual_seed(9)
    return torch.cat([x, 0.5 * x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)], -1)


def digits(n=240):
    (x,), _ = BernoulliMixture.default_data()
    return x[:n].to(F64)


# Small versions of every model the engine serves: (pair, data args).
def every_model(blobs):
    x = blobs[0].to(F64)
    return {
        "gmm-full": (GaussianMixture(3, "full", priors=None), (x,)),
        "gmm-diag": (GaussianMixture(3, "diag", priors=None), (x,)),
        "gmm-spherical-weak": (GaussianMixture(3, "spherical"), (x,)),
        "gmm-full-weak": (GaussianMixture(3, "full"), (x,)),
        "bmm": (BernoulliMixture(3, priors=None), (digits(),)),
        "bmm-weak": (BernoulliMixture(3), (digits(),)),
        "hmm-gaussian": (HMM(3), (hmm_data(),)),
        "hmm-gaussian-full-weak": (HMM(2, covariance="full", priors="weak"), (hmm_data_2d(),)),
        "hmm-categorical-weak": (
            HMM(3, emission="categorical", priors="weak"),
            (hmm_data("categorical"),),
        ),
        "poisson": (poisson_mixture, (poisson_data(),)),
        "regression": (regression_mixture, regression_data()),
    }


# --------------------------------------------------------------------------- the E-step
def _pyro_log_likelihood(model, fm, theta, *args):
    params = {k: v for k, v in theta.items() if fm.free[k].kind == "param"}
    globs = {k: v for k, v in theta.items() if fm.free[k].kind == "global"}
    m = pyro.poutine.condition(pyro.poutine.substitute(model, params), globs)
    return -TraceEnum_ELBO(max_plate_nesting=1).loss(m, lambda *a, **k: None, *args)


@pytest.mark.parametrize("name", ["hmm-gaussian", "hmm-categorical-weak", "gmm-full-weak"])
def test_e_step_log_partition_equals_pyro_enumeration(blobs, name):
    pair, args = every_model(blobs)[name]
    if name.startswith("hmm"):  # Pyro's own variable elimination is slow on long chains
        args = (args[0][:4, :12],)
    fm = FactorModel(pair.model, args, {}, dtype=F64)
    chain_ll, _ = fm.e_step(fm.init)
    assert fm.chain is not None
    fm.chain = None  # the generic contraction must agree with the chain recursion
    generic_ll, _ = fm.e_step(fm.init)
    ref = _pyro_log_likelihood(pair.model, fm, fm.init, *args)
    assert chain_ll == pytest.approx(ref, rel=1e-10)
    assert generic_ll == pytest.approx(ref, rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 4),
    K=st.integers(1, 3),
    S=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_hmm_log_likelihood_equals_brute_force_sum_over_paths(T, K, S, seed):
    g = torch.Generator().manual_seed(seed)
    init = torch.rand(K, generator=g, dtype=F64) + 0.1
    trans = torch.rand(K, K, generator=g, dtype=F64) + 0.1
    locs = torch.randn(K, generator=g, dtype=F64)
    x = torch.randn(S, T, generator=g, dtype=F64)
    theta = {
        "init": init / init.sum(),
        "trans": trans / trans.sum(-1, keepdim=True),
        "locs": locs.unsqueeze(-1),
        "scales": torch.ones(K, 1, dtype=F64),
    }
    fm = FactorModel(HMM(K).model, (x,), {}, dtype=F64)
    ll, _ = fm.e_step(theta)
    total = 0.0
    for s in range(S):
        paths = []
        for path in itertools.product(range(K), repeat=T):
            lp = theta["init"][path[0]].log()
            for t in range(1, T):
                lp = lp + theta["trans"][path[t - 1], path[t]].log()
            lp = lp + dist.Normal(locs[list(path)], 1.0).log_prob(x[s]).sum()
            paths.append(lp)
        total += float(torch.logsumexp(torch.stack(paths), 0))
    assert ll == pytest.approx(total, rel=1e-10, abs=1e-10)


def test_forward_backward_marginals_equal_autograd_of_chain_contract():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    pots = torch.randn(4, 9, 3, 3, generator=g, dtype=F64, requires_grad=True)
    ours = ChainLogPartition.apply(init, pots, "sequential").sum()
    ref = chain_contract(init, pots, LogSemiring).logsumexp(-1).sum()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    g1 = torch.autograd.grad(ours, [init, pots])
    g2 = torch.autograd.grad(ref, [init, pots])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shared_transition_recursion_equals_the_general_chain():
    """A homogeneous HMM's structured (scaled) forward-backward gives chain_contract's log
    partition and the same marginals (gradients) as the general recursion."""
    g = torch.Generator().manual_seed(1)
    unary = (3 * torch.randn(5, 40, 4, generator=g, dtype=F64)).requires_grad_()
    trans = torch.randn(4, 4, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    ours = SharedChainLogPartition.apply(unary, trans).sum()
    pots = unary[:, 1:, None, :] + trans
    ref = chain_contract(unary[:, 0], pots, LogSemiring).logsumexp(-1).sum()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, [unary, trans]),
        torch.autograd.grad(ref, [unary, trans]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_posterior_weights_are_responsibilities(blobs):
    x = blobs[0].to(F64)
    m = GaussianMixture(3, "full", priors=None)
    fm = FactorModel(m.model, (x,), {}, dtype=F64)
    _, W = fm.e_step(fm.init)
    obs = next(i for i, g in enumerate(fm.groups) if g.sites == ["obs"])
    r = W[obs][0]  # (K, N): p(z_n = k | x_n)
    torch.testing.assert_close(r.sum(0), torch.ones(len(x), dtype=F64))
    w, loc, tril = fm.init["weights"], fm.init["locs"], fm.init["scale_tril"]
    lp = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(x.unsqueeze(-2)) + w.log()
    torch.testing.assert_close(r, lp.softmax(-1).T)


@pytest.mark.parametrize("offset, sd", [(0.0, 1.0), (1e4, 1e-3)])
def test_gaussian_log_densities_are_exact_far_from_the_origin(offset, sd):
    """The E-step's Mahalanobis shortcut (cached outer products) must agree with the direct
    form, and step aside where it would cancel digits (data far away, tight components)."""
    g = torch.Generator().manual_seed(0)
    x = offset + sd * torch.randn(300, 3, generator=g, dtype=F64)
    m = GaussianMixture(2, "full", priors=None)
    fm = FactorModel(m.model, (x,), {}, dtype=F64)
    theta = dict(fm.init)
    theta["locs"] = x[:2].clone()
    theta["scale_tril"] = sd * torch.linalg.cholesky(
        torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.0]], dtype=F64)
    ).expand(2, 3, 3)
    ll, _ = fm.e_step(theta)
    d = dist.MultivariateNormal(theta["locs"], scale_tril=theta["scale_tril"])
    ref = torch.logsumexp(d.log_prob(x.unsqueeze(-2)) + theta["weights"].log(), -1).sum()
    assert ll == pytest.approx(float(ref), rel=1e-10)


# --------------------------------------------------------------------------- the M-step
@pytest.mark.parametrize(
    "name", ["gmm-full", "gmm-diag", "bmm-weak", "hmm-categorical-weak", "poisson"]
)
def test_closed_form_m_steps_are_stationary_points_of_q(blobs, name):
    """A closed form must be the argmax of Q: its gradient (in unconstrained coordinates)
    vanishes there."""
    pair, args = every_model(blobs)[name]
    fm = FactorModel(getattr(pair, "model", pair), args, {}, dtype=F64)
    closed, gradient = plan_updates(fm)
    assert closed and not gradient
    _, W = fm.e_step(fm.init)
    theta = m_step(fm, fm.init, W, closed, gradient)
    from jointkl.inference.em import transform_for

    names = [n for up in closed for n in up.names]
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    u = {n: ts[n].inv(theta[n]).detach().requires_grad_() for n in names}
    th = {**theta, **{n: ts[n](u[n]) for n in names}}
    q = fm.expected_log_joint(th, W, list(range(len(fm.groups))))
    grads = torch.autograd.grad(q, list(u.values()))
    for n, gr in zip(names, grads, strict=True):
        assert float(gr.abs().max()) < 1e-6 * max(1.0, abs(float(q.detach()))), n


@pytest.mark.parametrize(
    "name",
    [
        "gmm-full",
        "gmm-diag",
        "gmm-spherical-weak",
        "gmm-full-weak",
        "bmm",
        "bmm-weak",
        "hmm-gaussian",
        "hmm-gaussian-full-weak",
        "hmm-categorical-weak",
        "poisson",
        "regression",
    ],
)
def test_em_log_likelihood_never_decreases(blobs, name):
    pair, args = every_model(blobs)[name]
    # A random start: the default k-means start of a Gaussian mixture on well-separated blobs
    # is already EM's fixed point (hard labels, Lloyd to convergence), so nothing would move.
    fit = quiet(max_iter=12, tol=0, mstep_iter=10, init="random").fit(pair, *args)
    h = np.asarray(fit.history)
    # tol=0 stops only at an exact fixed point (well-separated blobs get there quickly).
    assert (len(h) == 13 or fit.converged) and len(h) >= 3 and np.isfinite(h).all()
    assert (np.diff(h) >= -1e-9 * np.abs(h[:-1])).all(), np.diff(h).min()
    assert h[-1] > h[0]
    assert fit.info["decreases"] == 0


def test_em_plan_uses_closed_forms_where_they_exist(blobs):
    fits = {}
    for name in ("gmm-full", "gmm-full-weak", "hmm-gaussian", "regression"):
        pair, args = every_model(blobs)[name]
        fits[name] = quiet(max_iter=1).fit(pair, *args)
    assert set(fits["gmm-full"].info["closed_form"]) == {"weights", "locs", "scale_tril"}
    # The default priors are conjugate: Dirichlet weights, Normal means, Wishart precisions.
    assert set(fits["gmm-full-weak"].info["closed_form"]) == {"weights", "locs", "precision"}
    assert fits["gmm-full-weak"].info["gradient"] == []
    # A non-conjugate prior (the weak HMM's LogNormal scales and LKJ) takes the gradient step.
    fit = quiet(max_iter=1).fit(HMM(2, covariance="full", priors="weak"), hmm_data_2d())
    assert set(fit.info["gradient"]) == {"scales", "corr_chol"}
    assert set(fits["hmm-gaussian"].info["closed_form"]) == {"init", "trans", "locs", "scales"}
    assert fits["hmm-gaussian"].info["e_step"] == "chain"
    assert fits["regression"].info["traced_sites"] == ["y"]
    assert set(fits["regression"].info["gradient"]) == {"coef", "b", "s"}


# --------------------------------------------------------------------------- against the peers
def _overlapping_blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [2.0, 1.0], [-1.0, 2.5]])
    cov = np.array([[1.0, 0.4], [0.4, 0.6]])
    z = rng.integers(3, size=n)
    return centres[z] + rng.multivariate_normal(np.zeros(2), cov, size=n)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_matches_sklearn_gaussian_mixture_from_the_same_start(covariance):
    sk_mixture = pytest.importorskip("sklearn.mixture", reason="scikit-learn not installed")
    X = _overlapping_blobs()
    K, D = 3, 2
    w0 = np.full(K, 1 / K)
    m0 = X[[0, 1, 2]]
    init = {"weights": torch.tensor(w0), "locs": torch.tensor(m0)}
    if covariance == "full":
        init["scale_tril"] = torch.eye(D, dtype=F64).expand(K, D, D).clone()
        prec = np.stack([np.eye(D)] * K)
    else:
        init["scales"] = torch.ones(K, D, dtype=F64)
        prec = np.ones((K, D))
    sk = sk_mixture.GaussianMixture(
        K,
        covariance_type=covariance,
        max_iter=60,
        tol=0,
        reg_covar=0,
        weights_init=w0,
        means_init=m0,
        precisions_init=prec,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never converges
        sk.fit(X)
    fit = quiet(max_iter=60, tol=0, init=lambda x, seed: init).fit(
        GaussianMixture(K, covariance, priors=None), torch.tensor(X)
    )
    assert fit.history[-1] / len(X) == pytest.approx(sk.score(X), abs=1e-4)
    order = np.argsort(sk.means_[:, 0])
    ours = fit.params["locs"].numpy()
    np.testing.assert_allclose(ours[np.argsort(ours[:, 0])], sk.means_[order], atol=1e-4)


def test_em_matches_hmmlearn_gaussian_hmm_from_the_same_start():
    hmm = pytest.importorskip("hmmlearn.hmm", reason="hmmlearn not installed")
    x = hmm_data(S=10, T=40)
    S, T, D = x.shape
    m = HMM(3)
    iv = m.init_values(x)
    trans = torch.full((3, 3), 0.1, dtype=F64) + 0.7 * torch.eye(3, dtype=F64)
    init = {"init": iv["init"], "trans": trans, "locs": iv["locs"], "scales": iv["scales"]}
    ref = hmm.GaussianHMM(3, "diag", n_iter=25, tol=0, init_params="", params="stmc", min_covar=0)
    ref.startprob_, ref.transmat_ = init["init"].numpy(), trans.numpy()
    ref.means_, ref.covars_ = init["locs"].numpy(), init["scales"].numpy() ** 2
    X, lengths = x.reshape(-1, D).numpy(), [T] * S
    ref.fit(X, lengths)
    fit = quiet(max_iter=25, tol=0, init=lambda x, seed: init).fit(m, x)
    assert fit.history[-1] / (S * T) == pytest.approx(ref.score(X, lengths) / (S * T), abs=1e-4)
    np.testing.assert_allclose(fit.params["trans"].numpy(), ref.transmat_, atol=1e-4)


def test_em_matches_hmmlearn_categorical_hmm_from_the_same_start():
    hmm = pytest.importorskip("hmmlearn.hmm", reason="hmmlearn not installed")
    x = hmm_data("categorical", S=10, T=40)
    S, T = x.shape
    m = HMM(3, emission="categorical")
    g = torch.Generator().manual_seed(5)
    emit = torch.rand(3, 6, generator=g, dtype=F64) + 0.5
    init = {
        "init": torch.full((3,), 1 / 3, dtype=F64),
        "trans": torch.full((3, 3), 0.1, dtype=F64) + 0.7 * torch.eye(3, dtype=F64),
        "emit": emit / emit.sum(-1, keepdim=True),
    }
    ref = hmm.CategoricalHMM(3, n_iter=25, tol=0, init_params="", params="ste")
    ref.startprob_, ref.transmat_ = init["init"].numpy(), init["trans"].numpy()
    ref.emissionprob_ = init["emit"].numpy()
    X, lengths = x.reshape(-1, 1).numpy(), [T] * S
    ref.fit(X, lengths)
    fit = quiet(max_iter=25, tol=0, init=lambda x, seed: init).fit(m, x)
    assert fit.history[-1] / (S * T) == pytest.approx(ref.score(X, lengths) / (S * T), abs=1e-4)
    np.testing.assert_allclose(fit.params["emit"].numpy(), ref.emissionprob_, atol=1e-4)


# --------------------------------------------------------------------------- models from a test file
def test_poisson_mixture_written_in_a_test_fits_by_closed_forms():
    x = poisson_data()
    fit = quiet(max_iter=200, tol=1e-8).fit(poisson_mixture, x)
    assert set(fit.info["closed_form"]) == {"w", "rate"}
    rates, w = fit.params["rate"], fit.params["w"]
    order = rates.argsort()
    np.testing.assert_allclose(rates[order].numpy(), [2.0, 12.0], atol=0.5)
    np.testing.assert_allclose(w[order].numpy(), [0.6, 0.4], atol=0.06)
    # One EM step sets the rates to the responsibility-weighted means of the counts.
    fm = FactorModel(poisson_mixture, (x,), {}, dtype=F64)
    _, W = fm.e_step(fit.params)
    r = W[next(i for i, g in enumerate(fm.groups) if g.sites == ["x"])][0]
    step = quiet(max_iter=1, tol=0, init=lambda x, seed: fit.params).fit(poisson_mixture, x)
    np.testing.assert_allclose(step.params["rate"].numpy(), (r @ x / r.sum(-1)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(step.params["w"].numpy(), (r.sum(-1) / len(x)).numpy(), rtol=1e-12)


def test_mixture_of_regressions_written_in_a_test_fits_by_gradient_m_steps():
    x, y = regression_data()
    fit = quiet(max_iter=40, tol=1e-7).fit(regression_mixture, x, y)
    coef, b = fit.params["coef"][:, 0], fit.params["b"]
    order = coef.argsort()
    np.testing.assert_allclose(coef[order].numpy(), [-1.5, 2.0], atol=0.1)
    np.testing.assert_allclose(b[order].numpy(), [-1.0, 1.0], atol=0.1)
    np.testing.assert_allclose(fit.params["s"].numpy(), [0.3, 0.3], atol=0.06)


# --------------------------------------------------------------------------- results
def test_em_fit_converts_to_arviz_with_laplace_draws(blobs):
    import arviz as az

    x = blobs[0][:90].to(F64)
    fit = quiet(max_iter=20).fit(GaussianMixture(3, "diag"), x)
    idata = fit.to_arviz(num_samples=40, seed=1)
    assert {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    } <= set(idata.groups())
    locs = idata.posterior["locs"].values
    assert locs.shape == (4, 40, 3, 2)  # four chains of independent Laplace draws
    assert locs.std(axis=1).min() > 0  # Laplace draws spread around the optimum
    np.testing.assert_allclose(locs.mean(axis=(0, 1)), fit.params["locs"].numpy(), atol=0.1)
    # A MAP fit's objective is the log-posterior (log-likelihood + log-prior), named so.
    assert fit.objective == "log_posterior"
    np.testing.assert_allclose(idata.sample_stats["log_posterior"].values, fit.history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)


def test_laplace_covariance_is_the_inverse_observed_information():
    """One Normal mean with known scale: the Laplace variance of the mean is sigma^2 / n."""

    def model(y):
        w = pyro.param("w", torch.tensor([0.5, 0.5], dtype=F64), constraint=constraints.simplex)
        mu = pyro.param("mu", torch.zeros(2, dtype=F64))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(mu[z], 2.0), obs=y)

    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(200, generator=g) * 2 - 30, torch.randn(300, generator=g) * 2 + 30])
    fit = quiet(max_iter=50, tol=1e-9).fit(model, y.to(F64))
    draws = EM.posterior_draws(fit, 4000, seed=0)["mu"][0]
    sd = draws.std(0).sort().values
    np.testing.assert_allclose(sd.numpy(), [2 / math.sqrt(300), 2 / math.sqrt(200)], rtol=0.08)


def test_laplace_hessian_through_a_chain_is_exact():
    """The E-step's forward-backward gradient is first-order only; the Hessian the Laplace
    approximation needs must match the one through Pyro-style contraction."""
    x = hmm_data(S=3, T=6)
    fm = FactorModel(HMM(2).model, (x,), {}, dtype=F64)

    def log_z(v):
        th = {**fm.init, "locs": v.reshape(2, 1), "trans": fm.init["trans"]}
        return fm.log_partition(fm.tables(th), twice_differentiable=True)

    v = torch.tensor([-1.0, 1.5], dtype=F64)
    h_chain = torch.autograd.functional.hessian(log_z, v)
    fm.chain = None
    h_generic = torch.autograd.functional.hessian(log_z, v)
    torch.testing.assert_close(h_chain, h_generic, rtol=1e-9, atol=1e-9)
    assert float(h_chain.abs().sum()) > 0


def test_bic_and_aic_count_free_parameters(blobs):
    x = blobs[0].to(F64)
    fit = quiet(max_iter=5).fit(GaussianMixture(3, "full", priors=None), x)
    k = 2 + 3 * 2 + 3 * 3  # weights on the simplex, means, Cholesky factors
    assert n_parameters(fit) == k
    ll = fit.info["log_likelihood"]
    assert ll == pytest.approx(fit.history[-1])
    assert bic(fit) == pytest.approx(-2 * ll + k * math.log(len(x)))
    assert aic(fit) == pytest.approx(-2 * ll + 2 * k)
    assert fit.info["bic"] == pytest.approx(bic(fit))


def test_map_fit_reports_log_likelihood_without_the_prior(blobs):
    x = blobs[0].to(F64)
    fit = quiet(max_iter=5).fit(GaussianMixture(3, "diag"), x)
    assert fit.info["log_prior"] != 0
    assert fit.info["log_likelihood"] == pytest.approx(fit.history[-1] - fit.info["log_prior"])


def test_n_init_keeps_the_best_restart(blobs):
    x = blobs[0].to(F64)
    fit = quiet(max_iter=8, n_init=3, init="random").fit(GaussianMixture(3, "diag", priors=None), x)
    finals = [r["log_likelihood"] for r in fit.info["restarts"]]
    assert len(finals) == 3 and [r["seed"] for r in fit.info["restarts"]] == [0, 1, 2]
    assert fit.history[-1] == pytest.approx(max(finals))


def test_same_seed_same_fit(blobs):
    x = blobs[0].to(F64)
    a = quiet(max_iter=6, seed=3).fit(GaussianMixture(3, "diag", priors=None), x)
    b = quiet(max_iter=6, seed=3).fit(GaussianMixture(3, "diag", priors=None), x)
    assert a.history == b.history


def test_fit_saves_loads_and_draws_again(tmp_path):
    x = hmm_data(S=4, T=15)
    fit = quiet(max_iter=5).fit(HMM(2), x)
    fit.save(tmp_path / "fit")
    back = Fit.load(tmp_path / "fit")
    assert back.engine == "em" and back.history == fit.history
    draws = back.posterior_draws(num_samples=7, seed=0)
    assert draws["trans"].shape == (4, 7, 2, 2)  # four chains of independent draws
    torch.testing.assert_close(draws["trans"].sum(-1), torch.ones(4, 7, 2, dtype=F64))
    EM.activate(back)
    torch.testing.assert_close(pyro.param("trans").detach(), fit.params["trans"])


def test_singular_covariance_stops_with_a_clear_error():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]], dtype=F64)
    init = {
        "weights": torch.tensor([0.5, 0.5], dtype=F64),
        "locs": torch.tensor([[0.5, 0.5], [5.0, 5.0]], dtype=F64),
        "scale_tril": torch.eye(2, dtype=F64).expand(2, 2, 2).clone(),
    }
    with pytest.raises(FitDivergedError, match="reg_covar"):
        quiet(max_iter=20, init=lambda x, seed: init).fit(GaussianMixture(2, priors=None), x)
    fit = quiet(max_iter=20, reg_covar=1e-3, init=lambda x, seed: init).fit(
        GaussianMixture(2, priors=None), x
    )
    assert np.isfinite(fit.history).all()


# --------------------------------------------------------------------------- refusals
def test_em_refuses_a_continuous_local_latent_and_suggests_svi():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
            )
            h = pyro.sample("h", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(h + z, 1.0), obs=x)

    with pytest.raises(InputError, match=r"'h'.*continuous.*SVI"):
        quiet().fit(model, torch.randn(10))


def test_em_refuses_a_model_without_discrete_latents_and_suggests_svi():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(InputError, match=r"no enumerated discrete latent.*\['mu'\].*SVI"):
        quiet().fit(model, torch.randn(10))


def test_em_refuses_a_discrete_latent_that_is_not_enumerated():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("x", dist.Normal(z.to(x.dtype), 1.0), obs=x)

    with pytest.raises(InputError, match=r"'z'.*not enumerated.*config_enumerate"):
        quiet().fit(model, torch.randn(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": -1}, "max_iter"),
        ({"n_init": 0}, "n_init"),
        ({"tol": -1.0}, "tol"),
        ({"init": "kmeans"}, "init must be one of"),
        ({"dtype": "float16"}, "dtype"),
        ({"reg_covar": "x"}, "reg_covar"),
    ],
)
def test_em_validates_its_settings_at_construction(kwargs, match):
    with pytest.raises(InputError, match=match):
        EM(**kwargs)


def test_em_refuses_nan_data_and_bad_initial_values(blobs):
    x = blobs[0].to(F64).clone()
    x[3, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        quiet().fit(GaussianMixture(3, priors=None), x)
    good = blobs[0].to(F64)
    with pytest.raises(InputError, match="'means'.*known"):
        quiet(init=lambda x, seed: {"means": torch.zeros(3, 2)}).fit(
            GaussianMixture(3, priors=None), good
        )
    with pytest.raises(InputError, match=r"'locs' has shape \(2, 2\)"):
        quiet(init=lambda x, seed: {"locs": torch.zeros(2, 2)}).fit(
            GaussianMixture(3, priors=None), good
        )
