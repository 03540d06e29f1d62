"""Optimisation as dynamics, seen: trajectories, the Euler stability limit, SGD's noise scale.

Writes to ``--out`` (default ``runs/dynamics/``):

- ``rosenbrock.png``: each jointkl.optim optimiser on the Rosenbrock valley, from (−1.2, 1).
- ``gmm.png``: the same on the negative log-likelihood of a two-component 1-D Gaussian
  mixture as a function of its two means (two symmetric minima and a ridge on μ₁ = μ₂).
- ``stability.png``: gradient descent (Euler on dθ/dt = −∇L) on a quadratic run at 0.95 and
  1.05 times the stability limit ε = 2/λ_max: the first settles, the second blows up.
- ``noise_scale.png``: mini-batch SGD near a minimum keeps a stationary spread whose variance
  is ε σ²/(B h (2 − εh)) ≈ (ε/B) σ²/(2h): only the ratio ε/B (the temperature) matters.
- ``summary.json``: the figures behind the plots; each is also printed as one JSON line.

    python scripts/dynamics.py [--out runs/dynamics] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from jointkl.optim import (  # noqa: E402
    AdaptiveFlow,
    GradientFlow,
    HeavyBall,
    Heun,
    Nesterov,
)
from jointkl.runs import atomic_write_text  # noqa: E402

Loss = Callable[[torch.Tensor], torch.Tensor]


def rosenbrock(theta: torch.Tensor) -> torch.Tensor:
    x, y = theta[..., 0], theta[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def gmm_nll(data: torch.Tensor) -> Loss:
    """Mean negative log-likelihood of ½N(μ₁, 1) + ½N(μ₂, 1) as a function of θ = (μ₁, μ₂)."""

    def loss(theta: torch.Tensor) -> torch.Tensor:
        means = theta.unsqueeze(-1).unsqueeze(-1)  # (..., 2, 1, 1) against data (N,)
        comp = torch.distributions.Normal(means, 1.0).log_prob(data).squeeze(-2)
        return -(torch.logsumexp(comp, dim=-2) - math.log(2.0)).mean(-1)

    return loss


def path(loss: Loss, make, start: tuple[float, float], steps: int) -> torch.Tensor:
    """The iterates θ_0, θ_1, ... of ``make([θ])`` on ``loss`` (Heun gets its closure)."""
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = make([theta])

    def closure():
        opt.zero_grad()
        value = loss(theta)
        value.backward()
        return value

    points = [theta.detach().clone()]
    for _ in range(steps):
        opt.step(closure)
        points.append(theta.detach().clone())
        if not torch.isfinite(theta).all():
            break
    return torch.stack(points)


def surface_plot(loss: Loss, runs: dict[str, torch.Tensor], box, title: str, file: Path):
    (x0, x1), (y0, y1) = box
    xs = torch.linspace(x0, x1, 300, dtype=torch.float64)
    ys = torch.linspace(y0, y1, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    with torch.no_grad():
        z = loss(torch.stack([gx, gy], -1))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    ax.contour(gx, gy, torch.log1p(z - z.min()), levels=30, cmap="Greys", linewidths=0.6)
    for label, pts in runs.items():
        ax.plot(pts[:, 0], pts[:, 1], ".-", ms=2, lw=1, label=label)
    ax.plot(*runs[next(iter(runs))][0], "ko")
    ax.set(xlim=(x0, x1), ylim=(y0, y1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def trajectories(out: Path, seed: int) -> list[dict]:
    records = []
    rosen = {
        "GradientFlow ε=1e-3": (lambda p: GradientFlow(p, step_size=1e-3), 4000),
        "HeavyBall ε=0.03 λ=3.3": (lambda p: HeavyBall(p, step_size=0.03, friction=10 / 3), 800),
        "Nesterov ε=0.03 λ=3.3": (lambda p: Nesterov(p, step_size=0.03, friction=10 / 3), 800),
        "Heun ε=1e-3": (lambda p: Heun(p, step_size=1e-3), 4000),
        "AdaptiveFlow ε=0.02": (lambda p: AdaptiveFlow(p, step_size=0.02), 800),
    }
    runs = {k: path(rosenbrock, make, (-1.2, 1.0), n) for k, (make, n) in rosen.items()}
    surface_plot(rosenbrock, runs, ((-1.6, 1.6), (-0.6, 1.8)), "Rosenbrock", out / "rosenbrock.png")
    for k, pts in runs.items():
        end = pts[-1]
        records.append(
            {"surface": "rosenbrock", "optimiser": k, "steps": len(pts) - 1,
             "end": end.tolist(), "loss": rosenbrock(end).item()}
        )  # fmt: skip

    g = torch.Generator().manual_seed(seed)
    data = torch.cat([torch.randn(200, generator=g) - 2, torch.randn(200, generator=g) + 2])
    data = data.double()
    nll = gmm_nll(data)
    gmm = {
        "GradientFlow ε=0.5": lambda p: GradientFlow(p, step_size=0.5),
        "HeavyBall ε=0.7 λ=1": lambda p: HeavyBall(p, step_size=0.7, friction=1.0),
        "Nesterov ε=0.7 λ=1": lambda p: Nesterov(p, step_size=0.7, friction=1.0),
        "Heun ε=0.5": lambda p: Heun(p, step_size=0.5),
        "AdaptiveFlow ε=0.05": lambda p: AdaptiveFlow(p, step_size=0.05),
    }
    runs = {k: path(nll, make, (0.4, 0.1), 150) for k, make in gmm.items()}
    surface_plot(nll, runs, ((-4, 4), (-4, 4)), "GMM negative log-likelihood (μ₁, μ₂)", out / "gmm.png")  # fmt: skip
    for k, pts in runs.items():
        records.append(
            {"surface": "gmm", "optimiser": k, "steps": len(pts) - 1,
             "end": pts[-1].tolist(), "loss": nll(pts[-1]).item()}
        )  # fmt: skip
    return records


def stability(out: Path) -> list[dict]:
    """Euler on L = ½ θᵀ diag(1, 10) θ: each mode is multiplied by 1 − ελ per step, so the
    stiff mode (λ_max = 10) decides: |1 − ελ_max| < 1 ⇔ ε < 2/λ_max = 0.2."""
    curv = torch.tensor([1.0, 10.0], dtype=torch.float64)
    limit = 2.0 / curv.max().item()

    def quad(theta):
        return 0.5 * (curv * theta**2).sum(-1)

    records, runs = [], {}
    for factor in (0.95, 1.05):
        eps = factor * limit
        runs[f"ε = {factor} · 2/λ_max"] = pts = path(
            quad, lambda p, e=eps: GradientFlow(p, step_size=e), (1.0, 1.0), 60
        )
        records.append(
            {"stability": f"{factor} x limit", "step_size": eps, "limit": limit,
             "final_norm": pts[-1].norm().item()}
        )  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, pts in runs.items():
        ax1.semilogy(pts.norm(dim=1), label=label)
        ax2.plot(pts[:25, 0], pts[:25, 1], ".-", label=label)
    ax1.set(xlabel="step", ylabel="|θ − θ*|", title="Euler just below and above ε = 2/λ_max")
    ax2.set(xlabel="θ₁ (λ = 1)", ylabel="θ₂ (λ = 10)", title="first 25 iterates")
    ax2.set_ylim(-4, 4)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    plt.close(fig)
    return records


def noise_scale(out: Path, seed: int) -> list[dict]:
    """Mini-batch SGD on least squares, many independent chains at once.

    Near w*, δ_{n+1} = (1 − εh) δ_n − ε ξ_n with ξ the mini-batch gradient noise, variance
    σ²/B (σ² the per-example gradient variance at w*, B drawn with replacement), so the
    stationary variance is ε σ² / (B h (2 − εh)): the Langevin temperature is ε/B.
    """
    g = torch.Generator().manual_seed(seed)
    n, chains, steps, burn = 2000, 200, 2000, 500
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = 1.5 * x + torch.randn(n, generator=g, dtype=torch.float64)
    h = (x**2).mean().item()  # L(w) = mean ½(y − w x)²  ⇒  L'' = mean x²
    w_star = ((x * y).sum() / (x**2).sum()).item()
    sigma2 = (x * (y - w_star * x)).pow(2).mean().item()  # per-example gradient variance

    records = []
    for eps in (0.02, 0.08):
        for batch in (2, 8, 32):
            w = torch.full((chains,), w_star, dtype=torch.float64, requires_grad=True)
            opt = GradientFlow([w], step_size=eps)
            draws = []
            for step in range(steps):
                idx = torch.randint(n, (chains, batch), generator=g)
                opt.zero_grad()
                # Σ over chains of each chain's own mini-batch loss: independent gradients.
                (0.5 * (y[idx] - w.unsqueeze(1) * x[idx]).pow(2).mean(1)).sum().backward()
                opt.step()
                if step >= burn:
                    draws.append(w.detach().clone())
            var = torch.stack(draws).var().item()
            predicted = eps * sigma2 / (batch * h * (2 - eps * h))
            records.append(
                {"noise_scale": eps / batch, "step_size": eps, "batch_size": batch,
                 "variance": var, "predicted": predicted}
            )  # fmt: skip

    fig, ax = plt.subplots(figsize=(6, 5))
    for eps in sorted({r["step_size"] for r in records}):
        rs = [r for r in records if r["step_size"] == eps]
        ax.loglog(
            [r["noise_scale"] for r in rs], [r["variance"] for r in rs], "o", label=f"ε={eps}"
        )
    ratio = torch.logspace(-4, -1, 20)
    ax.loglog(ratio, ratio * sigma2 / (2 * h), "k--", lw=1, label="σ²/(2h) · ε/B")
    ax.set(xlabel="noise scale ε/B", ylabel="stationary Var(w)",
           title="SGD's spread depends on ε/B only")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "noise_scale.png", dpi=120)
    plt.close(fig)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/dynamics"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    records = trajectories(args.out, args.seed) + stability(args.out)
    records += noise_scale(args.out, args.seed)
    for r in records:
        print(json.dumps(r))
    atomic_write_text(json.dumps(records, indent=1), args.out / "summary.json")


if __name__ == "__main__":
    main()
