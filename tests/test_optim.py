"""jointkl.optim: each optimiser is the stated discretisation of its ODE.

Trajectories are compared with torch.optim under the documented parameter maps; the
integrators' orders are measured against the exact solution of a linear ODE.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jointkl.checkpoint import LoopState
from jointkl.errors import FitDivergedError, InputError
from jointkl.optim import (
    OPTIM_CLASSES,
    OPTIMIZERS,
    AdaptiveFlow,
    GradientFlow,
    HeavyBall,
    Heun,
    Nesterov,
    NormalisedFlow,
    heavyball_settings,
    optim_class,
    pyro_optim,
    sgd_settings,
)
from jointkl.optim.gradients import grad_norm, grads_finite
from jointkl.optim.loop import StepLoop
from jointkl.optim.sparse import LazyAdam, SparseAwareOptimizer

DIM = 10
F64 = torch.float64


def random_quadratic(seed: int, low: float = 0.2, high: float = 2.0):
    """A, b of L(θ) = ½ θᵀAθ − bᵀθ with A symmetric, eigenvalues spread over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=F64))
    eig = torch.linspace(low, high, DIM, dtype=F64)
    return (q * eig) @ q.T, torch.randn(DIM, generator=g, dtype=F64)


def trajectory(make_optimizer, seed: int = 0, steps: int = 100) -> torch.Tensor:
    """θ after each of ``steps`` steps on a random quadratic; θ is split over a matrix and a
    vector parameter so that the multi-tensor code paths see more than one tensor."""
    A, b = random_quadratic(seed)
    g = torch.Generator().manual_seed(seed + 1)
    theta0 = torch.randn(DIM, generator=g, dtype=F64)
    w = theta0[:6].reshape(2, 3).clone().requires_grad_()
    v = theta0[6:].clone().requires_grad_()
    opt = make_optimizer([w, v])
    out = []
    for _ in range(steps):
        opt.zero_grad()
        theta = torch.cat([w.reshape(-1), v])
        (0.5 * theta @ A @ theta - b @ theta).backward()
        opt.step()
        out.append(torch.cat([w.detach().reshape(-1), v.detach()]))
    return torch.stack(out)


def assert_same_trajectory(ours, reference, tol: float = 1e-6) -> None:
    a, b = trajectory(ours), trajectory(reference)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < tol


lrs = st.floats(1e-3, 0.3)
momenta = st.floats(0.0, 0.95)
betas = st.floats(0.5, 0.999)


# ---------------------------------------------------------------- torch.optim under the maps
@settings(max_examples=10, deadline=None)
@given(lr=lrs)
def test_gradientflow_reproduces_sgd(lr):
    assert_same_trajectory(
        lambda p: GradientFlow(p, step_size=lr),
        lambda p: torch.optim.SGD(p, lr=lr, foreach=True),
    )


@settings(max_examples=10, deadline=None)
@given(lr=lrs, momentum=momenta)
def test_heavyball_reproduces_momentum_sgd_under_stated_map(lr, momentum):
    assert_same_trajectory(
        lambda p: HeavyBall(p, **heavyball_settings(lr, momentum)),
        lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, foreach=True),
    )


@settings(max_examples=10, deadline=None)
@given(lr=lrs, momentum=st.floats(0.05, 0.95))
def test_nesterov_reproduces_nesterov_sgd_under_stated_map(lr, momentum):
    assert_same_trajectory(
        lambda p: Nesterov(p, **heavyball_settings(lr, momentum)),
        lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, nesterov=True, foreach=True),
    )


@settings(max_examples=10, deadline=None)
@given(lr=st.floats(1e-3, 0.05), alpha=betas)
def test_adaptiveflow_without_momentum_reproduces_rmsprop(lr, alpha):
    assert_same_trajectory(
        lambda p: AdaptiveFlow(p, step_size=lr, smoothing=alpha, momentum=0.0, debias=False),
        lambda p: torch.optim.RMSprop(p, lr=lr, alpha=alpha, foreach=True),
    )


