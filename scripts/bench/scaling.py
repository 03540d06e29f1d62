"""Data-parallel scaling: throughput of SVI and NCE at 1 and 2 processes, where a step's time
goes (compute vs all-reduce), and a cost model that extrapolates to P = 8 … 64 ranks.

Each P runs as one torchrun launch (gloo on the CPU; ``OMP_NUM_THREADS=1`` per rank) of this
file in worker mode, which fits every case with the engines' defaults for the zoo model
(``engine_defaults``: the batch size a user gets) on the model's default data, each rank
taking its shard of the rows (:mod:`jointkl.distributed`):

* ``svi-vae``: ``SVI`` on ``VAE()`` over the binarised digits (1,437 × 64);
* ``nce-energy``: ``NCE`` on ``EnergyModel()`` over its default 5,000-point ring;
* ``em-gmm``: ``EM`` on ``GaussianMixture(n_components=4)`` over 400,000 four-dimensional
  points (four Gaussian blobs); ``tol=0`` so both launches run the same iterations. The
  iteration time is (t(1 + 10 iterations) − t(1 iteration)) over the iterations between
  them, after a first warm-up fit, which cancels the
  initialisation; its all-reduce is the E-step statistics (a few hundred bytes).

Per-step time is taken from consecutive ``on_step`` calls (the first ``--warmup`` dropped,
the median kept); the all-reduce time is the time spent inside the one ``all_reduce`` of each
step (:func:`jointkl.distributed.comm_seconds`), which includes waiting for the slower rank;
compute is the rest. Throughput is global-batch rows per second, B / t_step; parallel
efficiency E(P) = throughput(P) / (P · throughput(1)).

The 2-process worker also times ``all_reduce`` of float64 buffers from 8 B to 4 MiB and fits
the ring all-reduce model t(P, m) = 2(P − 1)·α + 2(P − 1)/P · m/β (at P = 2: 2α + m/β) by
least squares, giving the latency α and bandwidth β of this machine's loopback gloo. The
step-time model is then

    t_step(P) = t_compute(1)/P + 2(P − 1)/P · m/β + 2(P − 1)·α

with m the bytes each step reduces (the parameter count × 4 for float32 parameters, × 8
otherwise, plus a flag pair per parameter tensor, the stop flag and the loss); for EM, the
E-step statistics (per component: weight, Σx, Σxxᵀ; float64). It assumes the global batch is fixed (strong
scaling), compute divides evenly over the ranks (no per-step fixed costs that do not shrink
with the batch part: an overestimate of the speed-up where such costs dominate), one rank per
core, and a ring all-reduce; it is evaluated with the measured α, β and, as a stated
assumption (not a measurement), with α = 20 µs and β = 1.25 GB/s (10 Gb Ethernet between
hosts).

    python scripts/bench/scaling.py [--steps 60] [--warmup 10] [--cases svi-vae,nce-energy,em-gmm]

Prints one JSON object per case and P, one per all-reduce fit, and one per model row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

CASES = ("svi-vae", "nce-energy")
EM_ROWS, EM_ITERS = 400_000, 10
ASSUMED = {"alpha_s": 20e-6, "beta_Bps": 1.25e9, "source": "assumed: 10 Gb Ethernet"}


def _case(name: str, steps: int):
    """(model, engine, data args) for a case, at the zoo model's engine defaults."""
    from jointkl.inference import NCE, SVI
    from jointkl.models import VAE, EnergyModel

    from jointkl.zoo import hook

    model = VAE() if name == "svi-vae" else EnergyModel()
    engine_name, cls = ("svi", SVI) if name == "svi-vae" else ("nce", NCE)
    settings = dict(hook(type(model), "engine_defaults").get(engine_name, {}))
    settings.update(steps=steps, progress=False)
    args, _ = model.default_data(seed=0)
    return model, cls, settings, args


