"""SVI overhead: one jointkl SVI step of the VAE against a hand-written PyTorch loop.

Both sides train the same networks (identical initial weights) on the binarised digits
(1,437 x 64) with mini-batches of B = 128, the N/B-scaled ELBO, and torch's Adam at the same
learning rate. The hand-written loop is what a PyTorch user would write:

    loc, scale = encoder(x_b); z = loc + scale·ε; logits = decoder(z)
    loss = N/B · Σ_b [BCE(logits, x_b) + KL_b]; zero_grad; backward; step

with KL_b in closed form for ``meanfield`` and the single-sample log q(z|x) − log p(z) for
``trace`` (the estimator Trace_ELBO uses). A third side is Pyro's own loop as its SVI
tutorial writes it (``pyro.infer.SVI`` + ``pyro.optim.Adam``, the batch scaled with
``poutine.scale``): what jointkl's engine adds or saves over plain Pyro. A fourth is the
hand-written loop with torch's fused Adam kernel (``Adam(fused=True)``), which the engine
uses: the ratio against it is the engine's overhead with the optimiser kernel held equal.

Per-step time is taken from consecutive step ends (the engine's ``on_step`` callback; the
same clock in the loops), the first ``warmup`` steps dropped; the sides alternate ``repeat``
times in one process and the median over all kept steps is reported, as wall time and as
this process's CPU time (``process_time``, the steadier figure on a machine shared with other
jobs). One JSON object per case on stdout.

    python scripts/bench/svi_overhead.py [--steps 200] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import time

import pyro
import pyro.optim
import torch
from jointkl.inference import SVI
from jointkl.models import VAE

from jointkl.data.digits import digits


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _batches(x: torch.Tensor, b: int, steps: int):
    """``steps`` mini-batches of ``b`` rows, epoch after epoch of a seeded permutation (the
    same order for every contender)."""
    gen = torch.Generator().manual_seed(1)
    perm, pos = None, 0
    for _ in range(steps):
        if perm is None or pos >= len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        yield x[perm[pos : pos + b]]
        pos += b


def _deltas(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[:-1], stamps[1:], strict=True)]


def svi_step_times(vae: VAE, x: torch.Tensor, loss: str, steps: int, lr: float) -> list:
    stamps: list[tuple[float, float]] = []
    engine = SVI(
        loss=loss,
        lr=lr,
        steps=steps,
        batch_size=128,
        seed=0,
        progress=False,
        on_step=lambda step, value: stamps.append(_clock()),
    )
    engine.fit(vae, x)
    return _deltas(stamps)


def pyro_step_times(vae: VAE, x: torch.Tensor, loss: str, steps: int, lr: float) -> list:
    """Pyro's own loop (the SVI tutorial's): pyro.infer.SVI, pyro.optim.Adam, poutine.scale."""
    pyro.clear_param_store()
    elbo = pyro.infer.TraceMeanField_ELBO() if loss == "meanfield" else pyro.infer.Trace_ELBO()
    n, b = x.shape[0], 128
    scale = pyro.poutine.scale(scale=n / b)
    svi = pyro.infer.SVI(scale(vae.model), scale(vae.guide), pyro.optim.Adam({"lr": lr}), elbo)
    stamps: list[tuple[float, float]] = []
    for xb in _batches(x, b, steps):
        svi.step(xb)
        stamps.append(_clock())
    return _deltas(stamps)


def hand_step_times(
    vae: VAE, x: torch.Tensor, loss: str, steps: int, lr: float, fused: bool = False
) -> list:
    enc, dec = vae.encoder, vae.decoder
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr, fused=fused)
    n, b = x.shape[0], 128
    stamps: list[tuple[float, float]] = []
    for xb in _batches(x, b, steps):
        loc, scale = enc(xb)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        logits = dec(z)
        rec = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, xb, reduction="none"
        ).sum(-1)
        if loss == "meanfield":
            kl = 0.5 * (loc.square() + scale.square() - 2 * scale.log() - 1).sum(-1)
        else:  # log q(z|x) − log p(z) at the sample: −½ε² − log σ + ½z²
            kl = (-0.5 * eps.square() - scale.log() + 0.5 * z.square()).sum(-1)
        total = (rec + kl).sum() * (n / len(xb))
        opt.zero_grad()
        total.backward()
        opt.step()
        float(total.detach())  # the engine reads the loss back every step too
        stamps.append(_clock())
    return _deltas(stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="trace,meanfield")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, _ = digits("train", binarize=True)
    torch.manual_seed(0)
    template = VAE(8, likelihood="bernoulli", input_dim=64)
    for loss in args.cases.split(","):
        sides = {
            "jointkl": svi_step_times,
            "pyro": pyro_step_times,
            "hand": hand_step_times,
            "hand_fused": functools.partial(hand_step_times, fused=True),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        for _ in range(args.repeat):
            for name, run in sides.items():
                # Fresh copies of the same initial weights for each side and repeat.
                times[name] += run(copy.deepcopy(template), x, loss, args.steps, 1e-3)[
                    args.warmup :
                ]
        wall = {k: statistics.median(t[0] for t in v) * 1e3 for k, v in times.items()}
        cpu = {k: statistics.median(t[1] for t in v) * 1e3 for k, v in times.items()}
        print(
            json.dumps(
                {
                    "case": f"vae-step-{loss}",
                    "batch_size": 128,
                    "network": "MLP 64-256-256-(8+8) / 8-256-256-64, Bernoulli",
                    "jointkl_svi_ms": round(wall["jointkl"], 3),
                    "pyro_svi_ms": round(wall["pyro"], 3),
                    "hand_pytorch_ms": round(wall["hand"], 3),
                    "hand_fused_adam_ms": round(wall["hand_fused"], 3),
                    "ratio": round(wall["jointkl"] / wall["hand"], 3),
                    "pyro_ratio": round(wall["pyro"] / wall["hand"], 3),
                    "jointkl_svi_cpu_ms": round(cpu["jointkl"], 3),
                    "pyro_svi_cpu_ms": round(cpu["pyro"], 3),
                    "hand_pytorch_cpu_ms": round(cpu["hand"], 3),
                    "hand_fused_adam_cpu_ms": round(cpu["hand_fused"], 3),
                    "cpu_time_ratio": round(cpu["jointkl"] / cpu["hand"], 3),
                    "cpu_time_ratio_vs_fused_adam": round(cpu["jointkl"] / cpu["hand_fused"], 3),
                    "pyro_cpu_time_ratio": round(cpu["pyro"] / cpu["hand"], 3),
                    "steps_timed": len(times["jointkl"]),
                    "threads": args.threads,
                    "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