@settings(max_examples=10, deadline=None)
@given(lr=st.floats(1e-3, 0.05), beta1=st.floats(0.0, 0.95), beta2=betas)
def test_adaptiveflow_with_momentum_reproduces_adam(lr, beta1, beta2):
    assert_same_trajectory(
        lambda p: AdaptiveFlow(p, step_size=lr, momentum=beta1, smoothing=beta2),
        lambda p: torch.optim.Adam(p, lr=lr, betas=(beta1, beta2), foreach=True),
    )


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(1e-6, 10.0), momentum=st.floats(0.0, 1.0))
def test_heavyball_parameter_maps_are_inverse(lr, momentum):
    back = sgd_settings(**heavyball_settings(lr, momentum))
    assert back["lr"] == pytest.approx(lr, rel=1e-12)
    assert back["momentum"] == pytest.approx(momentum, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: HeavyBall(p, step_size=0.2, friction=1.5),
        lambda p: Nesterov(p, step_size=0.2, friction=1.5),
        lambda p: AdaptiveFlow(p, step_size=0.05),
    ],
)
def test_state_dict_resumes_the_same_trajectory(make):
    A, b = random_quadratic(0)

    def run(theta, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * theta @ A @ theta - b @ theta).backward()
            opt.step()

    straight = torch.ones(DIM, dtype=F64, requires_grad=True)
    run(straight, make([straight]), 20)

    first = torch.ones(DIM, dtype=F64, requires_grad=True)
    opt = make([first])
    run(first, opt, 10)
    second = first.detach().clone().requires_grad_()
    resumed = make([second])
    resumed.load_state_dict(opt.state_dict())
    run(second, resumed, 10)
    assert torch.equal(second, straight)


# ---------------------------------------------------------------- orders of the integrators
def global_error(optimizer_cls, step_size: float, horizon: float = 2.0) -> float:
    """|θ(T) − θ_exact(T)| for dθ/dt = −Aθ integrated with ``optimizer_cls``."""
    A, _ = random_quadratic(7, low=0.5, high=2.0)
    theta0 = torch.ones(DIM, dtype=F64)
    exact = torch.linalg.matrix_exp(-A * horizon) @ theta0
    theta = theta0.clone().requires_grad_()
    opt = optimizer_cls([theta], step_size=step_size)

    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ A @ theta
        loss.backward()
        return loss

    for _ in range(round(horizon / step_size)):
        opt.step(closure)
    return (theta.detach() - exact).norm().item()


def log_log_slope(optimizer_cls) -> float:
    steps = [0.1, 0.05, 0.025, 0.0125]
    x = torch.tensor([math.log(s) for s in steps], dtype=F64)
    y = torch.tensor([math.log(global_error(optimizer_cls, s)) for s in steps], dtype=F64)
    xc = x - x.mean()
    return (xc @ (y - y.mean()) / (xc @ xc)).item()


def test_euler_global_error_is_first_order():
    assert log_log_slope(GradientFlow) == pytest.approx(1.0, abs=0.1)


def test_heun_global_error_is_second_order():
    assert log_log_slope(Heun) == pytest.approx(2.0, abs=0.1)


def test_heun_returns_the_loss_at_the_start_of_the_step():
    theta = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = Heun([theta], step_size=0.1)

    def closure():
        loss = (theta**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    # θ' = θ − ε/2 (2θ + 2(θ − 2εθ)) = θ (1 − 2ε + 2ε²)
    assert torch.allclose(theta.detach(), torch.tensor([1.0, -2.0], dtype=F64) * 0.82)


@pytest.mark.parametrize("cls", [HeavyBall, Nesterov])
def test_momentum_methods_converge_to_the_damped_ode(cls):
    """As ε → 0 at fixed friction λ, the iterates follow θ̈ + λθ̇ = −Aθ (θ̇(0) = 0): the
    physical parameters mean what they say, whatever the implied (lr, momentum)."""
    A, _ = random_quadratic(3, low=0.5, high=2.0)
    lam, horizon = 0.7, 3.0
    theta0 = torch.ones(DIM, dtype=F64)
    # First-order system d/dt (θ, v) = [[0, I], [−A, −λI]] (θ, v), solved exactly.
    eye = torch.eye(DIM, dtype=F64)
    system = torch.cat([torch.cat([0 * eye, eye], 1), torch.cat([-A, -lam * eye], 1)])
    exact = (torch.linalg.matrix_exp(system * horizon) @ torch.cat([theta0, 0 * theta0]))[:DIM]
    errors = []
    steps = [0.05, 0.025, 0.0125]
    for eps in steps:
        theta = theta0.clone().requires_grad_()
        opt = cls([theta], step_size=eps, friction=lam)
        for _ in range(round(horizon / eps)):
            opt.zero_grad()
            (0.5 * theta @ A @ theta).backward()
            opt.step()
        errors.append((theta.detach() - exact).norm().item())
    assert errors[-1] < 0.05 * exact.norm().item()
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 1.6 < coarse / fine < 2.4  # first order: halving ε halves the error


def test_euler_is_stable_just_below_two_over_lambda_max_and_not_above():
    A, b = random_quadratic(11, low=0.3, high=2.0)
    limit = 2.0 / torch.linalg.eigvalsh(A).max().item()

    def final_distance(step_size):
        theta = torch.zeros(DIM, dtype=F64, requires_grad=True)
        opt = GradientFlow([theta], step_size=step_size)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * theta @ A @ theta - b @ theta).backward()
            opt.step()
        return (theta.detach() - torch.linalg.solve(A, b)).norm().item()

    assert final_distance(0.95 * limit) < 1e-3
    assert final_distance(1.05 * limit) > 1e3


