"""A mixture that declares its structure (the zoo hook ``em_mixture``) compiles to exactly
what probing it finds: the same free variables, initial values, groups and data, and the same
fit to the bit (jointkl.inference.em.declared_mixture)."""

import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel
from jointkl.models import BernoulliMixture

from jointkl.errors import InputError
from jointkl.zoo import hook

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
    "mask",
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


def compiled(model, x, declared: bool) -> tuple[FactorModel, torch.Tensor]:
    """The compiled model and the next draw of torch's random state after compiling."""
    torch.manual_seed(11)
    mixture = model.em_mixture(x) if declared else None
    fm = FactorModel(model.model, (x,), {}, seed=0, dtype=torch.float64, mixture=mixture)
    return fm, torch.rand(4)


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("make", MODELS)
def test_declared_compilation_is_the_probed_one(make, data):
    model, x = make(), DATA[data]()
    probed, after_probed = compiled(model, x, declared=False)
    declared, after_declared = compiled(model, x, declared=True)
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
    theta = probed.init
    assert declared.e_step(theta)[0] == probed.e_step(theta)[0]


SETTINGS = [
    {},
    {"seed": 3},
    {"init": "random", "seed": 1},
    {"n_init": 2},
    {"accelerate": "squarem"},
    {"assign": "hard"},
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
