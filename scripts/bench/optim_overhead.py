"""Step time of each jointkl.optim optimiser against the matching torch.optim (foreach=True).

The model is an MLP with about 1M parameters; its gradients are filled once with random
values, and only ``optimizer.step()`` is timed (the part the two implementations do
differently). The two optimisers of a case are timed in alternating rounds in the same
process, so a busy machine slows both alike; each figure is the median over rounds of the
mean step time within a round.

Prints one JSON object per case: {"case", "ours_ms", "torch_ms", "ratio", ...}.

    python scripts/bench/optim_overhead.py [--rounds 15] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jointkl.optim import AdaptiveFlow, GradientFlow, HeavyBall, Nesterov, heavyball_settings


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 784·640 + 640·640 + 640·256 + 256·10 weights plus biases: 1,079,306 parameters.
    return torch.nn.Sequential(
        torch.nn.Linear(784, 640),
        torch.nn.Tanh(),
        torch.nn.Linear(640, 640),
        torch.nn.Tanh(),
        torch.nn.Linear(640, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )


CASES = {
    "gradientflow vs SGD": (
        lambda p: GradientFlow(p, step_size=1e-3),
        lambda p: torch.optim.SGD(p, lr=1e-3, foreach=True),
    ),
    "heavyball vs SGD(momentum)": (
        lambda p: HeavyBall(p, **heavyball_settings(1e-3, 0.9)),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=True),
    ),
    "nesterov vs SGD(nesterov)": (
        lambda p: Nesterov(p, **heavyball_settings(1e-3, 0.9)),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, nesterov=True, foreach=True),
    ),
    "adaptiveflow(momentum=0) vs RMSprop": (
        lambda p: AdaptiveFlow(p, step_size=1e-3, smoothing=0.99, momentum=0.0, debias=False),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.99, foreach=True),
    ),
    "adaptiveflow vs Adam": (
        lambda p: AdaptiveFlow(p, step_size=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    ),
}


def prepared(make, seed: int) -> torch.optim.Optimizer:
    net = model(seed)
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = make(list(net.parameters()))
    opt.step()  # state (velocities, averages) allocated outside the timing
    return opt


def mean_step_ms(opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps per timing round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_params = sum(p.numel() for p in model(0).parameters())
    for case, (ours_make, torch_make) in CASES.items():
        ours, ref = prepared(ours_make, 0), prepared(torch_make, 0)
        ours_t, ref_t = [], []
        for _ in range(args.rounds):
            ours_t.append(mean_step_ms(ours, args.steps))
            ref_t.append(mean_step_ms(ref, args.steps))
        o, r = statistics.median(ours_t), statistics.median(ref_t)
        record = {
            "case": case,
            "params": n_params,
            "ours_ms": round(o, 4),
            "torch_ms": round(r, 4),
            "ratio": round(o / r, 3),
            "device": "cpu",
            "threads": args.threads,
            "torch": torch.__version__,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
