"""Benchmark: EM on data larger than memory — a Gaussian mixture fitted to N four-dimensional
points read from a memory-mapped ``.npy`` file in blocks (:mod:`jointkl.inference.em.streaming`).

Each phase runs in a fresh process of its own, so its peak resident memory (``ru_maxrss``:
anonymous memory plus the file pages mapped at the time) is its own. Cases (one JSON object
each on stdout):

- ``write``: the file, N x 4 float64 written 10^6 rows at a time from a known 3-component
  mixture (seeded), its size and the seconds it took.
- ``subsample``: the anchor — the in-memory fit ``EM().fit(GaussianMixture(3), x_sub)`` of a
  seeded subsample of ``--subsample`` rows (one per stratum of N / subsample rows): its
  per-point log-likelihood and parameters are what the full fit should reach, up to the
  subsample's sampling error (its standard error per point is reported).
- ``in-memory`` (when N <= ``--memory-max``): the whole file loaded as one tensor and fitted
  by ``EM().fit(...)``: seconds per iteration and peak memory, against which the streamed fit
  is a ratio.
- ``in-memory`` and ``stream`` (when N <= ``--memory-max``) also time
  ``EM(max_iter=3, tol=0)`` started at their fitted values (an ``init`` callable: no
  k-means), seconds per iteration with compiling left out: ``fixed_start_...``.
- ``stream``: ``EM().fit(GaussianMixture(3), np.load(path, mmap_mode="r"))`` — defaults
  (``block_rows`` about 64 MB of working set, k-means++ on a 10^5-row subsample, tol 1e-3 per
  point): passes, seconds per pass, peak RSS against the file's size, the per-point
  log-likelihood and the parameters, and their differences from the subsample fit's.

The file is deleted at the end (``--keep`` keeps it). One thread for torch and NumPy.

    python scripts/bench/em_stream.py --n 10000000
    python scripts/bench/em_stream.py --n 100000000 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MEANS = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0], [0.0, -3.0, 3.0, 1.0]])
SCALES = np.array([[1.0, 0.5, 0.8, 1.0], [0.6, 1.0, 1.0, 0.7], [1.0, 1.0, 0.5, 0.9]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
CHUNK = 1_000_000


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: anonymous memory plus mapped file pages;
    unlike ``ru_maxrss`` it does not inherit the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write(path: str, n: int, seed: int) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, 4))
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        z = rng.choice(3, size=m, p=WEIGHTS)
        out[a : a + m] = MEANS[z] + rng.standard_normal((m, 4)) * SCALES[z]
        out.flush()
    del out
    return {
        "case": "write",
        "n": n,
        "file_bytes": os.path.getsize(path),
        "seconds": time.perf_counter() - t0,
    }


def summary(fit, n: int) -> dict:
    """Per-point log-likelihood and the parameters, components ordered by their first mean."""
    import torch

    order = torch.argsort(fit.params["locs"][:, 0] + 10 * fit.params["locs"][:, 1])
    return {
        "n_iter": fit.n_iter,
        "converged": fit.converged,
        "loglik_per_point": fit.info["log_likelihood"] / n,
        "weights": fit.params["weights"][order].tolist(),
        "locs": fit.params["locs"][order].tolist(),
        "precision_diag": fit.params["precision"][order].diagonal(dim1=-2, dim2=-1).tolist(),
    }


def fixed_start_seconds(data, params: dict) -> float:
    """Seconds per iteration (E-step and M-step) of ``EM(max_iter=3, tol=0)`` started at
    ``params`` (a callable init: no k-means), compiling left out."""
    from jointkl.inference import EM
    from jointkl.models import GaussianMixture

    start = {k: v.clone() for k, v in params.items()}
    fit = EM(progress=False, max_iter=3, tol=0, init=lambda *a, **k: start).fit(
        GaussianMixture(3), data
    )
    if "streamed" in fit.info:
        return fit.info["streamed"]["pass_seconds"] / fit.info["streamed"]["passes"]
    return (fit.info["seconds"] - fit.info["compile_seconds"]) / (fit.n_iter + 1)


def fit_phase(phase: str, path: str, subsample: int, seed: int, timing: bool) -> dict:
    import torch
    from jointkl.inference import EM
    from jointkl.inference.em.streaming import subsample_rows
    from jointkl.models import GaussianMixture

    torch.set_num_threads(1)
    x = np.load(path, mmap_mode="r")
    n = len(x)
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    if phase == "stream":
        data, rows = x, n
    elif phase == "subsample":
        data = subsample_rows(x, subsample, seed, torch.float64, "x")
        rows = len(data)
    else:  # in-memory: the whole file as one tensor
        data, rows = torch.from_numpy(np.array(x)), n
    t_read = time.perf_counter() - t0
    fit = EM(progress=False).fit(GaussianMixture(3), data)
    seconds = time.perf_counter() - t0
    out = {
        "case": phase,
        "n": rows,
        "file_bytes": os.path.getsize(path),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": base,
        "seconds": seconds,
        "read_seconds": t_read,
        **summary(fit, rows),
    }
    out["peak_rss_over_file"] = out["peak_rss_bytes"] / out["file_bytes"]
    if timing and phase != "subsample":
        out["fixed_start_seconds_per_iteration"] = fixed_start_seconds(data, fit.params)
    if phase == "stream" and "streamed" not in fit.info:
        # EM reads a row file that fits in jointkl.inference.em.streaming.IN_MEMORY_BYTES
        # whole (the in-memory path); say so rather than report a stream that did not happen
        out["streamed"] = False
    elif phase == "stream":
        s = fit.info["streamed"]
        out.update(
            streamed=True,
            block_rows=s["block_rows"],
            passes=s["passes"],
            seconds_per_pass=s["pass_seconds"] / s["passes"],
            compile_seconds=fit.info["compile_seconds"],
        )
    else:
        iters = fit.n_iter + 1  # E-steps: the initial one and one per iteration
        out["seconds_per_iteration"] = (seconds - t_read - fit.info["compile_seconds"]) / iters
        if phase == "subsample":
            # the per-point log-likelihood's standard error over a subsample of this size
            p = fit.params
            comps = torch.distributions.MultivariateNormal(
                p["locs"], precision_matrix=p["precision"]
            )
            lp = torch.logsumexp(p["weights"].log() + comps.log_prob(data.unsqueeze(-2)), -1)
            out["loglik_se_per_point"] = float(lp.std() / rows**0.5)
    return out


def compare(stream: dict, anchor: dict) -> dict:
    return {
        "case": "stream-vs-subsample",
        "n_stream": stream["n"],
        "n_subsample": anchor["n"],
        "loglik_per_point_diff": stream["loglik_per_point"] - anchor["loglik_per_point"],
        "loglik_se_per_point": anchor.get("loglik_se_per_point"),
        "max_abs_diff_weights": float(
            np.abs(np.subtract(stream["weights"], anchor["weights"])).max()
        ),
        "max_abs_diff_locs": float(np.abs(np.subtract(stream["locs"], anchor["locs"])).max()),
        "max_abs_diff_precision_diag": float(
            np.abs(np.subtract(stream["precision_diag"], anchor["precision_diag"])).max()
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000_000)
    ap.add_argument("--subsample", type=int, default=1_000_000)
    ap.add_argument("--memory-max", type=int, default=10_000_000)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the data file")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept data file of this N")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(fit_phase(a.phase, a.path, a.subsample, a.seed, a.n <= a.memory_max)))
        return
    path = os.path.join(a.dir, f"jointkl_em_stream_{a.n}.npy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        if a.reuse and os.path.exists(path) and os.path.getsize(path) == a.n * 32 + 128:
            print(json.dumps({"case": "write", "n": a.n, "reused": path}), flush=True)
        else:
            print(json.dumps(write(path, a.n, a.seed)), flush=True)
        phases = ["subsample", "stream"] + (["in-memory"] if a.n <= a.memory_max else [])
        res = {}
        for phase in phases:
            cmd = [
                sys.executable,
                __file__,
                "--phase",
                phase,
                "--path",
                path,
                "--n",
                str(a.n),
                "--memory-max",
                str(a.memory_max),
                "--subsample",
                str(a.subsample),
                "--seed",
                str(a.seed),
            ]
            line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            res[phase] = json.loads(line.stdout.strip().splitlines()[-1])
            print(json.dumps(res[phase]), flush=True)
        print(json.dumps(compare(res["stream"], res["subsample"])))
        if "in-memory" in res:
            m, s = res["in-memory"], res["stream"]
            print(
                json.dumps(
                    {
                        "case": "stream-vs-in-memory",
                        "n": s["n"],
                        "fit_seconds_ratio": s["seconds"] / m["seconds"],
                        "fixed_start_seconds_per_iteration_ratio": s[
                            "fixed_start_seconds_per_iteration"
                        ]
                        / m["fixed_start_seconds_per_iteration"],
                        "peak_rss_ratio": s["peak_rss_bytes"] / m["peak_rss_bytes"],
                        "loglik_per_point_diff": s["loglik_per_point"] - m["loglik_per_point"],
                        "max_abs_diff_locs": float(np.abs(np.subtract(s["locs"], m["locs"])).max()),
                    }
                )
            )
    finally:
        if not a.keep and os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    main()
