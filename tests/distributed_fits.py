"""Small SVI and NCE fits run by tests/test_distributed.py, once in one process and once per
rank under torchrun (``python -m torch.distributed.run --nproc-per-node 2 THIS OUT``): the
same data on every rank, of which each rank passes its own rows (jointkl.distributed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from jointkl.inference import NCE, SVI

from jointkl import distributed

N, D = 63, 3  # 63 rows: shards of 32 and 31, batches that split unevenly


def regression(x, y=None):
    """Bayesian linear regression: global latents only (their draws match across ranks)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def energy(x):
    """An unnormalised Gaussian e^{−½ (x − μ)ᵀ diag(e^{2s}) (x − μ)}."""
    mu = pyro.param("mu", torch.zeros(D))
    s = pyro.param("s", torch.zeros(D))
    with pyro.plate("data", len(x)):
        pyro.factor("e", -0.5 * (((x - mu) * s.exp()) ** 2).sum(-1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(N, generator=g)
    return x, y


def fits(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every fit's parameters, by '<fit>/<name>'; x, y are this process's rows."""
    out = {}
    runs = {
        "svi": lambda: SVI(steps=25, batch_size=16, lr=0.05, progress=False).fit(regression, x, y),
        "svi_full": lambda: SVI(steps=10, lr=0.05, progress=False).fit(regression, x, y),
        "nce": lambda: NCE(steps=25, batch_size=16, nu=4, progress=False).fit(energy, x),
        "nce_full": lambda: NCE(steps=10, nu=2, progress=False).fit(energy, x),
    }
    for name, run in runs.items():
        fit = run()
        for k, v in fit.params.items():
            out[f"{name}/{k}"] = v.detach().clone()
        out[f"{name}/history"] = torch.tensor(fit.history)
    return out


if __name__ == "__main__":
    distributed.initialise()
    x, y = data()
    xs, ys = distributed.local_shard((x, y), {}, N)[0]
    result = fits(xs, ys)
    torch.save(result, Path(sys.argv[1]) / f"rank{distributed.rank()}.pt")
