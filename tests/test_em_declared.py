"""A mixture or a hidden Markov chain that declares its structure (the zoo hooks
``em_mixture``, ``em_chain``) compiles to exactly what probing it finds: the same free
variables, initial values, groups, data and masks, and the same fit to the bit
(jointkl.inference.em.declared_mixture, declared_chain)."""

import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel
from jointkl.models import HMM, BernoulliMixture

from jointkl.errors import InputError
from jointkl.zoo import hook

F64 = torch.float64
GROUP_FIELDS = (
    "kind",
    "family",
    "sites",
    "roles",
    "cards",
    "plates",
    "shape",
    "value",
    "own",
    "free",
    "slots",
    "n_event",
    "depends",
)


class Probed(BernoulliMixture):
    """The zoo model without its declaration: EM probes it."""

    em_mixture = None


def binary(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    proto = torch.rand(3, d, generator=g)
    z = torch.randint(3, (n,), generator=g)
    return (torch.rand(n, d, generator=g) < proto[z]).double()


DATA = {
    "digits": lambda: BernoulliMixture.default_data()[0][0].double(),
    "small": lambda: binary(60, 5, 1),  # under the generic slice's size: whole-data probes
    "wide": lambda: binary(300, 12, 2),
}
MODELS = [
    pytest.param(lambda: BernoulliMixture(), id="default"),
    pytest.param(lambda: BernoulliMixture(3, priors=None), id="ml"),
    pytest.param(lambda: BernoulliMixture(4, concentration=2.0, beta=(2.0, 3.0)), id="priors"),
]


def compiled(model, x, declared: bool, **kw) -> tuple[FactorModel, torch.Tensor]:
    """The compiled model and the next draw of torch's random state after compiling."""
    torch.manual_seed(11)
    mixture = model.em_mixture(x) if declared else None
    fm = FactorModel(model.model, (x,), kw, seed=0, dtype=torch.float64, mixture=mixture)
    return fm, torch.rand(4)


def compiled_chain(model, x, how: str, **kw) -> tuple[FactorModel, torch.Tensor]:
    """The HMM compiled from its declaration, from its time steps, or generically."""
    torch.manual_seed(11)
    opts = {}
    if how == "declared":
        opts["chain"] = model.em_chain(x, **kw)
        assert opts["chain"] is not None
    elif how == "time_steps":
        opts["time_steps"] = model.em_time_steps(x, **kw)
    fm = FactorModel(model.model, (x,), kw, seed=0, dtype=torch.float64, **opts)
    return fm, torch.rand(4)


def assert_same_compilation(probed, after_probed, declared, after_declared):
    # the hook's groups were built, not probed: no "bind" of a slice or whole-data probe ran
    assert torch.equal(after_probed, after_declared)  # the same draws of torch's random state
    assert list(declared.free) == list(probed.free)
    assert [repr(f) for f in declared.free.values()] == [repr(f) for f in probed.free.values()]
    for k in probed.init:
        assert torch.equal(declared.init[k], probed.init[k])
    for attr in ("vars", "plate_order", "plate_dims", "plate_sizes", "n_points", "nesting"):
        assert getattr(declared, attr) == getattr(probed, attr), attr
    assert declared.plate_symbol == probed.plate_symbol
    assert declared.var_symbol == probed.var_symbol
    assert repr(declared.chain) == repr(probed.chain)
    assert len(declared.groups) == len(probed.groups)
    for g, h in zip(probed.groups, declared.groups, strict=True):
        for f in GROUP_FIELDS:
            assert getattr(h, f) == getattr(g, f), f
        assert (g.data is None) == (h.data is None)
        if g.data is not None:
            assert g.data.shape == h.data.shape and torch.equal(g.data, h.data)
        assert type(g.fn) is type(h.fn)
        if g.fn is not None:
            theta = probed.init[g.free]
            assert torch.equal(g.fn.log_prob(theta), h.fn.log_prob(theta))
        assert (g.mask is None) == (h.mask is None)
        if g.mask is not None:
            assert g.mask.shape == h.mask.shape and torch.equal(g.mask, h.mask)
    theta = probed.init
    assert declared.e_step(theta)[0] == probed.e_step(theta)[0]


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("make", MODELS)
def test_declared_compilation_is_the_probed_one(make, data):
    model, x = make(), DATA[data]()
    assert_same_compilation(*compiled(model, x, False), *compiled(model, x, True))


def hmm_case(name: str):
    """(model, data, kwargs) of the HMM variants the chain declaration covers."""
    (x,), _ = HMM().default_data()
    (r,), _ = HMM(emission="categorical").default_data()
    lengths = torch.randint(60, 101, (20,), generator=torch.Generator().manual_seed(0))
    x, short = x.double(), x.double()[:4, :12]
    return {
        "diag": (HMM(), x, {}),
        "diag-weak": (HMM(priors="weak"), x, {}),
        "diag-padded": (HMM(), x, {"lengths": lengths}),
        "diag-2d": (HMM(2), x.expand(-1, -1, 2) * torch.tensor([1.0, -0.5], dtype=F64), {}),
        "short": (HMM(2), short, {}),
        "categorical": (HMM(4, emission="categorical"), r, {}),
        "categorical-weak-padded": (
            HMM(3, emission="categorical", priors="weak"),
            r,
            {"lengths": lengths},
        ),
    }[name]


HMM_CASES = [
    "diag",
    "diag-weak",
    "diag-padded",
    "diag-2d",
    "short",
    "categorical",
    "categorical-weak-padded",
]


@pytest.mark.parametrize("against", ["time_steps", "generic"])
@pytest.mark.parametrize("case", HMM_CASES)
def test_declared_chain_is_the_probed_compilation(case, against):
    model, x, kw = hmm_case(case)
    assert_same_compilation(
        *compiled_chain(model, x, against, **kw), *compiled_chain(model, x, "declared", **kw)
    )


class ProbedHMM(HMM):
    """The zoo HMM without its chain declaration (its time steps still declared)."""

    em_chain = None


@pytest.mark.parametrize(
    "settings", [{}, {"seed": 2}, {"init": "random"}, {"n_init": 2}, {"dtype": "float32"}]
)
@pytest.mark.parametrize("case", ["diag", "diag-weak", "diag-padded", "categorical"])
def test_declared_chain_fit_is_the_probed_fit_bitwise(case, settings):
    model, x, kw = hmm_case(case)
    probed_model = ProbedHMM(**model.settings())
    torch.manual_seed(5)
    a = EM(progress=False, max_iter=30, **settings).fit(probed_model, x, **kw)
    ra = torch.rand(3)
    torch.manual_seed(5)
    b = EM(progress=False, max_iter=30, **settings).fit(model, x, **kw)
    assert torch.equal(ra, torch.rand(3))
    assert a.history == b.history and a.n_iter == b.n_iter
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_the_hmm_declares_no_chain_it_does_not_describe():
    (x,), _ = HMM().default_data()
    assert HMM(covariance="full").em_chain(x) is None

    class Other(HMM):
        def model(self, x, lengths=None):
            return super().model(x, lengths)

    assert Other().em_chain(x) is None
    assert HMM().em_chain(x) is not None


def test_a_chain_declaration_that_does_not_fit_falls_back():
    model, x, _ = hmm_case("diag")
    bad = dict(model.em_chain(x), states=4)
    torch.manual_seed(0)
    fm = FactorModel(model.model, (x,), {}, dtype=torch.float64, chain=bad)
    torch.manual_seed(0)
    ref = FactorModel(model.model, (x,), {}, dtype=torch.float64)
    assert fm.vars == ref.vars and fm.vars["state_0"].card == 3
    assert [g.sites for g in fm.groups] == [g.sites for g in ref.groups]


SETTINGS = [
    {},
    {"seed": 3},
    {"init": "random", "seed": 1},
    {"n_init": 2},
    {"accelerate": "squarem"},
    {"assign": "hard"},
    {"dtype": "float32"},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(map(str, s.items())) or "-")
@pytest.mark.parametrize("make", [MODELS[0], MODELS[1]])
def test_declared_fit_is_the_probed_fit_bitwise(make, settings):
    model = make()
    probed_model = Probed(**model.settings())
    x = DATA["digits"]()[:400]
    assert hook(model, "em_mixture") is not None and hook(probed_model, "em_mixture") is None
    torch.manual_seed(5)
    a = EM(progress=False, max_iter=40, **settings).fit(probed_model, x)
    ra = torch.rand(3)
    torch.manual_seed(5)
    b = EM(progress=False, max_iter=40, **settings).fit(model, x)
    rb = torch.rand(3)
    assert torch.equal(ra, rb)
    assert a.history == b.history and a.n_iter == b.n_iter and a.converged == b.converged
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    assert a.info["log_likelihood"] == b.info["log_likelihood"]


def test_a_subclass_with_its_own_model_declares_nothing():
    class Other(BernoulliMixture):
        def model(self, x):
            return super().model(x)

    x = binary(40, 4, 0)
    assert Other(2).em_mixture(x) is None
    assert BernoulliMixture(2).em_mixture(x) is not None
    fit = EM(progress=False, max_iter=5).fit(Other(2), x)  # compiled by probing
    assert fit.n_iter >= 1


def test_bad_data_is_refused_as_before():
    x = binary(40, 4, 0)
    x[0, 0] = 0.5
    with pytest.raises(InputError, match="only 0 and 1"):
        EM(progress=False).fit(BernoulliMixture(2), x)


def test_a_declaration_that_does_not_fit_falls_back_to_probing():
    model = BernoulliMixture(3)
    x = binary(200, 6, 3)
    bad = dict(model.em_mixture(x), components=4)  # not the model's weights' size
    torch.manual_seed(0)
    fm = FactorModel(model.model, (x,), {}, dtype=torch.float64, mixture=bad)
    torch.manual_seed(0)
    ref = FactorModel(model.model, (x,), {}, dtype=torch.float64)
    assert fm.vars == ref.vars and fm.vars["assignment"].card == 3
    assert [g.kind for g in fm.groups] == [g.kind for g in ref.groups]
    assert torch.equal(fm.init["probs"], ref.init["probs"])  # the same draws: state put back
