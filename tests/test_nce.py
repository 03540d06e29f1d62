"""NCE: known normalisers, efficiency in ν, the PMI reading of negative sampling, the ranking
variant's invariance, conditional models with per-context noise, and bad input."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import NCE
from jointkl.models import EnergyModel, SkipGram
from jointkl.models.energy import energy_data
from jointkl.models.skipgram import word_pairs
from pyro.distributions import constraints

from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit

pytestmark = pytest.mark.usefixtures("float64_one_thread")


# ---------------------------------------------------------------------- known normalisers
def gaussian_energy(x: torch.Tensor) -> None:
    """Unnormalised N(μ, (P Pᵀ)⁻¹): G(x) = −½‖Pᵀ(x − μ)‖², log Z = (D/2) log 2π − log det P."""
    mu = pyro.param("mu", torch.zeros(x.shape[1]))
    tril = pyro.param("prec_tril", torch.eye(x.shape[1]), constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.shape[0]):
        pyro.factor("energy", -0.5 * ((x - mu) @ tril).pow(2).sum(-1))


def gaussian_log_z(tril: torch.Tensor) -> float:
    return 0.5 * tril.shape[0] * math.log(2 * math.pi) - float(tril.diagonal().log().sum())


def test_gaussian_learned_log_z_and_params_match_maximum_likelihood():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    x = torch.randn(20000, 2, generator=g) @ scale.T + torch.tensor([1.0, -2.0])
    fit = NCE(nu=10, optim="lbfgs", steps=200, seed=0, progress=False).fit(gaussian_energy, x)
    tril = fit.params["prec_tril"]
    cov = torch.linalg.inv(tril @ tril.T)
    ml_mean, ml_cov = x.mean(0), torch.cov(x.T, correction=0)
    assert fit.converged
    assert (fit.params["mu"] - ml_mean).abs().max() < 0.05
    assert (cov - ml_cov).abs().max() < 0.05
    ml_log_z = 0.5 * math.log(2 * math.pi) * 2 + 0.5 * float(torch.logdet(ml_cov))
    assert abs(float(fit.params["log_Z"]) - gaussian_log_z(tril)) < 0.05
    assert abs(float(fit.params["log_Z"]) - ml_log_z) < 0.05


def ising_energy(x: torch.Tensor) -> None:
    """Unnormalised Ising model on {0,1}^D: G(x) = h·x + Σ_{i<j} J_ij x_i x_j."""
    h = pyro.param("h", torch.zeros(x.shape[1]))
    coupling = pyro.param("J", torch.zeros(x.shape[1], x.shape[1]))
    with pyro.plate("data", x.shape[0]):
        pyro.factor("energy", _ising_g(x, h, coupling))


def _ising_g(x, h, coupling):
    return x @ h + ((x @ coupling.triu(1)) * x).sum(-1)


def test_discrete_model_log_z_and_params_match_enumerated_maximum_likelihood():
    D = 4
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)))
    h_true = torch.tensor([0.5, -1.0, 0.2, -0.3])
    j_true = torch.tensor(
        [[0, 0.8, -0.5, 0.0], [0, 0, 0.4, 0.6], [0, 0, 0, -0.7], [0, 0, 0, 0]],
        dtype=torch.float64,
    )
    p = torch.softmax(_ising_g(states, h_true, j_true), 0)
    idx = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(1))
    x = states[idx]

    # Maximum likelihood with the exact normaliser: Z is a sum over the 2^D states.
    h = torch.zeros(D, requires_grad=True)
    coupling = torch.zeros(D, D, requires_grad=True)
    opt = torch.optim.LBFGS([h, coupling], max_iter=200, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        loss = -(_ising_g(x, h, coupling).mean() - _ising_g(states, h, coupling).logsumexp(0))
        loss.backward()
        return loss

    opt.step(nll)
    noise = dist.Bernoulli(probs=x.mean(0)).to_event(1)
    fit = NCE(noise=noise, nu=10, optim="lbfgs", steps=300, progress=False).fit(ising_energy, x)
    h_nce, j_nce = fit.params["h"], fit.params["J"].triu(1)
    assert (h_nce - h).abs().max() < 0.05
    assert (j_nce - coupling.detach().triu(1)).abs().max() < 0.05
    true_log_z = float(_ising_g(states, h_nce, j_nce).logsumexp(0))
    assert abs(float(fit.params["log_Z"]) - true_log_z) < 0.05


def test_zoo_quadratic_energy_learns_gaussian_normaliser():
    x = energy_data("mixture", 20000, seed=3)
    model = EnergyModel(energy="quadratic", dim=2)
    fit = NCE(nu=10, optim="lbfgs", steps=200, progress=False).fit(model, x)
    assert abs(float(fit.params["log_Z"]) - gaussian_log_z(fit.params["precision_tril"])) < 0.05
    assert fit.model_spec == {"zoo": "energy", "settings": model.settings()}


# ---------------------------------------------------------------------- efficiency in ν
def test_parameter_error_falls_as_nu_grows():
    # Mean squared distance of the NCE estimate from the ML fit on the same data, over seeded
    # repeats: the excess variance of NCE over maximum likelihood shrinks as ν grows.
    noise = dist.Normal(torch.tensor(0.0), torch.tensor(3.0))
    errors = {}
    for nu in (1, 10, 50):
        sq = []
        for seed in range(8):
            x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(100 + seed))
            x = 0.8 * x + 0.3
            engine = NCE(
                noise=noise.expand([1]).to_event(1), nu=nu, optim="lbfgs", seed=seed, progress=False
            )
            f = engine.fit(gaussian_energy, x)
            ml = torch.cat([x.mean(0), 1 / x.std(0, correction=0)])
            est = torch.cat([f.params["mu"], f.params["prec_tril"].reshape(1)])
            sq.append(float(((est - ml) ** 2).sum()))
        errors[nu] = sum(sq) / len(sq)
    assert errors[1] > errors[10] > errors[50], errors


# ---------------------------------------------------------------------- conditional models
def cooccurrence(n_words: int, n_contexts: int, n: int, seed: int):
    """(word, context) pairs drawn from a random joint table."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_contexts, n_words, generator=g)
    joint = torch.softmax(logits.reshape(-1), 0)
    cell = torch.multinomial(joint, n, replacement=True, generator=g)
    return cell % n_words, cell // n_words


