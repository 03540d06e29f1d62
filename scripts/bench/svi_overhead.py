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

Whole fits (``--cases vae-fit,regression-fit``) time everything a user waits for, set-up
included, on both sides, alternating ``--rounds`` times: for jointkl, ``SVI(...).fit(model,
data)`` with its defaults (progress bar on: its output goes to stderr), i.e. data checks,
tracing, guide creation, parameter init, the step loop with its history and checks, the
convergence test and the Fit; for the hand side, building the same networks or parameters,
the optimiser, the epoch-by-epoch batch order (the last partial batch kept, as the engine
does), the loop reading the loss every step, and the fitted parameters copied out. Both use
torch's Adam at the same lr (the engine: one fused-kernel Adam; the hand loop: torch's
default Adam). Reported: the median whole-fit time of each side, their ratio, and the median
of the per-round ratios.

* ``vae-fit``: ``SVI(steps, batch_size=128, lr=1e-3).fit(VAE(8, hidden=256), X)`` on the
  binarised digits, against the hand-written loop on ``VAE(8, hidden=256, input_dim=64)``'s
  networks (trace ELBO: the engine's default loss for the VAE).
* ``regression-fit``: Bayesian linear regression, w ~ N(0, I_D), b ~ N(0, 10²),
  y ~ N(Xw + b, 1), fitted by ``SVI(guide="normal", steps, batch_size, lr=1e-3)`` against
  the hand-written mean-field ELBO of the same guide (loc and softplus-positive scale per
  latent, initial scale 0.1, locations at the prior mean): z = loc + σ·ε,
  −ELBO = −N/B·Σ_b log N(y_b | x_b·w + b, 1) − log p(z) + log q(z).

    python scripts/bench/svi_overhead.py --cases vae-fit,regression-fit --rounds 5

The engine's default traces its pathwise ELBO step (``jit=None``, inference/traced_elbo.py);
``--eager-side`` adds a third side to the whole fits, the engine with ``jit=False``, for an
in-process A/B of the traced step against the eager one.

``--cases regression-model-handler`` times one call of the regression model under the
engine's handler against the same call with none (what a static replay that still runs the
model's code could save).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import statistics
import time

import pyro
import pyro.distributions as dist
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


def hand_vae_loss(
    enc, dec, xb: torch.Tensor, factor: float, meanfield: bool = False
) -> torch.Tensor:
    """The hand-written VAE's −ELBO of one batch, scaled by ``factor`` (N / B): Bernoulli
    reconstruction plus the KL term, analytic (``meanfield``) or at the sample, as
    log q(z|x) − log p(z) = −½ε² − log σ + ½z²."""
    loc, scale = enc(xb)
    eps = torch.randn_like(loc)
    z = loc + scale * eps
    rec = torch.nn.functional.binary_cross_entropy_with_logits(dec(z), xb, reduction="none").sum(-1)
    if meanfield:
        kl = 0.5 * (loc.square() + scale.square() - 2 * scale.log() - 1).sum(-1)
    else:
        kl = (-0.5 * eps.square() - scale.log() + 0.5 * z.square()).sum(-1)
    return (rec + kl).sum() * factor


def hand_step_times(
    vae: VAE, x: torch.Tensor, loss: str, steps: int, lr: float, fused: bool = False
) -> list:
    enc, dec = vae.encoder, vae.decoder
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr, fused=fused)
    n, b = x.shape[0], 128
    stamps: list[tuple[float, float]] = []
    for xb in _batches(x, b, steps):
        total = hand_vae_loss(enc, dec, xb, n / len(xb), meanfield=loss == "meanfield")
        opt.zero_grad()
        total.backward()
        opt.step()
        float(total.detach())  # the engine reads the loss back every step too
        stamps.append(_clock())
    return _deltas(stamps)


