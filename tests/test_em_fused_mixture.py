"""EM's fused steps for a Bernoulli mixture (jointkl.inference.em.fused_mixture) compute the
generic steps' iterates: the same iterations, the same parameters up to rounding order, on
every setting that takes them; and every other setting keeps the generic steps."""

import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import engine as em_engine
from jointkl.inference.em import fused_mixture
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.mstep import plan_updates
from jointkl.models import BernoulliMixture, GaussianMixture

F64 = torch.float64


def binary_data(n: int = 600, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Three clusters of binary vectors; the last two coordinates are 0 in every row."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, d, generator=g, dtype=F64) * 0.8 + 0.1
    p[:, -2:] = 0
    return torch.bernoulli(p[torch.randint(3, (n,), generator=g)], generator=g)


def fit(monkeypatch, fused: bool, model, x, **settings):
    if not fused:
        monkeypatch.setattr(em_engine, "fused_steps", lambda steps, accelerate: steps)
    else:
        monkeypatch.setattr(em_engine, "fused_steps", fused_mixture.fused_steps)
    return EM(progress=False, **settings).fit(model, x)


def assert_same_fit(a, b, tol: float) -> None:
    assert a.n_iter == b.n_iter
    assert a.info["stop_reason"] == b.info["stop_reason"]
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=tol)
    scale = max(1.0, abs(a.history[-1]))
    assert max(abs(u - v) for u, v in zip(a.history, b.history, strict=True)) <= tol * scale


def digits(n: int = 600) -> torch.Tensor:
    return BernoulliMixture.default_data()[0][0].double()[:n]


CASES = {
    "default": (lambda: BernoulliMixture(4), {}),
    "seed 3": (lambda: BernoulliMixture(4), {"seed": 3}),
    "no priors": (lambda: BernoulliMixture(4, priors=None), {}),
    "Beta(2, 3)": (lambda: BernoulliMixture(3, beta=(2.0, 3.0)), {}),
    "Beta(1, 2)": (lambda: BernoulliMixture(3, beta=(1.0, 2.0)), {}),
    "sparse Dirichlet": (lambda: BernoulliMixture(8, concentration=0.5), {"max_iter": 200}),
    "random start": (lambda: BernoulliMixture(4), {"init": "random"}),
    "tol 0": (lambda: BernoulliMixture(4), {"tol": 0.0, "max_iter": 15}),
}


@pytest.mark.parametrize("data", ["digits", "zero columns"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_steps_follow_the_generic_iterates(monkeypatch, case, data):
    make, settings = CASES[case]
    x = digits() if data == "digits" else binary_data()
    generic = fit(monkeypatch, False, make(), x, **settings)
    fused = fit(monkeypatch, True, make(), x, **settings)
    assert generic.info["steps"] == "generic"
    assert fused.info["steps"] == "bernoulli-mixture"
    assert_same_fit(generic, fused, 1e-10)


def test_fused_steps_in_float32(monkeypatch):
    x = digits()
    generic = fit(monkeypatch, False, BernoulliMixture(4), x, dtype=torch.float32)
    fused = fit(monkeypatch, True, BernoulliMixture(4), x, dtype=torch.float32)
    assert fused.params["probs"].dtype == torch.float32
    assert_same_fit(generic, fused, 1e-4)


@pytest.mark.parametrize("priors", ["weak", None])
def test_a_component_with_no_weight_keeps_its_values_as_the_generic_step_does(monkeypatch, priors):
    x = binary_data()
    K = 4

    def init(x, seed):
        w = torch.full((K,), 1.0 / (K - 1), dtype=F64)
        w[2] = 0
        p = 0.25 + 0.5 * torch.rand(K, x.shape[1], generator=torch.Generator().manual_seed(0))
        return {"weights": w, "probs": p.double()}

    settings = {"init": init, "max_iter": 10, "tol": 0.0}
    generic = fit(monkeypatch, False, BernoulliMixture(K, priors=priors), x, **settings)
    fused = fit(monkeypatch, True, BernoulliMixture(K, priors=priors), x, **settings)
    assert_same_fit(generic, fused, 1e-10)
    assert float(fused.params["weights"][2]) == 0.0
    if priors is None:  # no mass and no pseudo-counts: the probabilities stay where they were
        torch.testing.assert_close(fused.params["probs"][2], init(x, 0)["probs"][2])


def test_a_probability_at_zero_or_one_takes_the_generic_e_step(monkeypatch):
    """Without priors the M-step puts probabilities at exactly 0 and 1 (a cluster whose
    members all agree on a coordinate); there the table has no finite linear form."""
    x = digits()
    calls = []
    generic_expect = em_engine.Steps.expect

    def counted(self, theta, iteration):
        calls.append(iteration)
        return generic_expect(self, theta, iteration)

    monkeypatch.setattr(em_engine.Steps, "expect", counted)
    fused = fit(monkeypatch, True, BernoulliMixture(8, priors=None), x)
    active = x.amax(0) > 0
    p = fused.params["probs"][:, active]
    assert bool(((p == 0) | (p == 1)).any())  # the case this test is about
    assert calls  # the generic E-step ran
    monkeypatch.setattr(em_engine.Steps, "expect", generic_expect)
    generic = fit(monkeypatch, False, BernoulliMixture(8, priors=None), x)
    assert_same_fit(generic, fused, 1e-10)


def steps_for(model, x, **settings):
    fm = FactorModel(model.model, (x,), {}, seed=0, dtype=F64, mixture=model.em_mixture(x))
    s = EM(progress=False, **settings).settings
    steps = em_engine.Steps(fm, *plan_updates(fm), s.reg_covar, s.mstep_iter, s.assign == "hard")
    return fused_mixture.fused_steps(steps, s.accelerate)


def test_the_fused_steps_are_taken_only_where_they_apply():
    x = digits(300)
    assert steps_for(BernoulliMixture(3), x).name == "bernoulli-mixture"
    assert steps_for(BernoulliMixture(3, priors=None), x).name == "bernoulli-mixture"
    assert steps_for(BernoulliMixture(3), x, assign="hard").name == "generic"
    assert steps_for(BernoulliMixture(3), x, accelerate="squarem").name == "generic"
    g = torch.randn(300, 2, dtype=F64)
    gm = GaussianMixture(2)
    fm = FactorModel(gm.model, (g,), {}, seed=0, dtype=F64)
    steps = em_engine.Steps(fm, *plan_updates(fm), 0.0, 20)
    assert fused_mixture.fused_steps(steps, None) is steps


def test_hard_assignments_and_squarem_fit_as_before(monkeypatch):
    x = digits()
    for settings in ({"assign": "hard"}, {"accelerate": "squarem"}):
        generic = fit(monkeypatch, False, BernoulliMixture(4), x, **settings)
        fused = fit(monkeypatch, True, BernoulliMixture(4), x, **settings)
        assert fused.info["steps"] == "generic"
        assert generic.history == fused.history


def test_the_initial_m_step_from_k_means_labels_is_the_generic_one():
    x = binary_data()
    steps = steps_for(BernoulliMixture(3), x)
    fm = steps.fm
    labels = torch.nn.functional.one_hot(torch.arange(len(x)) % 3, 3).to(F64) * 0.9 + 0.1 / 3
    W = fm.label_weights({"assignment": labels})
    theta = dict(fm.init)
    ours = steps.initial_m_step(theta, W)
    theirs = steps.generic.initial_m_step(theta, fm.label_weights({"assignment": labels}))
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-14)