def make_cooccurrence_model(n_words, n_contexts, offset=None):
    """G(w, c) = ⟨u_w, v_c⟩ with one-hot v_c: word2vec's dot product at full rank, i.e. a
    free table of scores (convex losses, so L-BFGS converges in a few dozen steps), plus an
    optional fixed per-context constant."""

    def model(word, context):
        table = pyro.param("table", lambda: torch.zeros(n_contexts, n_words))
        score = table[context, word]
        if offset is not None:
            score = score + offset[context]
        with pyro.plate("data", len(word)):
            pyro.factor("score", score)

    return model


def _table(word, context, n_words, n_contexts):
    counts = torch.zeros(n_contexts, n_words)
    counts.index_put_((context, word), torch.ones(len(word)), accumulate=True)
    return counts


def test_negative_sampling_recovers_pmi_minus_log_nu():
    W, C, nu = 12, 8, 5
    word, context = cooccurrence(W, C, 20000, seed=4)
    engine = NCE(
        noise="unigram",
        nu=nu,
        variant="negative-sampling",
        optim="lbfgs",
        steps=500,
        seed=1,
        progress=False,
    )
    f = engine.fit(make_cooccurrence_model(W, C), word, context)
    assert "log_Z" not in f.params
    counts = _table(word, context, W, C)
    pmi = (counts * counts.sum()).log() - (
        counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True)
    ).log()
    learned = f.params["table"]
    target = pmi - math.log(nu)
    corr = torch.corrcoef(torch.stack([learned.reshape(-1), target.reshape(-1)]))[0, 1]
    assert corr >= 0.95
    # The shift is −log ν, not just any offset: weight the cells by their counts.
    w = counts / counts.sum()
    assert abs(float((w * (learned - target)).sum())) < 0.1


def test_binary_nce_with_per_context_noise_learns_normalised_conditionals():
    W, C = 12, 8
    word, context = cooccurrence(W, C, 20000, seed=5)
    counts = _table(word, context, W, C)
    p_w_given_c = counts / counts.sum(1, keepdim=True)
    # Per-context noise: half the empirical conditional, half uniform (covers every word).
    noise_table = 0.5 * p_w_given_c + 0.5 / W

    def noise(ctx: torch.Tensor):
        return dist.Categorical(probs=noise_table[ctx])

    engine = NCE(noise=noise, nu=10, optim="lbfgs", steps=500, progress=False)
    f = engine.fit(make_cooccurrence_model(W, C), word, context)
    # With the context copied into the noise, p(c) cancels: e^{G − γ} = p(w | c).
    log_p = f.params["table"] - f.params["log_Z"]
    assert (log_p.exp().sum(1) - 1).abs().max() < 0.05
    assert (log_p.exp() - p_w_given_c).abs().max() < 0.03


