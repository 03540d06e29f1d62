"""InfoMax: the JS bound, the objective by hand, and features worth learning."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference import SVI
from jointkl.models import InfoMax
from jointkl.models.infomax import (
    SeparableCritic,
    js_mutual_information,
    nce_mutual_information,
)

from jointkl import Fit, InputError
from jointkl.data.digits import digits
from jointkl.probe import linear_probe_accuracy

SMALL = dict(hidden=64, critic_hidden=32, channels=(8, 16))


def test_js_bound_is_minus_log4_at_chance_and_zero_when_separated():
    zeros = torch.zeros(5)
    torch.testing.assert_close(js_mutual_information(zeros, zeros), torch.full((5,), -math.log(4)))
    sure = js_mutual_information(torch.full((5,), 30.0), torch.full((5,), -30.0))
    assert bool((sure > -1e-6).all()) and bool((sure <= 0).all())
    # Local scores (N, H, W) are averaged over positions, one value per data point.
    local = js_mutual_information(torch.zeros(3, 4, 4), torch.randn(3, 4, 4))
    assert local.shape == (3,)


def test_infonce_bound_is_zero_at_chance_and_log_candidates_when_separated():
    k = 7  # negatives per point: 8 candidates
    zeros = nce_mutual_information(torch.zeros(5), torch.zeros(5, k))
    torch.testing.assert_close(zeros, torch.zeros(5))
    sure = nce_mutual_information(torch.full((5,), 40.0), torch.full((5, k), -40.0))
    torch.testing.assert_close(sure, torch.full((5,), math.log(k + 1)))
    # By definition: log-softmax of the true pair among the candidates, plus log(K + 1).
    torch.manual_seed(0)
    scores = torch.randn(6, 6, 3, 3)  # scores[i, j] = T(x_i, z_j) at 3x3 positions
    off = ~torch.eye(6, dtype=torch.bool)
    joint = scores[range(6), range(6)]
    by_hand = (joint - torch.logsumexp(scores, dim=1) + math.log(6)).reshape(6, -1).mean(-1)
    got = nce_mutual_information(joint, scores[off].reshape(6, 5, 3, 3))
    torch.testing.assert_close(got, by_hand)
    # One negative per point, (N, ...) shaped like the joint scores.
    one = nce_mutual_information(torch.zeros(4), torch.full((4,), -50.0))
    torch.testing.assert_close(one, torch.full((4,), math.log(2)))


@pytest.mark.parametrize("local", [False, True])
def test_separable_critic_scores_every_other_z_as_a_negative(local):
    torch.manual_seed(0)
    critic = SeparableCritic(6, 3, 16, local=local)
    f = torch.randn(5, 6, 2, 2) if local else torch.randn(5, 6)
    z = torch.randn(5, 3)
    joint, product = critic(f, z, "all")
    assert joint.shape == ((5, 2, 2) if local else (5,))
    assert product.shape == ((5, 4, 2, 2) if local else (5, 4))
    for i in range(5):
        others = [j for j in range(5) if j != i]
        for k, j in enumerate(others):  # product[i, k] = T(f_i, z_j), j running over j != i
            swapped = z.clone()
            swapped[i] = z[j]
            torch.testing.assert_close(product[i, k], critic(f, swapped, "all")[0][i])
    # One shuffled negative: product[i] = T(f_i, z_perm[i]).
    perm = torch.tensor([3, 0, 4, 1, 2])
    _, shuffled = critic(f, z, perm)
    torch.testing.assert_close(shuffled, critic(f, z[perm], "all")[0])


def _js_by_definition(scores: torch.Tensor) -> torch.Tensor:
    """scores[i, j] = T(x_i, z_j) (+ position dims): mean log σ(T_ii) + mean_j≠i log(1 − σ(T_ij))."""
    n = scores.shape[0]
    pos = torch.log(torch.sigmoid(scores[range(n), range(n)]))
    neg = torch.log(1 - torch.sigmoid(scores))
    off = ~torch.eye(n, dtype=torch.bool)
    return pos.reshape(n, -1).mean(-1) + neg[off].reshape(n, -1).mean(-1)


def test_loss_is_minus_weighted_mi_plus_prior_kl():
    torch.manual_seed(0)
    im = InfoMax(3, global_weight=0.7, local_weight=1.1, prior_weight=0.3, **SMALL)
    x = digits("test")[0][:16].double()
    im._check(x)  # build, then compare in float64: log(1 − σ(T)) by hand loses digits in float32
    for net in (im.encoder, im.global_critic, im.local_critic):
        net.double()
    pyro.set_rng_seed(5)
    loss = im.loss(im.model, im.guide, x)
    # By hand: the guide's z (same seed), every pair (x_i, z_j) scored by T = ⟨φ, ψ⟩ / √h.
    pyro.set_rng_seed(5)
    z = poutine.trace(im.guide).get_trace(x).nodes["z"]["value"]
    loc, scale, local = im.encoder(x)
    kl = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum(-1)
    g, lo = im.global_critic, im.local_critic
    h = SMALL["critic_hidden"]
    t_global = g.phi(x) @ g.psi(z).T / math.sqrt(h)  # (i, j)
    t_local = (lo.phi(local)[:, None] * lo.psi(z)[None, :, :, None, None]).sum(2) / math.sqrt(h)
    mi = 0.7 * _js_by_definition(t_global) + 1.1 * _js_by_definition(t_local)
    torch.testing.assert_close(loss, (-mi + 0.3 * kl).sum(), atol=1e-8, rtol=1e-10)
    # The engine's mini-batch scale N/B reaches the objective through the guide's site.
    pyro.set_rng_seed(5)
    scaled = im.loss(im.model, poutine.scale(im.guide, 3.0), x)
    torch.testing.assert_close(scaled, 3 * loss)


def test_infomax_features_beat_an_untrained_encoder():
    torch.set_num_threads(1)
    x, y = digits("train")
    x_te, y_te = digits("test")
    torch.manual_seed(0)
    untrained = InfoMax(8, **SMALL)
    untrained._check(x)
    base = linear_probe_accuracy(untrained.encode(x), y, untrained.encode(x_te), y_te)
    im = InfoMax(8, **SMALL)
    fit = SVI(loss=im.loss, lr=3e-3, steps=100, batch_size=64, seed=0, progress=False).fit(im, x)
    # SVI seeds torch before the networks are built (lazily, at the first call): same weights.
    assert fit.history[-1] < fit.history[0]
    acc = linear_probe_accuracy(im.encode(x), y, im.encode(x_te), y_te)
    assert acc > base + 0.05, (base, acc)


def test_fit_round_trip_restores_encoder_and_critics(tmp_path):
    x = digits("train")[0][:256]
    im = InfoMax(4, **SMALL)
    fit = SVI(loss=im.loss, steps=5, batch_size=64, progress=False).fit(im, x)
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")
    SVI.activate(loaded)
    torch.testing.assert_close(loaded.pair.encode(x[:8]), im.encode(x[:8]))
    torch.testing.assert_close(
        loaded.pair.mutual_information(x, seed=1), im.mutual_information(x, seed=1)
    )
    paths = im.diagnostic_plots(fit, tmp_path / "plots")
    assert [p.name for p in paths] == ["latent.png"]


def test_svi_without_a_loss_uses_the_pairs_objective():
    x = digits("train")[0][:128]
    runs = []
    for loss in (None, "plugged"):
        im = InfoMax(4, **SMALL)
        engine = SVI(loss=im.loss if loss else None, steps=3, batch_size=64, progress=False)
        runs.append(engine.fit(im, x))
    assert runs[0].config["resolved_loss"] == "callable"
    assert runs[0].history == runs[1].history  # the same objective, the same numbers


def test_vector_inputs_use_the_global_term_only():
    im = InfoMax(2, image_shape=None, **SMALL)
    x = torch.randn(32, 5)
    loss = im.loss(im.model, im.guide, x)
    assert im.local_critic is None and torch.isfinite(loss)
    assert im.encode(x).shape == (32, 2)


def test_bad_input_is_named():
    with pytest.raises(InputError, match="estimator"):
        InfoMax(2, estimator="dv")
    with pytest.raises(InputError, match="latent_dim"):
        InfoMax(0)
    with pytest.raises(InputError, match="float tensor"):
        InfoMax(2).model(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(InputError, match="image_shape"):
        InfoMax(2).model(torch.rand(4, 10))
    with pytest.raises(InputError, match="MI weight"):
        InfoMax(2, global_weight=0, local_weight=0)
    with pytest.raises(InputError, match="channels"):
        InfoMax(2, channels=(8,))
