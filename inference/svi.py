"""Stochastic variational inference: gradient steps on both sides of the joint KL at once.

The loss is the negative ELBO, E_q[log q(z) − log p(x, z)] = KL(q(z)‖p(z|x)) − log p(x): the
KL between the joint q(z) p(x) of guide and data and the model's joint p(x, z), up to the
data's constant entropy, so minimising it moves the guide towards p(z|x) and the model towards
the data at once. Discrete latents marked for enumeration are summed out exactly
(``loss="enum"``, chosen automatically when the model enumerates).

The whole progress of a run is one :class:`~jointkl.checkpoint.LoopState` (params, optimiser
state, RNG state, step, history): a checkpoint is that state on disk, and resuming from it
gives the same numbers as a run that never stopped.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import JitTraceEnum_ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_median,
    init_to_value,
)
from pyro.poutine.util import site_is_subsample

from jointkl import distributed
from jointkl.checkpoint import (
    LoopState,
    check_checkpointing,
    latest_checkpoint,
    load_params,
    with_step_size,
)
from jointkl.engine import Engine, Result, register_engine
from jointkl.errors import ConvergenceWarning, FitDivergedError, InputError
from jointkl.fit import DEFAULT_DRAWS, Fit
from jointkl.guide_draws import guide_draws
from jointkl.minibatch import (
    SAMPLE_ROWS,
    BatchOrder,
    ScaleDataPlate,
    slice_arguments,
    sliceable_arguments,
    spread_indices,
    streamed_rows,
)
from jointkl.optim import OPTIMIZERS, optim_class, pyro_optim
from jointkl.optim.fused_pyro import FusedPyroOptim
from jointkl.optim.gradients import grads_finite
from jointkl.optim.loop import StepLoop
from jointkl.optim.stationarity import loss_trend, trend_window
from jointkl.settings import (
    Settings,
    boolean,
    compute_device,
    function,
    integer,
    is_number,
    one_of,
    optional,
    or_callable,
    path_or_none,
    positive_float,
    positive_int,
    setting,
)
from jointkl.sites import DATA_PLATE, data_plate_size, max_plate_nesting, trace_model
from jointkl.zoo import hook

from .reparam_elbo import ReparamELBO

__all__ = ["SVI", "SVISettings"]

LOSSES = ("trace", "meanfield", "enum", "renyi")
GUIDES = ("delta", "normal", "lowrank")
SCHEDULES = ("constant", "exponential", "cosine")
# torch optimisers whose fused kernel the engine uses: Adam and AdamW refuse sparse gradients
# anyway, so fusing them never turns a working run into an error (SGD and Adagrad would).
FUSED_KERNELS = ("adam", "adamw")


# ---------------------------------------------------------------------- settings
def _optim_setting(value: Any, where: str) -> Any:
    """An optimiser name (checked against the one table) or a ``pyro.optim.PyroOptim``."""
    if isinstance(value, str):
        optim_class(value, "SVI")  # Pyro's SVI step passes no closure
        return value
    if not isinstance(value, pyro.optim.PyroOptim):
        raise InputError(f"{where} must be a name or a pyro.optim.PyroOptim, got {value!r}")
    return value


def _early_stopping(value: Any, where: str) -> dict[str, float | int] | None:
    """``None``, a relative tolerance, or ``{"tol": >0, "window": int}``, as the mapping."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"tol": float(value), "window": 50}
    if (
        not isinstance(value, Mapping)
        or not is_number(value.get("tol", 0))
        or not value.get("tol", 0) > 0
    ):
        raise InputError(
            f"{where} must be a positive tolerance or {{'tol': >0, 'window': int}}, got {value!r}"
        )
    return {
        "tol": float(value["tol"]),
        "window": positive_int(value.get("window", 50), f"{where} window"),
    }


