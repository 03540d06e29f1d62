"""Stochastic-gradient Langevin dynamics: posterior draws from gradient steps plus noise.

Gradient descent integrates dθ/dt = −∇U; adding white noise of the right size,

    dθ = −P ∇U(θ) dt + √(2P) dW,        U(θ) = −log p(x, θ)   (unconstrained θ),

gives the Langevin equation, whose stationary density is exp(−U) ∝ p(θ | x) for any constant
positive-definite preconditioner P: its Fokker–Planck equation ∂ρ/∂t = ∇·(P(ρ∇U + ∇ρ)) has
zero probability flux at ρ ∝ exp(−U), since ∇exp(−U) = −exp(−U)∇U. With U's gradient
estimated on a mini-batch (the likelihood scaled by N/B) this is SGLD (Welling & Teh 2011).
The time step is discretised with the Leimkuhler–Matthews scheme

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

One loop, one state. The stages above and the sampling are one sequence of ``warmup +
num_samples`` steps; the sampler's whole progress after any step is one
:class:`~jointkl.checkpoint.LoopState` (the chains' positions and the draws kept so far, the
Adam state of stage 1, torch's and the sampler's generator states, the potential history, and
in ``extra`` the stage, ε, P, the last noise ξ_n, the halvings and the gradient count), and
:meth:`_Sampler.advance` maps it to the next. A checkpoint is that value, so a fit resumed
from one continues bit for bit as if it had never stopped. Mini-batches come from
:class:`~jointkl.minibatch.BatchOrder`, one order per chain, a function of (seed, step).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from jointkl.checkpoint import (
    LoopState,
    check_checkpointing,
    checkpoint_path,
    latest_checkpoint,
)
from jointkl.device import data_device, moved
from jointkl.engine import Engine, Result, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.minibatch import BatchOrder, ScaleDataPlate, slice_arguments, sliceable_arguments
from jointkl.moment_guide import moment_guide
from jointkl.optim import AdaptiveFlow
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
from jointkl.signals import ForcedStop, polling, signal_name, stop_requested
from jointkl.sites import DATA_PLATE, trace_model

__all__ = ["Langevin", "LangevinSettings", "LogJoint"]

SCHEDULES = ("constant", "polynomial")
MIN_TUNED_WARMUP = 20
# Mini-batches drawn per chain by one tuning: 1 for the curvature, 1 for the power
# iteration, 8 for the gradient-noise variance.
PROBE_BATCHES = 10
# BatchOrder seeds its generator with seed·1,000,003 + stream + epoch: spacing the chains'
# streams this far apart keeps their orders distinct for 62,500 epochs and up to 16 chains
# (with stream = 1 + c, chain c's epoch e + 1 would be chain c + 1's epoch e).
CHAIN_STREAM_STRIDE = 62_500


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
        rows = torch.stack(rows)
        # the chains live with the data (a prior written with Python numbers, Normal(0., 10.),
        # draws its values on the CPU even when the engine moved the data to a GPU)
        return rows.to(data_device(self.args, self.kwargs, rows.device))


@dataclass(frozen=True)
class LangevinSettings(Settings):
    """The settings of :class:`Langevin` (see its docstring for each one's meaning)."""

    owner: ClassVar[str] = "Langevin"

    step_size: float | None = setting(None, optional(positive_float))
    schedule: str = setting("constant", one_of(*SCHEDULES))
    num_chains: int = setting(4, positive_int)
    num_samples: int = setting(1000, positive_int)
    warmup: int = setting(500, nonnegative_int)
    batch_size: int | None = setting(None, optional(positive_int))
    noise_tolerance: float = setting(0.05, positive_float)
    seed: int = setting(0, integer)
    device: str | None = setting(None, compute_device)
    checkpoint_every: int | None = setting(None, optional(positive_int))
    checkpoint_dir: str | None = setting(None, path_or_none)
    resume: bool = setting(False, boolean)
    progress: bool = setting(True, boolean, json=False)

    def validate(self) -> None:
        if self.step_size is None and self.warmup < MIN_TUNED_WARMUP:
            self.fail(
                f"warmup must be >= {MIN_TUNED_WARMUP} to tune the step size "
                f"(got {self.warmup}); or give step_size"
            )
        check_checkpointing(self.owner, self.checkpoint_every, self.checkpoint_dir, self.resume)

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the chains' path: a checkpoint records them, and a resume
        under other values is refused (its state would not mean the same thing)."""
        keys = ("step_size", "schedule", "num_chains", "num_samples", "warmup", "batch_size")
        return {k: getattr(self, k) for k in (*keys, "noise_tolerance", "seed")}


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
    :param device: where the fit computes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        (CUDA when available, else the CPU) or ``None`` (where the data already are: the
        CPU for data read from files); data and parameters move there once, at bind time.
    :param checkpoint_every: save the sampler's state every N steps (warmup and sampling
        counted together) into ``checkpoint_dir``; ``None``: only at the end, on interruption
        (Ctrl-C) and on divergence (the last good state), when ``checkpoint_dir`` is set.
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints.
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any,
        exactly (the same draws, history and info as a run that never stopped). The settings
        that decide the chains' path must be the ones the checkpoint was written with.
    :param bool progress: show a tqdm progress bar.

    ``Fit.samples`` holds the draws in the constrained space, ``(chain, draw, *site_shape)``;
    ``Fit.params`` their posterior means; ``Fit.history`` the chains' mean potential U per step
    (warmup included). Any ``pyro.param`` in the model stays at its current value (and is not
    part of a checkpoint).
    """

    name = "langevin"
    description = "stochastic-gradient Langevin dynamics: posterior draws (continuous latents)"
    Settings = LangevinSettings
    settings: LangevinSettings

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """Draw from the posterior of ``pair.model`` given ``model(*args, **kwargs)``."""
        s = self.settings
        target = LogJoint(pair.model, args, kwargs, s.batch_size)
        sampler = _Sampler(target, s)
        folder = Path(s.checkpoint_dir) if s.checkpoint_dir is not None else None
        latest = latest_checkpoint(folder) if s.resume and folder is not None else None
        t0 = time.perf_counter()
        if latest is not None:
            state = sampler.resumed(LoopState.load(latest), latest)
        else:
            state = sampler.initial()
        # The model and data were validated by LogJoint's first trace; re-checking every
        # distribution's arguments at every step costs ~40 % of a gradient.
        with pyro.validation_enabled(False):
            state = sampler.run(state, folder)
        elapsed = time.perf_counter() - t0

        extra, stopped = state.extra, sampler.stopped  # stopped: by SIGINT/SIGTERM, early
        theta = state.params["theta"]
        C = theta.shape[0]
        # The draws kept so far: all of them, or those before the stop (none in warmup).
        kept = max(0, state.step - s.warmup) if "draws" in state.params else 0
        with torch.no_grad():
            current, _ = target.constrained(theta)
            if kept:
                draws = state.params["draws"][:, :kept]
                values, _ = target.constrained(draws.reshape(C * kept, -1))
                samples = {n: v.reshape(C, kept, *v.shape[1:]) for n, v in values.items()}
                params = {n: v.mean((0, 1)) for n, v in samples.items()}
            else:  # stopped before sampling: no draws, the chains' mean position
                samples, params = {}, {n: v.mean(0) for n, v in current.items()}
        rhat = _max_rhat(samples) if C > 1 and kept >= 4 else math.nan
        info = {
            "step_size": extra["eps"],
            "max_rhat": rhat,
            "seconds": elapsed,
            "gradients": extra["gradients"],
            "data_size": target.data_size,
            **extra["info"],
        }
        if stopped is not None:
            info["stop_reason"] = stopped
        return Result(
            params=params,
            history=state.history,
            objective="potential",
            converged=bool(rhat < 1.05) and stopped is None,
            n_iter=state.step,
            state={"preconditioner": extra["precond"], "last": theta.clone()},
            samples=samples,
            info=info,
        )

    @classmethod
    def draws_kind(cls, fit: Any) -> tuple[str, str]:
        """The sampler's own chains (``to_arviz`` keeps every draw unless told otherwise); a
        run stopped before sampling has none, only the chains' mean position."""
        return ("markov_chain", "sgld") if fit.samples else ("point_estimate", "")

    @classmethod
    def importance_guide(cls, fit: Any):
        """The IWAE proposal of a model whose latents are all per-datum (a VAE): a normal
        per datum moment-matched to the chains' draws (:func:`jointkl.moment_guide.moment_guide`),
        so the pointwise log-likelihood estimates log p(x_i), not log p(x_i | z_i) at each
        draw; ``None`` when the draws are not of real-valued sites in the data plate."""
        if not fit.samples:
            return None
        return moment_guide(fit.pair.model, fit.args, fit.kwargs, fit.samples)


@dataclass(frozen=True)
class _Stage:
    """One stretch of the schedule: ``kind`` is ``"optimise"`` (Adam on U), ``"warmup"``
    (Langevin steps, discarded; a divergence halves ε) or ``"sample"`` (Langevin steps, kept);
    ``retune``: choose P and ε afresh on entering it."""

    kind: str
    length: int
    retune: bool = False


class _Sampler:
    """One fit's chains: the schedule of stages, the step function :meth:`advance` on a
    :class:`LoopState`, and the loop that drives it and writes checkpoints.

    Randomness: the starts come from torch's global generator (seeded by the engine); the
    noise ξ, the Hutchinson probes and the power-iteration starts from the sampler's own
    ``torch.Generator`` seeded with ``seed``; the mini-batches from one
    :class:`~jointkl.minibatch.BatchOrder` per chain — chain c's batch at step n is
    ``orders[c].indices(n)``, and the batches of the k-th tuning (curvature, power iteration,
    gradient noise) are the indices after the last step's, ``warmup + num_samples +
    k·PROBE_BATCHES + j``. All of it is a function of (seed, step) and the recorded
    generator states, so a resumed fit draws exactly what an uninterrupted one would.
    """

    def __init__(self, target: LogJoint, settings: LangevinSettings):
        self.target, self.s = target, settings
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.stages = _stages(settings)
        self.total = settings.warmup + settings.num_samples
        self.orders: list[BatchOrder] | None = None
        if settings.batch_size is not None:
            # drop_last: every step has exactly B rows, so the gradient noise is the same at
            # every step (the level the step size was capped for).
            self.orders = [
                BatchOrder(
                    target.data_size,
                    settings.batch_size,
                    settings.seed,
                    drop_last=True,
                    stream=1 + c * CHAIN_STREAM_STRIDE,
                )
                for c in range(settings.num_chains)
            ]
        self.spent = 0  # gradient-equivalents spent in the current advance()
        self.stopped: str | None = None  # why run() ended before the last step, if it did

    # ------------------------------------------------------------------ the state
    def initial(self) -> LoopState:
        """Step 0: dispersed starts, nothing tuned yet (P = I, ε = ``step_size``)."""
        theta = self.target.initial(self.s.num_chains)
        return LoopState(
            step=0,
            params={"theta": theta},
            rng=self.rng(),
            extra={
                "stage": 0,
                "stage_step": 0,
                "entered": False,
                "eps": self.s.step_size,
                "precond": torch.ones(self.target.dim, dtype=theta.dtype, device=theta.device),
                "noise": None,
                "halvings": 0,
                "tunings": 0,
                "gradients": 0,
                "info": {},
                "settings": self.s.trajectory(),
            },
        )

    def resumed(self, state: LoopState, path: Path) -> LoopState:
        """``state`` read from ``path``, checked against this fit, its generators restored."""
        saved = state.extra.get("settings")
        if saved is None or "theta" not in state.params:
            raise InputError(f"Langevin: checkpoint {path} was not written by Langevin")
        for key, value in self.s.trajectory().items():
            if saved.get(key) != value:
                raise InputError(
                    f"Langevin: checkpoint {path} was written with {key}={saved.get(key)!r}, "
                    f"not {value!r}: resume with the same settings"
                )
        if state.params["theta"].shape[-1] != self.target.dim:
            raise InputError(
                f"Langevin: checkpoint {path} has {state.params['theta'].shape[-1]} "
                f"coordinates per chain; this model has {self.target.dim}"
            )
        state.restore_torch_rng()
        self.gen.set_state(state.rng["chains"])
        # checkpoints are read onto the CPU: the chains continue on the data's device
        device = data_device(self.target.args, self.target.kwargs)
        state.params, state.extra = moved(state.params, device), moved(state.extra, device)
        return state

    def normal(self, theta: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of ``theta``'s shape from the chains' generator: drawn on
        the CPU (the same stream on every device, so a fit is reproducible across devices),
        then put on ``theta``'s device."""
        return torch.randn(theta.shape, generator=self.gen, dtype=theta.dtype).to(theta.device)

    def rng(self) -> dict[str, torch.Tensor]:
        return {**LoopState.torch_rng(), "chains": self.gen.get_state()}

    # ------------------------------------------------------------------ the loop
    def run(self, state: LoopState, folder: Path | None) -> LoopState:
        """Advance ``state`` to the end, saving it every ``checkpoint_every`` steps into
        ``folder``, and at the end. A stop request (SIGINT/SIGTERM under the command line,
        :mod:`jointkl.signals`) ends the loop at the next step boundary: the state is saved
        and returned, :attr:`stopped` saying why. On Ctrl-C otherwise the state of
        the last completed step is saved and the interruption goes on (a step never changes
        the state it starts from, so even a stop mid-step leaves that state whole); on
        divergence the checkpoint of the state that met it is removed (the newest left holds
        finite-potential chains) and :class:`FitDivergedError` goes on."""
        every = self.s.checkpoint_every
        bar = tqdm(
            total=self.total, initial=state.step, disable=not self.s.progress, desc="langevin"
        )
        try:
            with polling():
                while state.step < self.total:
                    new = self.advance(state)
                    if folder is not None and every and new.step // every > state.step // every:
                        new.save(folder)
                    bar.update(new.step - state.step)
                    state = new
                    signum = stop_requested()
                    if signum is not None and state.step < self.total:
                        self.stopped = (
                            f"interrupted by {signal_name(signum)} after step {state.step}"
                        )
                        break
        except (KeyboardInterrupt, ForcedStop):
            if folder is not None:
                state.save(folder)
            raise
        except FitDivergedError:
            # The chains of ``state`` met the NaN/inf: their checkpoint, if one was just
            # written, is removed; the newest left holds positions with a finite potential.
            if folder is not None:
                checkpoint_path(folder, state.step).unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        if folder is not None:
            state.save(folder)
        return state

    def advance(self, state: LoopState) -> LoopState:
        """The state after one more step. ``state`` is left as it was (lists and tensors are
        replaced, not changed; the draws buffer is written only past ``state``'s last draw),
        so an interruption mid-step leaves the previous state whole."""
        params, extra = dict(state.params), dict(state.extra)
        optim = state.optim
        self.spent = 0
        # Enter the current stage (choosing P and ε, drawing ξ_0), moving past finished ones.
        while True:
            stage = self.stages[extra["stage"]]
            if not extra["entered"]:
                optim = {}
                self.enter(stage, params, extra)
            if extra["stage_step"] < stage.length:
                break
            extra.update(stage=extra["stage"] + 1, stage_step=0, entered=False)
        t = extra["stage_step"]
        if stage.kind == "optimise":
            potential, optim, taken = self.optimise(state.step, t, stage.length, params, optim)
        else:
            potential, taken = self.langevin(state.step, t, stage, params, extra)
        extra["stage_step"] = t + taken
        extra["gradients"] += self.spent
        history = state.history if potential is None else [*state.history, potential]
        return LoopState(state.step + taken, params, optim, self.rng(), history, extra)

    def enter(self, stage: _Stage, params: dict, extra: dict) -> None:
        """Start ``stage``: P and ε chosen afresh when it retunes, ξ_0 drawn for Langevin
        stages, the draws buffer made for sampling."""
        extra["entered"] = True
        theta = params["theta"]
        params.pop("previous", None)
        if stage.kind == "optimise":
            params["previous"] = theta  # where to stay if the first step is not finite
            return
        if stage.retune:
            precond = 1.0 / self.diagonal_curvature(theta, extra["tunings"])
            extra["eps"] = self.step_size(theta, precond, extra)
            extra["precond"] = precond
            extra["tunings"] += 1
        extra["noise"] = self.normal(theta)
        extra["halvings"] = 0
        if stage.kind == "sample":
            params["draws"] = theta.new_zeros(theta.shape[0], stage.length, theta.shape[1])

    # ------------------------------------------------------------------ the steps
    def optimise(
        self, step: int, t: int, length: int, params: dict, optim: dict
    ) -> tuple[float | None, dict, int]:
        """Step ``t`` of Adam (AdaptiveFlow) on U, every chain: from the dispersed starts to
        the bulk. Returns the mean potential, the optimiser's state and the steps taken (the
        rest of the stage if U is not finite: the chains stay at the last finite point)."""
        theta = params["theta"]
        us, grads = self.gradients_at(theta, step)
        if not all(math.isfinite(u) for u in us) or not torch.isfinite(grads).all():
            # Overshot into a non-finite region: keep the last finite point, end the stage.
            params["theta"] = params.pop("previous")
            return None, {}, length - t
        params["previous"] = theta
        leaf = theta.clone().requires_grad_()
        opt = AdaptiveFlow([leaf])
        if optim:  # a copy: the previous state's tensors must not change under it
            opt.load_state_dict(copy.deepcopy(optim))
        # Step 0.1 → 0.01 geometrically: cross the distance first, then settle.
        opt.param_groups[0]["step_size"] = 0.1 * 0.1 ** (t / max(1, length - 1))
        leaf.grad = grads
        opt.step()
        params["theta"] = leaf.detach()
        return sum(us) / len(us), opt.state_dict(), 1

    def langevin(
        self, step: int, t: int, stage: _Stage, params: dict, extra: dict
    ) -> tuple[float | None, int]:
        """Step ``t`` of ``stage``: one Leimkuhler–Matthews move of every chain. In warmup, a
        non-finite potential halves ε and sends the chains back to their last good point; in
        sampling it stops the fit. Returns the mean potential (None after a halving) and the
        steps taken (1)."""
        theta, eps, precond = params["theta"], extra["eps"], extra["precond"]
        tuning = stage.kind != "sample"
        us, grads = self.gradients_at(theta, step)
        bad = [c for c, u in enumerate(us) if not math.isfinite(u)]
        bad += [c for c in range(len(us)) if not torch.isfinite(grads[c]).all()]
        if bad:
            where = "warmup" if tuning else "sampling"
            if not tuning or "previous" not in params or extra["halvings"] >= 30:
                raise FitDivergedError(
                    f"Langevin: non-finite potential or gradient in chain {bad[0]} at "
                    f"{where} step {t} (step size {eps:.3g}); give a smaller step_size "
                    "or check the model"
                )
            # Back to the last finite state, at half the step.
            extra["halvings"] += 1
            extra["eps"] = eps * 0.5
            params["theta"] = params["previous"]
            return None, 1
        if tuning:
            params["previous"] = theta
        h = eps * self.schedule(t) if not tuning else eps
        fresh = self.normal(theta)
        # Euler–Maruyama drift, noise averaged over consecutive steps (Leimkuhler–Matthews).
        theta = theta - h * precond * grads + (h * precond / 2).sqrt() * (extra["noise"] + fresh)
        extra["noise"] = fresh
        params["theta"] = theta
        if not tuning:
            params["draws"][:, t] = theta
        return sum(us) / len(us), 1

    def schedule(self, t: int) -> float:
        """The factor of ε at sampling step ``t``: 1, or (1 + t/τ)^−0.55 (polynomial)."""
        if self.s.schedule == "polynomial":
            tau = max(1.0, self.s.num_samples / 10)
            return (1.0 + t / tau) ** -0.55
        return 1.0

    # ------------------------------------------------------------------ gradients
    def batch(self, chain: int, index: int) -> torch.Tensor | None:
        """Chain ``chain``'s mini-batch number ``index`` (None: full data)."""
        return None if self.orders is None else self.orders[chain].indices(index)

    def probe_batch(self, chain: int, tuning: int, j: int) -> torch.Tensor | None:
        """The ``j``-th probe batch of the ``tuning``-th tuning: past every step's index."""
        return self.batch(chain, self.total + tuning * PROBE_BATCHES + j)

    def gradients_at(self, theta: torch.Tensor, step: int) -> tuple[list[float], torch.Tensor]:
        """U and ∇U of every chain at step ``step`` (each on its own mini-batch)."""
        us, gs = [], []
        for c, row in enumerate(theta):
            u, g = self.target.gradient(row, self.batch(c, step))
            us.append(u)
            gs.append(g)
        self.spent += len(us)
        return us, torch.stack(gs)

    # ------------------------------------------------------------------ tuning
    def diagonal_curvature(self, theta: torch.Tensor, tuning: int, probes: int = 16):
        """diag ∇²U averaged over the chains: exact (unit vectors) up to ``probes``
        coordinates, else Hutchinson's estimator E[z ⊙ ∇²U z] with Rademacher z. Kept
        positive: a non-convex spot must not give a negative or infinite preconditioner."""
        d = self.target.dim
        est = torch.zeros(d, dtype=theta.dtype, device=theta.device)
        for c, row in enumerate(theta):
            idx = self.probe_batch(c, tuning, 0)
            if d <= probes:  # e_i ⊙ ∇²U e_i picks the i-th diagonal entry: sum the rows
                z = torch.eye(d, dtype=theta.dtype, device=theta.device)
                est += (z * self.target.hvp(row, z, idx)).sum(0)
            else:  # E[z ⊙ ∇²U z] = diag ∇²U for Rademacher z: average the probes
                z = torch.randint(0, 2, (probes, d), generator=self.gen).to(theta) * 2 - 1
                est += (z * self.target.hvp(row, z, idx)).mean(0)
            self.spent += 2 * len(z)
        est = (est / len(theta)).abs()
        return est.clamp_min(max(est.max().item() * 1e-12, 1e-30))

    def step_size(
        self, theta: torch.Tensor, precond: torch.Tensor, extra: dict, iters: int = 12
    ) -> float:
        """ε = 1/κ_max, κ_max the top eigenvalue of P^½ ∇²U P^½ by power iteration (max over
        chains, 10 % margin), capped by the mini-batch noise tolerance. Records ``kappa_max``
        (and ``gradient_noise_pv``) in ``extra["info"]``."""
        tuning = extra["tunings"]
        root = precond.sqrt()
        kappa = 0.0
        for c, row in enumerate(theta):
            v = torch.randn(self.target.dim, generator=self.gen, dtype=theta.dtype).to(theta.device)
            idx = self.probe_batch(c, tuning, 1)
            lam = 0.0
            for _ in range(iters):
                v = v / v.norm()
                w = root * self.target.hvp(row, (root * v).unsqueeze(0), idx)[0]
                lam = float(v @ w)
                v = w
            kappa = max(kappa, abs(lam))
            self.spent += 2 * iters
        eps = 1.0 / (1.1 * kappa) if kappa > 0 else 1.0
        info = {**extra["info"], "kappa_max": kappa}
        if self.s.batch_size is not None:
            # Relative variance inflation from gradient noise ≈ ε P V (module docstring).
            # Median over the chains: one chain still far out must not set the step.
            pv = float(
                torch.stack(
                    [
                        (precond * self.gradient_noise(row, c, tuning)).max()
                        for c, row in enumerate(theta)
                    ]
                ).median()
            )
            info["gradient_noise_pv"] = pv
            if pv > 0:
                eps = min(eps, self.s.noise_tolerance / pv)
        extra["info"] = info
        return eps

    def gradient_noise(self, theta: torch.Tensor, chain: int, tuning: int) -> torch.Tensor:
        """Per-coordinate variance V of chain ``chain``'s mini-batch gradient at one point,
        over the probe batches 2, …, PROBE_BATCHES − 1 of this tuning."""
        grads = torch.stack(
            [
                self.target.gradient(theta, self.probe_batch(chain, tuning, j))[1]
                for j in range(2, PROBE_BATCHES)
            ]
        )
        self.spent += len(grads)
        return grads.var(0)


def _stages(s: LangevinSettings) -> list[_Stage]:
    """The schedule: with a tuned step, Adam on 2/5 of the warmup, Langevin on 2/5 and on
    the rest (each after choosing P and ε), then sampling; with ``step_size`` given, Langevin
    warmup at that step, then sampling."""
    W = s.warmup
    if s.step_size is not None:
        return [_Stage("warmup", W), _Stage("sample", s.num_samples)]
    first = second = 2 * W // 5
    return [
        _Stage("optimise", first),
        _Stage("warmup", second, retune=True),
        _Stage("warmup", W - first - second, retune=True),
        _Stage("sample", s.num_samples),
    ]


def _max_rhat(samples: dict[str, torch.Tensor]) -> float:
    import arviz as az

    data = az.convert_to_dataset({k: v.detach().cpu().double().numpy() for k, v in samples.items()})
    return float(np.nanmax([float(az.rhat(data)[k].max()) for k in samples]))
