"""EM on the default models: conjugate priors with closed-form MAP M-steps, the objective's
name, and bad input refused with one-line InputErrors (Python API and CLI)."""

import pytest
import torch
from jointkl.inference import EM
from jointkl.models import VAE, GaussianMixture

from jointkl.cli import main
from jointkl.errors import InputError

F64 = torch.float64


def blobs(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=F64)
    z = torch.arange(n) % 3
    return centres[z] + 0.6 * torch.randn(n, 2, generator=g, dtype=F64)


def quiet(**kw):
    return EM(progress=False, **kw)


@pytest.mark.parametrize("cov", ["full", "diag", "spherical"])
def test_default_gmm_m_step_is_closed_form_everywhere(cov):
    fit = quiet(max_iter=2).fit(GaussianMixture(3, cov), blobs())
    assert set(fit.info["closed_form"]) == {"weights", "locs", "precision"}
    assert fit.info["gradient"] == []


@pytest.mark.parametrize("cov", ["full", "diag", "spherical"])
def test_default_gmm_map_update_is_the_conjugate_formula(cov):
    """One EM step from a given start equals the MAP update written out by hand: responsibilities
    at θ0, means (n P + I/s²)⁻¹ (P Σ r x + m/s²), covariances (S_k + ψ I) / n_k."""
    x = blobs()
    K, D, psi, (m, s) = 3, 2, 0.05, (0.0, 10.0)
    w0 = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    mu0 = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [0.5, 2.0]], dtype=F64)
    if cov == "full":
        A = torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=F64)
        P0 = torch.stack([A, 2 * A, 0.5 * torch.eye(2, dtype=F64)])
        prec0 = P0
    elif cov == "diag":
        prec0 = torch.tensor([[1.0, 2.0], [0.5, 1.5], [2.0, 0.7]], dtype=F64)
        P0 = torch.diag_embed(prec0)
    else:
        prec0 = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
        P0 = prec0[:, None, None] * torch.eye(2, dtype=F64)
    init = {"weights": w0, "locs": mu0, "precision": prec0}
    model = GaussianMixture(K, cov, covariance_prior=psi)
    fit = quiet(max_iter=1, tol=0.0, init=lambda x, seed: init).fit(model, x)

    comp = torch.distributions.MultivariateNormal(mu0, precision_matrix=P0)
    logr = comp.log_prob(x.unsqueeze(1)) + w0.log()
    r = torch.softmax(logr, -1)  # (N, K)
    n = r.sum(0)
    torch.testing.assert_close(fit.params["weights"], n / n.sum())
    A = n[:, None, None] * P0 + torch.eye(D, dtype=F64) / s**2
    b = (P0 @ (r.T @ x).unsqueeze(-1)).squeeze(-1) + m / s**2
    mu1 = torch.linalg.solve(A, b)
    torch.testing.assert_close(fit.params["locs"], mu1)
    diff = x.unsqueeze(1) - mu1  # (N, K, D)
    S = torch.einsum("nk,nki,nkj->kij", r, diff, diff)
    if cov == "full":
        want = torch.linalg.inv((S + psi * torch.eye(D, dtype=F64)) / n[:, None, None])
    elif cov == "diag":
        want = n[:, None] / (S.diagonal(dim1=-2, dim2=-1) + psi)
    else:
        want = n * D / (S.diagonal(dim1=-2, dim2=-1).sum(-1) + D * psi)
    torch.testing.assert_close(fit.params["precision"], want)


def test_objective_is_named_log_posterior_with_priors_and_log_likelihood_without():
    x = blobs()
    fit = quiet(max_iter=5).fit(GaussianMixture(3), x)
    assert fit.objective == "log_posterior"
    assert fit.history[-1] == pytest.approx(fit.info["log_likelihood"] + fit.info["log_prior"])
    ml = quiet(max_iter=5).fit(GaussianMixture(3, priors=None), x)
    assert ml.objective == "log_likelihood"
    assert ml.history[-1] == pytest.approx(ml.info["log_likelihood"])


def test_default_gmm_fit_is_close_to_maximum_likelihood():
    """The weak default prior barely moves the optimum: from the same start the MAP fit's
    log-likelihood is within 1e-3 nats per point of the maximum-likelihood fit's."""
    x = blobs(300)
    map_fit = quiet(max_iter=200, tol=1e-8).fit(GaussianMixture(3), x)
    ml_fit = quiet(max_iter=200, tol=1e-8).fit(GaussianMixture(3, priors=None), x)
    gap = (ml_fit.info["log_likelihood"] - map_fit.info["log_likelihood"]) / len(x)
    assert 0 <= gap < 1e-3, gap


