"""SVI's traced pathwise ELBO (inference/traced_elbo.py): a graph replays the eager step's
numbers, a model whose structure or control flow is not static runs eagerly, fits and
resumes are those of the eager path."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import SVI
from jointkl.inference.reparam_elbo import ReparamELBO, _rng_state, _set_rng_state
from jointkl.models import VAE
from pyro.infer.autoguide import AutoNormal

from jointkl import InputError


def regression_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))  # a constrained latent: a real transform
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w + b, s), obs=y)


def regression_data(n=100, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5])[:d] + 0.3 + 0.5 * torch.randn(n, generator=g)


def binary_data(n=90, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.3).float()


def _fit(model, *data, **kw):
    kw = {"steps": 30, "lr": 0.05, "progress": False, "seed": 1, **kw}
    return SVI(**kw).fit(model, *data)


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_a_graph_step_gives_the_eager_steps_loss_and_gradients(analytic_kl):
    pyro.clear_param_store()
    x, y = regression_data()
    guide = AutoNormal(regression_model)
    elbo = ReparamELBO(analytic_kl=analytic_kl, compiled=True)
    elbo.data_scale = 4.0
    for _ in range(4):  # Pyro's checked step, two eager ones agreeing, the one that builds
        elbo.loss_and_grads(regression_model, guide, x, y)
        for p in elbo.last_params:
            p.grad = None
    assert elbo.traced.graphs_built == 1 and elbo.traced.note == "compiled"
    start = _rng_state()
    traced = elbo.loss_and_grads(regression_model, guide, x, y)
    assert elbo.traced.graph_steps == 1
    params = list(elbo.last_params)
    traced_grads, traced_rng = _grads(params), _rng_state()
    for p in params:
        p.grad = None
    _set_rng_state(start)
    elbo.traced.disabled = True  # the same step, eagerly
    eager = elbo.loss_and_grads(regression_model, guide, x, y)
    assert traced == eager
    assert torch.equal(traced_rng[0], _rng_state()[0])  # the same draws were consumed
    assert len(elbo.last_params) == len(params)
    for p, g in zip(elbo.last_params, traced_grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("batch_size", [None, 32])
def test_a_compiled_fit_equals_the_eager_fit_bit_for_bit(batch_size):
    x, y = regression_data()  # 100 rows, B = 32: an epoch's short last batch gets its graph
    compiled = _fit(regression_model, x, y, guide="normal", batch_size=batch_size)
    eager = _fit(regression_model, x, y, guide="normal", batch_size=batch_size, jit=False)
    assert compiled.info["jit"]["path"] == "compiled"
    assert compiled.info["jit"]["graph_steps"] >= 25
    assert compiled.info["jit"]["graphs_built"] == (1 if batch_size is None else 2)
    assert eager.info["jit"] == {"path": "eager: jit=False"}
    assert compiled.history == eager.history
    for k, v in eager.params.items():
        assert torch.equal(v, compiled.params[k]), k


def test_a_compiled_fit_converges_to_the_eager_fits_answer_on_another_seed():
    x, y = regression_data(400)
    kw = dict(guide="normal", steps=400, lr=0.05, batch_size=64)
    compiled = _fit(regression_model, x, y, **{**kw, "seed": 7})
    eager = _fit(regression_model, x, y, **{**kw, "seed": 8}, jit=False)
    assert compiled.info["jit"]["path"] == "compiled"
    w_c, w_e = compiled.params["w"], eager.params["w"]
    assert torch.allclose(w_c, w_e, atol=0.1), (w_c, w_e)
    assert torch.allclose(w_c, torch.tensor([1.0, -2.0, 0.5]), atol=0.15)


def test_the_vae_compiles_and_equals_its_eager_fit():
    x = binary_data()
    kw = dict(steps=20, lr=1e-3, batch_size=32, progress=False, seed=0)
    torch.manual_seed(0)
    compiled = SVI(**kw).fit(VAE(2, hidden=8), x)
    torch.manual_seed(0)
    eager = SVI(**kw, jit=False).fit(VAE(2, hidden=8), x)
    assert compiled.info["jit"]["path"] == "compiled"
    assert compiled.history == eager.history


def test_a_non_binary_batch_after_the_graph_is_built_still_raises_the_vaes_error():
    x = binary_data()

    def spoil(step, loss):
        if step == 8:  # graphs run from step 4 on: the bad row reaches a graph first
            x[5, 0] = 0.5

    with pytest.raises(InputError, match="binary x"):
        SVI(steps=20, lr=1e-3, progress=False, on_step=spoil).fit(VAE(2, hidden=8), x)


def test_a_model_whose_sites_change_between_steps_runs_eagerly():
    calls = {"model": 0, "guide": 0}

    def model(x, y):
        calls["model"] += 1
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        scale = 1.0
        if calls["model"] % 2:  # every other call: one more latent site
            scale = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, scale), obs=y)

    def guide(x, y):
        calls["guide"] += 1
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        pyro.sample("w", dist.Normal(loc, 0.1).to_event(1))
        if calls["guide"] % 2:
            pyro.sample("s", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.1))

    x, y = regression_data()
    fit = SVI(steps=12, lr=0.05, progress=False, guide=guide).fit(model, x, y)
    assert fit.config["resolved_loss"] == "trace"
    assert fit.info["jit"]["graph_steps"] == 0
    assert fit.info["jit"]["path"].startswith("eager"), fit.info["jit"]


def test_a_model_that_branches_on_the_batchs_values_runs_eagerly():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        # a Python branch on the data: a graph would freeze one outcome
        noise = 0.5 if bool(y.mean() > 0) else 2.0
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, noise), obs=y)

    x, y = regression_data()
    compiled = _fit(model, x, y, guide="normal", batch_size=16)
    eager = _fit(model, x, y, guide="normal", batch_size=16, jit=False)
    assert compiled.info["jit"]["graph_steps"] == 0
    assert "reads a tensor's value" in compiled.info["jit"]["path"], compiled.info["jit"]
    assert compiled.history == eager.history


def test_a_branch_on_a_shape_alone_still_compiles():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        if x.shape[0] == 0:  # read from the traced shape: a graph is kept per shape
            raise ValueError("empty")
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    x, y = regression_data()
    fit = _fit(model, x, y, guide="normal")
    assert fit.info["jit"]["path"] == "compiled", fit.info["jit"]


def test_resume_of_a_compiled_fit_equals_the_unbroken_run(tmp_path):
    x, y = regression_data()
    kw = dict(steps=40, lr=0.05, batch_size=16, progress=False, seed=3, guide="normal")
    straight = SVI(**kw).fit(regression_model, x, y)
    assert straight.info["jit"]["path"] == "compiled"

    def interrupt(step, loss):
        if step == 16:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    part = SVI(**kw, checkpoint_every=5, checkpoint_dir=ck, on_step=interrupt).fit(
        regression_model, x, y
    )
    assert part.n_iter == 17
    resumed = SVI(**kw, checkpoint_every=5, checkpoint_dir=ck, resume=True).fit(
        regression_model, x, y
    )
    assert resumed.n_iter == 40 and resumed.info["jit"]["graph_steps"] > 0
    assert resumed.history == straight.history
    for k, v in straight.params.items():
        assert torch.equal(v, resumed.params[k]), k


def test_the_jit_setting_and_the_paths_without_a_graph():
    x, y = regression_data()
    on = _fit(regression_model, x, y, guide="normal", jit=True)
    assert on.info["jit"]["path"] == "compiled"
    particles = _fit(regression_model, x, y, guide="normal", num_particles=2)
    assert particles.info["jit"]["path"].startswith("eager")
    with pytest.raises(InputError, match="jit"):
        SVI(jit="yes")


def test_an_enumerating_model_still_fits_with_the_default_jit():
    data = torch.cat([torch.randn(30) - 3, torch.randn(30) + 3])

    def model(x):
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    fit = SVI(steps=50, lr=0.1, progress=False).fit(model, data)
    assert fit.config["resolved_loss"] == "enum"
    assert fit.info["jit"]["path"].startswith("eager")
    assert sorted(fit.params["locs"].tolist())[0] < -1.5


def test_a_python_value_that_changes_after_the_graph_is_built_is_caught_by_the_audit(
    monkeypatch,
):
    from jointkl.inference import traced_elbo

    monkeypatch.setattr(traced_elbo, "AUDIT_EVERY", 5)
    anneal = {"factor": 1.0}

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", len(x)):
            # a KL-annealing style factor read from a global: frozen in a graph
            pyro.sample("y", dist.Normal(x @ w, 1.0 / anneal["factor"]), obs=y)

    def bump(step, loss):
        if step == 12:
            anneal["factor"] = 2.0

    x, y = regression_data()
    fit = _fit(model, x, y, guide="normal", on_step=bump)
    assert fit.info["jit"]["path"].startswith("eager: the model's step changed"), fit.info["jit"]
    assert 8 <= fit.info["jit"]["graph_steps"] <= 13
    anneal["factor"] = 1.0
    eager = _fit(model, x, y, guide="normal", on_step=bump, jit=False)
    # the steps before the change and after the detection are the eager path's; those
    # between (at most AUDIT_EVERY) used the old factor
    assert fit.history[:12] == eager.history[:12]
