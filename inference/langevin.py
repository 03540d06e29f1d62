"""Stochastic-gradient Langevin dynamics: posterior draws from gradient steps plus noise.

Gradient descent integrates dθ/dt = −∇U; adding white noise of the right size,

    dθ = −P ∇U(θ) dt + √(2P) dW,        U(θ) = −log p(x, θ)   (unconstrained θ),

gives the Langevin equation, whose stationary density is exp(−U) ∝ p(θ | x) for any constant
positive-definite preconditioner P (SEEDS.md §7). With U's gradient estimated on a mini-batch
(the likelihood scaled by N/B) this is SGLD (Welling & Teh 2011). The time step is discretised
with the Leimkuhler–Matthews scheme

    θ_{n+1} = θ_n − ε P ∇Û(θ_n) + √(εP/2) (ξ_n + ξ_{n+1}),     ξ ~ N(0, I) i.i.d.,

Euler–Maruyama with the noise of consecutive steps averaged. It costs one gradient per step,
as Euler does, but its stationary law is exact for Gaussian targets at any stable step
(εκ_max < 2, κ the eigenvalues of P∇²U), and its bias is O(ε²) in general, where Euler's is
O(ε): without a Metropolis test (impossible with mini-batch gradients), this is what keeps the
draws honest at a useful step size. Mini-batch noise (variance V per coordinate) inflates each
posterior variance by a relative εPV/(2 − εκ), which the step-size choice keeps small; since
PV ≈ N/B for a well-specified model, a small batch forces a small step (Nagapetyan et al.
2017): mini-batches pay off only when a full gradient is much dearer than the model's
per-call overhead.

Tuning (``step_size=None``), all within ``warmup``:

1. two fifths of it: :class:`~jointkl.optim.AdaptiveFlow` (Adam, step 0.1 decaying to 0.01)
   on U from dispersed starts, to reach the bulk of the posterior;
2. P = 1/diag ∇²U (the Jacobi preconditioner: exact diagonal by Hessian-vector products for
   up to 16 coordinates, Hutchinson's estimator beyond), averaged over the chains, and
   ε = 1/(1.1 κ_max) (power iteration on P^½ ∇²U P^½), capped so that mini-batch gradient
   noise inflates no variance by more than ``noise_tolerance`` (5 %): ε ≤ 0.05 / max_i(P_i V_i)
   (median over the chains);
3. two fifths: Langevin steps, after which P and ε are chosen again as in 2, now from inside
   the bulk of the posterior;
4. the last fifth: Langevin steps at the final settings, discarded.

With ``step_size`` given there is no tuning: P = I (plain SGLD in unconstrained space) and
the warmup steps are taken at that step and discarded.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from jointkl.engine import Engine, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.minibatch import (
    ScaleDataPlate,
    check_finite_data,
    slice_arguments,
    sliceable_arguments,
)
from jointkl.optim import AdaptiveFlow
from jointkl.pair import as_pair
from jointkl.sites import DATA_PLATE, trace_model

__all__ = ["Langevin", "LogJoint"]

SCHEDULES = ("constant", "polynomial")
MIN_TUNED_WARMUP = 20


class LogJoint:
    """U(θ) = −log p(x, T(θ)) − log|det ∂T/∂θ| for a Pyro model's continuous latent sites,
    as a function of one flat unconstrained vector θ (T: Pyro's ``biject_to`` per support).

    With ``batch_size`` set, :meth:`potential` runs the model on the rows ``idx`` of every
    per-datum argument and scales the ``"data"`` plate by N/B, an unbiased estimate of U.
    """

    def __init__(self, model, args: tuple, kwargs: dict, batch_size: int | None = None):
        self.model, self.args, self.kwargs = model, args, kwargs
        tr = trace_model(model, args, kwargs)
        self.names: list[str] = []
        self.transforms, self.shapes, self.slices = {}, {}, {}
        self.data_size: int | None = None
        local, start = [], 0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for f in site["cond_indep_stack"]:
                if f.name == DATA_PLATE:
                    self.data_size = f.size
            if site["is_observed"]:
                continue
            if site["fn"].support.is_discrete or site["infer"].get("enumerate"):
                raise InputError(
                    f"Langevin: latent site {name!r} is discrete; Langevin dynamics needs "
                    "continuous latents (sum discrete ones out in the model, or use EM/SVI)"
                )
            t = biject_to(site["fn"].support)
            unconstrained = t.inv(site["value"])
            self.names.append(name)
            self.transforms[name] = t
            self.shapes[name] = unconstrained.shape
            self.slices[name] = slice(start, start + unconstrained.numel())
            start += unconstrained.numel()
            if any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
                local.append(name)
        if not self.names:
            raise InputError("Langevin: the model has no latent sample site to draw")
        self.dim = start
        if batch_size is not None:
            if self.data_size is None:
                raise InputError(
                    f"Langevin: batch_size needs a pyro.plate({DATA_PLATE!r}, N) in the model"
                )
            if batch_size > self.data_size:
                raise InputError(
                    f"Langevin: batch_size={batch_size} exceeds the data size {self.data_size}"
                )
            if local:
                raise InputError(
                    f"Langevin: mini-batches need every latent outside the {DATA_PLATE!r} "
                    f"plate; local latent site(s) {local}: use batch_size=None"
                )
            self._sliceable = sliceable_arguments(args, kwargs, self.data_size)
            if not any(self._sliceable):
                raise InputError(
                    f"Langevin: batch_size needs the data as model arguments whose first "
                    f"dimension is the {DATA_PLATE!r} plate size {self.data_size}; none is"
                )

    def constrained(self, theta: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Site values for ``theta`` of shape (..., dim), and the log-Jacobian of T, shape (...)."""
        batch = theta.shape[:-1]
        values, log_det = {}, theta.new_zeros(batch)
        for name in self.names:
            u = theta[..., self.slices[name]].reshape(batch + self.shapes[name])
            t = self.transforms[name]
            values[name] = x = t(u)
            ld = t.log_abs_det_jacobian(u, x)
            log_det = log_det + ld.reshape(*batch, -1).sum(-1)
        return values, log_det

    def unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.transforms[n].inv(values[n]).reshape(-1) for n in self.names])

    def potential(self, theta: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """U at one flat ``theta`` (on the mini-batch ``idx`` when given)."""
        values, log_det = self.constrained(theta)
        model = poutine.condition(self.model, data=values)
        args, kwargs = self.args, self.kwargs
        if idx is not None:
            args, kwargs = slice_arguments(args, kwargs, self._sliceable, idx)
            model = ScaleDataPlate(self.data_size / len(idx))(model)
        tr = poutine.trace(model).get_trace(*args, **kwargs)
        return -(tr.log_prob_sum() + log_det)

    def gradient(self, theta: torch.Tensor, idx=None) -> tuple[float, torch.Tensor]:
        theta = theta.detach().requires_grad_()
        u = self.potential(theta, idx)
        (g,) = torch.autograd.grad(u, theta)
        return float(u.detach()), g

    def hvp(self, theta: torch.Tensor, vectors: torch.Tensor, idx=None) -> torch.Tensor:
        """∇²U(theta) v for each row v of ``vectors`` (double backward)."""
        theta = theta.detach().requires_grad_()
        (g,) = torch.autograd.grad(self.potential(theta, idx), theta, create_graph=True)
        rows = [
            torch.autograd.grad(g, theta, v, retain_graph=i < len(vectors) - 1)[0]
            for i, v in enumerate(vectors)
        ]
        return torch.stack(rows)

    def initial(self, num_chains: int) -> torch.Tensor:
        """Dispersed starts: every site uniform in (−2, 2) in unconstrained space."""
        rows = []
        with torch.no_grad():
            for _ in range(num_chains):
                with InitMessenger(init_to_uniform(radius=2.0)):
                    tr = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
                rows.append(self.unconstrained({n: tr.nodes[n]["value"] for n in self.names}))
        return torch.stack(rows)


@register_engine
class Langevin(Engine):
    """Posterior draws of a Pyro model's continuous latents by stochastic-gradient Langevin
    dynamics (see the module docstring for the equation, the discretisation and the tuning).

    :param step_size: the time step ε of plain (P = I) SGLD; ``None`` tunes ε and a diagonal
        preconditioner P during warmup.
    :param schedule: ``"constant"``, or ``"polynomial"``: ε_t = ε (1 + t/τ)^−0.55 over the
        sampling steps, τ = num_samples/10 (Welling & Teh's decay: mini-batch bias shrinks).
    :param int num_chains: independent chains (R-hat needs ≥ 2).
    :param int num_samples: draws kept per chain (one per step).
    :param int warmup: steps per chain before the draws are kept (tuning happens here; at
        least 20 when ``step_size`` is None).
    :param batch_size: mini-batch size along the ``"data"`` plate; ``None`` for full data.
    :param float noise_tolerance: with mini-batches and a tuned step, the largest relative
        inflation of a posterior variance that gradient noise may cause (ε ≤ tol/max PV).
        Larger mixes faster and is less exact.
    :param int seed: the one seed for starts, noise and mini-batches.
    :param bool progress: show a tqdm progress bar.

    ``Fit.samples`` holds the draws in the constrained space, ``(chain, draw, *site_shape)``;
    ``Fit.params`` their posterior means; ``Fit.history`` the chains' mean potential U per step
    (warmup included). Any ``pyro.param`` in the model stays at its current value.
    """

    name = "langevin"
    description = "stochastic-gradient Langevin dynamics: posterior draws (continuous latents)"

    def __init__(
        self,
        step_size: float | None = None,
        schedule: str = "constant",
        num_chains: int = 4,
        num_samples: int = 1000,
        warmup: int = 500,
        batch_size: int | None = None,
        noise_tolerance: float = 0.05,
        seed: int = 0,
        progress: bool = True,
    ):
        if step_size is not None and not _positive(step_size, float):
            raise InputError(f"Langevin: step_size must be > 0 or None, got {step_size!r}")
        if schedule not in SCHEDULES:
            raise InputError(f"Langevin: schedule must be one of {SCHEDULES}, got {schedule!r}")
        for key, value in (("num_chains", num_chains), ("num_samples", num_samples)):
            if not _positive(value, int):
                raise InputError(f"Langevin: {key} must be a positive integer, got {value!r}")
        if not (_positive(warmup, int) or warmup == 0) or isinstance(warmup, bool):
            raise InputError(f"Langevin: warmup must be an integer >= 0, got {warmup!r}")
        if step_size is None and warmup < MIN_TUNED_WARMUP:
            raise InputError(
                f"Langevin: warmup must be >= {MIN_TUNED_WARMUP} to tune the step size "
                f"(got {warmup}); or give step_size"
            )
        if batch_size is not None and not _positive(batch_size, int):
            raise InputError(
                f"Langevin: batch_size must be a positive integer or None, got {batch_size!r}"
            )
        if not _positive(noise_tolerance, float):
            raise InputError(f"Langevin: noise_tolerance must be > 0, got {noise_tolerance!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"Langevin: seed must be an integer, got {seed!r}")
        super().__init__(
            step_size=None if step_size is None else float(step_size),
            schedule=schedule,
            num_chains=int(num_chains),
            num_samples=int(num_samples),
            warmup=int(warmup),
            batch_size=None if batch_size is None else int(batch_size),
            noise_tolerance=float(noise_tolerance),
            seed=seed,
        )
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def fit(self, pair: Any, *args: Any, **kwargs: Any) -> Fit:
        """Draw from the posterior of ``pair.model`` given ``model(*args, **kwargs)``."""
        pair = as_pair(pair)
        cfg = self.config
        check_finite_data(args, kwargs)
        pyro.set_rng_seed(cfg["seed"])
        target = LogJoint(pair.model, args, kwargs, cfg["batch_size"])
        run = _Run(target, cfg, torch.Generator().manual_seed(cfg["seed"]), self.progress)
        t0 = time.perf_counter()
        theta = target.initial(cfg["num_chains"])
        # The model and data were validated by LogJoint's first trace; re-checking every
        # distribution's arguments at every step costs ~40 % of a gradient.
        with pyro.validation_enabled(False):
            theta, precond, eps = run.warmup(theta)
            draws = run.sample(theta, precond, eps)
        elapsed = time.perf_counter() - t0

        C, S = draws.shape[:2]
        with torch.no_grad():
            values, _ = target.constrained(draws.reshape(C * S, -1))
        samples = {n: v.reshape(C, S, *v.shape[1:]) for n, v in values.items()}
        rhat = _max_rhat(samples) if C > 1 and S >= 4 else math.nan
        return Fit(
            engine=self.name,
            config=cfg,
            params={n: v.mean((0, 1)) for n, v in samples.items()},
            history=run.history,
            objective="potential",
            converged=bool(rhat < 1.05),
            n_iter=cfg["warmup"] + cfg["num_samples"],
            state={"preconditioner": precond, "last": draws[:, -1].clone()},
            samples=samples,
            info={
                "step_size": eps,
                "max_rhat": rhat,
                "seconds": elapsed,
                "gradients": run.gradients,
                "data_size": target.data_size,
                **run.info,
            },
            model_spec=pair.spec() if hasattr(pair, "spec") else None,
            pair=pair,
            args=args,
            kwargs=kwargs,
        )


class _Run:
    """One fit's chains: the Langevin moves, the tuning stages, and the potential trace."""

    def __init__(self, target: LogJoint, cfg: dict, gen: torch.Generator, progress: bool):
        self.target, self.cfg, self.gen = target, cfg, gen
        self.history: list[float] = []
        self.info: dict[str, Any] = {}
        self.gradients = 0
        self.bar = tqdm(
            total=cfg["warmup"] + cfg["num_samples"], disable=not progress, desc="langevin"
        )

    def batch(self) -> torch.Tensor | None:
        b = self.cfg["batch_size"]
        if b is None:
            return None
        return torch.randperm(self.target.data_size, generator=self.gen)[:b]

    def gradients_at(self, theta: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """U and ∇U of every chain (each on its own mini-batch)."""
        us, gs = [], []
        for row in theta:
            u, g = self.target.gradient(row, self.batch())
            us.append(u)
            gs.append(g)
        self.gradients += len(us)
        return us, torch.stack(gs)

    # ------------------------------------------------------------------ dynamics
    def langevin(self, theta, steps, precond, eps, *, tuning: bool, keep=None):
        """``steps`` Leimkuhler–Matthews moves of every chain. In tuning, a non-finite
        potential halves ε and restarts the chain from its last good point; in sampling it
        stops the fit. Returns θ, ε and the kept states (``keep``: the last that many)."""
        noise = torch.randn(theta.shape, generator=self.gen, dtype=theta.dtype)
        kept, halvings, last = [], 0, None
        for t in range(steps):
            us, grads = self.gradients_at(theta)
            bad = [c for c, u in enumerate(us) if not math.isfinite(u)]
            bad += [c for c in range(len(us)) if not torch.isfinite(grads[c]).all()]
            if bad:
                where = "sampling" if not tuning else "warmup"
                if not tuning or last is None or halvings >= 30:
                    raise FitDivergedError(
                        f"Langevin: non-finite potential or gradient in chain {bad[0]} at "
                        f"{where} step {t} (step size {eps:.3g}); give a smaller step_size "
                        "or check the model"
                    )
                # Back to the last finite state, at half the step.
                halvings += 1
                eps *= 0.5
                theta = last
                continue
            last = theta
            self.history.append(sum(us) / len(us))
            step = eps * self.schedule(t) if not tuning else eps
            fresh = torch.randn(theta.shape, generator=self.gen, dtype=theta.dtype)
            # Euler–Maruyama drift, noise averaged over consecutive steps (Leimkuhler–Matthews).
            theta = theta - step * precond * grads + (step * precond / 2).sqrt() * (noise + fresh)
            noise = fresh
            if keep is not None and t >= steps - keep:
                kept.append(theta)
            self.bar.update(1)
        return theta, eps, kept

    def schedule(self, t: int) -> float:
        if self.cfg["schedule"] == "polynomial":
            tau = max(1.0, self.cfg["num_samples"] / 10)
            return (1.0 + t / tau) ** -0.55
        return 1.0

    # ------------------------------------------------------------------ tuning
    def warmup(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        cfg = self.cfg
        W = cfg["warmup"]
        precond = torch.ones(self.target.dim, dtype=theta.dtype)
        if cfg["step_size"] is not None:
            theta, eps, _ = self.langevin(theta, W, precond, cfg["step_size"], tuning=True)
            return theta, precond, eps
        stage1 = 2 * W // 5
        stage2 = 2 * W // 5
        theta = self.optimise(theta, stage1)
        precond = 1.0 / self.diagonal_curvature(theta)
        eps = self.step_size(theta, precond)
        theta, eps, _ = self.langevin(theta, stage2, precond, eps, tuning=True)
        # Again, from inside the bulk: the curvature where the draws will be.
        precond = 1.0 / self.diagonal_curvature(theta)
        eps = self.step_size(theta, precond)
        theta, eps, _ = self.langevin(theta, W - stage1 - stage2, precond, eps, tuning=True)
        return theta, precond, eps

    def sample(self, theta, precond, eps) -> torch.Tensor:
        _, _, kept = self.langevin(
            theta, self.cfg["num_samples"], precond, eps, tuning=False, keep=self.cfg["num_samples"]
        )
        self.bar.close()
        return torch.stack(kept, 1).detach()

    def optimise(self, theta: torch.Tensor, steps: int) -> torch.Tensor:
        """Adam (AdaptiveFlow) on U, every chain: from the dispersed starts to the bulk."""
        last = theta
        theta = theta.clone().requires_grad_()
        opt = AdaptiveFlow([theta])
        for t in range(steps):
            # Step 0.1 → 0.01 geometrically: cross the distance first, then settle.
            opt.param_groups[0]["step_size"] = 0.1 * 0.1 ** (t / max(1, steps - 1))
            us, grads = self.gradients_at(theta.detach())
            if not all(math.isfinite(u) for u in us) or not torch.isfinite(grads).all():
                # Overshot into a non-finite region: keep the last finite point.
                return last
            last = theta.detach().clone()
            self.history.append(sum(us) / len(us))
            theta.grad = grads
            opt.step()
            self.bar.update(1)
        return theta.detach()

    def diagonal_curvature(self, theta: torch.Tensor, probes: int = 16) -> torch.Tensor:
        """diag ∇²U averaged over the chains: exact (unit vectors) up to ``probes``
        coordinates, else Hutchinson's estimator E[z ⊙ ∇²U z] with Rademacher z. Kept
        positive: a non-convex spot must not give a negative or infinite preconditioner."""
        d = self.target.dim
        est = torch.zeros(d, dtype=theta.dtype)
        for row in theta:
            if d <= probes:  # e_i ⊙ ∇²U e_i picks the i-th diagonal entry: sum the rows
                z = torch.eye(d, dtype=theta.dtype)
                est += (z * self.target.hvp(row, z, self.batch())).sum(0)
            else:  # E[z ⊙ ∇²U z] = diag ∇²U for Rademacher z: average the probes
                z = torch.randint(0, 2, (probes, d), generator=self.gen).to(theta.dtype) * 2 - 1
                est += (z * self.target.hvp(row, z, self.batch())).mean(0)
            self.gradients += 2 * len(z)
        est = (est / len(theta)).abs()
        return est.clamp_min(max(est.max().item() * 1e-12, 1e-30))

    def step_size(self, theta: torch.Tensor, precond: torch.Tensor, iters: int = 12) -> float:
        """ε = 1/κ_max, κ_max the top eigenvalue of P^½ ∇²U P^½ by power iteration (max over
        chains, 10 % margin), capped by the mini-batch noise tolerance."""
        root = precond.sqrt()
        kappa = 0.0
        for row in theta:
            v = torch.randn(self.target.dim, generator=self.gen, dtype=theta.dtype)
            idx = self.batch()
            lam = 0.0
            for _ in range(iters):
                v = v / v.norm()
                w = root * self.target.hvp(row, (root * v).unsqueeze(0), idx)[0]
                lam = float(v @ w)
                v = w
            kappa = max(kappa, abs(lam))
            self.gradients += 2 * iters
        eps = 1.0 / (1.1 * kappa) if kappa > 0 else 1.0
        self.info["kappa_max"] = kappa
        if self.cfg["batch_size"] is not None:
            # Relative variance inflation from gradient noise ≈ ε P V (module docstring).
            # Median over the chains: one chain still far out must not set the step.
            pv = float(
                torch.stack([(precond * self.gradient_noise(row)).max() for row in theta]).median()
            )
            self.info["gradient_noise_pv"] = pv
            if pv > 0:
                eps = min(eps, self.cfg["noise_tolerance"] / pv)
        return eps

    def gradient_noise(self, theta: torch.Tensor, batches: int = 8) -> torch.Tensor:
        """Per-coordinate variance V of the mini-batch gradient at one point."""
        grads = torch.stack([self.target.gradient(theta, self.batch())[1] for _ in range(batches)])
        self.gradients += batches
        return grads.var(0)


def _positive(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int and not float(value).is_integer():
        return False
    return math.isfinite(value) and value > 0


def _max_rhat(samples: dict[str, torch.Tensor]) -> float:
    import arviz as az

    data = az.convert_to_dataset({k: v.detach().double().numpy() for k, v in samples.items()})
    return float(np.nanmax([float(az.rhat(data)[k].max()) for k in samples]))
