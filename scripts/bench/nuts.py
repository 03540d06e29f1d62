"""jointkl's NUTS against Pyro's MCMC(NUTS): effective samples per second, same posterior.

Two models, each run by both samplers in this process with the same chains, warmup and
draws (Pyro's defaults on both sides, with ``--dense-mass false``: diagonal mass matrix,
target acceptance 0.8, tree depth 10, uniform starts in (−2, 2)):

* ``schools``: eight schools, non-centred (μ ~ N(0, 5²), τ ~ HalfCauchy(5),
  η_j ~ N(0, 1), y_j ~ N(μ + τ η_j, σ_j²)), Rubin's data;
* ``linreg``: a two-coefficient linear regression y_i ~ N(α + β x_i, s²), α ~ N(0, 100²),
  β ~ N(0, 10²), s ~ HalfNormal(50), on 434 points *generated* in the units of the kidiq
  data (x ~ N(100, 15²), α = 26, β = 0.6, s = 18; no installed package ships kidiq): the
  uncentred predictor makes α and β strongly correlated, so trees are deep.

Pyro runs its chains one after another (``MCMC(NUTS(model), num_chains=1)`` per chain: what
``num_chains=4`` does on a machine with fewer cores than chains), with Pyro's argument
validation off on both sides. Time is wall-clock of the whole fit, warmup and jointkl's
one-off graph compilation included. ESS is ArviZ's bulk ESS, the minimum over all
coordinates; ``ratio`` is jointkl's ESS/s over Pyro's. Posterior means and standard
deviations are printed side by side.

Prints one JSON object per (case, sampler), then one per case with the ratio.
``--dense-mass`` runs jointkl once per value given (``auto``, the default: the engine's own
default, a dense metric on these small models; ``false``: the diagonal metric, Pyro's
default, the like-for-like kernel; ``true``), each row labelled with it and the ratio taken
for each; ``--no-pyro`` leaves Pyro out (dense against diagonal only). Rows also
carry the process CPU seconds (``cpu_seconds``), steadier than the wall clock on a shared
machine.

    python scripts/bench/nuts.py [--cases schools linreg] [--chains 4] [--warmup 1000]
        [--draws 1000] [--seed 0] [--dense-mass auto false true] [--no-pyro]
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
from jointkl.inference import NUTS as JointklNUTS
from pyro.infer import MCMC
from pyro.infer import NUTS as PyroNUTS

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("data", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def linreg(x, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 100.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.HalfNormal(50.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(alpha + beta * x, s), obs=y)


def linreg_data(n: int = 434, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 100.0 + 15.0 * torch.randn(n, generator=g)
    y = 26.0 + 0.6 * x + 18.0 * torch.randn(n, generator=g)
    return x, y


CASES = {
    "schools": (schools, lambda: (SCHOOLS_Y, SCHOOLS_SIGMA)),
    "linreg": (linreg, linreg_data),
}


def pyro_nuts(model, data, chains: int, warmup: int, draws: int, seed: int):
    """Pyro's MCMC(NUTS), chains one after another: draws by site (chain, draw, ...)."""
    runs = []
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        mcmc = MCMC(PyroNUTS(model), num_samples=draws, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*data)
        div = int(mcmc.diagnostics()["divergences"]["chain 0"].__len__())
        runs.append(({k: v.numpy() for k, v in mcmc.get_samples().items()}, div))
    samples = {k: np.stack([r[0][k] for r in runs]) for k in runs[0][0]}
    return samples, sum(r[1] for r in runs)


def jointkl_nuts(model, data, chains: int, warmup: int, draws: int, seed: int, dense_mass="auto"):
    fit = JointklNUTS(
        num_chains=chains,
        warmup=warmup,
        draws=draws,
        seed=seed,
        progress=False,
        dense_mass=dense_mass,
    ).fit(model, *data)
    samples = {k: v.numpy() for k, v in fit.samples.items()}
    return samples, fit.info["divergences"], fit.info


def summary(case: str, sampler: str, samples: dict, seconds: float, divergences: int) -> dict:
    data = az.convert_to_dataset(samples)
    ess = az.ess(data, method="bulk")
    rhat = az.rhat(data)
    min_ess = float(min(float(ess[k].min()) for k in samples))
    return {
        "case": case,
        "sampler": sampler,
        "seconds": round(seconds, 2),
        "min_ess_bulk": round(min_ess, 1),
        "ess_per_s": round(min_ess / seconds, 3),
        "max_rhat": round(float(max(float(rhat[k].max()) for k in samples)), 4),
        "divergences": divergences,
        "mean": {k: np.round(v.mean((0, 1)), 3).tolist() for k, v in samples.items()},
        "sd": {k: np.round(v.std((0, 1)), 3).tolist() for k, v in samples.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-mass", nargs="+", default=["auto"], choices=["false", "true", "auto"])
    p.add_argument("--no-pyro", action="store_true", help="run jointkl only")
    a = p.parse_args()
    metrics = {"false": False, "true": True, "auto": "auto"}
    for case in a.cases:
        model, make = CASES[case]
        data = make()
        rows = []
        for value in a.dense_mass:
            with pyro.validation_enabled(False):
                t0, c0 = time.perf_counter(), time.process_time()
                ours, div, info = jointkl_nuts(
                    model, data, a.chains, a.warmup, a.draws, a.seed, metrics[value]
                )
                t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
            row = summary(case, "jointkl", ours, t_ours, div)
            row.update(
                dense_mass=value,
                cpu_seconds=round(c_ours, 2),
                ess_per_cpu_s=round(row["min_ess_bulk"] / c_ours, 3),
                vectorised=info["vectorised"],
                compiled=info["compiled"],
                mean_tree_depth=round(info["mean_tree_depth"], 2),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
        if a.no_pyro:
            continue
        with pyro.validation_enabled(False):
            t0, c0 = time.perf_counter(), time.process_time()
            theirs, pdiv = pyro_nuts(model, data, a.chains, a.warmup, a.draws, a.seed)
            t_pyro, c_pyro = time.perf_counter() - t0, time.process_time() - c0
        row_pyro = summary(case, f"pyro {pyro.__version__}", theirs, t_pyro, pdiv)
        row_pyro.update(cpu_seconds=round(c_pyro, 2))
        print(json.dumps(row_pyro), flush=True)
        for row in rows:
            print(
                json.dumps(
                    {
                        "case": case,
                        "dense_mass": row["dense_mass"],
                        "chains": a.chains,
                        "warmup": a.warmup,
                        "draws": a.draws,
                        "threads": torch.get_num_threads(),
                        "ess_per_s_ratio": round(row["ess_per_s"] / row_pyro["ess_per_s"], 2),
                        "time_ratio": round(t_pyro / row["seconds"], 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
