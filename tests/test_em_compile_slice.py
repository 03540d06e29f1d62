"""Compiling on a slice of the "data" plate (inference/em/compile.py, ``on_a_slice``): the
groups found on the first rows and bound to the whole data compute the same factor tables as
a compilation on the whole data, and a model whose later rows differ from the slice falls
back to the whole data."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em import FactorModel
from jointkl.inference.em import compile as em_compile
from jointkl.models import HMM, BernoulliMixture, GaussianMixture
from pyro.ops.indexing import Vindex

F64 = torch.float64
N = 300  # above the slice's threshold


def blobs(n=N, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-1.0, 3.0]], dtype=F64)
    z = torch.randint(3, (n,), generator=g)
    return centres[z, :d] + torch.randn(n, d, generator=g, dtype=F64)


def covariate_mixture(x, c):
    """Per-point constants in a recipe's slot (a known noise scale per point), times a
    data-dependent scalar (the spread of all the data, which a slice does not see)."""
    weights = pyro.param(
        "weights", torch.ones(3, dtype=F64) / 3, constraint=dist.constraints.simplex
    )
    locs = pyro.param("locs", torch.tensor([-1.0, 0.5, 2.0], dtype=F64))
    spread = x.std()
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], spread * c), obs=x)


def late_rows_differ(x):
    """Rows past the first 40 ignore the component's location: a slice of 32 rows sees a
    plain mixture, the whole data does not."""
    weights = pyro.param(
        "weights", torch.ones(3, dtype=F64) / 3, constraint=dist.constraints.simplex
    )
    locs = pyro.param("locs", torch.tensor([-1.0, 0.5, 2.0], dtype=F64))
    early = torch.arange(len(x)) < 40
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(torch.where(early, Vindex(locs)[z], 0.0), 1.0), obs=x)


def compiled(model, args, whole: bool, monkeypatch) -> tuple[FactorModel, bool]:
    """The model compiled on a slice (``whole=False``) or on the whole data, and whether the
    slice was kept."""
    kept = []
    original = em_compile.Compiler.on_a_slice

    def spy(self, *a):
        found = original(self, *a)
        kept.append(found is not None)
        return found

    with monkeypatch.context() as m:
        m.setattr(em_compile.Compiler, "on_a_slice", spy)
        if whole:
            m.setattr(em_compile, "SLICE_MIN_POINTS", 10**9)
        pyro.clear_param_store()
        fm = FactorModel(model, args, {}, seed=0, dtype=F64)
    return fm, kept == [True]


def random_theta(fm, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, f in fm.free.items():
        t = em_compile.transform_for(f.constraint)
        u = t.inv(fm.init[k])
        out[k] = t(u + torch.randn(u.shape, generator=g, dtype=u.dtype))
    return out


def assert_same_factor_model(a: FactorModel, b: FactorModel) -> None:
    assert [(g.kind, g.family, g.sites) for g in a.groups] == [
        (g.kind, g.family, g.sites) for g in b.groups
    ]
    assert a.plate_sizes == b.plate_sizes and a.n_points == b.n_points
    for theta in (a.init, random_theta(a)):
        ta, tb = a.tables(theta), b.tables(theta)
        for i in ta:
            torch.testing.assert_close(ta[i].expand(tb[i].shape), tb[i], rtol=1e-12, atol=1e-12)
        assert a.e_step(theta)[0] == pytest.approx(b.e_step(theta)[0], rel=1e-12)


@pytest.mark.parametrize(
    "model, x",
    [
        (GaussianMixture(3, "full"), blobs()),
        (GaussianMixture(3, "diag"), blobs()),
        (GaussianMixture(3, "spherical", priors=None), blobs()),
        (BernoulliMixture(3), (blobs() > 0.5).to(F64)),
        (HMM(2), torch.randn(200, 6, dtype=F64)),
    ],
    ids=["gmm-full", "gmm-diag", "gmm-spherical", "bmm", "hmm"],
)
def test_a_slice_compiles_the_zoo_models_as_the_whole_data_does(model, x, monkeypatch):
    sliced, kept = compiled(model.model, (x,), whole=False, monkeypatch=monkeypatch)
    whole, _ = compiled(model.model, (x,), whole=True, monkeypatch=monkeypatch)
    assert kept
    assert_same_factor_model(sliced, whole)


def test_masks_of_padded_sequences_are_read_from_the_whole_data(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 7, dtype=F64, generator=g)
    lengths = torch.randint(2, 8, (200,), generator=g)
    lengths[:32] = 7  # the slice has no padding: its masks are all True
    model = HMM(2).model
    sliced, kept = compiled(model, (x, lengths), whole=False, monkeypatch=monkeypatch)
    whole, _ = compiled(model, (x, lengths), whole=True, monkeypatch=monkeypatch)
    assert kept
    assert any(g.mask is not None and not bool(g.mask.all()) for g in sliced.groups)
    assert_same_factor_model(sliced, whole)
    for a, b in zip(sliced.groups, whole.groups, strict=True):
        if b.mask is not None:
            assert torch.equal(a.mask.expand(b.mask.shape), b.mask)


def test_per_point_and_whole_data_constants_are_read_from_the_whole_data(monkeypatch):
    x = blobs()[:, 0]
    c = torch.linspace(0.5, 2.0, N, dtype=F64)
    sliced, kept = compiled(covariate_mixture, (x, c), whole=False, monkeypatch=monkeypatch)
    whole, _ = compiled(covariate_mixture, (x, c), whole=True, monkeypatch=monkeypatch)
    assert kept
    assert [g.kind for g in sliced.groups] == ["recipe", "recipe"]
    assert_same_factor_model(sliced, whole)


def test_a_model_whose_later_rows_differ_falls_back_to_the_whole_data(monkeypatch):
    x = blobs()[:, 0]
    sliced, kept = compiled(late_rows_differ, (x,), whole=False, monkeypatch=monkeypatch)
    whole, _ = compiled(late_rows_differ, (x,), whole=True, monkeypatch=monkeypatch)
    assert not kept
    assert "traced" in [g.kind for g in sliced.groups]
    assert_same_factor_model(sliced, whole)
    # and the fit is exact EM on the whole model: the log-likelihood never decreases
    fit = EM(max_iter=20, progress=False).fit(late_rows_differ, x)
    h = torch.tensor(fit.history)
    assert bool((h[1:] >= h[:-1] - 1e-9 * h.abs()[:-1]).all())