@dataclass(frozen=True)
class SVISettings(Settings):
    """The settings of :class:`SVI` (see its docstring for each one)."""

    owner: ClassVar[str] = "SVI"

    loss: str | Callable | None = setting(None, or_callable(optional(one_of(*LOSSES))))
    guide: str | Callable | None = setting(None, or_callable(optional(one_of(*GUIDES))))
    optim: str | pyro.optim.PyroOptim = setting("adam", _optim_setting)
    lr: float = setting(0.01, positive_float)
    steps: int = setting(1000, positive_int)
    batch_size: int | None = setting(None, optional(positive_int))
    num_particles: int = setting(1, positive_int)
    vectorize_particles: bool = setting(False, boolean)
    clip_norm: float | None = setting(None, optional(positive_float))
    lr_schedule: str = setting("constant", one_of(*SCHEDULES))
    early_stopping: float | Mapping[str, float] | None = setting(None, _early_stopping)
    checkpoint_every: int | None = setting(None, optional(positive_int))
    checkpoint_dir: str | None = setting(None, path_or_none)
    resume: bool = setting(False, boolean)
    seed: int = setting(0, integer)
    device: str | None = setting(None, compute_device)
    jit: bool | None = setting(None, optional(boolean))
    progress: bool = setting(True, boolean, json=False)
    on_step: Callable[[int, float], None] | None = setting(None, optional(function), json=False)

    def validate(self) -> None:
        check_checkpointing(self.owner, self.checkpoint_every, self.checkpoint_dir, self.resume)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if not isinstance(self.optim, str):  # a PyroOptim is callable: record its class
            out["optim"] = type(self.optim).__name__
        return out


