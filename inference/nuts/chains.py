"""The warmup and sampling loop of a NUTS fit, all chains batched, as one resumable state.

The loop's whole progress after ``step`` iterations (warmup and sampling counted together) is
one :class:`~jointkl.checkpoint.LoopState`:

* ``params``: ``theta`` (C, D), the chains' unconstrained positions, and ``draws`` (C, S, D),
  the buffer of kept draws (the first ``step − warmup`` rows are filled);
* ``rng``: the sampler's ``torch.Generator`` (momenta, directions, multinomial draws, the
  step-size heuristic) and torch's global generator;
* ``history``: the chains' mean potential per iteration;
* ``extra``: U and ∇U at ``theta`` (so a resumed run does not recompute them, which could
  differ in the last bit from the values the trajectory carried), the step size ε and the
  inverse mass matrix M⁻¹ per chain ((C, D) diagonal or (C, D, D) dense), the dual-averaging state (μ, H̄, log ε̄, t), the current
  slow window's running moments (n, mean, M2), the per-draw sample statistics so far, the
  warmup divergences, the gradient count, and the settings that decide the chains' path.

Every random choice comes from the recorded generator, so a fit resumed from a checkpoint
gives exactly the draws of a fit that never stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from jointkl.inference.nuts.adaptation import DualAveraging, WindowVariance, windows
from jointkl.inference.nuts.compiled_transition import transition_graph
from jointkl.inference.nuts.curvature import mode_and_variances
from jointkl.inference.nuts.metric import as_dense, dense_metric, kinetic, momentum, velocity
from jointkl.inference.nuts.potential import Potential
from jointkl.inference.nuts.trajectory import Transition, step_function, transition
from tqdm.auto import tqdm

from jointkl.checkpoint import LoopState
from jointkl.errors import InputError
from jointkl.signals import ForcedStop, polling, signal_name, stop_requested

__all__ = ["Chains", "STATS"]

# ArviZ's names for the per-draw statistics of a NUTS sampler, with their dtypes (None: the
# positions' floating dtype).
STATS = {
    "lp": None,
    "acceptance_rate": None,
    "diverging": torch.bool,
    "energy": None,
    "step_size": None,
    "tree_depth": torch.long,
    "n_steps": torch.long,
}


class Chains:
    """One fit's chains: :meth:`start` or :meth:`restore` sets the state, :meth:`run` drives
    it to the end (or to a stop request), writing checkpoints.

    :param target: the potential U of the model.
    :param settings: the engine's :class:`~jointkl.inference.nuts.engine.NUTSSettings`.
    :param init_values: for ``init="auto"``, ``c -> {site: value}``: chain c's start from
        the model's own seeding (``None``: the model has none; uniform starts).
    """

    def __init__(self, target: Potential, settings: Any, init_values: Any = None):
        self.target, self.s = target, settings
        self.init_values = init_values  # chain -> {site: value}, the model's own seeding
        self.gen = torch.Generator(device=target.device).manual_seed(settings.seed)
        # The metric's form, fixed for the fit: dense (C, D, D) or diagonal (C, D) M⁻¹.
        self.dense = dense_metric(settings.dense_mass, target.dim)
        self.step_fn = step_function(
            target, settings.max_tree_depth, settings.compile, dense=self.dense
        )
        # The whole transition as one TorchScript call around the compiled leaf (same
        # draws as the eager transition, which replays any transition where it raises).
        self.graph = transition_graph(self.step_fn, settings.max_tree_depth)
        spans = windows(settings.warmup)
        self.first, self.last = (spans[0][0], spans[-1][1]) if spans else (settings.warmup, -1)
        self.ends = {end for _, end in spans}
        self.total = settings.warmup + settings.draws
        self.stopped: str | None = None  # why run() ended before the last iteration
        self.gradients = 0

    # ------------------------------------------------------------------ the state
    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.gradients += theta.shape[0]
        return self.target.value_and_grad(theta)

    def start(self) -> None:
        """Iteration 0: a start per chain from the init strategy, M⁻¹ = I (diagonal or
        dense), ε from the heuristic (or the ``step_size`` setting)."""
        s, C, D = self.s, self.s.num_chains, self.target.dim
        self.step = 0
        strategy, values = ("uniform", self.init_values) if s.init == "auto" else (s.init, None)
        theta = self.target.initial(C, strategy, chain_values=values)
        self.theta = theta.to(self.target.device)
        self.u, self.grad = self.value_and_grad(self.theta)
        opts = dict(dtype=self.theta.dtype, device=self.theta.device)
        if s.laplace_start:
            self.theta, self.inv_mass = mode_and_variances(self.value_and_grad, self.theta)
            self.u, self.grad = self.value_and_grad(self.theta)
        else:
            self.inv_mass = torch.ones(C, D, **opts)
        if self.dense:
            self.inv_mass = as_dense(self.inv_mass)
        self.eps = torch.full((C,), s.step_size or 1.0, **opts)
        if s.step_size is None:
            self.eps = self.reasonable_step_size(self.eps)
        self.adapt = DualAveraging(self.eps, s.target_accept)
        self.window = WindowVariance((C, D), self.theta.dtype, self.theta.device, self.dense)
        # Zeros, not empty: the buffer is checkpointed whole and must be finite.
        self.draws = torch.zeros(C, s.draws, D, **opts)
        self.stats = {
            k: torch.zeros(C, s.draws, dtype=dtype or self.theta.dtype)
            for k, dtype in STATS.items()
        }
        self.history: list[float] = []
        self.warmup_divergences = 0

    def state(self) -> LoopState:
        """The state now, as a checkpoint holds it (references: every tensor of the loop is
        replaced, never changed in place, except the rows of the draw and statistics buffers
        past this state's last draw)."""
        a, w = self.adapt, self.window
        return LoopState(
            step=self.step,
            params={"theta": self.theta, "draws": self.draws},
            rng={**LoopState.torch_rng(), "chains": self.gen.get_state()},
            history=list(self.history),
            extra={
                "potential": self.u,
                "grad": self.grad,
                "step_size": self.eps,
                "inverse_mass_matrix": self.inv_mass,
                "dual_averaging": {
                    "mu": a.mu,
                    "h_bar": a.h_bar,
                    "log_eps_bar": a.log_eps_bar,
                    "t": a.t,
                },
                "window": {"n": w.n, "mean": w.mean, "m2": w.m2},
                "stats": dict(self.stats),
                "warmup_divergences": self.warmup_divergences,
                "gradients": self.gradients,
                "settings": self.s.trajectory(),
            },
        )

    def restore(self, state: LoopState, path: Path) -> None:
        """Continue from ``state``, read from ``path``: checked against this fit's settings
        and model, its generators restored."""
        extra = state.extra
        saved = extra.get("settings")
        if saved is None or "theta" not in state.params or "dual_averaging" not in extra:
            raise InputError(f"NUTS: checkpoint {path} was not written by NUTS")
        for key, value in self.s.trajectory().items():
            if key == "dense_mass":  # what matters is the metric's form, checked below
                continue
            was = saved.get(key)
            if was != value:
                raise InputError(
                    f"NUTS: checkpoint {path} was written with {key}={was!r}, "
                    f"not {value!r}: resume with the same settings"
                )
        theta = state.params["theta"]
        if tuple(theta.shape) != (self.s.num_chains, self.target.dim):
            raise InputError(
                f"NUTS: checkpoint {path} holds chains of {theta.shape[-1]} coordinates; "
                f"this model has {self.target.dim}"
            )
        device = self.target.device
        self.step = state.step
        self.theta = theta.to(device)
        self.draws = state.params["draws"].to(device)
        self.u, self.grad = extra["potential"].to(device), extra["grad"].to(device)
        self.eps = extra["step_size"].to(device)
        self.inv_mass = extra["inverse_mass_matrix"].to(device)
        # The metric's form, not the dense_mass value: True and "auto" give the same path
        # on a small model, and a checkpoint from before the setting existed is diagonal.
        if self.inv_mass.dim() != (3 if self.dense else 2):
            raise InputError(
                f"NUTS: checkpoint {path} holds a "
                f"{'dense' if self.inv_mass.dim() == 3 else 'diagonal'} mass matrix; this fit "
                f"adapts a {'dense' if self.dense else 'diagonal'} one: resume with the same "
                "dense_mass"
            )
        da = extra["dual_averaging"]
        self.adapt = DualAveraging(self.eps, self.s.target_accept)
        self.adapt.mu, self.adapt.h_bar = da["mu"].to(device), da["h_bar"].to(device)
        self.adapt.log_eps_bar, self.adapt.t = da["log_eps_bar"].to(device), int(da["t"])
        w = extra["window"]
        self.window = WindowVariance(tuple(theta.shape), theta.dtype, device, self.dense)
        self.window.n = int(w["n"])
        self.window.mean, self.window.m2 = w["mean"].to(device), w["m2"].to(device)
        self.stats = dict(extra["stats"])
        self.history = list(state.history)
        self.warmup_divergences = int(extra["warmup_divergences"])
        self.gradients = int(extra["gradients"])
        state.restore_torch_rng()
        self.gen.set_state(state.rng["chains"])

    # ------------------------------------------------------------------ the loop
    def run(self, folder: Path | None) -> None:
        """Iterate to the end, saving the state every ``checkpoint_every`` iterations into
        ``folder`` and at the end. A stop request (SIGINT/SIGTERM under the command line,
        :mod:`jointkl.signals`) ends the loop at the next iteration boundary, the state saved
        and :attr:`stopped` saying why; on Ctrl-C otherwise (a forced stop) the state of the
        last completed iteration is saved and the interruption goes on."""
        s, every = self.s, self.s.checkpoint_every
        bar = tqdm(total=self.total, initial=self.step, disable=not s.progress, desc="nuts")
        boundary = self.state()
        try:
            with polling():
                while self.step < self.total:
                    self.iterate()
                    bar.update(1)
                    boundary = self.state()
                    if folder is not None and every and self.step % every == 0:
                        boundary.save(folder)
                    signum = stop_requested()
                    if signum is not None and self.step < self.total:
                        self.stopped = (
                            f"interrupted by {signal_name(signum)} after step {self.step}"
                        )
                        break
        except (KeyboardInterrupt, ForcedStop):
            if folder is not None:
                boundary.save(folder)
            raise
        finally:
            bar.close()
        if folder is not None and boundary.saved is None:
            boundary.save(folder)

    def iterate(self) -> None:
        """One transition of every chain, then warmup's adaptation or the draw's record."""
        s, i = self.s, self.step
        t = self.transition()
        self.gradients += t.evaluations
        self.theta, self.u, self.grad = t.theta, t.potential, t.grad
        self.history.append(float(self.u.mean()))
        if i < s.warmup:
            self.warmup_divergences += int(t.diverging.sum())
            self.eps = self.adapt.update(t.accept_prob)
            if self.first <= i <= self.last:
                self.window.add(self.theta)
            if i in self.ends:
                self.inv_mass = self.window.regularised()
                self.window.reset()
                self.eps = self.reasonable_step_size(self.eps)
                self.adapt.restart(self.eps)
            if i == s.warmup - 1:
                self.eps = self.adapt.final()
        else:
            k = i - s.warmup
            self.draws[:, k] = self.theta
            row = {
                "lp": -self.u,
                "acceptance_rate": t.accept_prob,
                "diverging": t.diverging,
                "energy": t.energy,
                "step_size": self.eps,
                "tree_depth": t.tree_depth,
                "n_steps": t.num_steps,
            }
            for name, value in row.items():
                self.stats[name][:, k] = value.detach().cpu()
        self.step = i + 1

    def transition(self) -> Transition:
        """One NUTS transition of every chain from the current state: by the scripted
        transition when there is one, else (or when it raises: a failed check or an error
        in the compiled leaf) by the eager one from the same generator state, whose leaves
        are guarded one at a time."""
        args = (self.theta, self.u, self.grad, self.eps, self.inv_mass)
        if self.graph is not None:
            rng = self.gen.get_state()
            try:
                *out, evaluations = self.graph(*args, self.gen)
                return Transition(*out, evaluations=evaluations)
            except (RuntimeError, torch.jit.Error):  # a raise inside TorchScript is the latter
                self.gen.set_state(rng)
        return transition(*args, self.s.max_tree_depth, self.step_fn, self.gen)

    def reasonable_step_size(self, eps: torch.Tensor, tries: int = 100) -> torch.Tensor:
        """Hoffman & Gelman's heuristic (Algorithm 4, as Stan runs it), per chain, at the
        current position and mass matrix: from ``eps``, double (or halve) the step until one
        leapfrog step's acceptance probability exp(H₀ − H) crosses 0.8."""
        theta, u, grad, inv_mass = self.theta, self.u, self.grad, self.inv_mass
        C = theta.shape[0]
        log_target = math.log(0.8)
        direction = None
        done = torch.zeros(C, dtype=torch.bool, device=theta.device)
        for _ in range(tries):
            z = torch.randn(theta.shape, generator=self.gen, dtype=theta.dtype, device=theta.device)
            r = momentum(z, inv_mass)
            h0 = u + kinetic(r, inv_mass)
            e = eps.reshape(C, 1)
            r_half = r - 0.5 * e * grad
            new_theta = theta + e * velocity(r_half, inv_mass)
            u_new, g_new = self.value_and_grad(new_theta)
            r_new = r_half - 0.5 * e * g_new
            h = u_new + kinetic(r_new, inv_mass)
            delta = torch.nan_to_num(h0 - h, nan=-math.inf)
            up = delta > log_target
            if direction is None:
                direction = up
            done = done | (direction & ~up) | (~direction & up)
            if bool(done.all()):
                break
            eps = torch.where(done, eps, torch.where(direction, eps * 2, eps / 2))
        return eps.clamp(1e-10, 1e7)
