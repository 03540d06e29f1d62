"""NUTS against reference posteriors of two standard models (eight schools non-centred; the
434-point linear regression of ``scripts/bench/nuts.py``), stored in
``tests/data/reference_posteriors.json`` by ``scripts/reference_posteriors.py`` (the command
is in the file): exact moments by quadrature, and a long run of Pyro's own MCMC(NUTS) with its
Monte-Carlo standard errors.

The tolerance is not a hand-picked number: each posterior mean and sd of a short NUTS run is
compared with a reference through z = (ours − ref) / √(MCSE_ours² + MCSE_ref²) (MCSE_ref = 0
for the exact moments), and every |z| must be below the Bonferroni bound
Φ⁻¹(1 − α / 2K) for the K comparisons of the test, at a family-wise false-alarm rate α of
10⁻³: a correct sampler fails it once in a thousand seeds, a biased one as soon as its bias
exceeds a few Monte-Carlo errors.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from statistics import NormalDist

import pytest
from jointkl.inference import NUTS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests/data/reference_posteriors.json").read_text())
FAMILY_ALPHA = 1e-3


def _script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _script("reference_posteriors", "scripts/reference_posteriors.py")
BENCH = REF.bench_module()


def z_bound(comparisons: int) -> float:
    """The two-sided Bonferroni bound on |z| for ``comparisons`` tests at FAMILY_ALPHA."""
    return NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * comparisons))


def z_scores(ours: dict, reference: dict, reference_mcse: bool) -> dict[str, float]:
    """z of every mean and sd of ``ours`` (:func:`summaries` rows) against ``reference``."""
    out = {}
    for site, ref in reference.items():
        row = ours[site]
        for stat in ("mean", "sd"):
            mcse = f"mcse_{stat}"
            for j, (a, b) in enumerate(zip(row[stat], ref[stat], strict=True)):
                var = row[mcse][j] ** 2 + (ref[mcse][j] ** 2 if reference_mcse else 0.0)
                out[f"{site}[{j}] {stat}"] = (a - b) / var**0.5
    return out


@pytest.mark.parametrize("model", [m for m, r in REFERENCE["models"].items() if "pyro" in r])
def test_the_two_references_agree(model):
    """Pyro's long run agrees with the quadrature (within its own MCSE): the references
    check each other."""
    exact, pyro_run = REFERENCE["models"][model]["exact"], REFERENCE["models"][model]["pyro"]
    z = z_scores(pyro_run["summary"], exact, reference_mcse=False)
    assert max(abs(v) for v in z.values()) < z_bound(len(z)), z
    assert max(max(r["rhat"]) for r in pyro_run["summary"].values()) < 1.01


@pytest.mark.parametrize(
    "model, chains, warmup, draws",
    [
        pytest.param("schools", 4, 150, 250, id="schools"),
        pytest.param("linreg", 4, 150, 250, id="linreg", marks=pytest.mark.slow),
    ],
)
def test_nuts_matches_the_reference_posteriors(model, chains, warmup, draws):
    fn, make = BENCH.CASES[model]
    fit = NUTS(num_chains=chains, warmup=warmup, draws=draws, progress=False).fit(fn, *make())
    assert fit.info["max_rhat"] < 1.05
    ours = REF.summaries({k: v.numpy() for k, v in fit.samples.items()})
    stored = REFERENCE["models"][model]
    z = {f"exact {k}": v for k, v in z_scores(ours, stored["exact"], False).items()}
    if "pyro" in stored:  # every reference the file holds (see its "command")
        z.update(
            {f"pyro {k}": v for k, v in z_scores(ours, stored["pyro"]["summary"], True).items()}
        )
    bound = z_bound(len(z))
    print(f"max |z| {max(abs(v) for v in z.values()):.2f} (bound {bound:.2f})")
    assert max(abs(v) for v in z.values()) < bound, {k: round(v, 2) for k, v in z.items()}
