"""Benchmark: what a run spends after its fit (``to_arviz`` + netCDF + plots) against the fit.

For every zoo model, the run ``jointkl fit MODEL --engine ENGINE`` makes with no ``--set``
(the model's ``engine_defaults`` applied, its default data, seed 0), done in this process the
way the command line does it: the fit (timed), then ``fit.to_arviz()`` with the converter's
defaults, ``idata.to_netcdf`` and ``jointkl.diagnostics.write_plots`` (timed together: the
post-fit work). One JSON object per case on stdout:

    {"case": "gmm/em", "fit_s": .., "to_arviz_s": .., "netcdf_s": .., "plots_s": ..,
     "post_s": .., "ratio": post_s / fit_s, "budget_s": max(0.2 * fit_s, 10), "ok": ..}

The target (issue 12) is post_s <= max(20 % of fit_s, 10 s). The same figures in CPU
seconds of the process (``*_cpu_s``, ``ok_cpu``) are given beside them: with one torch
thread they are what the wall clock would read on an idle machine. ArviZ and matplotlib are
imported before anything is timed (a one-off cost of the process, not of a conversion).

    python scripts/bench/postfit.py                        # every case but LONG_CASES
    python scripts/bench/postfit.py --cases all            # every case
    python scripts/bench/postfit.py --cases gmm/em,bmm/em
    python scripts/bench/postfit.py --set steps=50         # shorter fits (not the default run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import arviz  # noqa: E402, F401  (imported up front: see the docstring)
import torch  # noqa: E402

from jointkl.cli import parse_settings, route_settings  # noqa: E402
from jointkl.diagnostics import write_plots  # noqa: E402
from jointkl.engine import engine_class  # noqa: E402
from jointkl.errors import InputError  # noqa: E402
from jointkl.zoo import model_class  # noqa: E402

warnings.filterwarnings("ignore")

CASES = (  # every model x engine pair `jointkl fit` accepts (tests/test_diagnose_matrix.py)
    "gmm/em",
    "gmm/svi",
    "gmm/nuts",
    "bmm/em",
    "bmm/svi",
    "bmm/nuts",
    "hmm/em",
    "hmm/svi",
    "vae/svi",
    "vae/langevin",
    "vae/nuts",
    "infomax/svi",
    "infomax/langevin",
    "infomax/nuts",
    "crf-seg/svi",
    "energy/nce",
    "energy/svi",
    "skipgram/nce",
)
# Default NUTS fits of these take hours on a 2-core CPU (4 x (1000 + 1000) transitions of up
# to 1,023 gradient evaluations each, a network or 1,797 x 64 enumerated pixels a gradient):
# `--cases all` includes them; the plain run (`make bench`) does not.
LONG_CASES = ("bmm/nuts", "vae/nuts", "infomax/nuts")


def run_case(case: str, extra: list[str]) -> dict:
    """Fit ``case`` ("model/engine") as the CLI does and time the post-fit work."""
    name, engine_name = case.split("/")
    cls, engine_cls = model_class(name), engine_class(engine_name)
    model_kw, engine_kw = route_settings(parse_settings(extra), cls, engine_cls)
    pair = cls(**model_kw)
    engine_kw = {**getattr(pair, "engine_defaults", {}).get(engine_name, {}), **engine_kw}
    if "progress" in engine_cls.Settings.names():
        engine_kw.setdefault("progress", False)
    if "seed" in engine_cls.Settings.names():  # as `jointkl fit` does (--seed 0)
        engine_kw.setdefault("seed", 0)
    data_args, data_kwargs = pair.default_data(seed=0)
    torch.manual_seed(0)
    engine = engine_cls(**engine_kw)
    c0, t0 = time.process_time(), time.perf_counter()
    fit = engine.fit(pair, *data_args, **data_kwargs)
    c1, t1 = time.process_time(), time.perf_counter()
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    idata = fit.to_arviz(seed=0)  # as `jointkl fit` calls it (no --draws)
    c2, t2 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        idata.to_netcdf(str(Path(d) / "inference_data.nc"))
        c3, t3 = time.process_time(), time.perf_counter()
        nc_mb = (Path(d) / "inference_data.nc").stat().st_size / 2**20
        write_plots(fit, idata, Path(d) / "plots")
        c4, t4 = time.process_time(), time.perf_counter()
    fit_s, post_s = t1 - t0, t4 - t1
    budget = max(0.2 * fit_s, 10.0)
    fit_cpu, post_cpu = c1 - c0, c4 - c1
    budget_cpu = max(0.2 * fit_cpu, 10.0)
    return {
        "case": case,
        "settings": extra,
        "fit_s": round(fit_s, 2),
        "to_arviz_s": round(t2 - t1, 2),
        "netcdf_s": round(t3 - t2, 2),
        "plots_s": round(t4 - t3, 2),
        "post_s": round(post_s, 2),
        "ratio": round(post_s / fit_s, 3),
        "budget_s": round(budget, 2),
        "ok": post_s <= budget,
        # CPU seconds of this process (one thread): on a machine shared with other jobs
        # the wall clock measures the load as much as the work
        "fit_cpu_s": round(fit_cpu, 2),
        "to_arviz_cpu_s": round(c2 - c1, 2),
        "netcdf_cpu_s": round(c3 - c2, 2),
        "plots_cpu_s": round(c4 - c3, 2),
        "post_cpu_s": round(post_cpu, 2),
        "budget_cpu_s": round(budget_cpu, 2),
        "ok_cpu": post_cpu <= budget_cpu,
        # peak resident memory of the process after the fit and at the end: the second
        # is larger only when the post-fit work set a new peak
        "peak_rss_fit_mb": round(rss_fit),
        "peak_rss_end_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "netcdf_mb": round(nc_mb, 1),
        "steps": getattr(engine.settings, "steps", None),
        # the loop lengths the fit ran: the per-step cost of a shortened fit gives the
        # default fit's time
        "loop": {
            k: getattr(engine.settings, k)
            for k in ("steps", "max_iter", "warmup", "draws", "num_samples", "num_chains")
            if hasattr(engine.settings, k)
        },
        # a sampler's work (NUTS: U-and-gradient evaluations of all chains, tree depth):
        # with fit_cpu_s, the cost per gradient that sizes a default fit not run here
        "fit_info": {
            k: fit.info[k]
            for k in ("gradients", "mean_tree_depth", "divergences")
            if k in getattr(fit, "info", {})
        },
        "groups": list(idata.groups()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases",
        default=",".join(c for c in CASES if c not in LONG_CASES),
        help="comma-separated model/engine pairs, or 'all' (default: all but LONG_CASES)",
    )
    p.add_argument("--set", action="append", default=[], help="key=value for every case")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for case in CASES if a.cases == "all" else a.cases.split(","):
        try:
            row = run_case(case, a.set)
        except InputError as e:  # a combination the engine refuses: said, not a crash
            row = {"case": case, "settings": a.set, "refused": str(e)}
        except Exception as e:  # a fit that crashes is a row too; the other cases still run
            row = {"case": case, "settings": a.set, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
