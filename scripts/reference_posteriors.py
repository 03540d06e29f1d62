"""Reference summaries of two standard posteriors, for NUTS's accuracy test.

The models are those of ``scripts/bench/nuts.py``: eight schools, non-centred (Rubin's
data), and the two-coefficient linear regression on 434 generated points. For each latent
coordinate the reference holds its posterior mean and standard deviation two ways:

* ``exact``: by quadrature. Both models are conditionally Gaussian given one scale, so the
  posterior is a one-dimensional mixture of Gaussians:

  - schools: given τ, z = (μ, η₁..η₈) ~ N(0, Λ = diag(5², 1, …, 1)) and y = H z + ε with
    H = [1 | τ I], ε ~ N(0, D = diag(σ²)); so z | τ, y ~ N(m, P⁻¹) with P = Λ⁻¹ + Hᵀ D⁻¹ H,
    m = P⁻¹ Hᵀ D⁻¹ y, and p(y | τ) = N(y; 0, H Λ Hᵀ + D). With τ = 5 tan u the HalfCauchy(5)
    prior is uniform in u ∈ (0, π/2), so p(u | y) ∝ p(y | τ(u)) on a grid in u;
  - regression: given s, (α, β) ~ N(0, Λ = diag(100², 10²)), y = X (α, β) + ε, ε ~ N(0, s²
    I): (α, β) | s, y ~ N(m, P⁻¹) with P = Λ⁻¹ + XᵀX / s², m = P⁻¹ Xᵀ y / s², and
    log p(y | s) = −n/2 log 2π − n log s − ½ log|Λ| − ½ log|P| − ½ (yᵀy / s² − mᵀ P m),
    on a grid in log s (prior HalfNormal(50) times the Jacobian s).

  Moments follow by the law of total expectation and variance over the grid (trapezoid
  rule); the grid error is far below any Monte-Carlo error.

* ``pyro``: a long run of Pyro's own ``MCMC(NUTS)`` (Pyro's defaults; chains one after
  another, seeds ``seed + c``): mean, sd, their Monte-Carlo standard errors (ArviZ's
  ``mcse`` with ``method="mean"`` and ``"sd"``), bulk ESS and R-hat, and the divergences.
  The script prints, per model, the largest |z| of Pyro's summaries against the exact ones
  (z = difference / MCSE): the two independent references agree when it is small.

The result is one small JSON file (``tests/data/reference_posteriors.json``, read by
``tests/test_nuts_reference.py``). It was made with

    OMP_NUM_THREADS=1 python scripts/reference_posteriors.py --chains 4 --warmup 500 \\
        --draws 1500 --out tests/data/reference_posteriors.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer import MCMC
from pyro.infer import NUTS as PyroNUTS

BENCH = Path(__file__).resolve().parent / "bench" / "nuts.py"


def bench_module():
    """``scripts/bench/nuts.py``, where the models and their data are defined."""
    spec = importlib.util.spec_from_file_location("bench_nuts", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _moments(log_w: np.ndarray, grid: np.ndarray, means: np.ndarray, variances: np.ndarray):
    """Mean and sd of a mixture over a 1-D grid: ``log_w`` the unnormalised log density at
    ``grid`` points, ``means`` (G, K) and ``variances`` (G, K) the conditional moments."""
    w = np.exp(log_w - log_w.max())
    w = w / np.trapezoid(w, grid)
    mean = np.trapezoid(w[:, None] * means, grid, axis=0)
    second = np.trapezoid(w[:, None] * (variances + means**2), grid, axis=0)
    return mean, np.sqrt(second - mean**2)


def _gaussian_posterior(prior_var, H, noise_var, y):
    """z ~ N(0, diag(prior_var)), y = H z + N(0, diag(noise_var)): the posterior mean, the
    posterior variances (diagonal) and log p(y)."""
    P = np.diag(1 / prior_var) + H.T @ (H / noise_var[:, None])
    cov = np.linalg.inv(P)
    m = cov @ (H.T @ (y / noise_var))
    S = (H * prior_var) @ H.T + np.diag(noise_var)
    _, logdet = np.linalg.slogdet(S)
    log_lik = -0.5 * (len(y) * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(S, y))
    return m, np.diag(cov), log_lik


def exact_schools(y: np.ndarray, sigma: np.ndarray, points: int = 20001) -> dict:
    J = len(y)
    u = np.linspace(0, math.pi / 2, points + 2)[1:-1]  # τ = 5 tan u, u uniform a priori
    prior_var = np.array([25.0] + [1.0] * J)
    means, variances, log_w = [], [], []
    for ui in u:
        tau = 5 * math.tan(ui)
        H = np.hstack([np.ones((J, 1)), tau * np.eye(J)])
        m, v, ll = _gaussian_posterior(prior_var, H, sigma**2, y)
        t = 5 * math.tan(ui)
        means.append(np.append(m, t))
        variances.append(np.append(v, 0.0))
        log_w.append(ll)
    mean, sd = _moments(np.array(log_w), u, np.array(means), np.array(variances))
    return {
        "mu": {"mean": [mean[0]], "sd": [sd[0]]},
        "eta": {"mean": mean[1 : J + 1].tolist(), "sd": sd[1 : J + 1].tolist()},
        "tau": {"mean": [mean[-1]], "sd": [sd[-1]]},
    }


def exact_linreg(x: np.ndarray, y: np.ndarray, points: int = 20001) -> dict:
    n = len(x)
    X = np.stack([np.ones(n), x], 1)
    prior_var = np.array([100.0**2, 10.0**2])
    log_s = np.linspace(math.log(1.0), math.log(200.0), points)
    means, variances, log_w = [], [], []
    for ls in log_s:
        s = math.exp(ls)
        P = np.diag(1 / prior_var) + X.T @ X / s**2
        cov = np.linalg.inv(P)
        m = cov @ (X.T @ y) / s**2
        _, logdet_p = np.linalg.slogdet(P)
        ll = (
            -0.5 * n * math.log(2 * math.pi)
            - n * ls
            - 0.5 * np.log(prior_var).sum()
            - 0.5 * logdet_p
            - 0.5 * (y @ y / s**2 - m @ P @ m)
        )
        log_prior = -0.5 * (s / 50.0) ** 2 + ls  # HalfNormal(50) density × Jacobian ds/dlog s
        means.append(np.append(m, s))
        variances.append(np.append(np.diag(cov), 0.0))
        log_w.append(ll + log_prior)
    mean, sd = _moments(np.array(log_w), log_s, np.array(means), np.array(variances))
    return {
        "alpha": {"mean": [mean[0]], "sd": [sd[0]]},
        "beta": {"mean": [mean[1]], "sd": [sd[1]]},
        "s": {"mean": [mean[2]], "sd": [sd[2]]},
    }


def summaries(samples: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Per site, per coordinate (flattened): the mean, the sd, their Monte-Carlo standard
    errors, bulk ESS and R-hat of ``(chain, draw, ...)`` draws.

    MCSE of the mean: sd / √ESS_mean (ArviZ's). MCSE of the sd, by the delta method (the
    formula of ArviZ's ``mcse(method="sd")``, written out because that function fails on
    arrays when numba is installed): with d = (x − x̄)², Var(ŝ²) ≈ Var(d) / ESS_mean(d) and
    se(ŝ) ≈ se(ŝ²) / (2 ŝ), i.e. √(Var(d) / ESS(d) / (4 E d))."""
    out = {}
    for k, v in samples.items():
        flat = np.asarray(v, dtype=np.float64).reshape(v.shape[0], v.shape[1], -1)
        rows = {s: [] for s in ("mean", "sd", "mcse_mean", "mcse_sd", "ess_bulk", "rhat")}
        for j in range(flat.shape[-1]):
            x = flat[..., j]
            d = (x - x.mean()) ** 2
            ess_d = float(az.ess(d, method="mean"))
            rows["mean"].append(float(x.mean()))
            rows["sd"].append(float(x.std(ddof=1)))
            rows["mcse_mean"].append(float(x.std(ddof=1) / math.sqrt(az.ess(x, method="mean"))))
            rows["mcse_sd"].append(float(math.sqrt(d.var() / ess_d / (4 * d.mean()))))
            rows["ess_bulk"].append(float(az.ess(x, method="bulk")))
            rows["rhat"].append(float(az.rhat(x)))
        out[k] = rows
    return out


