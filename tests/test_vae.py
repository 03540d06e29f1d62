"""VAE: the ELBO in closed form, training, the IWAE bound, the learned scale."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference import SVI
from jointkl.models import VAE
from pyro.infer import TraceMeanField_ELBO

from jointkl import Fit, InputError
from jointkl.bounds import elbo_per_datum, iwae_per_datum, log_importance_weights
from jointkl.data.digits import digits
from jointkl.zoo import build_pair, model_class

STEPS = 300


def _data(likelihood: str, split: str) -> torch.Tensor:
    return digits(split, binarize=likelihood == "bernoulli")[0]


def _fit(likelihood: str, steps: int = STEPS, seed: int = 0, **kw) -> tuple[VAE, Fit]:
    vae = VAE(4, hidden=64, likelihood=likelihood, **kw)
    engine = SVI(loss="meanfield", lr=3e-3, steps=steps, batch_size=128, seed=seed, progress=False)
    return vae, engine.fit(vae, _data(likelihood, "train"))


@pytest.fixture(scope="module")
def fitted() -> dict[str, tuple[VAE, Fit]]:
    torch.set_num_threads(1)  # tiny networks: threads only add contention
    return {lk: _fit(lk) for lk in ("bernoulli", "gaussian", "gaussian-learned-scale")}


# ---------------------------------------------------------------- the ELBO in closed form
def _closed_form_elbo(vae: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log q(x|z) at the given z minus ½ Σ (μ² + σ² − log σ² − 1), per image, by hand."""
    loc, scale = vae.encoder(x)
    kl = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum(-1)
    out = vae.decoder(z)
    if vae.likelihood == "bernoulli":
        # x log σ(l) + (1 − x) log(1 − σ(l)) = x·l − log(1 + e^l)
        rec = (x * out - torch.nn.functional.softplus(out)).sum(-1)
    else:
        s = vae.obs_scale() if vae.obs_scale is not None else torch.tensor(vae.scale, dtype=x.dtype)
        s = s.expand_as(x)
        rec = (-((x - out) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return rec - kl


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned-scale"])
def test_elbo_on_fixed_weights_matches_closed_form(likelihood):
    torch.manual_seed(0)
    vae = VAE(3, hidden=16, likelihood=likelihood, scale=0.7, input_dim=64)
    for net in (vae.encoder, vae.decoder, vae.obs_scale):
        if net is not None:
            net.double()
    x = _data(likelihood, "test")[:40].double()
    pyro.clear_param_store()
    # The guide runs first in both, so the same seed gives the ELBO and the trace the same z.
    pyro.set_rng_seed(7)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
    pyro.set_rng_seed(7)
    engine_loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    with torch.no_grad():
        expected = _closed_form_elbo(vae, x, z)
        ours = elbo_per_datum(vae.model, vae.guide, x, num_samples=1, seed=7)
    assert -engine_loss == pytest.approx(float(expected.sum()), abs=1e-5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-learned-scale"])
def test_training_lowers_held_out_loss(fitted, likelihood):
    x_test = _data(likelihood, "test")
    fresh = VAE(4, hidden=64, likelihood=likelihood)
    torch.manual_seed(0)
    fresh._check(x_test)  # the same initialisation the fit started from (seed 0)
    before = elbo_per_datum(fresh.model, fresh.guide, x_test, num_samples=4, seed=0).mean()
    vae, fit = fitted[likelihood]
    after = elbo_per_datum(vae.model, vae.guide, x_test, num_samples=4, seed=0).mean()
    assert fit.n_iter == STEPS and len(fit.history) == STEPS
    assert after > before + 5.0, (float(before), float(after))


def test_learned_scale_beats_fixed_unit_scale(fitted):
    x_test = _data("gaussian", "test")
    fixed, _ = fitted["gaussian"]
    learned, _ = fitted["gaussian-learned-scale"]
    e_fixed = elbo_per_datum(fixed.model, fixed.guide, x_test, num_samples=4, seed=0).mean()
    e_learned = elbo_per_datum(learned.model, learned.guide, x_test, num_samples=4, seed=0).mean()
    assert float(learned.obs_scale().detach()) < 0.9  # it moved away from its start at 1.0
    assert e_learned > e_fixed + 1.0, (float(e_fixed), float(e_learned))


# ---------------------------------------------------------------- the IWAE bound
def test_iwae_is_above_elbo_and_grows_with_k(fitted):
    vae, _ = fitted["bernoulli"]
    x = _data("bernoulli", "test")
    elbo = elbo_per_datum(vae.model, vae.guide, x, num_samples=64, analytic_kl=False, seed=1)
    iwae = {k: iwae_per_datum(vae.model, vae.guide, x, k=k, seed=2).mean() for k in (1, 8, 64)}
    # k = 1 is the Monte-Carlo ELBO: the same expectation (±~0.1 nat of noise on 360 images).
    assert float(iwae[1]) == pytest.approx(float(elbo.mean()), abs=0.3)
    assert elbo.mean() < iwae[8] < iwae[64]
    assert iwae[64] - elbo.mean() > 0.2  # a real gap, not noise


def test_iwae_accumulates_chunks_by_logsumexp():
    torch.manual_seed(0)
    vae = VAE(2, hidden=8, input_dim=64)
    x = _data("bernoulli", "test")[:10]
    w = log_importance_weights(vae.model, vae.guide, x, num_samples=30, seed=3)
    one_pass = iwae_per_datum(vae.model, vae.guide, x, k=30, chunk_size=30, seed=3)
    torch.testing.assert_close(one_pass, w.logsumexp(0) - math.log(30))
    # In chunks of one particle the draws are these 30, one after another.
    with torch.random.fork_rng():
        pyro.set_rng_seed(3)
        singles = torch.cat(
            [log_importance_weights(vae.model, vae.guide, x, num_samples=1) for _ in range(30)]
        )
    chunked = iwae_per_datum(vae.model, vae.guide, x, k=30, chunk_size=1, seed=3)
    torch.testing.assert_close(chunked, singles.logsumexp(0) - math.log(30))


# ---------------------------------------------------------------- the pair as a zoo model
def test_zoo_rebuilds_a_saved_vae_with_its_weights(fitted, tmp_path):
    vae, fit = fitted["gaussian-learned-scale"]
    x = _data("gaussian", "test")[:5]
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")
    assert isinstance(loaded.pair, VAE) and loaded.pair.settings() == vae.settings()
    SVI.activate(loaded)
    torch.testing.assert_close(loaded.pair.encode(x), vae.encode(x))
    torch.testing.assert_close(loaded.pair.obs_scale(), vae.obs_scale())
    assert model_class("vae") is VAE
    assert build_pair(fit.model_spec).likelihood == "gaussian-learned-scale"


def test_diagnostic_plots_write_image_grids(fitted, tmp_path):
    vae, fit = fitted["bernoulli"]
    paths = vae.diagnostic_plots(fit, tmp_path)
    assert sorted(p.name for p in paths) == ["latent.png", "reconstructions.png", "samples.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_networks_are_used_and_not_rebuilt():
    enc_net = torch.nn.Linear(64, 2 * 3)

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = enc_net

        def forward(self, x):
            loc, raw = self.net(x).chunk(2, -1)
            return loc, torch.nn.functional.softplus(raw) + 1e-3

    dec = torch.nn.Linear(3, 64)
    vae = VAE(3, encoder=Enc(), decoder=dec)
    x = _data("bernoulli", "train")[:256]
    SVI(loss="meanfield", steps=3, batch_size=64, progress=False).fit(vae, x)
    assert vae.decoder is dec and vae.encoder.net is enc_net
    assert vae.spec() is None  # code, not settings: Fit.load needs the pair passed in


def test_bad_input_is_named():
    with pytest.raises(InputError, match="binary"):
        VAE(2).model(torch.rand(5, 64))
    with pytest.raises(InputError, match="likelihood"):
        VAE(2, likelihood="poisson")
    with pytest.raises(InputError, match="latent_dim"):
        VAE(0)
    with pytest.raises(InputError, match="features"):
        VAE(2, input_dim=64).model(torch.zeros(3, 10))