def _history(variant: str, offset: torch.Tensor | None, word, context, W, C):
    engine = NCE(
        noise="unigram^0.75", nu=5, variant=variant, lr=0.05, steps=25, seed=2, progress=False
    )
    return engine.fit(make_cooccurrence_model(W, C, offset), word, context)


def test_ranking_is_invariant_to_a_per_context_constant_binary_is_not():
    W, C = 12, 8
    word, context = cooccurrence(W, C, 4000, seed=6)
    offset = 3.0 * torch.randn(C, generator=torch.Generator().manual_seed(7))
    rank0 = _history("ranking", None, word, context, W, C)
    rank1 = _history("ranking", offset, word, context, W, C)
    # Same seed, same noise: the softmax over {datum} ∪ noise cancels any per-context shift,
    # so the whole trajectory (losses and parameters) is unchanged.
    assert torch.allclose(torch.tensor(rank0.history), torch.tensor(rank1.history), atol=1e-9)
    assert torch.allclose(rank0.params["table"], rank1.params["table"], atol=1e-9)
    assert "log_Z" not in rank1.params
    bin0 = _history("binary", None, word, context, W, C)
    bin1 = _history("binary", offset, word, context, W, C)
    # The binary loss sees G − γ: one scalar γ cannot absorb a per-context constant.
    assert abs(bin0.history[-1] - bin1.history[-1]) > 1e-3
    assert not torch.allclose(bin0.params["table"], bin1.params["table"], atol=1e-6)


# ---------------------------------------------------------------------- zoo models, Fit
def test_energy_model_fit_saves_and_reloads(tmp_path):
    x = energy_data("ring", 2000, seed=0)
    model = EnergyModel(hidden=16)
    fit = NCE(nu=5, steps=60, lr=0.02, batch_size=500, progress=False).fit(model, x)
    assert fit.history[-1] < fit.history[0]
    with torch.no_grad():
        before = model.energy_of(x[:10]).clone()
    fit.save(tmp_path / "fit")
    loaded = Fit.load(tmp_path / "fit")
    assert torch.equal(loaded.params["log_Z"], fit.params["log_Z"])
    _, _, log_p, _ = loaded.pair.log_density_grid(loaded, (-3, 3, -3, 3), grid=20)
    assert torch.isfinite(log_p).all()
    with torch.no_grad():
        assert torch.allclose(loaded.pair.energy_of(x[:10]), before)


def test_user_energy_module_restarts_from_its_initial_state_in_every_fit():
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = EnergyModel(energy=net)
    x = energy_data("moons", 1000, seed=2)
    engine = NCE(nu=5, steps=20, lr=0.05, progress=False)
    first, second = engine.fit(model, x), engine.fit(model, x)
    assert first.history == second.history
    assert model.spec() is None  # a user's module cannot be rebuilt from JSON


def test_non_finite_loss_stops_the_fit_with_a_clear_error():
    def log_energy(x):
        scale = pyro.param("scale", torch.tensor(1.0))
        with pyro.plate("data", len(x)):
            # log(scale) is NaN once a large step takes scale below zero
            pyro.factor("energy", -((x / scale) ** 2) - scale.log())

    x = 0.1 * torch.randn(500)
    with pytest.raises(FitDivergedError, match="non-finite loss"):
        NCE(optim="sgd", lr=100.0, steps=50, progress=False).fit(log_energy, x)
    assert torch.isfinite(pyro.param("scale"))


def test_word_pairs_are_within_sentence_neighbours():
    sentences = [["a", "b", "c"], ["c", "a"]]
    pairs = word_pairs(sentences, vocab=["<unk>", "a", "c"], window=1)
    got = sorted(zip(pairs.context.tolist(), pairs.target.tolist(), strict=True))
    # ids: a=1, b=<unk>=0, c=2; pairs (centre, neighbour) in both directions
    assert got == sorted([(1, 0), (0, 1), (0, 2), (2, 0), (2, 1), (1, 2)])
    lm = word_pairs(sentences, vocab=["<unk>", "a", "c"], window=2, mode="lm")
    assert lm.context.tolist() == [[1, 0]] and lm.target.tolist() == [2]


