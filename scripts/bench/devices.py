"""Benchmark: the same fit on each device, side by side with the default (no ``device``).

Each case fits one engine with its defaults except the length of the loop, on synthetic data
that was not tuned on: EM and SVI fit a 3-component ``GaussianMixture`` to N four-dimensional
points, NCE an ``EnergyModel`` (the MLP energy) to N two-dimensional points. Every case runs
with ``device=None`` (the anchor: the data's device, the CPU), ``device="cpu"`` and, where
``torch.cuda.is_available()``, ``device="cuda"``; the runs are interleaved ``--repeat`` times
and the median wall-clock time is reported with the ratio anchor / device (> 1: faster than
the anchor). One JSON object per case and device on stdout; a device that is not available is
one object with ``"skipped"``.

    python scripts/bench/devices.py                  # N = 20000, 1 thread, 3 repeats
    python scripts/bench/devices.py --n 200000 --threads 0 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from jointkl.inference import EM, NCE, SVI
from jointkl.models import EnergyModel, GaussianMixture


def _mixture(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0, 0, 0], [0, 3.0, 0, 0], [3.0, 0, 1.0, 0]])
    k = torch.randint(3, (n,), generator=g)
    return centres[k] + torch.randn(n, 4, generator=g)


def _rings(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = 2 * torch.pi * torch.rand(n, generator=g)
    r = 2.0 + 0.2 * torch.randn(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], -1)


CASES = {
    "em": lambda n: (
        lambda **d: EM(max_iter=50, progress=False, **d),
        lambda: GaussianMixture(n_components=3),
        _mixture(n, 0),
    ),
    "svi": lambda n: (
        lambda **d: SVI(steps=300, batch_size=1024, progress=False, **d),
        lambda: GaussianMixture(n_components=3),
        _mixture(n, 0).float(),
    ),
    "nce": lambda n: (
        lambda **d: NCE(steps=300, batch_size=1024, progress=False, **d),
        lambda: EnergyModel(dim=2),
        _rings(n, 0),
    ),
}


def _time(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_case(name: str, n: int, repeat: int) -> list[dict]:
    engine, pair, x = CASES[name](n)
    devices: list[str | None] = [None, "cpu"]
    rows = []
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        rows.append({"case": name, "n": n, "device": "cuda", "skipped": "no CUDA device"})
    times: dict[str | None, list[float]] = {d: [] for d in devices}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in devices:  # warm-up: imports, CUDA context, kernels
            engine(**({} if d is None else {"device": d})).fit(pair(), x)
        for _ in range(repeat):
            for d in devices:
                e = engine(**({} if d is None else {"device": d}))
                times[d].append(_time(lambda e=e: e.fit(pair(), x)))
    anchor = statistics.median(times[None])
    for d in devices:
        med = statistics.median(times[d])
        rows.append(
            {
                "case": name,
                "n": n,
                "device": "default (None)" if d is None else d,
                "seconds": round(med, 4),
                "anchor_seconds": round(anchor, 4),
                "speedup_vs_anchor": round(anchor / med, 3),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="data points (default 20000)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per device (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in args.case or sorted(CASES):
        for row in run_case(name, args.n, args.repeat):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
