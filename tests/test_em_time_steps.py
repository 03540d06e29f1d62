"""Compiling a chain of identical steps on its first few and stamping them out
(inference/em/time_steps.py, the zoo HMM's ``em_time_steps`` hook): the same compiled model
and the same fit (parameters, log-likelihood, iterations) as the generic compilation of every
step, and a declaration that does not match the model falls back to the generic path."""

import pyro
import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel
from jointkl.inference.em import time_steps as em_time_steps
from jointkl.models import HMM

F64 = torch.float64
LENGTHS = torch.tensor([30, 21, 12, 30, 5, 25, 1, 17])


def data(emission="gaussian", d=1, lengths=False):
    (x,), _ = HMM(3, emission=emission).default_data(1)
    x = x[: len(LENGTHS), :30]
    if emission == "gaussian":
        x = x.to(F64)
        if d > 1:  # a second coordinate: the first, shifted by state-free noise
            g = torch.Generator().manual_seed(2)
            x = torch.cat([x, 0.5 * x + torch.randn(x.shape, generator=g, dtype=F64)], -1)
    return (x,), ({"lengths": LENGTHS} if lengths else {})


CASES = [
    (dict(), dict()),
    (dict(covariance="full"), dict(d=2)),
    (dict(emission="categorical"), dict(emission="categorical")),
    (dict(), dict(lengths=True)),
    (dict(emission="categorical"), dict(emission="categorical", lengths=True)),
    (dict(priors="weak"), dict()),
    (dict(priors="weak", covariance="full"), dict(d=2)),
]
IDS = ["diag", "full", "categorical", "lengths", "categorical-lengths", "weak", "weak-full"]


def compiled(model: HMM, args, kwargs, fast: bool, monkeypatch) -> tuple[FactorModel, list]:
    """The model compiled with its declaration (``fast``) or generically, and what
    :func:`compile_by_time_steps` returned."""
    taken = []
    original = em_time_steps.compile_by_time_steps

    def spy(*a):
        taken.append(original(*a))
        return taken[-1]

    with monkeypatch.context() as m:
        m.setattr("jointkl.inference.em.compile.compile_by_time_steps", spy)
        steps = model.em_time_steps(*args, **kwargs) if fast else None
        pyro.set_rng_seed(0)  # MAP globals start at medians of random draws
        fm = FactorModel(model.model, args, kwargs, seed=0, dtype=F64, time_steps=steps)
    return fm, taken


def fitted(model: HMM, args, kwargs, fast: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(HMM, "em_time_steps", None)
        return EM(seed=0, progress=False).fit(model, *args, **kwargs)


@pytest.mark.parametrize("settings, how", CASES, ids=IDS)
def test_stamped_steps_compile_and_fit_as_the_generic_compilation(settings, how, monkeypatch):
    model = HMM(3, **settings)
    args, kwargs = data(**how)
    fast, taken = compiled(model, args, kwargs, True, monkeypatch)
    generic, _ = compiled(model, args, kwargs, False, monkeypatch)
    assert taken == [True]
    assert list(fast.vars) == list(generic.vars) and fast.vars == generic.vars
    assert fast.init.keys() == generic.init.keys()
    for k in fast.init:
        assert torch.equal(fast.init[k], generic.init[k]), k
    assert [
        (g.kind, g.family, g.sites, g.roles, g.cards, g.plates, g.shape) for g in fast.groups
    ] == [(g.kind, g.family, g.sites, g.roles, g.cards, g.plates, g.shape) for g in generic.groups]
    for a, b in zip(fast.groups, generic.groups, strict=True):
        for f in ("data", "mask", "table"):
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None), f
            if va is not None:
                assert torch.equal(va, vb), f
        assert {k: s.key() for k, s in a.slots.items()} == {k: s.key() for k, s in b.slots.items()}
    assert (fast.chain is None) == (generic.chain is None)

    fit_fast = fitted(model, args, kwargs, True, monkeypatch)
    fit_generic = fitted(model, args, kwargs, False, monkeypatch)
    assert fit_fast.n_iter == fit_generic.n_iter
    assert fit_fast.info["log_likelihood"] == fit_generic.info["log_likelihood"]
    assert fit_fast.params.keys() == fit_generic.params.keys()
    for k in fit_fast.params:
        assert torch.equal(fit_fast.params[k], fit_generic.params[k]), k


def test_a_declaration_that_does_not_match_the_model_falls_back(monkeypatch):
    model = HMM(3)
    args, kwargs = data()
    steps = model.em_time_steps(*args, **kwargs)
    wrong = dict(steps, values={"obs": steps["values"]["obs"] + 1.0})  # not the sites' data
    taken = []
    original = em_time_steps.compile_by_time_steps

    def spy(*a):
        taken.append(original(*a))
        return taken[-1]

    monkeypatch.setattr("jointkl.inference.em.compile.compile_by_time_steps", spy)
    fm = FactorModel(model.model, args, kwargs, seed=0, dtype=F64, time_steps=wrong)
    generic = FactorModel(model.model, args, kwargs, seed=0, dtype=F64)
    assert taken == [False]
    assert [g.sites for g in fm.groups] == [g.sites for g in generic.groups]
    for a, b in zip(fm.groups, generic.groups, strict=True):
        assert (a.data is None and b.data is None) or torch.equal(a.data, b.data)


def test_observations_outside_the_support_are_left_to_the_generic_compilation(monkeypatch):
    """The stamped steps are not run through Pyro's validation: a NaN there must still get
    the generic path's error."""
    (x,), _ = data()
    x = x.clone()
    x[0, 20] = float("nan")
    steps = HMM(3).em_time_steps(x)
    taken = []
    original = em_time_steps.compile_by_time_steps

    def spy(*a):
        taken.append(original(*a))
        return taken[-1]

    monkeypatch.setattr("jointkl.inference.em.compile.compile_by_time_steps", spy)
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever the generic path raises)
        FactorModel(HMM(3).model, (x,), {}, seed=0, dtype=F64, time_steps=steps)
    assert taken == [False]


def test_many_sequences_compile_the_prefix_on_a_slice_and_fit_as_the_generic_path(monkeypatch):
    """200 sequences: the prefix's own compilation runs on its 32-row slice, then stamped."""
    g = torch.Generator().manual_seed(0)
    model, x = HMM(2), torch.randn(200, 10, generator=g, dtype=F64)
    fast, taken = compiled(model, (x,), {}, True, monkeypatch)
    assert taken == [True]
    fit_fast = fitted(model, (x,), {}, True, monkeypatch)
    fit_generic = fitted(model, (x,), {}, False, monkeypatch)
    assert fit_fast.n_iter == fit_generic.n_iter
    assert fit_fast.info["log_likelihood"] == fit_generic.info["log_likelihood"]
    for k in fit_fast.params:
        assert torch.equal(fit_fast.params[k], fit_generic.params[k]), k


def test_symbols_first_seen_after_the_prefix_fall_back(monkeypatch):
    """The emission table's size is read from the data: the prefix's is smaller than the
    whole data's, so its compilation cannot be stamped out."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(5, 4, dtype=torch.long), torch.randint(6, (5, 20), generator=g)], 1)
    model = HMM(3, emission="categorical")
    fm, taken = compiled(model, (x,), {}, True, monkeypatch)
    assert taken == [False]
    assert fm.free["emit"].shape == (3, 6)