# ---------------------------------------------------------------- bad input
def one_param():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("cls", [GradientFlow, HeavyBall, Nesterov, Heun, AdaptiveFlow])
@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), float("inf"), "0.1"])
def test_bad_step_size_is_refused(cls, bad):
    with pytest.raises(InputError, match="step_size"):
        cls(one_param(), step_size=bad)


@pytest.mark.parametrize("cls", [HeavyBall, Nesterov])
@pytest.mark.parametrize("friction", [-0.5, 10.5, float("nan")])
def test_friction_outside_zero_to_one_over_step_is_refused(cls, friction):
    with pytest.raises(InputError, match=r"friction must be a number in \[0, 10\]"):
        cls(one_param(), step_size=0.1, friction=friction)


def test_friction_at_the_ends_of_its_range_is_accepted():
    HeavyBall(one_param(), step_size=0.1, friction=0.0)
    HeavyBall(one_param(), step_size=0.1, friction=10.0)


@pytest.mark.parametrize(
    "setting", [{"smoothing": 1.0}, {"smoothing": -0.1}, {"momentum": 1.0}, {"eps": -1e-8}]
)
def test_adaptiveflow_bad_averages_are_refused(setting):
    name = next(iter(setting))
    with pytest.raises(InputError, match=name):
        AdaptiveFlow(one_param(), **setting)


def test_bad_param_group_is_refused_before_it_joins():
    opt = HeavyBall(one_param(), step_size=0.1, friction=1.0)
    with pytest.raises(InputError, match="friction"):
        opt.add_param_group({"params": one_param(), "friction": 50.0})
    assert len(opt.param_groups) == 1


def test_heun_without_closure_is_refused():
    params = one_param()
    params[0].grad = torch.ones(3)
    with pytest.raises(InputError, match="closure is required"):
        Heun(params, step_size=0.1).step()


def test_pyro_optim_bad_name_and_settings_are_refused():
    with pytest.raises(InputError, match="unknown optimiser 'adam'.*heavyball"):
        pyro_optim("adam")
    with pytest.raises(InputError, match="closure"):
        pyro_optim("heun", step_size=0.1)
    with pytest.raises(InputError, match="friction"):
        pyro_optim("heavyball", step_size=0.1, friction=-1.0)
    with pytest.raises(InputError, match="HeavyBall.*lr"):
        pyro_optim("heavyball", lr=0.1)


# ---------------------------------------------------------------- under Pyro
def test_registry_names_every_optimiser():
    assert OPTIMIZERS == {
        "gradientflow": GradientFlow,
        "heavyball": HeavyBall,
        "nesterov": Nesterov,
        "heun": Heun,
        "adaptiveflow": AdaptiveFlow,
        "normalisedflow": NormalisedFlow,
    }


