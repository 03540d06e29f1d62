"""EM's k-means++ initialisation (jointkl.inference.em.initial._kmeans) computes the same
labels as the plain formulation it shortcuts: seeding distances by torch.cdist on the raw
points, the tolerance from x.var, and Lloyd's cluster sums along the transposed points."""

import math

import pytest
import torch
from jointkl.inference.em import initial
from jointkl.models import BernoulliMixture

F64 = torch.float64


def reference_kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int) -> torch.Tensor:
    """Greedy k-means++ and Lloyd to convergence, written directly (hard labels)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = (x - centres[0]).square().sum(-1)
    for _ in range(1, k):
        p = d2 / d2.sum()
        cand = x[torch.multinomial(p, trials, replacement=True, generator=gen)]
        dc = torch.minimum(torch.cdist(cand, x).square(), d2)
        best = int(dc.sum(-1).argmin())
        centres = torch.cat([centres, cand[best : best + 1]])
        d2 = dc[best]
    tol = initial.KMEANS_TOL * float(x.var(0, unbiased=False).mean())
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        moved = torch.stack(
            [x[assign == j].mean(0) if bool((assign == j).any()) else centres[j] for j in range(k)]
        )
        shift = float((moved - centres).square().sum())
        centres = moved
        if shift <= tol:
            break
    return torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(-1), k).to(x.dtype)


def blobs(n: int, d: int, k: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    return (
        centres[torch.randint(k, (n,), generator=g)]
        + torch.randn(n, d, generator=g, dtype=F64)
        + offset
    )


DATA = {
    "digits": lambda: (BernoulliMixture.default_data()[0][0].double()[:900], 10),
    "narrow": lambda: (blobs(1500, 3, 5, 0), 5),
    "far-from-origin": lambda: (blobs(1500, 4, 4, 1, offset=1e4), 4),
    "wide": lambda: (blobs(800, initial.WIDE + 4, 6, 2), 6),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("data", sorted(DATA))
def test_kmeans_labels_are_the_plain_formulation_s(data, seed):
    x, k = DATA[data]()
    ours = initial._kmeans(x, k, torch.Generator().manual_seed(seed), 300, None, False)
    ref = reference_kmeans(x, k, torch.Generator().manual_seed(seed), 300)
    assert torch.equal(ours, ref)


def test_lloyd_sums_along_rows_equal_the_sums_along_the_transposed_points():
    x = blobs(700, 24, 5, 3)
    start = x[:5].clone()
    a, assign_a = initial._lloyd(x.T.contiguous(), start, 50, 0.0)
    b, assign_b = initial._lloyd(x.T.contiguous(), start, 50, 0.0, x.contiguous())
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # stopped on unchanged assignments: they are the nearest centres of the final ones
    assert assign_a is not None and torch.equal(assign_a, assign_b)
    assert torch.equal(assign_a, torch.cdist(x, a).argmin(-1))