# ---------------------------------------------------------------------- whole fits
def _epoch_batches(n: int, b: int, steps: int, seed: int):
    """Row indices of ``steps`` mini-batches: a seeded permutation per epoch, the last
    partial batch of each epoch kept (the engine's BatchOrder with drop_last=False)."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + b]
        pos += b


def jointkl_vae_fit(x: torch.Tensor, steps: int, seed: int, jit: bool | None = None) -> dict:
    fit = SVI(steps=steps, batch_size=128, lr=1e-3, seed=seed, jit=jit).fit(VAE(8, hidden=256), x)
    return fit.params


def hand_vae_fit(x: torch.Tensor, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    vae = VAE(8, hidden=256, input_dim=x.shape[1])
    enc, dec = vae.encoder, vae.decoder
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    n, history = x.shape[0], []
    for idx in _epoch_batches(n, 128, steps, seed):
        xb = x[idx]
        total = hand_vae_loss(enc, dec, xb, n / len(xb))
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    return {
        k: v.detach().clone() for k, v in [*enc.state_dict().items(), *dec.state_dict().items()]
    }


def regression_data(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    return x, x @ w + 0.5 + torch.randn(n, generator=g)


def regression_model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w + b, 1.0), obs=y)


def jointkl_regression_fit(
    x, y, steps: int, batch: int | None, seed: int, jit: bool | None = None
) -> dict:
    fit = SVI(guide="normal", steps=steps, batch_size=batch, lr=1e-3, seed=seed, jit=jit).fit(
        regression_model, x, y
    )
    return fit.params


def hand_regression_fit(x, y, steps: int, batch: int | None, seed: int) -> dict:
    torch.manual_seed(seed)
    n, d = x.shape
    raw0 = math.log(math.expm1(0.1))  # softplus⁻¹(0.1): AutoNormal's initial scale
    loc = torch.zeros(d + 1, requires_grad=True)  # (w, b) at the prior mean
    raw = torch.full((d + 1,), raw0, requires_grad=True)
    prior = dist.Normal(torch.zeros(d + 1), torch.cat([torch.ones(d), torch.tensor([10.0])]))
    opt = torch.optim.Adam([loc, raw], lr=1e-3)
    history = []
    for idx in _epoch_batches(n, batch or n, steps, seed):
        xb, yb = (x[idx], y[idx]) if batch else (x, y)  # full batch: no gather (nor has SVI)
        scale = torch.nn.functional.softplus(raw)
        eps = torch.randn(d + 1)
        z = loc + scale * eps
        w, b = z[:d], z[d]
        log_lik = dist.Normal(xb @ w + b, 1.0).log_prob(yb).sum() * (n / len(idx))
        log_q = dist.Normal(loc, scale).log_prob(z).sum()
        loss = -(log_lik + prior.log_prob(z).sum() - log_q)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return {"loc": loc.detach().clone(), "scale": torch.nn.functional.softplus(raw).detach()}


def whole_fit_case(name: str, sides: dict, rounds: int, info: dict) -> None:
    """Alternate the sides ``rounds`` times (a warm-up round first, untimed: one-time
    imports and allocator growth belong to neither); print one JSON line."""
    for run in sides.values():
        run(0)
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            w0, c0 = _clock()
            sides[side](r + 1)
            w1, c1 = _clock()
            wall[side].append(w1 - w0)
            cpu[side].append(c1 - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    per_round = [a / b for a, b in zip(wall["jointkl"], wall["hand"], strict=True)]
    per_round_cpu = [a / b for a, b in zip(cpu["jointkl"], cpu["hand"], strict=True)]
    extra = {}
    for side in [k for k in sides if k not in ("jointkl", "hand")]:
        # another engine configuration (--eager-side: jit=False), against both
        rounds_vs = [a / b for a, b in zip(cpu["jointkl"], cpu[side], strict=True)]
        extra |= {
            f"{side}_fit_cpu_s": round(medc[side], 3),
            f"{side}_cpu_time_ratio": round(medc[side] / medc["hand"], 3),
            f"jointkl_vs_{side}_cpu": round(medc["jointkl"] / medc[side], 3),
            f"jointkl_vs_{side}_median_round_cpu": round(statistics.median(rounds_vs), 3),
        }
    print(
        json.dumps(
            {
                "case": name,
                **info,
                "jointkl_fit_s": round(med["jointkl"], 3),
                "hand_fit_s": round(med["hand"], 3),
                "ratio": round(med["jointkl"] / med["hand"], 3),
                "median_round_ratio": round(statistics.median(per_round), 3),
                "round_ratios": [round(v, 3) for v in per_round],
                "jointkl_fit_cpu_s": round(medc["jointkl"], 3),
                "hand_fit_cpu_s": round(medc["hand"], 3),
                "cpu_time_ratio": round(medc["jointkl"] / medc["hand"], 3),
                "median_round_cpu_ratio": round(statistics.median(per_round_cpu), 3),
                "round_cpu_ratios": [round(v, 3) for v in per_round_cpu],
                **extra,
                "rounds": rounds,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "pyro": pyro.__version__,
                "cpu": platform.processor() or platform.machine(),
            }
        ),
        flush=True,
    )


def step_parts(x: torch.Tensor, steps: int = 600, warmup: int = 50) -> None:
    """Where a VAE step's time goes (CPU ms per step, ``--cases vae-step-parts``): the
    engine's pathwise ELBO forward (model and guide under Pyro), backward, gradient check and
    fused Adam, against the hand loop's forward, backward and default Adam, on one batch."""
    from jointkl.inference.reparam_elbo import ReparamELBO

    from jointkl.optim.fused_pyro import FusedPyroOptim
    from jointkl.optim.gradients import grads_finite

    xb, factor = x[:128], x.shape[0] / 128
    vae = VAE(8, hidden=256, input_dim=x.shape[1])
    pyro.clear_param_store()
    elbo = ReparamELBO()
    elbo.data_scale = factor
    elbo.loss(vae.model, vae.guide, xb)
    opt = FusedPyroOptim(torch.optim.Adam, {"lr": 1e-3, "fused": True})
    ours = {"forward": 0.0, "backward": 0.0, "grad_check": 0.0, "optimiser": 0.0}
    for i in range(steps + warmup):
        t0 = time.process_time()
        value = elbo._negative_elbo(vae.model, vae.guide, (xb,), {})
        t1 = time.process_time()
        value.backward()
        float(value)
        t2 = time.process_time()
        grads_finite(elbo.last_params)
        t3 = time.process_time()
        opt(elbo.last_params)
        for p in elbo.last_params:
            p.grad = None
        t4 = time.process_time()
        if i >= warmup:
            for k, d in zip(ours, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                ours[k] += d
    enc, dec = vae.encoder, vae.decoder
    hopt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    hand = {"forward": 0.0, "backward": 0.0, "optimiser": 0.0}
    for i in range(steps + warmup):
        t0 = time.process_time()
        total = hand_vae_loss(enc, dec, xb, factor)
        t1 = time.process_time()
        hopt.zero_grad()
        total.backward()
        float(total)
        t2 = time.process_time()
        hopt.step()
        t3 = time.process_time()
        if i >= warmup:
            for k, d in zip(hand, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                hand[k] += d
    print(
        json.dumps(
            {
                "case": "vae-step-parts",
                "jointkl_cpu_ms": {k: round(v / steps * 1e3, 3) for k, v in ours.items()},
                "hand_cpu_ms": {k: round(v / steps * 1e3, 3) for k, v in hand.items()},
                "steps": steps,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def traced_parts(x: torch.Tensor, calls: int = 200, blocks: int = 3) -> None:
    """Forward and backward of one VAE step three ways (``--cases vae-traced-parts``, CPU
    ms, median of ``calls`` per block, ``blocks`` alternating blocks): the engine's traced
    graph (taken from a ``ReparamELBO(compiled=True)`` after five steps), its eager pathwise
    ELBO, and the hand-written loss, on one batch of 128 with the same networks."""
    from jointkl.inference.reparam_elbo import ReparamELBO
    from jointkl.inference.traced_elbo import _plain_interpreter

    xb = x[:128]
    torch.manual_seed(0)
    vae = VAE(8, hidden=256, input_dim=x.shape[1])
    pyro.clear_param_store()
    elbo = ReparamELBO(compiled=True)
    elbo.data_scale = x.shape[0] / 128
    for _ in range(5):
        elbo.loss_and_grads(vae.model, vae.guide, xb)
        for p in elbo.last_params:
            p.grad = None
    graph = next(g for g in elbo.traced.graphs.values() if g is not None)
    raw = pyro.get_param_store()._params
    params = [raw[n] for n in graph.names]
    enc, dec = vae.encoder, vae.decoder

    def hand() -> torch.Tensor:
        return hand_vae_loss(enc, dec, xb, x.shape[0] / 128)

    def traced() -> torch.Tensor:
        with _plain_interpreter():
            return graph.fn(*params, xb)

    def eager() -> torch.Tensor:
        return elbo._pathwise(vae.model, vae.guide, (xb,), {})

    parts: dict[str, list[tuple[float, float]]] = {}
    for _ in range(blocks):
        for name, fn in (("hand", hand), ("graph", traced), ("eager", eager)):
            fw, bw = [], []
            for _ in range(calls):
                t0 = time.process_time()
                loss = fn()
                t1 = time.process_time()
                loss.backward()
                t2 = time.process_time()
                for p in params:
                    p.grad = None
                fw.append(t1 - t0)
                bw.append(t2 - t1)
            parts.setdefault(name, []).append(
                (statistics.median(fw) * 1e3, statistics.median(bw) * 1e3)
            )
    out = {"case": "vae-traced-parts", "batch_size": 128, "calls": calls}
    for name, blocks_ in parts.items():
        out[f"{name}_forward_cpu_ms"] = [round(f, 3) for f, _ in blocks_]
        out[f"{name}_backward_cpu_ms"] = [round(b, 3) for _, b in blocks_]
    print(json.dumps({**out, "threads": torch.get_num_threads(), "torch": torch.__version__}))


def model_handler_cost(calls: int = 1000, repeat: int = 5) -> None:
    """What Pyro's handler machinery costs in one call of the regression model
    (``--cases regression-model-handler``, CPU ms per call, median of ``repeat`` blocks of
    ``calls``): the model under the engine's one handler (replaying fixed latents, as the
    pathwise ELBO runs it) against the same Python with no handler of the engine's (its
    latents then drawn from the prior), on one mini-batch of 128 rows. The difference bounds
    what a replay that still runs the model's own code could save per step."""
    from jointkl.inference.reparam_elbo import _SitePass

    rx, ry = regression_data(2000, 20)
    xb, yb = rx[:128], ry[:128]
    w = torch.zeros(rx.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    replay = {
        "w": {"value": w, "is_observed": False, "infer": {}},
        "b": {"value": b, "is_observed": False, "infer": {}},
    }

    def handled() -> None:
        with _SitePass(replay=replay):
            regression_model(xb, yb)

    def bare() -> None:
        regression_model(xb, yb)

    out = {}
    for name, call in (("under_engine_handler", handled), ("no_handler", bare)):
        for _ in range(200):  # warm-up
            call()
        blocks = []
        for _ in range(repeat):
            t0 = time.process_time()
            for _ in range(calls):
                call()
            blocks.append((time.process_time() - t0) / calls * 1e3)
        out[name] = round(statistics.median(blocks), 4)
    print(
        json.dumps(
            {
                "case": "regression-model-handler",
                "cpu_ms_per_call": out,
                "handler_ms": round(out["under_engine_handler"] - out["no_handler"], 4),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="trace,meanfield")
    ap.add_argument("--rounds", type=int, default=5, help="whole fits: alternating rounds")
    ap.add_argument("--fit-steps", type=int, default=1000, help="whole fits: steps per fit")
    ap.add_argument("--regression", default="2000,20,128", help="whole fits: N,D,batch (0: full)")
    ap.add_argument(
        "--eager-side",
        action="store_true",
        help="whole fits: a third side, the engine with jit=False (its traced step off)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, _ = digits("train", binarize=True)
    torch.manual_seed(0)
    template = VAE(8, likelihood="bernoulli", input_dim=64)
    fit_steps = args.fit_steps
    if "vae-step-parts" in args.cases.split(","):
        step_parts(x)
    if "regression-model-handler" in args.cases.split(","):
        model_handler_cost()
    if "vae-traced-parts" in args.cases.split(","):
        traced_parts(x)
    for case in [c for c in args.cases.split(",") if c.endswith("-fit")]:
        if case == "vae-fit":
            sides = {
                "jointkl": functools.partial(jointkl_vae_fit, x, fit_steps),
                "hand": functools.partial(hand_vae_fit, x, fit_steps),
            }
            if args.eager_side:
                sides["jointkl_eager"] = functools.partial(jointkl_vae_fit, x, fit_steps, jit=False)
            info = {"model": "VAE(8, hidden=256), digits 1437x64", "batch_size": 128}
        elif case == "regression-fit":
            n, d, b = (int(v) for v in args.regression.split(","))
            rx, ry = regression_data(n, d)
            batch = b or None
            sides = {
                "jointkl": functools.partial(jointkl_regression_fit, rx, ry, fit_steps, batch),
                "hand": functools.partial(hand_regression_fit, rx, ry, fit_steps, batch),
            }
            if args.eager_side:
                sides["jointkl_eager"] = functools.partial(
                    jointkl_regression_fit, rx, ry, fit_steps, batch, jit=False
                )
            info = {"model": f"Bayesian linear regression N={n} D={d}", "batch_size": batch}
        else:
            raise SystemExit(f"unknown case {case!r}")
        whole_fit_case(case, sides, args.rounds, {**info, "steps": fit_steps, "lr": 1e-3})
    for loss in [c for c in args.cases.split(",") if c in ("trace", "meanfield")]:
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