def worker(steps: int, warmup: int, cases: list[str]) -> None:
    """One rank of one launch: every case, then (P > 1) the all-reduce sweep."""
    from jointkl import distributed

    distributed.initialise()
    p, main = distributed.world_size(), distributed.is_main()
    out = []
    for name in [c for c in CASES if c in cases]:
        model, cls, settings, args = _case(name, steps)
        n = len(args[0])
        shard, _ = distributed.local_shard(args, {}, n)
        ends, comm = [], []

        def on_step(i: int, loss: float, ends=ends, comm=comm) -> None:
            ends.append(time.perf_counter())
            comm.append(distributed.comm_seconds()[0])

        distributed.comm_seconds(reset=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = cls(**settings, on_step=on_step).fit(model, *shard)
        step_t = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1 :], strict=False)]
        comm_t = [b - a for a, b in zip(comm[warmup:], comm[warmup + 1 :], strict=False)]
        t_step = statistics.median(step_t)
        t_comm = statistics.median(comm_t) if p > 1 else 0.0
        batch = settings.get("batch_size") or n
        numel = sum(int(v.numel()) for k, v in fit.state.items() if k.startswith("param:"))
        tensors = sum(1 for k in fit.state if k.startswith("param:"))
        f32 = all(v.dtype == torch.float32 for k, v in fit.state.items() if k.startswith("param:"))
        wire = 4 if f32 else 8
        out.append(
            {
                "case": name,
                "processes": p,
                "rows": n,
                "batch_size": batch,
                "steps_timed": len(step_t),
                "step_s": t_step,
                "allreduce_s": t_comm,
                "compute_s": t_step - t_comm,
                "rows_per_s": batch / t_step,
                "params": numel,
                # the step's buffer: float32 when every parameter is (else float64)
                "allreduce_bytes": wire * (numel + 2 * tensors + 3),
            }
        )
    if "em-gmm" in cases:
        out.append(_em_case(p))
    if p > 1:
        sizes = [8 * 4**k for k in range(10)]  # 8 B … 2 MiB
        for m in sizes:
            buf = torch.zeros(m // 8, dtype=torch.float64)
            reps = 30 if m < 1 << 16 else 10
            for _ in range(3):
                distributed.all_reduce_sum(buf)
            distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                distributed.all_reduce_sum(buf)
            out.append(
                {"allreduce_bytes": m, "processes": p, "seconds": (time.perf_counter() - t0) / reps}
            )
    if main:
        print("RESULT " + json.dumps(out), flush=True)


def em_data(n: int = EM_ROWS, seed: int = 0) -> torch.Tensor:
    """n four-dimensional points from four well-separated Gaussian blobs (float64)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-4.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, -4.0, 0, 0]])
    which = torch.randint(0, 4, (n,), generator=g)
    return (centres[which] + torch.randn(n, 4, generator=g)).double()


def _em_case(p: int) -> dict:
    """``em-gmm``: EM (defaults, but ``tol=0`` so every launch runs the same iterations) on
    ``GaussianMixture(n_components=4)`` over :func:`em_data`. Every rank is handed the
    whole data and takes its own rows (EM picks its own rows). The time of one iteration
    (E-step over the rows, one all-reduce of the statistics, M-step) is the difference of
    a 1 + ``EM_ITERS``-iteration fit and a 1-iteration fit over ``EM_ITERS``: what the
    initialisation costs cancels."""
    from jointkl.inference import EM
    from jointkl.models import GaussianMixture

    from jointkl import distributed

    x = em_data()
    # EM's statistics go through torch.distributed.all_reduce directly (not
    # jointkl.distributed's timed one): time that call here, for this case only
    comm = {"s": 0.0}
    plain = torch.distributed.all_reduce

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return plain(*a, **kw)
        finally:
            comm["s"] += time.perf_counter() - t

    runs = {}
    torch.distributed.all_reduce = timed
    try:
        # a first 1-iteration fit warms up (first-call costs), then the two timed fits
        for key, iters in (("warm", 1), (1, 1), (1 + EM_ITERS, 1 + EM_ITERS)):
            distributed.barrier()
            comm["s"] = 0.0
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                em = EM(max_iter=iters, tol=0.0, progress=False)
                fit = em.fit(GaussianMixture(n_components=4), x)
            runs[key] = (time.perf_counter() - t0, comm["s"], fit.n_iter)
    finally:
        torch.distributed.all_reduce = plain
    (t1, c1, n1), (tk, ck, n_iter) = runs[1], runs[1 + EM_ITERS]
    t_iter, t_comm = (tk - t1) / (n_iter - n1), (ck - c1) / (n_iter - n1)
    k, d = 4, 4
    stats = k * (1 + d + d * d) + 1  # per component: weight, Σ x, Σ x xᵀ; the log-likelihood
    return {
        "case": "em-gmm",
        "processes": p,
        "rows": len(x),
        "batch_size": len(x),  # a full pass per iteration
        "iterations_timed": n_iter - n1,
        "step_s": t_iter,
        "allreduce_s": t_comm if p > 1 else 0.0,
        "compute_s": t_iter - (t_comm if p > 1 else 0.0),
        "rows_per_s": len(x) / t_iter,
        "params": k * (1 + d + d * (d + 1) // 2),
        "allreduce_bytes": 8 * stats,
    }


def _launch(p: int, steps: int, warmup: int, cases: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    cmd += [f"--nproc-per-node={p}", __file__, "--worker", f"--steps={steps}"]
    cmd += [f"--warmup={warmup}", f"--cases={','.join(cases)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"the {p}-process launch failed:\n{done.stderr[-3000:]}")


def _fit_alpha_beta(rows: list[dict]) -> tuple[float, float]:
    """Least squares of t = 2α + m/β over the 2-process sweep (ring all-reduce at P = 2)."""
    m = torch.tensor([r["allreduce_bytes"] for r in rows], dtype=torch.float64)
    t = torch.tensor([r["seconds"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.full_like(m, 2.0), m], 1)
    coef = torch.linalg.lstsq(design, t.unsqueeze(1)).solution.squeeze(1)
    alpha, inv_beta = float(coef[0]), float(coef[1])
    return max(alpha, 0.0), (1.0 / inv_beta if inv_beta > 0 else float("inf"))


def model_step(t_compute_1: float, m: int, p: int, alpha: float, beta: float) -> float:
    """t_step(P) = t_compute(1)/P + 2(P − 1)/P · m/β + 2(P − 1)·α (ring all-reduce)."""
    return t_compute_1 / p + 2 * (p - 1) / p * m / beta + 2 * (p - 1) * alpha


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cases", default=",".join((*CASES, "em-gmm")))
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    cases = a.cases.split(",")
    if a.worker:
        worker(a.steps, a.warmup, cases)
        return
    machine = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "shared with other jobs",
        "torch": torch.__version__,
        "threads_per_rank": 1,
    }
    runs = {p: _launch(p, a.steps, a.warmup, cases) for p in (1, 2)}
    sweep = [r for r in runs[2] if "seconds" in r]
    for r in sweep:
        print(json.dumps({"kind": "allreduce", **r, **machine}))
    alpha, beta = _fit_alpha_beta(sweep)
    print(json.dumps({"kind": "allreduce-fit", "alpha_s": alpha, "beta_Bps": beta, **machine}))
    for name in cases:
        one = next(r for r in runs[1] if r.get("case") == name)
        two = next(r for r in runs[2] if r.get("case") == name)
        eff = two["rows_per_s"] / (2 * one["rows_per_s"])
        for r in (one, two):
            print(json.dumps({"kind": "measured", **r, **machine}))
        print(
            json.dumps(
                {
                    "kind": "efficiency",
                    "case": name,
                    "speedup_2": two["rows_per_s"] / one["rows_per_s"],
                    "efficiency_2": eff,
                    "allreduce_share_2": two["allreduce_s"] / two["step_s"],
                }
            )
        )
        m = two["allreduce_bytes"]
        for label, al, be in (
            ("measured loopback", alpha, beta),
            (ASSUMED["source"], ASSUMED["alpha_s"], ASSUMED["beta_Bps"]),
        ):
            for p in (1, 2, 8, 16, 32, 64):
                t = model_step(one["compute_s"], m, p, al, be)
                print(
                    json.dumps(
                        {
                            "kind": "model",
                            "case": name,
                            "constants": label,
                            "processes": p,
                            "step_s": t,
                            "rows_per_s": one["batch_size"] / t,
                            "efficiency": one["compute_s"] / (p * t),
                        }
                    )
                )


if __name__ == "__main__":
    main()