def pyro_reference(model, data, chains: int, warmup: int, draws: int, seed: int) -> dict:
    """Pyro's MCMC(NUTS), chains one after another; summaries with their MCSE."""
    runs, divergences = [], 0
    t0 = time.perf_counter()
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        mcmc = MCMC(PyroNUTS(model), num_samples=draws, warmup_steps=warmup, disable_progbar=True)
        with pyro.validation_enabled(False):
            mcmc.run(*data)
        divergences += len(mcmc.diagnostics()["divergences"]["chain 0"])
        runs.append({k: v.double().numpy() for k, v in mcmc.get_samples().items()})
    seconds = time.perf_counter() - t0
    samples = {k: np.stack([r[k] for r in runs]) for k in runs[0]}
    summary = summaries(samples)
    return {
        "pyro_version": pyro.__version__,
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        "seed": seed,
        "divergences": divergences,
        "seconds": round(seconds, 1),
        "summary": summary,
    }


def max_z(pyro_summary: dict, exact: dict) -> float:
    """The largest |z| of Pyro's means and sds against the exact ones."""
    z = []
    for k, ref in exact.items():
        row = pyro_summary[k]
        for stat, mcse in (("mean", "mcse_mean"), ("sd", "mcse_sd")):
            z += [abs(a - b) / e for a, b, e in zip(row[stat], ref[stat], row[mcse], strict=True)]
    return max(z)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["schools", "linreg"])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--draws", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("tests/data/reference_posteriors.json"))
    a = p.parse_args()
    bench = bench_module()
    out = json.loads(a.out.read_text()) if a.out.is_file() else {"models": {}}
    out["command"] = " ".join(["python", *sys.argv])
    made = {name: bench.CASES[name][1]() for name in a.models}  # the bench's float32 data
    torch.set_default_dtype(torch.float64)  # Pyro's draws in double, like the exact sums
    for name in a.models:
        model = bench.CASES[name][0]
        data = tuple(t.double() for t in made[name])
        arrays = [t.numpy() for t in data]
        exact = exact_schools(*arrays) if name == "schools" else exact_linreg(*arrays)
        ref = pyro_reference(model, data, a.chains, a.warmup, a.draws, a.seed)
        out["models"][name] = {"exact": exact, "pyro": ref}
        print(
            json.dumps(
                {
                    "model": name,
                    "seconds": ref["seconds"],
                    "divergences": ref["divergences"],
                    "max_z_pyro_vs_exact": round(max_z(ref["summary"], exact), 2),
                }
            ),
            flush=True,
        )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