def test_skipgram_nce_beats_unigram_perplexity():
    (target, context), _ = SkipGram.default_data()
    target, context = target[:8000], context[:8000]
    model = SkipGram(dim=16)
    fit = NCE(nu=10, steps=150, lr=0.05, batch_size=2000, progress=False).fit(
        model, target, context
    )
    unigram = torch.bincount(target, minlength=model.vocab_size).double() / len(target)
    unigram_ppl = math.exp(-float(unigram[target].log().mean()))
    assert model.perplexity(fit, target, context) < unigram_ppl


# ---------------------------------------------------------------------- bad input
def test_model_with_latent_site_is_refused():
    def latent_model(x):
        mu = pyro.param("mu", torch.zeros(()))
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -((x - z) ** 2))

    with pytest.raises(InputError, match=r"latent sample site\(s\) \['z'\]"):
        NCE(steps=5, progress=False).fit(latent_model, torch.randn(50))


def test_noise_whose_support_misses_the_data_is_refused():
    x = torch.randn(200)

    def model(x):
        mu = pyro.param("mu", torch.zeros(()))
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -((x - mu) ** 2))

    with pytest.raises(InputError, match=r"support GreaterThanEq.* misses \d+ datum"):
        NCE(noise=dist.Exponential(torch.tensor(1.0)), progress=False).fit(model, x)
    narrow = dist.Uniform(torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(InputError, match="misses"):
        NCE(noise=narrow, progress=False).fit(model, x)
    ids = torch.tensor([0, 1, 2, 2])
    two_words = dist.Categorical(probs=torch.tensor([0.5, 0.5]))
    with pytest.raises(InputError, match=r"misses 2 datum/data \(first at row 2: 2\)"):
        NCE(noise=two_words, progress=False).fit(model, ids)


@pytest.mark.parametrize(
    "kwargs, data, message",
    [
        ({"noise": "gaussian"}, torch.tensor([0, 1, 2]), "needs real-valued data"),
        ({"noise": "unigram^0.75"}, torch.randn(5), "needs integer category ids"),
        ({"noise": dist.Normal(torch.zeros(2), 1.0)}, torch.randn(5, 2), "batch_shape"),
        ({"noise": dist.Normal(0.0, 1.0)}, torch.randn(5, 2), "event_shape"),
    ],
)
def test_noise_that_does_not_fit_the_data_is_refused(kwargs, data, message):
    with pytest.raises(InputError, match=message):
        NCE(progress=False, **kwargs).fit(lambda x: None, data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "softmax"}, "variant must be one of"),
        ({"nu": 0}, "nu must be a positive int"),
        ({"noise": "zipf"}, "noise must be 'gaussian'"),
        ({"optim": "lbfgs", "batch_size": 10}, "full batch"),
        ({"optim": "newton"}, "unknown optim"),
        ({"log_z": "guess"}, "log_z must be"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(InputError, match=message):
        NCE(**kwargs)


def test_noise_outside_the_models_support_is_refused():
    def exponential(x):
        rate = pyro.param("rate", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Exponential(rate), obs=x)

    # Gaussian noise has negative draws, where the model's density is undefined.
    with pytest.raises(InputError, match="inside the model's support.*site 'x'"):
        NCE(progress=False).fit(exponential, torch.rand(100) + 0.1)


def test_model_without_data_plate_is_refused():
    def no_plate(x):
        mu = pyro.param("mu", torch.zeros(()))
        pyro.factor("energy", -((x - mu) ** 2).sum())

    with pytest.raises(InputError, match="inside pyro.plate"):
        NCE(progress=False).fit(no_plate, torch.randn(30))


def test_skipgram_engine_defaults_are_nce_settings_with_mini_batches():
    # What `jointkl fit skipgram --engine nce` starts from: valid settings, and mini-batches
    # (a full batch scores all 27k default pairs at every step).
    engine = NCE(progress=False, **SkipGram.engine_defaults["nce"])
    (target, _), _ = SkipGram.default_data()
    assert engine.config["batch_size"] < len(target)


def test_integrators_step_with_lr_as_their_step_size_and_closure_only_ones_are_refused():
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    fit = NCE(optim="heavyball", lr=0.05, steps=30, batch_size=100, progress=False).fit(
        gaussian_energy, x
    )
    assert fit.config["optim"] == "heavyball" and fit.n_iter == 30
    assert all(math.isfinite(h) for h in fit.history)
    with pytest.raises(InputError, match="needs a closure"):
        NCE(optim="heun")