# --------------------------------------------------------------------------- bad input
def test_em_refuses_a_model_with_continuous_latents_in_one_line():
    x = torch.rand(16, 784).round()
    with pytest.raises(InputError, match="continuous latent inside the 'data' plate") as e:
        quiet(max_iter=2).fit(VAE(), x)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("priors", [None, "weak"])
def test_one_component_mixture_is_refused_in_one_line(priors):
    with pytest.raises(InputError, match="takes a single value.*n_components >= 2") as e:
        quiet().fit(GaussianMixture(n_components=1, priors=priors), blobs())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [[1], [0.0, -1.0], "ab", [0.0, float("nan")]])
def test_loc_prior_of_the_wrong_shape_is_refused(bad):
    with pytest.raises(InputError, match=r"loc_prior must be \(mean, scale\)"):
        GaussianMixture(loc_prior=bad)


def test_one_column_data_fits_with_every_covariance():
    """With D = 1 full, diagonal and spherical covariances are one model: from one start
    they give one fit (the 1 x 1 case once read a vector of scales as a padded matrix)."""
    x = blobs()[:, :1]
    init = {
        "weights": torch.full((3,), 1 / 3, dtype=F64),
        "locs": torch.tensor([[-3.0], [0.0], [3.0]], dtype=F64),
    }
    lls = []
    for cov in ("full", "diag", "spherical"):
        start = dict(init)
        if cov == "full":
            start["scale_tril"] = torch.ones(3, 1, 1, dtype=F64)
        else:
            start["scales"] = torch.ones((3, 1) if cov == "diag" else (3,), dtype=F64)
        fit = quiet(max_iter=30, init=lambda x, seed, s=start: s).fit(
            GaussianMixture(3, cov, priors=None), x
        )
        lls.append(fit.info["log_likelihood"])
        weak = quiet(max_iter=30).fit(GaussianMixture(3, cov), x)
        assert weak.info["gradient"] == [] and torch.isfinite(torch.tensor(weak.history)).all()
    assert lls[1] == pytest.approx(lls[0], rel=1e-9)
    assert lls[2] == pytest.approx(lls[0], rel=1e-9)


def test_cli_exits_2_for_a_model_em_cannot_fit(tmp_path, capsys):
    code = main(["fit", "vae", "--engine", "em", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "continuous latent" in err


def test_default_bernoulli_mixture_from_a_given_start_follows_plain_em():
    """``BernoulliMixture()`` from a given start runs the iterates of plain maximum-likelihood
    Bernoulli-mixture EM (the benchmark's anchor): the Beta(1.001, 1.001) prior moves the
    log-likelihood by less than 1e-3 nats per point and EM stops on the same path."""
    from jointkl.models import BernoulliMixture

    g = torch.Generator().manual_seed(1)
    k, n, d = 3, 240, 12
    protos = torch.rand(k, d, generator=g, dtype=F64)
    z = torch.arange(n) % k
    x = (torch.rand(n, d, generator=g, dtype=F64) < protos[z]).to(F64)
    r = torch.nn.functional.one_hot(torch.randint(k, (n,), generator=g), k).to(F64)
    w0, p0 = r.mean(0), ((r.T @ x) / r.sum(0)[:, None]).clamp(0.05, 0.95)

    # Plain EM, written out: E-step by logsumexp, M-step normalised counts, stop when the
    # mean log-likelihood changes by less than 1e-3 (EM's default tol).
    w, p, prev, iters = w0, p0, -float("inf"), 0
    while True:
        iters += 1
        lp = x @ p.log().T + (1 - x) @ torch.log1p(-p).T + w.log()
        ll = torch.logsumexp(lp, 1)
        resp = (lp - ll[:, None]).exp()
        w, p = resp.mean(0), (resp.T @ x) / resp.sum(0)[:, None]
        if abs(float(ll.mean()) - prev) < 1e-3:
            break
        prev = float(ll.mean())
    lp = x @ p.log().T + (1 - x) @ torch.log1p(-p).T + w.log()
    ref = float(torch.logsumexp(lp, 1).mean())

    fit = quiet(init=lambda x, seed: {"weights": w0, "probs": p0}).fit(BernoulliMixture(k), x)
    # The loop above, like scikit-learn's, tests the log-likelihood of the parameters before
    # its last M-step; EM tests the one after its M-step, so it stops one M-step sooner on the
    # same path.
    assert fit.n_iter == iters - 1
    assert abs(fit.info["log_likelihood"] / n - ref) < 1e-3
