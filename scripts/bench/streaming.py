"""Streaming from a memory-mapped file: what reading each mini-batch from disk costs SVI.

One process, one data set (N rows × 16 float32, random, written once to a temporary
``.npy``), two sides alternating ``--repeat`` times:

* ``memory``: ``SVI(batch_size=B, steps=S).fit(model, x)`` with ``x`` a tensor, for the
  default ``GaussianMixture(3)`` and (a tuned row, labelled) ``GaussianMixture(3,
  priors=None, covariance="diag")``, a cheap step, so the reads' share shows;
* ``streamed``: the same fit on ``open_rows(path)`` (each step's rows gathered from the file
  with ``pread`` and made a tensor).

Per-step time from consecutive step ends (the engine's ``on_step``), the first 10 steps
dropped; the median over all kept steps of each side, and their ratio (streamed / memory).
A third case times the gather alone: ``x[idx]`` for B random rows, rows per second. The file
is in the page cache (it was just written), so this is the cost of the reads, not of a disk.
One JSON object per case on stdout.

    python scripts/bench/streaming.py [--rows 1000000] [--batch 1024] [--steps 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from jointkl.inference import SVI
from jointkl.models import GaussianMixture

from jointkl.data.arrays import open_rows

MODELS = {
    # what a user gets: the zoo mixture at its defaults (full covariances, its priors)
    "default GaussianMixture(3)": lambda: GaussianMixture(3),
    # tuned: a cheap step, so the reads' share of it shows
    "tuned GaussianMixture(3, priors=None, covariance='diag')": lambda: GaussianMixture(
        3, priors=None, covariance="diag"
    ),
}


def step_times(data, batch: int, steps: int, model=MODELS["default GaussianMixture(3)"]):
    """Seconds between consecutive step ends of one SVI fit of ``model()``, the first 10
    dropped."""
    ends: list[float] = []
    SVI(
        steps=steps,
        batch_size=batch,
        progress=False,
        on_step=lambda i, v: ends.append(time.perf_counter()),
    ).fit(model(), data)
    return list(np.diff(ends)[10:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        rng = np.random.default_rng(0)
        x = rng.standard_normal((a.rows, 16), dtype=np.float32)
        x[: a.rows // 2] += 3.0
        np.save(path, x)
        tensor, rows = torch.from_numpy(x), open_rows(path)
        common = {"rows": a.rows, "dim": 16, "batch": a.batch, "threads": a.threads}
        for name, model in MODELS.items():
            sides: dict[str, list[float]] = {"memory": [], "streamed": []}
            for _ in range(a.repeat):
                sides["memory"] += step_times(tensor, a.batch, a.steps, model)
                sides["streamed"] += step_times(rows, a.batch, a.steps, model)
            med = {k: statistics.median(v) for k, v in sides.items()}
            print(
                json.dumps(
                    {
                        "case": "svi-gmm-step",
                        "model": name,
                        **common,
                        "memory_ms": round(1e3 * med["memory"], 3),
                        "streamed_ms": round(1e3 * med["streamed"], 3),
                        "ratio": round(med["streamed"] / med["memory"], 3),
                        "file_mib": round(path.stat().st_size / 2**20, 1),
                    }
                ),
                flush=True,
            )
        gathers = []
        for _ in range(200):
            idx = rng.integers(0, a.rows, a.batch)
            t0 = time.perf_counter()
            rows[idx]
            gathers.append(time.perf_counter() - t0)
        g = statistics.median(gathers)
        print(
            json.dumps(
                {
                    "case": "gather",
                    **common,
                    "gather_ms": round(1e3 * g, 3),
                    "rows_per_s": round(a.batch / g),
                }
            )
        )


if __name__ == "__main__":
    main()
