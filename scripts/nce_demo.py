"""NCE end to end: 2-D energy densities, then a word|context model against the full softmax.

1. ``EnergyModel("mlp")`` fitted by binary NCE (Gaussian noise from the data's moments,
   ν = 10) to the ring, two moons and eight-Gaussian mixture; the fitted densities
   e^{−E(x) − log Z} are drawn side by side (``energy.png``), with the learned log Z, the
   grid's Riemann estimate of log Z, and the held-out log-likelihood per point.
2. The bigram language model p(word | previous word) over People's Daily, V = 10,000 by
   default: full softmax against binary and ranking NCE for the same wall-clock budget,
   scored by held-out full-softmax perplexity (the benchmark ``scripts/bench/nce.py`` at a
   smaller size; run that for V = 50,000).

    python scripts/nce_demo.py [--out runs/nce-demo] [--steps 1500] [--vocab 10000]
        [--budget 30] [--skip-words]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import matplotlib
import torch
from jointkl.inference import NCE
from jointkl.models import EnergyModel
from jointkl.models.energy import energy_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def energy_part(out: Path, steps: int, seed: int) -> list[dict]:
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    rows = []
    for ax, kind in zip(axes, ("ring", "moons", "mixture"), strict=True):
        x = energy_data(kind, 5000, seed)
        model = EnergyModel("mlp", dim=2, hidden=64)
        engine = NCE(nu=10, lr=0.01, steps=steps, batch_size=500, seed=seed, progress=False)
        t0 = time.perf_counter()
        fit = engine.fit(model, x)
        seconds = time.perf_counter() - t0
        held = energy_data(kind, 5000, seed + 1)
        with torch.no_grad():
            ll = float((-model.energy_of(held) - fit.params["log_Z"]).mean())
        model.plot_density(fit, ax=ax, bounds=(-3.5, 3.5, -3.5, 3.5))
        ax.set_xlabel(kind)
        _, _, _, grid_log_z = model.log_density_grid(fit, (-5, 5, -5, 5), grid=300)
        row = {
            "part": "energy",
            "data": kind,
            "steps": fit.n_iter,
            "seconds": round(seconds, 1),
            "learned_log_Z": round(float(fit.params["log_Z"]), 4),
            "grid_log_Z": round(grid_log_z, 4),
            "held_out_log_lik_per_point": round(ll, 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    fig.tight_layout()
    fig.savefig(out / "energy.png", dpi=110)
    plt.close(fig)
    return rows


def words_part(vocab: int, budget: float, seed: int) -> None:
    path = Path(__file__).parent / "bench" / "nce.py"
    spec = importlib.util.spec_from_file_location("nce_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            f"--vocab={vocab}",
            f"--budget={budget}",
            "--timing-steps=15",
            "--held-out=10000",
            f"--seed={seed}",
            "--cases=softmax,binary:20,ranking:20",
            "--quality-cases=softmax,binary:20,ranking:20",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/nce-demo")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-words", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    energy_part(out, a.steps, a.seed)
    print(f"density plot: {out / 'energy.png'}", flush=True)
    if not a.skip_words:
        words_part(a.vocab, a.budget, a.seed)


if __name__ == "__main__":
    main()