@pytest.mark.parametrize(
    "name, settings_",
    [
        ("gradientflow", {"step_size": 0.01}),
        ("heavyball", {"step_size": 0.1, "friction": 2.0}),
        ("nesterov", {"step_size": 0.1, "friction": 2.0}),
        ("adaptiveflow", {"step_size": 0.05}),
    ],
)
def test_pyro_optim_drives_svi_to_the_conjugate_posterior(name, settings_):
    """Normal prior N(0, 1), 20 observations with unit noise: the posterior mean is
    Σx/(n + 1); a Delta guide under SVI must find it (the MAP)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = torch.randn(20) + 2.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Delta(loc))

    svi = pyro.infer.SVI(model, guide, pyro_optim(name, **settings_), pyro.infer.Trace_ELBO())
    for _ in range(300):
        svi.step(data)
    expected = (data.sum() / (len(data) + 1)).item()
    assert pyro.param("loc").item() == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------------- the engines' name table
def test_one_optimiser_table_for_every_engine():
    assert set(OPTIMIZERS) <= set(OPTIM_CLASSES)
    assert optim_class("adam", "E") is torch.optim.Adam
    assert optim_class("heavyball", "E") is HeavyBall
    with pytest.raises(InputError, match=r"E: unknown optim 'adamax9'; known: adagrad, adam,"):
        optim_class("adamax9", "E")
    for name in ("heun", "lbfgs"):  # a loop without closures cannot run them
        with pytest.raises(InputError, match=f"E: optim '{name}' needs a closure"):
            optim_class(name, "E")
        assert optim_class(name, "E", closure=True) is OPTIM_CLASSES[name]


# ---------------------------------------------------------------------- gradients
def test_grads_finite_and_grad_norm_read_dense_and_sparse_gradients():
    dense = torch.zeros(3, requires_grad=True)
    rows = torch.zeros(5, 2, requires_grad=True)
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    # row 1 twice (uncoalesced): its coalesced value is (2, 0)
    rows.grad = torch.sparse_coo_tensor(
        [[1, 1]], torch.tensor([[1.0, 0.0], [1.0, 0.0]]), (5, 2), check_invariants=True
    )
    assert grads_finite([dense, rows, torch.zeros(1, requires_grad=True)])
    assert grad_norm([dense, rows]) == pytest.approx(math.sqrt(9.0 + 4.0))
    rows.grad = torch.sparse_coo_tensor(
        [[2]], torch.tensor([[float("nan"), 0.0]]), (5, 2), check_invariants=True
    )
    assert not grads_finite([dense, rows])
    rows.grad = None
    dense.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not grads_finite([dense, rows])


# ---------------------------------------------------------------------- sparse rows
def test_sparse_aware_optimizer_steps_touched_rows_and_integrators_take_lr_as_step_size():
    emb = torch.ones(4, 2, requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    opt = SparseAwareOptimizer("adam", 0.1, [emb, bias])
    emb.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (4, 2), check_invariants=True)
    bias.grad = torch.ones(2)
    opt.step()
    assert [type(o) for o in opt.optims] == [LazyAdam, torch.optim.Adam]
    assert torch.equal(emb[1:], torch.ones(3, 2)) and (emb[0] < 1).all()  # one row moved
    assert opt.state_dict()["optims"][0]["state"]
    flow = SparseAwareOptimizer("heavyball", 0.2, [bias])
    bias.grad = torch.ones(2)
    flow.step()
    assert flow.optims[0].param_groups[0]["step_size"] == 0.2
    with pytest.raises(InputError, match="needs a closure"):
        SparseAwareOptimizer("heun", 0.1, [bias])


# ---------------------------------------------------------------------- the step loop
def test_step_loop_carries_the_state_saves_it_and_keeps_the_last_good_one(tmp_path):
    w = torch.zeros(1)
    state = LoopState(0, params={"w": w})
    saved = []

    def save():
        saved.append(state.step)
        state.save(tmp_path)

    def step(i):
        if i == 7:
            raise FitDivergedError("bad step")
        w.add_(1.0)
        return float(i)

    loop = StepLoop(steps=10, save=save, checkpoint_every=3)
    with pytest.raises(FitDivergedError):
        loop.run(state, step)
    assert state.step == 7 and state.history == [float(i) for i in range(7)]
    # every 3 steps; the state that met the divergence is never saved, so the newest
    # checkpoint (step 6) is the last state whose objective was evaluated finite
    assert saved == [3, 6] and not (tmp_path / "step-00000007.pt").exists()
    back = LoopState.load(tmp_path / "step-00000006.pt")
    assert back.step == 6 and back.history == state.history[:6] and float(back.params["w"]) == 6.0

    def interrupt(i, value):
        if i == 8:
            raise KeyboardInterrupt

    state = LoopState(5, history=[0.0] * 5)
    converged, reason = StepLoop(steps=20, on_step=interrupt).run(state, lambda i: 1.0)
    assert (converged, reason, state.step) == (False, "interrupted after step 9", 9)
    state = LoopState(0)
    converged, reason = StepLoop(steps=20, stop=lambda v: v >= 4).run(state, float)
    assert (converged, reason, state.step) == (True, "early stopping", 5)


# ---------------------------------------------------------------------- normalised flow
def test_normalised_flow_moves_exactly_step_size_along_the_global_gradient_direction():
    """Every step has length ε in the space of all parameters (global norm, here over a
    matrix and a vector), in the direction of the whole gradient, on an anisotropic
    quadratic."""
    eps = 0.05
    A, b = random_quadratic(0)
    path = trajectory(lambda p: NormalisedFlow(p, step_size=eps), steps=60)
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(DIM, generator=g, dtype=F64)
    path = torch.cat([theta0[None], path])
    steps = path[1:] - path[:-1]
    assert torch.allclose(steps.norm(dim=1), torch.full((60,), eps, dtype=F64), atol=1e-12)
    grads = path[:-1] @ A - b  # ∇L = Aθ − b at each step's start
    unit = grads / grads.norm(dim=1, keepdim=True)
    assert torch.allclose(steps, -eps * unit, atol=1e-12)


def test_normalised_flow_follows_the_exact_flow_on_an_isotropic_quadratic():
    """L = ½a‖θ − θ*‖²: the exact normalised flow runs straight at θ* at unit speed,
    θ(t) = θ* + (θ₀ − θ*)(1 − t/d₀) for t ≤ d₀ = ‖θ₀ − θ*‖. Euler's iterates are that solution
    at t = nε until they pass θ*, then stay within ε of θ*."""
    a, eps = 3.0, 0.1
    target = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    theta = torch.tensor([4.0, 2.0, -1.0], dtype=F64, requires_grad=True)
    d0 = float((theta.detach() - target).norm())
    opt = NormalisedFlow([theta], step_size=eps)
    start = theta.detach().clone()
    for n in range(1, 120):
        opt.zero_grad()
        (0.5 * a * (theta - target).square().sum()).backward()
        opt.step()
        t = n * eps
        if t <= d0:
            exact = target + (start - target) * (1 - t / d0)
            assert torch.allclose(theta.detach(), exact, atol=1e-12), n
        else:
            assert float((theta.detach() - target).norm()) <= eps + 1e-12, n
    assert 120 * eps > d0 + 2 * eps  # the loop did run past the arrival


def test_normalised_flow_stands_still_where_the_gradient_vanishes_and_checks_its_step():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    other = torch.tensor([3.0], requires_grad=True)
    opt = NormalisedFlow([theta, other], step_size=0.5)
    theta.grad, other.grad = torch.zeros(2), torch.zeros(1)
    opt.step()
    assert theta.tolist() == [1.0, 2.0] and other.tolist() == [3.0]
    other.grad = None  # a parameter without a gradient is left out of the norm and the step
    theta.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.allclose(theta.detach(), torch.tensor([0.7, 1.6]))
    assert other.tolist() == [3.0]
    with pytest.raises(InputError, match="NormalisedFlow: step_size must be a finite number > 0"):
        NormalisedFlow([theta], step_size=0.0)


def test_normalised_flow_under_pyro_and_the_engine_uses_one_global_norm():
    """Under Pyro (pyro_optim) and SVI(optim="normalisedflow") the norm spans all parameters:
    two sites' locations move ε together, not ε each."""
    from jointkl.inference import SVI

    def model(x):
        u = pyro.sample("u", dist.Normal(0.0, 10.0))
        v = pyro.sample("v", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(u + 2 * v, 1.0), obs=x)

    x = torch.randn(30) + 5.0
    fit = SVI(guide="delta", optim="normalisedflow", lr=0.01, steps=1, progress=False).fit(model, x)
    moved = torch.stack([fit.params["u"], fit.params["v"]]).norm()
    assert float(moved) == pytest.approx(0.01, rel=1e-5)  # both started at the prior mean 0
    with pytest.raises(InputError, match="clip_args"):
        pyro_optim("normalisedflow", clip_args={"clip_norm": 1.0}, step_size=0.1)
    fit = SVI(guide="delta", optim="normalisedflow", lr=0.01, steps=600, progress=False).fit(
        model, x
    )
    # on the ridge u + 2v = mean(x) (up to the prior), within the step length ε
    assert float(fit.params["u"] + 2 * fit.params["v"]) == pytest.approx(float(x.mean()), abs=0.05)