# ---------------------------------------------------------------------- losses
class _CallableLoss:
    """Adapt a plain differentiable loss ``fn(model, guide, *args, **kwargs) -> tensor`` (e.g.
    InfoMax's objective) to the ELBO interface the step loop uses."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.fn(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.fn(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _empty_guide(*args, **kwargs) -> None:
    """The guide of a model with no latent sites (maximum likelihood of pyro.params)."""


class _EarlyStopping:
    """Stop when the exponentially smoothed loss s_t = 0.9 s_{t−1} + 0.1 loss_t changed by
    less than ``tol`` (relative) over the last ``window`` steps. Built from the history so
    far, so a resumed run stops where an unbroken one would."""

    def __init__(self, tol: float, window: int, history: list[float]):
        self.tol, self.window = tol, window
        self.smoothed: list[float] = []
        for h in history:
            self(h)

    def __call__(self, loss: float) -> bool:
        prev = self.smoothed[-1] if self.smoothed else None
        self.smoothed.append(loss if prev is None else 0.9 * prev + 0.1 * loss)
        if len(self.smoothed) <= self.window:
            return False
        old, new = self.smoothed[-self.window - 1], self.smoothed[-1]
        return abs(new - old) <= self.tol * max(abs(new), 1e-12)


# ---------------------------------------------------------------------- the engine
@register_engine
class SVI(Engine):
    """Stochastic variational inference on any Pyro model/guide pair.

    :param loss: ``"trace"`` (Trace_ELBO), ``"meanfield"`` (analytic KL where known),
        ``"enum"`` (TraceEnum_ELBO: enumerated discrete latents summed out), ``"renyi"``
        (Rényi α-divergence, α=0.5), or a callable ``loss(model, guide, *args, **kwargs)``
        returning a differentiable scalar tensor (a plugged-in objective). ``None`` picks
        the pair's ``default_loss`` callable if it has one, else ``"enum"`` when the model
        enumerates, else ``"trace"``.
    :param guide: ``"delta"`` (MAP), ``"normal"`` (mean-field Gaussian), ``"lowrank"``
        (low-rank multivariate normal), a callable guide, or ``None`` for the pair's guide,
        else the pair's ``default_guide`` attribute, else ``"normal"``.
    :param optim: an optimiser name of :data:`jointkl.optim.OPTIM_CLASSES` (adam, adamw,
        sgd, rmsprop, adagrad, clippedadam, or a :mod:`jointkl.optim` integrator, whose step
        size ε is ``lr``), or a ``pyro.optim.PyroOptim``.
    :param float lr: learning rate (step size).
    :param int steps: number of gradient steps.
    :param batch_size: mini-batch size along the ``"data"`` plate; ``None`` for full batch.
    :param int num_particles: Monte-Carlo samples of the ELBO per step.
    :param bool vectorize_particles: draw the particles in one vectorised pass.
    :param clip_norm: clip the global gradient norm to this value (``None``: no clipping).
    :param lr_schedule: ``"constant"``, ``"exponential"`` (to lr/100 at the last step) or
        ``"cosine"`` (to 0); a function of the step, so resumed runs match exactly.
    :param early_stopping: ``None`` or a relative tolerance (float) or ``{"tol": .., "window":
        ..}``: stop when the exponentially smoothed loss changed by less than ``tol``
        (relative) over the last ``window`` steps (default 50).
    :param checkpoint_every: save the :class:`~jointkl.checkpoint.LoopState` every N steps
        into ``checkpoint_dir``.
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints; the state is also
        saved when the fit ends, is interrupted, or stops on a NaN/inf (the last good state).
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any.
    :param int seed: the one seed for initialisation, ELBO noise and batch order.
    :param device: where the fit computes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        (CUDA when available, else the CPU) or ``None`` (where the data already are: the
        CPU for data read from files); data and parameters move there once, at bind time.
    :param jit: compile the loss with ``torch.jit.trace``. ``None`` (default): the pathwise
        ELBO (``"trace"``/``"meanfield"``, one particle) replays a traced graph of its step
        where checks show the model's structure is static, else runs eagerly
        (:mod:`jointkl.inference.traced_elbo`; ``fit.info["jit"]`` says which path ran);
        the enum loss runs eagerly. ``True``: the same, and ``JitTraceEnum_ELBO`` for
        ``"enum"``. ``False``: everything eager.
    :param bool progress: show a tqdm progress bar with the running loss.
    :param on_step: called as ``on_step(step, loss)`` after every step; raising
        ``KeyboardInterrupt`` there ends the fit early, keeping it.
    """

    name = "svi"
    data_parallel = True
    description = "stochastic variational inference: gradient steps on the ELBO (any latents)"
    Settings = SVISettings
    settings: SVISettings

    # ------------------------------------------------------------------ set-up
    def _setup(self, pair, args, kwargs, probe_args, probe_kwargs, data_size):
        """Resolve the loss and guide for this model; returns (guide, elbo, info).

        The model's structure is read from one trace on ``probe_args`` (the first mini-batch
        when batching, the data otherwise); ``data_size`` is N when already known.
        """
        s = self.settings
        model = pair.model
        tr = trace_model(model, probe_args, probe_kwargs)
        sample_sites = {n: site for n, site in tr.nodes.items() if site["type"] == "sample"}
        enumerated = [
            n
            for n, site in sample_sites.items()
            if site["infer"].get("enumerate") == "parallel" and not site["is_observed"]
        ]
        # a plate's subsample site is not a latent: a model with none gets no guide (an
        # autoguide over nothing would still trace the model on the whole data to set up)
        latent = [
            n
            for n, site in sample_sites.items()
            if not site["is_observed"] and n not in enumerated and not site_is_subsample(site)
        ]
        loss_name = s.loss if isinstance(s.loss, str) else None
        loss = (
            "callable" if callable(s.loss) else (loss_name or ("enum" if enumerated else "trace"))
        )
        loss_fn = s.loss if callable(s.loss) else None
        default_loss = hook(pair, "default_loss")
        if s.loss is None and default_loss is not None:
            # A pair whose objective is not an ELBO (e.g. InfoMax) names it, like default_guide.
            loss, loss_fn = "callable", default_loss
        if enumerated and loss not in ("enum", "callable"):
            raise InputError(
                f"SVI: the model enumerates site(s) {enumerated}; use loss='enum' (or None)"
            )
        pair_guide = hook(pair, "guide")
        if callable(s.guide):
            guide, guide_kind = s.guide, "callable"
        elif s.guide is None and pair_guide is not None:
            guide, guide_kind = pair_guide, "pair"
        else:
            guide_kind = s.guide or hook(pair, "default_guide") or "normal"
            if not latent:
                guide, guide_kind = _empty_guide, "none"
            else:
                guide = _autoguide(guide_kind, pair, model, args, kwargs, s.seed)
        if data_size is None:
            for site in sample_sites.values():
                for f in site["cond_indep_stack"]:
                    if f.name == DATA_PLATE:
                        data_size = f.size
        if s.batch_size is not None or distributed.active():
            local = [
                n
                for n in latent
                if any(f.name == DATA_PLATE for f in sample_sites[n]["cond_indep_stack"])
            ]
            if local and guide_kind in GUIDES:
                raise InputError(
                    f"SVI: mini-batching or a data-parallel run with local latent site(s) "
                    f"{local} needs an amortised guide (an encoder), not the {guide_kind!r} "
                    f"autoguide"
                )
        nesting = max_plate_nesting(tr)
        common = dict(num_particles=s.num_particles, vectorize_particles=s.vectorize_particles)
        if s.vectorize_particles or loss == "enum":
            common["max_plate_nesting"] = nesting
        if loss == "callable":
            elbo = _CallableLoss(loss_fn)
        elif loss in ("trace", "meanfield") and s.num_particles == 1:
            # The same estimator without the general bookkeeping when the guide is fully
            # reparameterised (it hands any other step to Pyro's class itself).
            # A data-parallel run's ranks see batches of varying shapes: eager there.
            compiled = s.jit is not False and not distributed.active()
            elbo = ReparamELBO(analytic_kl=loss == "meanfield", compiled=compiled)
        elif loss == "trace":
            elbo = Trace_ELBO(**common)
        elif loss == "meanfield":
            elbo = TraceMeanField_ELBO(**common)
        elif loss == "renyi":
            elbo = RenyiELBO(alpha=0.5, **{**common, "num_particles": max(2, s.num_particles)})
        else:
            elbo = (JitTraceEnum_ELBO if s.jit else TraceEnum_ELBO)(**common)
        return guide, elbo, {"loss": loss, "guide": guide_kind, "data_size": data_size}

    def _make_optim(self) -> pyro.optim.PyroOptim:
        name, lr = self.settings.optim, self.settings.lr
        if not isinstance(name, str):
            return name  # a PyroOptim given by the user
        cls = optim_class(name, "SVI")
        if name == "clippedadam":
            return pyro.optim.ClippedAdam({"lr": lr})
        if name in OPTIMIZERS:
            # jointkl.optim integrators: lr is their step size ε (docs/optim.md)
            return pyro_optim(name, step_size=lr)
        # One torch optimiser for all params: per-param optimisers cost more than the maths
        # on networks with many weight tensors (jointkl/optim/fused_pyro.py); Adam's fused
        # kernel where the device has one (the same update, to rounding).
        kernel = {"fused": True} if name in FUSED_KERNELS else {}
        return FusedPyroOptim(cls, {"lr": lr, **kernel})

    @staticmethod
    def _scaled(elbo, model, guide, scale: float) -> tuple:
        """Model and guide whose data-plate sites count N/B times: the pathwise ELBO applies
        the factor itself (no handler around every message); Pyro's classes get the
        ScaleDataPlate handler."""
        if isinstance(elbo, ReparamELBO):
            elbo.data_scale = scale
            return model, guide
        return ScaleDataPlate(scale)(model), ScaleDataPlate(scale)(guide)

    def _lr_factor(self, step: int) -> float:
        sched, total = self.settings.lr_schedule, self.settings.steps
        frac = step / max(1, total - 1)
        if sched == "exponential":
            return 0.01**frac
        if sched == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    # ------------------------------------------------------------------ fitting
    def streams_rows(self) -> bool:
        """With a ``batch_size``, data given as a memory-mapped row array are read one
        mini-batch at a time (never whole)."""
        return self.settings.batch_size is not None

    def bind_data(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """The skeleton's checks, after refusing streamed data without a batch size."""
        streamed_rows("SVI", self.settings.batch_size, args, kwargs)
        return super().bind_data(pair, args, kwargs)

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """The step loop on the bound data; its progress is one LoopState."""
        s = self.settings
        pyro.clear_param_store()
        model = pair.model
        # Under a process group the data are this rank's rows (jointkl.distributed): the
        # batches are the parts of the global ones that fall in this rank's shard.
        parallel = distributed.active()
        shard = None
        if s.batch_size is None and not parallel:
            order = None
            guide, elbo, info = self._setup(pair, args, kwargs, args, kwargs, None)
            init_model, init_guide, init_args, init_kwargs = model, guide, args, kwargs
        else:
            # Everything before the first step sees one mini-batch, never the full data: a
            # conditional model over a large output (a full softmax over 50k words) would
            # otherwise pay a full-data pass just to create its parameters, whose shapes do
            # not depend on the batch for a model written with the "data" plate.
            # Streamed rows (a memory-mapped file) are never one tensor: N is their length.
            streamed = streamed_rows("SVI", s.batch_size, args, kwargs)
            rng = torch.get_rng_state()
            n = streamed if streamed is not None else data_plate_size(model, args, kwargs)
            if s.batch_size is None:  # data-parallel only: the draws of a 1-process full batch
                torch.set_rng_state(rng)
            if n is None:
                raise InputError(
                    f"SVI: batch_size needs a pyro.plate({DATA_PLATE!r}, N) in the model"
                )
            sliced = sliceable_arguments(args, kwargs, n)
            full = (args, kwargs)
            if parallel:
                shard = distributed.Shard.of_local(n)
            big_n = shard.n if shard is not None else n
            # A batch larger than the data is the whole data (in a seeded order) each step;
            # no batch_size (data-parallel only) is all rows every step.
            order = None
            if s.batch_size is not None:
                order = BatchOrder(big_n, min(s.batch_size, big_n), s.seed, stream=0)

            def batch(step: int) -> tuple[tuple, dict, float, float]:
                """(args, kwargs, data-plate factor, this rank's weight w_r = B_r/B)."""
                idx = order.indices(step) if order is not None else None
                if shard is None:
                    return (*slice_arguments(*full, sliced, idx), order.scale(idx), 1.0)
                local = torch.arange(n) if idx is None else shard.part(idx)[1]
                weight = len(local) / (big_n if idx is None else len(idx))
                scale = big_n / max(1, len(local))
                return (*slice_arguments(*full, sliced, local), scale, weight)

            if streamed is not None:
                # What reads the data outside the loop (the plate check, which also creates
                # a model's params from the data as the in-memory path does; an autoguide's
                # data-based start; the medians at the end) sees at most SAMPLE_ROWS evenly
                # spaced rows, in memory: all of them for small data (the in-memory fit's
                # numbers), a bounded sample of a file larger than memory.
                held = spread_indices(n, SAMPLE_ROWS)
                args, kwargs = slice_arguments(*full, sliced, held)
                _check_streamed_plate(model, args, kwargs, len(held))
            if shard is None:
                init_args, init_kwargs, scale, _ = batch(0)
            else:  # this rank's part of batch 0 may be empty: its first rows create params
                probe = torch.arange(min(n, order.batch_size if order else n))
                init_args, init_kwargs = slice_arguments(*full, sliced, probe)
                scale = big_n / len(probe)
            guide, elbo, info = self._setup(pair, args, kwargs, init_args, init_kwargs, big_n)
            init_model, init_guide = self._scaled(elbo, model, guide, scale)

        # Create every param (model and guide) once, so a checkpoint can be poured in.
        with torch.no_grad(), poutine.block():
            elbo.loss(init_model, init_guide, *init_args, **init_kwargs)
        optim = self._make_optim()
        store = pyro.get_param_store()
        state = LoopState(0)
        latest = latest_checkpoint(s.checkpoint_dir) if s.resume else None
        latest = distributed.broadcast_object(latest)  # every rank resumes from one file
        if latest is not None:
            state = LoopState.load(latest)
            load_params(store, state.params)
            # the step size of this run's settings, not the checkpoint's (a resume after a
            # divergence lowers lr)
            optim.set_state(with_step_size(state.optim, s.lr))
            state.restore_torch_rng()
        # The live unconstrained tensors the optimiser moves (named_parameters, unlike
        # get_state, leaves the param store untouched).
        state.params = dict(store.named_parameters())
        # every parameter in one order on every rank: the all-reduce buffer's layout
        every = [state.params[k] for k in sorted(state.params)] if parallel else None
        distributed.broadcast_start(every or [])

        def save() -> None:
            state.optim = optim.get_state()
            state.rng = LoopState.torch_rng()
            if distributed.is_main():  # rank 0 alone writes; the state is every rank's
                state.save(s.checkpoint_dir)

        def step(i: int) -> float:
            weight = 1.0
            if order is None and shard is None:
                b_args, b_kwargs, m, g = args, kwargs, model, guide
            else:
                b_args, b_kwargs, scale, weight = batch(i)
                m, g = self._scaled(elbo, model, guide, scale)
            return self._step(
                elbo, m, g, optim, self._lr_factor(i), b_args, b_kwargs, i, every, weight
            )

        es = s.early_stopping
        loop = StepLoop(
            steps=s.steps,
            save=save if s.checkpoint_dir is not None else None,
            checkpoint_every=s.checkpoint_every,
            on_step=s.on_step,
            stop=_EarlyStopping(es["tol"], es["window"], state.history) if es else None,
            progress=s.progress and distributed.is_main(),
            desc="svi",
        )
        t0 = time.perf_counter()
        converged, reason = loop.run(state, step)
        elapsed = time.perf_counter() - t0
        convergence = None
        if reason == "max steps":
            converged, convergence = _judge_convergence(state.history, info["data_size"], s)

        params = {k: store[k].detach().clone() for k in store.keys()}
        if hasattr(guide, "median"):
            with torch.no_grad():
                params.update(
                    {k: v.detach().clone() for k, v in guide.median(*args, **kwargs).items()}
                )
        return Result(
            params=params,
            history=state.history,
            objective="loss",
            converged=converged,
            n_iter=state.step,
            state={f"param:{k}": v.detach().clone() for k, v in store.named_parameters()},
            info={
                "stop_reason": reason,
                "seconds": elapsed,
                "data_size": info["data_size"],
                "convergence": convergence,
                "jit": _jit_info(elbo, s.jit),
            },
            config={"resolved_loss": info["loss"], "resolved_guide": info["guide"]},
            guide=guide,  # in memory: a callable guide cannot be rebuilt from disk
        )

    def _step(
        self, elbo, model, guide, optim, lr_factor, args, kwargs, step, every=None, weight=1.0
    ) -> float:
        """One update; ``every`` (data-parallel runs: all parameters in one order) and
        ``weight`` (this rank's w_r) sum the ranks' gradients and losses before it."""
        try:
            if every is not None and weight == 0:  # no row of this batch on this rank
                loss, params = 0.0, []
            elif isinstance(elbo, ReparamELBO):  # it notes the params it touched itself
                loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
                params = elbo.last_params
            else:
                with poutine.trace(param_only=True) as capture:
                    loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
                params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        except ValueError as e:
            # Pyro's argument validation meets the NaN first when a parameter has gone bad.
            if step > 0 and "invalid values" in str(e):
                raise FitDivergedError(
                    f"SVI: non-finite distribution parameters at step {step}; parameters kept "
                    f"at the last good step; lower lr, set clip_norm, or check the data "
                    f"({str(e).splitlines()[0][:160]})"
                ) from e
            raise
        loss = float(loss)
        if every is not None:
            loss = distributed.all_reduce_step(every, weight, loss, step)
            params = [p for p in every if p.grad is not None]
        if not (math.isfinite(loss) and grads_finite(params)):
            pyro.infer.util.zero_grads(set(params))
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise FitDivergedError(
                f"SVI: non-finite {what} at step {step} (loss={loss}); parameters kept at the "
                f"last good step {step}; lower lr, set clip_norm, or check the data"
            )
        clip_norm = self.settings.clip_norm
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if lr_factor != 1.0:
            for opt in optim.optim_objs.values():
                for group in opt.param_groups:
                    key = "lr" if "lr" in group else "step_size"  # jointkl.optim: step size ε
                    group.setdefault("initial_lr", group[key])
                    group[key] = group["initial_lr"] * lr_factor
        try:
            optim(params)
        except RuntimeError as e:
            if "sparse" not in str(e):
                raise
            raise InputError(
                f"SVI: optim={self.settings.optim!r} cannot take the model's sparse gradients "
                "(embedding lookups with sparse=True); use optim='sgd' or 'adagrad', or an "
                "engine made for the model (NCE for an unnormalised one)"
            ) from e
        for p in params:
            # None, not zeros: the next backward assigns instead of allocating and adding
            # (torch's zero_grad(set_to_none=True)); optimisers skip None-grad params.
            p.grad = None
        return loss

    # ------------------------------------------------------------------ posterior
    @classmethod
    def _guide_for(cls, fit: Fit):
        if fit.guide is not None:
            return fit.guide
        kind = fit.config.get("resolved_guide")
        if kind == "pair":
            return fit.pair.guide
        if kind == "none":
            return _empty_guide
        if kind in GUIDES:
            return _autoguide(
                kind, fit.pair, fit.pair.model, fit.args, fit.kwargs, fit.config["seed"]
            )
        raise InputError(
            "this SVI fit used a guide function passed to SVI(guide=...); it cannot be rebuilt "
            "from disk: pass it as the pair's guide instead"
        )

    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Recreate the fit's params in Pyro's param store (model and guide)."""
        guide = cls._guide_for(fit)
        fit.guide = guide
        pyro.clear_param_store()
        rng = torch.get_rng_state()
        args, kwargs = fit.args, fit.kwargs
        if fit.config.get("resolved_guide") == "none":
            # No latents, no guide params: the model's params do not depend on the rows
            # (they are created as in the fit, from one mini-batch), so one row creates them
            # without a run of the model over the whole data (a tagger's network on a corpus).
            args, kwargs = _first_row(fit.pair.model, args, kwargs)
        with torch.no_grad(), poutine.block():
            poutine.trace(guide).get_trace(*args, **kwargs)
            gtr = poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.trace(poutine.replay(fit.pair.model, trace=gtr)).get_trace(*args, **kwargs)
        torch.set_rng_state(rng)
        saved = {
            k.removeprefix("param:"): v for k, v in fit.state.items() if k.startswith("param:")
        }
        load_params(pyro.get_param_store(), saved)

    @classmethod
    def posterior_draws(
        cls, fit: Fit, num_samples: int | None, seed: int, num_chains: int = 4
    ) -> dict[str, torch.Tensor]:
        """Independent guide draws of every latent site of the model (enumerated ones are
        summed out, not drawn), ``(num_chains, num_samples, *shape)``
        (``num_samples=None``: 100)."""
        if fit.config.get("resolved_guide") == "none":
            return {}  # the model has no latent site (why the fit had no guide)
        guide = cls._guide_for(fit)
        model_tr = trace_model(fit.pair.model, fit.args, fit.kwargs)
        latent = {
            n
            for n, site in model_tr.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and site["infer"].get("enumerate") != "parallel"
        }
        total = num_chains * (num_samples or DEFAULT_DRAWS)
        if fit.config.get("resolved_guide") == "delta":
            num_chains = total = 1  # a point mass: one draw says it all
        pyro.set_rng_seed(seed)
        # all draws in one run of the guide under a plate of draws where a check allows it
        # (the encoder of a VAE or InfoMax then runs once, not once per draw)
        draws = guide_draws(guide, fit.args, fit.kwargs, latent, total)
        return {k: v.reshape(num_chains, -1, *v.shape[1:]) for k, v in draws.items()}

    @classmethod
    def draws_kind(cls, fit: Fit) -> tuple[str, str]:
        """Independent draws from the fitted guide; a ``"delta"`` guide is a point mass."""
        if fit.config.get("resolved_guide") in ("delta", "none"):
            return "point_estimate", "map" if fit.config.get("resolved_guide") == "delta" else ""
        return "independent", "variational"

    @classmethod
    def importance_guide(cls, fit: Fit):
        """The fitted guide (the IWAE proposal of a model with per-datum latents)."""
        return cls._guide_for(fit)


def _jit_info(elbo: Any, setting: bool | None) -> dict[str, Any]:
    """Which path the fit's loss ran (``fit.info["jit"]``): the compiled steps' account, or
    why there were none."""
    if isinstance(elbo, ReparamELBO) and elbo.traced is not None:
        if not elbo.reparameterised:
            return {"path": "eager: the general ELBO (a non-reparameterised site)"}
        return elbo.traced.info()
    if isinstance(elbo, JitTraceEnum_ELBO):
        return {"path": "JitTraceEnum_ELBO"}
    if setting is False:
        return {"path": "eager: jit=False"}
    if isinstance(elbo, ReparamELBO) and distributed.active():
        return {"path": "eager: data-parallel run"}
    return {"path": "eager: the loss has no compiled form"}


def _first_row(model, args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
    """The arguments cut to the first row of the model's ``"data"`` plate (unchanged when it
    has none, or no per-row argument)."""
    n = data_plate_size(model, args, kwargs)
    if n is None or n < 1:
        return args, dict(kwargs)
    return slice_arguments(args, kwargs, sliceable_arguments(args, kwargs, n), torch.arange(1))


def _check_streamed_plate(model, args: tuple, kwargs: Mapping[str, Any], rows: int) -> None:
    """A streamed model's ``"data"`` plate must be as long as the batch it is given (the
    rows are sliced to the batch before the model sees them)."""
    size = data_plate_size(model, args, kwargs)
    if size != rows:
        raise InputError(
            f"SVI: the model's pyro.plate({DATA_PLATE!r}, ...) has size {size} on {rows} "
            f"streamed rows; with a memory-mapped file the plate must be len(x)"
        )


def _judge_convergence(
    history: list[float], data_size: int | None, settings: SVISettings
) -> tuple[bool, dict[str, Any]]:
    """The trend test of a fit that used all its steps (:mod:`jointkl.optim.stationarity`):
    (converged, the figures it read); warns :class:`ConvergenceWarning` in one line, with
    the remedy, when the loss was still falling."""
    steps, lr = settings.steps, settings.lr
    if trend_window(len(history)) == 0:
        warnings.warn(
            f"SVI: {len(history)} steps are too few to test convergence (the trend test needs "
            f"10); raise steps",
            ConvergenceWarning,
            stacklevel=4,
        )
        return False, {"tested": False}
    trend = loss_trend(history, data_size)
    figures = {
        "tested": True,
        "window": trend.window,
        "loss_fall": trend.fall,
        "stderr": trend.stderr,
        "threshold": trend.threshold,
    }
    if trend.descending:
        warnings.warn(
            f"SVI: not converged after {steps} steps: the loss still fell by {trend.fall:.4g} "
            f"over the last {trend.window} steps (noise {trend.stderr:.3g}); raise steps (e.g. "
            f"steps={2 * steps}) or lr (now {lr:g})",
            ConvergenceWarning,
            stacklevel=4,
        )
    return not trend.descending, figures


def _prior_centre(site: dict[str, Any]) -> torch.Tensor:
    """A latent's starting value: its prior mean where that is finite (0 for a symmetric
    prior: deterministic, and central in the prior), else the prior median (estimated from
    draws by Pyro), else a feasible point."""
    try:
        value = site["fn"].mean.detach()
    except (NotImplementedError, AttributeError):
        return init_to_median(site)
    if not bool(torch.isfinite(value).all()):  # Cauchy, HalfCauchy, StudentT(df ≤ 1)
        return init_to_median(site)
    try:
        site["fn"]._validate_sample(value)  # a mean outside the support (e.g. Categorical)
    except (ValueError, AttributeError):
        return init_to_median(site)
    value._pyro_custom_init = False
    return value


def _autoguide(kind: str, pair, model, args, kwargs, seed: int):
    """The autoguide ``kind`` over the model's non-enumerated latents, starting at the pair's
    ``init_values`` when it has them, else at the prior means (:func:`_prior_centre`)."""
    hide = lambda msg: msg["infer"].get("enumerate") == "parallel"  # noqa: E731
    blocked = poutine.block(model, hide_fn=hide)
    init = _prior_centre
    init_values = hook(pair, "init_values")
    if init_values is not None:
        init = init_to_value(values=init_values(*args, seed=seed, **kwargs), fallback=_prior_centre)
    cls = {"delta": AutoDelta, "normal": AutoNormal, "lowrank": AutoLowRankMultivariateNormal}[kind]
    return cls(blocked, init_loc_fn=init)
