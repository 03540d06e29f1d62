"""NCE with one noise sample shared by a mini-batch's contexts: the per-datum loss keeps its
expectation, fits stay consistent, the candidate_scores hook agrees with the model, and the
settings that cannot share are refused."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from jointkl.inference import NCE
from jointkl.models import SkipGram

from jointkl.errors import InputError

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def cooccurrence(n_words: int, n_contexts: int, n: int, seed: int):
    """(word, context) pairs drawn from a random joint table."""
    g = torch.Generator().manual_seed(seed)
    joint = torch.softmax(torch.randn(n_contexts * n_words, generator=g), 0)
    cell = torch.multinomial(joint, n, replacement=True, generator=g)
    return cell % n_words, cell // n_words


class TableScores:
    """G(w, c) = T[c, w], a free table of scores, with the hook that scores every
    (context, candidate) pair at once. ``bias`` makes the hook wrong on purpose."""

    guide = None

    def __init__(self, n_words: int, n_contexts: int, init=None, bias: float = 0.0):
        self.shape, self.init, self.bias = (n_contexts, n_words), init, bias

    def _table(self) -> torch.Tensor:
        init = self.init
        return pyro.param("table", lambda: torch.zeros(self.shape) if init is None else init)

    def model(self, word, context):
        score = self._table()[context, word]
        with pyro.plate("data", len(word)):
            pyro.factor("score", score)

    def candidate_scores(self, candidates, context):
        return self._table()[context][:, candidates] + self.bias


def _loss_at_fixed_params(variant, shared, word, context, table, seed):
    """Losses of many steps that do not move the parameters (SGD with lr 1e-12), each on a
    fresh batch and fresh noise: their mean estimates the expected loss at ``table``."""
    engine = NCE(
        noise="unigram",
        nu=5,
        variant=variant,
        log_z=0.3,
        optim="sgd",
        lr=1e-12,
        steps=400,  # 20 whole epochs of 20 batches: the data average is exact
        batch_size=100,
        shared_noise=shared,
        seed=seed,
        progress=False,
    )
    fit = engine.fit(TableScores(12, 8, init=table.clone()), word, context)
    assert fit.info["shared_noise"] is shared
    h = torch.tensor(fit.history)
    return float(h.mean()), float(h.std() / math.sqrt(len(h)))


def test_shared_noise_keeps_the_expected_per_datum_loss():
    W, C, nu, gamma = 12, 8, 5, 0.3
    word, context = cooccurrence(W, C, 2000, seed=11)
    table = torch.randn(C, W, generator=torch.Generator().manual_seed(12))
    # Exact binary NCE loss: E[softplus(−l(x, c))] + ν Σ_w q(w) softplus(l(w, c)), with
    # l(w, c) = T[c, w] − γ − log ν − log q(w) and q the unigram of the data.
    q = torch.bincount(word, minlength=W).double() / len(word)
    logit = table - gamma - math.log(nu) - q.log()
    exact = float(
        (F.softplus(-logit[context, word]) + nu * (q * F.softplus(logit[context])).sum(-1)).mean()
    )
    means = {}
    for shared in (True, False):
        mean, se = _loss_at_fixed_params("binary", shared, word, context, table, seed=3)
        assert se < 0.05  # the comparison below has teeth
        assert abs(mean - exact) < 4 * se
        means[shared] = (mean, se)
    # Ranking (sampled softmax): no closed form, but sharing must not move its expectation.
    (m1, s1), (m0, s0) = (
        _loss_at_fixed_params("ranking", s, word, context, table, seed=4) for s in (True, False)
    )
    assert abs(m1 - m0) < 4 * math.hypot(s1, s0)


def test_shared_noise_binary_nce_learns_normalised_conditionals():
    W, C = 12, 8
    word, context = cooccurrence(W, C, 20000, seed=5)
    counts = torch.zeros(C, W).index_put_((context, word), torch.ones(len(word)), accumulate=True)
    p_w_given_c = counts / counts.sum(1, keepdim=True)
    engine = NCE(
        noise="unigram^0.75", nu=20, lr=0.02, steps=1500, batch_size=1000, seed=0, progress=False
    )
    fit = engine.fit(TableScores(W, C), word, context)
    assert fit.info["shared_noise"] and fit.info["noise_scores"] == "candidate_scores"
    # Each context still meets ν draws of q: e^{G − γ} → p(w | c), one γ for all contexts.
    # The tolerances are the final Adam iterate's fluctuation: a step sees only ν draws
    # (measured over seeds 0–4: at most 0.064 and 0.053; per-datum noise gives ~0.015).
    log_p = fit.params["table"] - fit.params["log_Z"]
    assert (log_p.exp().sum(1) - 1).abs().max() < 0.1
    assert (log_p.exp() - p_w_given_c).abs().max() < 0.08


def test_candidate_scores_hook_follows_the_same_trajectory_as_the_model():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 40, (3000,), generator=g)
    context = torch.randint(0, 40, (3000,), generator=g)
    model = SkipGram(vocab_size=40, dim=8)

    def fit(pair):
        engine = NCE(
            nu=7, lr=0.05, steps=30, batch_size=200, shared_noise=True, seed=1, progress=False
        )
        return engine.fit(pair, target, context)

    hooked, plain = fit(model), fit(model.model)  # a bare function has no hook
    assert hooked.info["noise_scores"] == "candidate_scores"
    assert plain.info["noise_scores"] == "model"
    # Same draws, scored by one (B, d) @ (d, ν) product or by the model row by row.
    assert torch.allclose(torch.tensor(hooked.history), torch.tensor(plain.history), atol=1e-10)
    for k, v in plain.params.items():
        assert torch.allclose(hooked.params[k], v, atol=1e-10), k


def test_shared_noise_is_the_default_only_for_context_free_noise_and_a_hook():
    word, context = cooccurrence(6, 4, 500, seed=1)
    pair = TableScores(6, 4)
    common = {"nu": 3, "steps": 2, "batch_size": 50, "progress": False}
    assert NCE(**common).fit(pair, word, context).info["shared_noise"]
    assert not NCE(**common).fit(pair.model, word, context).info["shared_noise"]
    assert not NCE(shared_noise=False, **common).fit(pair, word, context).info["shared_noise"]
    per_context = NCE(noise=lambda c: dist.Categorical(logits=torch.zeros(len(c), 6)), **common)
    assert not per_context.fit(pair, word, context).info["shared_noise"]
    lbfgs = NCE(nu=3, steps=2, optim="lbfgs", progress=False).fit(pair, word, context)
    assert not lbfgs.info["shared_noise"]


def test_shared_noise_that_cannot_be_shared_is_refused():
    word, context = cooccurrence(6, 4, 500, seed=1)
    per_context = NCE(
        noise=lambda c: dist.Categorical(logits=torch.zeros(len(c), 6)),
        shared_noise=True,
        steps=2,
        progress=False,
    )
    with pytest.raises(InputError, match="is per context"):
        per_context.fit(TableScores(6, 4), word, context)
    with pytest.raises(InputError, match="disagrees with the model"):
        NCE(steps=2, progress=False).fit(TableScores(6, 4, bias=1.0), word, context)
    with pytest.raises(InputError, match="only ν noise points"):
        NCE(shared_noise=True, optim="lbfgs")
    with pytest.raises(InputError, match="shared_noise must be"):
        NCE(shared_noise="yes")
