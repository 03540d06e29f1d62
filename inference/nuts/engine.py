"""The NUTS engine: the reference sampler of jointkl (see the package docstring)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyro
import torch
from jointkl.inference.nuts.adaptation import DualAveraging, WindowVariance, windows
from jointkl.inference.nuts.discrete import discrete_draws
from jointkl.inference.nuts.potential import INIT_STRATEGIES, Potential, describe
from jointkl.inference.nuts.trajectory import step_function, transition
from tqdm.auto import tqdm

from jointkl.engine import Engine, Result, register_engine
from jointkl.errors import InputError
from jointkl.fit import Fit, stored_draws
from jointkl.settings import (
    Settings,
    boolean,
    compute_device,
    integer,
    nonnegative_int,
    one_of,
    optional,
    positive_float,
    positive_int,
    setting,
)

__all__ = ["NUTS", "NUTSSettings", "SAMPLE_STATS"]

# ArviZ's names for the per-draw statistics of a NUTS sampler.
SAMPLE_STATS = (
    "lp",
    "acceptance_rate",
    "diverging",
    "energy",
    "step_size",
    "tree_depth",
    "n_steps",
)
STATS_PREFIX = "sample_stats."


def _target_accept(value: Any, where: str) -> float:
    value = positive_float(value, where)
    if value >= 1:
        raise InputError(f"{where} must be in (0, 1), got {value!r}")
    return value


@dataclass(frozen=True)
class NUTSSettings(Settings):
    """The settings of :class:`NUTS` (see its docstring for each one's meaning)."""

    owner: ClassVar[str] = "NUTS"

    num_chains: int = setting(4, positive_int)
    warmup: int = setting(1000, nonnegative_int)
    draws: int = setting(1000, positive_int)
    target_accept: float = setting(0.8, _target_accept)
    max_tree_depth: int = setting(10, positive_int)
    init: str = setting("uniform", one_of(*INIT_STRATEGIES))
    step_size: float | None = setting(None, optional(positive_float))
    vectorise: bool | None = setting(None, optional(boolean))
    compile: bool = setting(True, boolean)
    seed: int = setting(0, integer)
    device: str | None = setting(None, compute_device)
    progress: bool = setting(True, boolean, json=False)


@register_engine
class NUTS(Engine):
    """The No-U-Turn Sampler on a Pyro model's continuous latents (discrete latents with
    finite support summed out), all chains advanced as one batched tensor program.

    :param int num_chains: independent chains (R-hat needs ≥ 2).
    :param int warmup: adaptation iterations per chain (discarded): step size by dual
        averaging, diagonal mass matrix from Stan's doubling windows.
    :param int draws: kept iterations per chain.
    :param float target_accept: the mean acceptance statistic the step size is tuned to
        (0.8; raise it toward 0.95 when there are divergences).
    :param int max_tree_depth: the most trajectory doublings per iteration (2^depth − 1
        leapfrog steps at most).
    :param str init: Pyro's initial-value strategy per chain: ``"uniform"`` (uniform in
        (−2, 2) unconstrained, Stan's), ``"median"`` (prior median) or ``"sample"`` (a prior
        draw).
    :param step_size: the initial leapfrog step; ``None``: Hoffman & Gelman's heuristic
        (double or halve until one step's acceptance crosses 0.8). Adapted during warmup
        either way; with ``warmup=0`` it is used as is (1 when ``None``... after the heuristic).
    :param vectorise: evaluate the potential of all chains in one model run (an outer plate
        of chains): ``None`` when a check at distinct points shows it exact, else one run
        per chain; ``True`` requires it; ``False`` never.
    :param bool compile: trace the potential and its gradient once into a graph of tensor
        operations (``torch.fx``), kept only if it matches the eager potential at random
        points; ``False``: run the model through Pyro at every step.
    :param int seed: the one seed (starts, momenta, directions, multinomial draws).
    :param device: where the fit computes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        (CUDA when available, else the CPU) or ``None`` (where the data already are: the
        CPU for data read from files); data and parameters move there once, at bind time.
    :param bool progress: show a tqdm progress bar.

    ``Fit.samples``: draws by continuous latent site in the constrained space, ``(chain,
    draw, *site_shape)`` (:meth:`posterior_draws` adds a draw of the enumerated discrete
    sites given each); ``Fit.state``: the ArviZ sample statistics as ``"sample_stats.<name>"``
    (``(chain, draw)`` each: ``lp``, ``acceptance_rate``, ``diverging``, ``energy``,
    ``step_size``, ``tree_depth``, ``n_steps``), the inverse mass matrix and the last draws;
    ``Fit.info``: ``divergences`` (after warmup), ``warmup_divergences``, ``max_rhat``,
    ``min_ess_bulk``, ``step_size`` (per chain), ``gradients``, ``seconds``, ``vectorised``.
    """

    name = "nuts"
    description = (
        "No-U-Turn Sampler: the reference MCMC (continuous latents; finite discrete summed out)"
    )
    Settings = NUTSSettings
    settings: NUTSSettings

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """Draw from the posterior of ``pair.model`` given ``model(*args, **kwargs)``."""
        s = self.settings
        mode = {None: "auto", True: "vectorised", False: "loop"}[s.vectorise]
        target = Potential(pair.model, args, kwargs, s.num_chains, mode)
        if s.compile:
            with pyro.validation_enabled(False):
                target.compile()
        gen = torch.Generator(device=target.device).manual_seed(s.seed)
        t0 = time.perf_counter()
        with pyro.validation_enabled(False):
            out = _Chains(target, s, gen).run()
        elapsed = time.perf_counter() - t0
        draws, stats = out["draws"], out["stats"]
        C, S = draws.shape[:2]
        with torch.no_grad():
            values, _ = target.constrained(draws.reshape(C * S, -1))
        samples = {n: v.reshape(C, S, *target.site_shapes[n]) for n, v in values.items()}
        rhat, ess = _diagnostics(samples) if C > 1 and S >= 4 else (math.nan, math.nan)
        divergences = int(stats["diverging"].sum())
        if divergences:
            warnings.warn(
                f"NUTS: {divergences} divergent transition(s) after warmup "
                f"({divergences / (C * S):.1%}): the draws may be biased; raise target_accept "
                "or reparameterise the model",
                stacklevel=2,
            )
        state = {STATS_PREFIX + k: v for k, v in stats.items()}
        state.update(inverse_mass_matrix=out["inv_mass"], last=draws[:, -1].clone())
        return Result(
            params={n: v.mean((0, 1)) for n, v in samples.items()},
            history=out["history"],
            objective="potential",
            converged=bool(rhat < 1.01) and divergences == 0,
            n_iter=s.warmup + s.draws,
            state=state,
            samples=samples,
            info={
                "divergences": divergences,
                "warmup_divergences": out["warmup_divergences"],
                "max_rhat": rhat,
                "min_ess_bulk": ess,
                "step_size": [float(e) for e in out["step_size"]],
                "mean_tree_depth": float(stats["tree_depth"].double().mean()),
                "gradients": out["gradients"],
                "seconds": elapsed,
                **describe(target),
            },
        )

    @classmethod
    def posterior_draws(
        cls, fit: Fit, num_samples: int | None, seed: int, num_chains: int = 4
    ) -> dict[str, torch.Tensor]:
        """The stored draws of the continuous latents (thinned to ``num_samples`` per chain
        when given) and, for each, one draw of every enumerated discrete latent from its
        conditional posterior p(z | x, θ) (:func:`~jointkl.inference.nuts.discrete.discrete_draws`,
        seeded by ``seed``): together, draws of the joint posterior."""
        draws = stored_draws(fit, num_samples, seed)
        draws.update(discrete_draws(fit.pair.model, fit.args, fit.kwargs, draws, seed))
        return draws

    @classmethod
    def draws_kind(cls, fit: Fit) -> tuple[str, str]:
        """The sampler's own Markov chains."""
        return "markov_chain", "nuts"

    @classmethod
    def sample_stats(cls, fit: Fit, num_samples: int | None, seed: int) -> dict[str, torch.Tensor]:
        """The per-draw statistics under ArviZ's names, ``(chain, draw)``, thinned as
        :func:`jointkl.fit.stored_draws` thins the draws."""
        out = {}
        for key, v in fit.state.items():
            if key.startswith(STATS_PREFIX):
                n = v.shape[1]
                if num_samples is not None and n > num_samples:
                    v = v[:, torch.linspace(0, n - 1, num_samples).round().long()]
                out[key[len(STATS_PREFIX) :]] = v
        return out


class _Chains:
    """The warmup and sampling loop of one fit, all chains batched."""

    def __init__(self, target: Potential, s: NUTSSettings, gen: torch.Generator):
        self.target, self.s, self.gen = target, s, gen
        self.gradients = 0
        self.step_fn = step_function(target, s.max_tree_depth, s.compile)

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.gradients += theta.shape[0]
        u, g = self.target.value_and_grad(theta)
        return u, g

    def run(self) -> dict[str, Any]:
        s, C, D = self.s, self.s.num_chains, self.target.dim
        theta = self.target.initial(C, s.init).to(self.target.device)
        u, grad = self.value_and_grad(theta)
        opts = dict(dtype=theta.dtype, device=theta.device)
        inv_mass = torch.ones(C, D, **opts)
        eps = torch.full((C,), s.step_size or 1.0, **opts)
        if s.step_size is None:
            eps = self.reasonable_step_size(theta, u, grad, eps, inv_mass)
        adapt = DualAveraging(eps, s.target_accept)
        spans = windows(s.warmup)
        first, last = (spans[0][0], spans[-1][1]) if spans else (s.warmup, -1)
        ends = {end for _, end in spans}
        window = WindowVariance((C, D), theta.dtype, theta.device)
        W, S = s.warmup, s.draws
        draws = torch.empty(C, S, D, **opts)
        stats = {
            "lp": torch.empty(C, S, **opts),
            "acceptance_rate": torch.empty(C, S, **opts),
            "diverging": torch.empty(C, S, dtype=torch.bool, device=theta.device),
            "energy": torch.empty(C, S, **opts),
            "step_size": torch.empty(C, S, **opts),
            "tree_depth": torch.empty(C, S, dtype=torch.long, device=theta.device),
            "n_steps": torch.empty(C, S, dtype=torch.long, device=theta.device),
        }
        history, warmup_divergences = [], 0
        bar = tqdm(total=W + S, disable=not s.progress, desc="nuts")
        try:
            for i in range(W + S):
                t = transition(
                    theta, u, grad, eps, inv_mass, s.max_tree_depth, self.step_fn, self.gen
                )
                self.gradients += t.evaluations
                theta, u, grad = t.theta, t.potential, t.grad
                history.append(float(u.mean()))
                if i < W:
                    warmup_divergences += int(t.diverging.sum())
                    eps = adapt.update(t.accept_prob)
                    if first <= i <= last:
                        window.add(theta)
                    if i in ends:
                        inv_mass = window.regularised()
                        window.reset()
                        eps = self.reasonable_step_size(theta, u, grad, eps, inv_mass)
                        adapt.restart(eps)
                    if i == W - 1:
                        eps = adapt.final()
                else:
                    k = i - W
                    draws[:, k] = theta
                    stats["lp"][:, k] = -u
                    stats["acceptance_rate"][:, k] = t.accept_prob
                    stats["diverging"][:, k] = t.diverging.cpu()
                    stats["energy"][:, k] = t.energy
                    stats["step_size"][:, k] = eps
                    stats["tree_depth"][:, k] = t.tree_depth.cpu()
                    stats["n_steps"][:, k] = t.num_steps.cpu()
                bar.update(1)
        finally:
            bar.close()
        return {
            "draws": draws,
            "stats": stats,
            "history": history,
            "inv_mass": inv_mass,
            "step_size": eps,
            "warmup_divergences": warmup_divergences,
            "gradients": self.gradients,
        }

    def reasonable_step_size(self, theta, u, grad, eps, inv_mass, tries: int = 100):
        """Hoffman & Gelman's heuristic (Algorithm 4, as Stan runs it), per chain: from
        ``eps``, double (or halve) the step until one leapfrog step's acceptance probability
        exp(H₀ − H) crosses 0.8."""
        C = theta.shape[0]
        log_target = math.log(0.8)
        direction = None
        done = torch.zeros(C, dtype=torch.bool, device=theta.device)
        for _ in range(tries):
            r = torch.randn(theta.shape, generator=self.gen, dtype=theta.dtype, device=theta.device)
            r = r / inv_mass.sqrt()
            h0 = u + 0.5 * (r * r * inv_mass).sum(-1)
            e = eps.reshape(C, 1)
            r_half = r - 0.5 * e * grad
            new_theta = theta + e * inv_mass * r_half
            u_new, g_new = self.value_and_grad(new_theta)
            r_new = r_half - 0.5 * e * g_new
            h = u_new + 0.5 * (r_new * r_new * inv_mass).sum(-1)
            delta = torch.nan_to_num(h0 - h, nan=-math.inf)
            up = delta > log_target
            if direction is None:
                direction = up
            done = done | (direction & ~up) | (~direction & up)
            if bool(done.all()):
                break
            eps = torch.where(done, eps, torch.where(direction, eps * 2, eps / 2))
        return eps.clamp(1e-10, 1e7)


def _diagnostics(samples: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The largest rank-normalised split R-hat and the smallest bulk ESS over all
    coordinates of all sites (ArviZ)."""
    import arviz as az

    data = az.convert_to_dataset({k: v.detach().cpu().double().numpy() for k, v in samples.items()})
    rhat = az.rhat(data)
    ess = az.ess(data, method="bulk")
    return (
        float(np.nanmax([float(rhat[k].max()) for k in samples])),
        float(np.nanmin([float(ess[k].min()) for k in samples])),
    )
