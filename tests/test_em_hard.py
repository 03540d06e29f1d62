"""Hard-assignment EM (EM(assign="hard")): classification EM, which for a mixture with
equal fixed weights and one shared spherical variance is k-means' Lloyd iteration."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM
from jointkl.models import HMM, GaussianMixture

from jointkl.errors import InputError

F64 = torch.float64
K = 4


def overlapping(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, 2, generator=g, dtype=F64) * 1.5
    z = torch.randint(K, (n,), generator=g)
    return centres[z] + torch.randn(n, 2, generator=g, dtype=F64)


def spherical_shared(x: torch.Tensor, sigma: float = 1.0) -> None:
    """K components, equal fixed weights, one fixed spherical variance sigma^2."""
    locs = pyro.param("locs", lambda: x[:K].clone())
    with pyro.plate("data", len(x)):
        z = pyro.sample(
            "z",
            dist.Categorical(torch.full((K,), 1.0 / K, dtype=x.dtype)),
            infer={"enumerate": "parallel"},
        )
        pyro.sample("obs", dist.Normal(locs[z], sigma).to_event(1), obs=x)


def responsibilities(x, locs, sigma):
    return torch.softmax(-0.5 * torch.cdist(x, locs).square() / sigma**2, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_em_on_a_shared_spherical_mixture_is_kmeans(seed):
    from sklearn.cluster import KMeans

    x = overlapping(seed=seed)
    g = torch.Generator().manual_seed(10 + seed)
    start = x[torch.randperm(len(x), generator=g)[:K]].clone()
    fit = EM(
        assign="hard", max_iter=300, tol=0.0, progress=False, init=lambda x, seed: {"locs": start}
    ).fit(spherical_shared, x)
    km = KMeans(K, init=start.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300)
    km.fit(x.numpy())
    labels = torch.cdist(x, fit.params["locs"]).argmin(-1).numpy()
    np.testing.assert_array_equal(labels, km.labels_)
    np.testing.assert_allclose(fit.params["locs"].numpy(), km.cluster_centers_, atol=1e-10)
    assert fit.converged and fit.objective == "classification_log_likelihood"
    h = np.asarray(fit.history)
    assert (np.diff(h) >= -1e-9 * np.abs(h[:-1])).all()  # classification EM is monotone


def test_soft_em_partition_tends_to_kmeans_as_the_shared_variance_shrinks():
    """The soft → hard limit: with a small shared variance soft EM gives k-means' partition;
    with a large one it does not (the test could fail either way)."""
    x = overlapping(seed=3)
    start = x[:K].clone()
    hard = EM(
        assign="hard", max_iter=300, tol=0.0, progress=False, init=lambda x, seed: {"locs": start}
    ).fit(spherical_shared, x)
    hard_labels = torch.cdist(x, hard.params["locs"]).argmin(-1)
    agree = {}
    for sigma in (3.0, 0.05):
        soft = EM(max_iter=300, tol=0.0, progress=False, init=lambda x, seed: {"locs": start}).fit(
            lambda x, s=sigma: spherical_shared(x, s), x
        )
        labels = responsibilities(x, soft.params["locs"], sigma).argmax(-1)
        agree[sigma] = float((labels == hard_labels).double().mean())
    assert agree[0.05] == 1.0
    assert agree[3.0] < 0.99


def test_hard_em_runs_on_the_zoo_mixture():
    x = overlapping()
    fit = EM(assign="hard", progress=False).fit(GaussianMixture(K, "spherical"), x)
    assert fit.objective == "classification_log_posterior"
    assert fit.info["decreases"] == 0


def test_hard_assignments_are_refused_for_a_chain_and_bad_values():
    (x,), _ = HMM().default_data()
    with pytest.raises(InputError, match="assign='hard' needs a mixture"):
        EM(assign="hard", progress=False).fit(HMM(), x[:2, :10])
    with pytest.raises(InputError, match="assign must be one of"):
        EM(assign="viterbi")
