"""Langevin (SGLD) against Pyro's NUTS: ESS per second on a Bayesian logistic regression.

The model is w ~ N(0, I_D), b ~ N(0, 5²), y_i ~ Bernoulli(σ(x_i·w + b)) over N = 10,000
points. Both samplers run 4 chains in this process, one after another for NUTS (Pyro's
multi-chain MCMC would fork processes on a 2-core machine), with Pyro's argument validation
off for both (Langevin turns it off itself after its first trace). Time includes warmup.
ESS is ArviZ's bulk ESS, the minimum over the D + 1 coordinates; agreement is the largest
|mean difference| between a Langevin run and NUTS, in NUTS posterior standard deviations.

Prints one JSON object per case.

    python scripts/bench/langevin.py [--n 10000] [--dim 5] [--nuts-warmup 300]
        [--nuts-samples 500] [--sgld-warmup 500] [--sgld-samples 1000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from jointkl.inference import Langevin
from pyro.infer import MCMC, NUTS


def model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(logits=x @ w + b), obs=y)


def data(n: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.linspace(-1.0, 1.0, dim)
    y = torch.bernoulli(torch.sigmoid(x @ w + 0.5), generator=g)
    return x, y


def flat(samples: dict[str, np.ndarray]) -> np.ndarray:
    """(chain, draw, D + 1) array of w and b."""
    return np.concatenate([samples["w"], samples["b"][..., None]], axis=-1)


def summary(case: str, draws: np.ndarray, seconds: float, **extra) -> dict:
    ess = float(az.ess(az.convert_to_dataset({"theta": draws}))["theta"].min())
    rhat = float(az.rhat(az.convert_to_dataset({"theta": draws}))["theta"].max())
    return {
        "case": case,
        "seconds": round(seconds, 2),
        "min_ess_bulk": round(ess, 1),
        "ess_per_s": round(ess / seconds, 2),
        "max_rhat": round(rhat, 4),
        **extra,
    }


def run_nuts(x, y, warmup: int, samples: int, chains: int) -> tuple[np.ndarray, float]:
    chain_draws = []
    t0 = time.perf_counter()
    with pyro.validation_enabled(False):
        for c in range(chains):
            pyro.set_rng_seed(c)
            mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
            mcmc.run(x, y)
            s = mcmc.get_samples()
            chain_draws.append(flat({k: v.numpy()[None] for k, v in s.items()}))
    return np.concatenate(chain_draws), time.perf_counter() - t0


def run_langevin(x, y, warmup: int, samples: int, chains: int, batch: int | None):
    engine = Langevin(
        num_chains=chains, num_samples=samples, warmup=warmup, batch_size=batch, progress=False
    )
    t0 = time.perf_counter()
    fit = engine.fit(model, x, y)
    seconds = time.perf_counter() - t0
    return flat({k: v.numpy() for k, v in fit.samples.items()}), seconds, fit.info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=5)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--nuts-warmup", type=int, default=300)
    ap.add_argument("--nuts-samples", type=int, default=500)
    # Langevin's own defaults (warmup 500, 1000 draws, 4 chains): the full-batch row is what
    # `Langevin()` gives; the mini-batch row is a tuned setting, labelled so.
    ap.add_argument("--sgld-warmup", type=int, default=500)
    ap.add_argument("--sgld-samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1000, help="Langevin mini-batch case; 0 skips")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = data(args.n, args.dim)
    common = {"n": args.n, "dim": args.dim, "chains": args.chains, "threads": args.threads}

    nuts, t = run_nuts(x, y, args.nuts_warmup, args.nuts_samples, args.chains)
    ref_mean, ref_sd = (
        nuts.reshape(-1, nuts.shape[-1]).mean(0),
        nuts.reshape(-1, nuts.shape[-1]).std(0),
    )
    print(
        json.dumps(
            summary(
                "pyro NUTS",
                nuts,
                t,
                settings="anchor",
                warmup=args.nuts_warmup,
                samples=args.nuts_samples,
                **common,
            )
        ),
        flush=True,
    )
    for batch in [None] + ([args.batch] if args.batch else []):
        draws, t, info = run_langevin(x, y, args.sgld_warmup, args.sgld_samples, args.chains, batch)
        mean = draws.reshape(-1, draws.shape[-1]).mean(0)
        sd = draws.reshape(-1, draws.shape[-1]).std(0)
        record = summary(
            f"jointkl Langevin (batch {batch or 'full'})",
            draws,
            t,
            settings="Langevin() defaults"
            if batch is None
            and (args.sgld_warmup, args.sgld_samples, args.chains) == (500, 1000, 4)
            else "tuned (set here)",
            warmup=args.sgld_warmup,
            samples=args.sgld_samples,
            step_size=round(info["step_size"], 5),
            gradients=info["gradients"],
            max_mean_diff_in_nuts_sd=round(float(np.max(np.abs(mean - ref_mean) / ref_sd)), 3),
            max_sd_ratio_to_nuts=round(float(np.max(sd / ref_sd)), 3),
            min_sd_ratio_to_nuts=round(float(np.min(sd / ref_sd)), 3),
            **common,
        )
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
