"""The NUTS engine: the reference sampler of jointkl (see the package docstring)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyro
import torch
from jointkl.inference.nuts.chains import STATS, Chains
from jointkl.inference.nuts.discrete import discrete_draws
from jointkl.inference.nuts.potential import INIT_STRATEGIES, Potential, describe

from jointkl.checkpoint import LoopState, check_checkpointing, latest_checkpoint
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
    path_or_none,
    positive_float,
    positive_int,
    setting,
)
from jointkl.zoo import hook

__all__ = ["NUTS", "NUTSSettings", "SAMPLE_STATS"]

# ArviZ's names for the per-draw statistics of a NUTS sampler.
SAMPLE_STATS = tuple(STATS)
STATS_PREFIX = "sample_stats."


def _or_auto(check: Any) -> Any:
    """``"auto"``, or a value that passes ``check`` (here :func:`boolean`): a closure over the
    check, so that the setting's checks are seen as boolean ones."""

    def or_auto(value: Any, where: str) -> Any:
        if isinstance(value, str) and value == "auto":
            return value
        try:
            return check(value, where)
        except InputError:
            raise InputError(f"{where} must be true, false or 'auto', got {value!r}") from None

    return or_auto


_dense_mass = _or_auto(boolean)


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
    init: str = setting("auto", one_of("auto", *INIT_STRATEGIES))
    laplace_start: bool = setting(False, boolean)
    dense_mass: bool | str = setting("auto", _dense_mass)
    step_size: float | None = setting(None, optional(positive_float))
    vectorise: bool | None = setting(None, optional(boolean))
    compile: bool = setting(True, boolean)
    seed: int = setting(0, integer)
    device: str | None = setting(None, compute_device)
    checkpoint_every: int | None = setting(None, optional(positive_int))
    checkpoint_dir: str | None = setting(None, path_or_none)
    resume: bool = setting(False, boolean)
    progress: bool = setting(True, boolean, json=False)

    def validate(self) -> None:
        check_checkpointing(self.owner, self.checkpoint_every, self.checkpoint_dir, self.resume)

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the chains' path: a checkpoint records them, and a resume
        under other values is refused (its state would not mean the same thing)."""
        keys = (
            "num_chains",
            "warmup",
            "draws",
            "target_accept",
            "max_tree_depth",
            "init",
            "laplace_start",
            "dense_mass",
        )
        return {k: getattr(self, k) for k in (*keys, "step_size", "vectorise", "compile", "seed")}


@register_engine
class NUTS(Engine):
    """The No-U-Turn Sampler on a Pyro model's continuous latents (discrete latents with
    finite support summed out), all chains advanced as one batched tensor program.

    :param int num_chains: independent chains (R-hat needs ≥ 2).
    :param int warmup: adaptation iterations per chain (discarded): step size by dual
        averaging, mass matrix (diagonal or dense) from Stan's doubling windows.
    :param int draws: kept iterations per chain.
    :param float target_accept: the mean acceptance statistic the step size is tuned to
        (0.8; raise it toward 0.95 when there are divergences).
    :param int max_tree_depth: the most trajectory doublings per iteration (2^depth − 1
        leapfrog steps at most).
    :param str init: the start of each chain: ``"auto"`` (the model's own seeding when it
        has one, the zoo's ``init_values`` hook, called with ``seed + c`` for chain c, e.g.
        k-means++ centres for a mixture; else ``"uniform"``), or Pyro's strategy
        ``"uniform"`` (uniform in (−2, 2) unconstrained, Stan's), ``"median"`` (prior
        median) or ``"sample"`` (a prior draw).
    :param bool laplace_start: move each start to its nearest mode (a few L-BFGS
        iterations on U) and begin warmup with the Laplace approximation's marginal
        variances there as the diagonal inverse mass matrix; ``False`` (default): the
        start as drawn and M⁻¹ = I, Stan's (chains stay over-dispersed at the start,
        which R-hat relies on).
    :param dense_mass: the mass matrix's form: ``"auto"`` (default) dense up to 200
        unconstrained coordinates, diagonal above; ``True`` a dense M⁻¹ per chain, each
        slow window's sample covariance (its off-diagonal part shrunk by min(1, D/n), then
        Stan's regularisation toward 10⁻³ I): undoes linear correlations at O(D²) per
        leapfrog step; ``False`` a diagonal M⁻¹ per chain (Stan's and Pyro's default).
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
    :param checkpoint_every: save the sampler's whole state (positions, adaptation, draws so
        far, generator) every N iterations (warmup and sampling counted together) into
        ``checkpoint_dir``; ``None``: only at the end and on interruption, when
        ``checkpoint_dir`` is set.
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints.
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any,
        exactly (the same draws as a run that never stopped); the settings that decide the
        chains' path must be the ones the checkpoint was written with.
    :param bool progress: show a tqdm progress bar.

    ``Fit.samples``: draws by continuous latent site in the constrained space, ``(chain,
    draw, *site_shape)`` (:meth:`posterior_draws` adds a draw of the enumerated discrete
    sites given each); ``Fit.state``: the ArviZ sample statistics as ``"sample_stats.<name>"``
    (``(chain, draw)`` each: ``lp``, ``acceptance_rate``, ``diverging``, ``energy``,
    ``step_size``, ``tree_depth``, ``n_steps``), the inverse mass matrix ((C, D) diagonal or
    (C, D, D) dense) and the last draws;
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
        folder = Path(s.checkpoint_dir) if s.checkpoint_dir is not None else None
        latest = latest_checkpoint(folder) if s.resume and folder is not None else None
        t0 = time.perf_counter()
        seeding = hook(pair, "init_values") if s.init == "auto" else None
        init_values = None
        if seeding is not None:

            def init_values(c: int) -> dict[str, torch.Tensor]:
                return seeding(*args, seed=s.seed + c, **kwargs)

        chains = Chains(target, s, init_values)
        if latest is not None:
            chains.restore(LoopState.load(latest), latest)
        else:
            with pyro.validation_enabled(False):
                chains.start()
        with pyro.validation_enabled(False):
            if s.progress:
                remaining = s.warmup + s.draws - chains.step
                line = expected_cost(_gradient_seconds(chains), remaining, s)
                if line is not None:
                    print(line, file=sys.stderr, flush=True)
            chains.run(folder)
        elapsed = time.perf_counter() - t0
        C, S = s.num_chains, max(0, chains.step - s.warmup)  # the draws kept so far
        draws = chains.draws[:, :S]
        stats = {k: v[:, :S] for k, v in chains.stats.items()}
        with torch.no_grad():
            if S:
                values, _ = target.constrained(draws.reshape(C * S, -1))
                samples = {n: v.reshape(C, S, *target.site_shapes[n]) for n, v in values.items()}
                params = {n: v.mean((0, 1)) for n, v in samples.items()}
            else:  # stopped in warmup: no draws, the chains' mean position
                current, _ = target.constrained(chains.theta)
                samples, params = {}, {n: v.mean(0) for n, v in current.items()}
        rhat, ess = _diagnostics(samples) if C > 1 and S >= 4 else (math.nan, math.nan)
        stopped = chains.stopped  # by SIGINT/SIGTERM, early
        divergences = int(stats["diverging"].sum())
        if divergences:
            warnings.warn(
                f"NUTS: {divergences} divergent transition(s) after warmup "
                f"({divergences / (C * S):.1%}): the draws may be biased; raise target_accept "
                "or reparameterise the model",
                stacklevel=2,
            )
        state = {STATS_PREFIX + k: v for k, v in stats.items()} if S else {}
        state.update(inverse_mass_matrix=chains.inv_mass, last=chains.theta.clone())
        info = {"stop_reason": stopped} if stopped is not None else {}
        switching = _label_switching(target, stats["lp"], rhat)
        if switching:
            info["notes"] = [switching]
        return Result(
            params=params,
            history=chains.history,
            objective="potential",
            converged=bool(rhat < 1.01) and divergences == 0 and stopped is None,
            n_iter=chains.step,
            state=state,
            samples=samples,
            info={
                "divergences": divergences,
                "warmup_divergences": chains.warmup_divergences,
                "max_rhat": rhat,
                "min_ess_bulk": ess,
                "step_size": [float(e) for e in chains.eps],
                "mean_tree_depth": float(stats["tree_depth"].double().mean()),
                "gradients": chains.gradients,
                "seconds": elapsed,
                **describe(target),
                **info,
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
        if not fit.samples:  # stopped in warmup: the chains' mean position, one draw
            return super().posterior_draws(fit, num_samples, seed, num_chains)
        draws = stored_draws(fit, num_samples, seed)
        draws.update(discrete_draws(fit.pair.model, fit.args, fit.kwargs, draws, seed))
        return draws

    @classmethod
    def draws_kind(cls, fit: Fit) -> tuple[str, str]:
        """The sampler's own Markov chains; a run stopped in warmup has none, only the
        chains' mean position."""
        return ("markov_chain", "nuts") if fit.samples else ("point_estimate", "")

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


def _gradient_seconds(chains: Chains, calls: int = 3) -> float:
    """Seconds per U-and-∇U evaluation of all chains at their current points (the best of
    ``calls``, the way the sampler will call it)."""
    best = math.inf
    for _ in range(calls):
        t0 = time.perf_counter()
        chains.value_and_grad(chains.theta)
        best = min(best, time.perf_counter() - t0)
    return best


def expected_cost(seconds: float, transitions: int, s: NUTSSettings) -> str | None:
    """One line saying what a fit will cost when it may take long, else ``None``.

    A transition of the batched chains takes as many leapfrog steps (one U-and-∇U each) as
    the deepest chain's tree: 2^d − 1 for depth d ≤ ``max_tree_depth``. Well-conditioned
    posteriors settle at depths 3–5 after warmup; a hard one (a mixture's full precision
    matrices) runs at ``max_tree_depth`` in early warmup, before the mass matrix adapts.

    :param seconds: the measured time of one U-and-∇U evaluation of all chains.
    :param transitions: the transitions left to run (warmup and draws).
    :param s: the settings (``max_tree_depth``, ``num_chains``).
    :returns: the line when the worst case exceeds ten minutes.
    """
    worst = transitions * (2**s.max_tree_depth - 1) * seconds
    if worst <= 600:
        return None
    low = transitions * (2**3 - 1) * seconds

    def span(t: float) -> str:
        return f"{t / 60:.0f} min" if t < 5400 else f"{t / 3600:.1f} h"

    return (
        f"NUTS: one gradient of the {s.num_chains} chains takes {seconds * 1e3:.1f} ms here; "
        f"{transitions} transitions of 7 (depth 3) to {2**s.max_tree_depth - 1} "
        f"(max_tree_depth={s.max_tree_depth}) leapfrog steps: {span(low)} to {span(worst)} "
        "(lower warmup/draws or max_tree_depth to bound it)"
    )


def _label_switching(target: Potential, lp: torch.Tensor, rhat: float) -> str | None:
    """One line when the chains disagree (max R-hat > 1.05) yet sit at the same log density
    (every chain's mean lp within two within-chain sds of the others'): what a mixture's
    exchangeable components give when chains order them differently (label switching), not
    a failure to converge. Chains that disagree at different log densities get the
    :func:`_separate_modes` line instead; ``None`` when they agree, or when the model has no
    enumerated latent."""
    if not target.enumerated or lp.shape[0] < 2 or lp.shape[1] < 4 or not rhat > 1.05:
        return None
    lp = lp.double()
    means, spread = lp.mean(1), lp.std(1).mean()
    if float(means.max() - means.min()) > 2 * float(spread):
        return _separate_modes(means, rhat)
    return (
        f"label switching: the chains disagree (max R-hat {rhat:.2f}) at the same log "
        f"density, as when the components labelled by {', '.join(target.enumerated)} are "
        "exchangeable and chains order them differently; R-hat of component-indexed sites "
        "then measures the labelling, not convergence (compare label-invariant quantities)"
    )


def _separate_modes(means: torch.Tensor, rhat: float) -> str:
    """One line for chains that disagree at *different* log densities: each sits in its own
    mode (a mixture's near-empty component placed differently, a merged pair of clusters),
    which no longer run of the same chains is likely to join; the draws are not one
    posterior sample."""
    per_chain = ", ".join(f"{float(m):.1f}" for m in means)
    best = int(means.argmax())
    return (
        f"separate modes: the chains disagree (max R-hat {rhat:.2f}) at different log "
        f"densities (mean lp per chain: {per_chain}; highest: chain {best}): each sits in its "
        "own mode of a multimodal posterior, so the pooled draws are not one posterior "
        "sample; compare the chains, or simplify the model (e.g. fewer components)"
    )


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
