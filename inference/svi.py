"""Stochastic variational inference: gradient steps on both sides of the joint KL at once.

The loss is the negative ELBO, E_q[log q(z) − log p(x, z)] = KL(q(z)‖p(z|x)) − log p(x), the
joint KL of DESIGN.md with the guide as p(z|x). Discrete latents marked for enumeration are
summed out exactly (``loss="enum"``, chosen automatically when the model enumerates).

The whole progress of a run is one :class:`SVIState` (params, optimiser state, RNG states, step,
history): a checkpoint is that state on disk, and resuming from it gives the same numbers as a
run that never stopped (NumPyro's ``SVIState`` habit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
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
from jointkl.optim import OPTIMIZERS, pyro_optim
from jointkl.pair import as_pair
from jointkl.runs import atomic_save_tensors, load_tensors
from jointkl.sites import DATA_PLATE, max_plate_nesting, trace_model

from .fused_optim import FusedPyroOptim
from .reparam_elbo import ReparamELBO

__all__ = ["SVI", "SVIState"]

LOSSES = ("trace", "meanfield", "enum", "renyi")
GUIDES = ("delta", "normal", "lowrank")
TORCH_OPTIMS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
SCHEDULES = ("constant", "exponential", "cosine")
# torch optimisers whose fused kernel the engine uses: Adam and AdamW refuse sparse gradients
# anyway, so fusing them never turns a working run into an error (SGD and Adagrad would).
FUSED_KERNELS = ("adam", "adamw")


@dataclass
class SVIState:
    """Everything a run needs to continue exactly: one value, saved as one checkpoint."""

    step: int
    params: dict[str, torch.Tensor]  # unconstrained, by param-store name
    optim: dict[str, Any]  # PyroOptim.get_state(): per-param torch optimiser state_dicts
    rng: torch.Tensor  # torch's global RNG (Pyro samples from it); batch order is stateless
    history: list[float] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        return atomic_save_tensors(
            {
                "step": self.step,
                "params": self.params,
                "optim": self.optim,
                "rng": self.rng,
                "history": torch.tensor(self.history, dtype=torch.float64),
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> SVIState:
        d = load_tensors(path)
        return cls(d["step"], d["params"], d["optim"], d["rng"], d["history"].tolist())


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
    :param optim: a torch optimiser name (adam, adamw, sgd, rmsprop, adagrad, clippedadam),
        a :mod:`jointkl.optim` integrator name, or a ``pyro.optim.PyroOptim``.
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
        (relative) over the last ``window`` steps.
    :param checkpoint_every: save an :class:`SVIState` every N steps into ``checkpoint_dir``.
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints.
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any.
    :param int seed: the one seed for initialisation, ELBO noise and batch order.
    :param bool jit: use the JIT-compiled TraceEnum loss (enum only).
    :param bool progress: show a tqdm progress bar with the running loss.
    """

    name = "svi"
    description = "stochastic variational inference: gradient steps on the ELBO (any latents)"

    def __init__(
        self,
        loss: str | None = None,
        guide: str | Callable | None = None,
        optim: str | pyro.optim.PyroOptim = "adam",
        lr: float = 0.01,
        steps: int = 1000,
        batch_size: int | None = None,
        num_particles: int = 1,
        vectorize_particles: bool = False,
        clip_norm: float | None = None,
        lr_schedule: str = "constant",
        early_stopping: float | Mapping[str, float] | None = None,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        seed: int = 0,
        jit: bool = False,
        progress: bool = True,
        on_step: Callable[[int, float], None] | None = None,
    ):
        if loss is not None and not callable(loss) and loss not in LOSSES:
            raise InputError(f"SVI: loss must be one of {LOSSES} or None, got {loss!r}")
        if guide is not None and not callable(guide) and guide not in GUIDES:
            raise InputError(
                f"SVI: guide must be one of {GUIDES}, a callable or None, got {guide!r}"
            )
        if isinstance(optim, str):
            _optim_class(optim)  # validates the name now, not at the first step
        elif not isinstance(optim, pyro.optim.PyroOptim):
            raise InputError(f"SVI: optim must be a name or a pyro.optim.PyroOptim, got {optim!r}")
        _check_positive("lr", lr, float)
        _check_positive("steps", steps, int)
        _check_positive("num_particles", num_particles, int)
        if batch_size is not None:
            _check_positive("batch_size", batch_size, int)
        if clip_norm is not None:
            _check_positive("clip_norm", clip_norm, float)
        if lr_schedule not in SCHEDULES:
            raise InputError(f"SVI: lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if isinstance(early_stopping, (int, float)) and not isinstance(early_stopping, bool):
            early_stopping = {"tol": float(early_stopping), "window": 50}
        if early_stopping is not None:
            if not isinstance(early_stopping, Mapping) or early_stopping.get("tol", 0) <= 0:
                raise InputError(
                    f"SVI: early_stopping must be a positive tolerance or "
                    f"{{'tol': >0, 'window': int}}, got {early_stopping!r}"
                )
            early_stopping = {
                "tol": float(early_stopping["tol"]),
                "window": int(early_stopping.get("window", 50)),
            }
        check_checkpointing("SVI", checkpoint_every, checkpoint_dir, resume)
        self._loss_fn = loss if callable(loss) else None
        super().__init__(
            loss=loss if not callable(loss) else "callable",
            guide=guide if not callable(guide) else "callable",
            optim=optim if isinstance(optim, str) else type(optim).__name__,
            lr=float(lr),
            steps=int(steps),
            batch_size=batch_size,
            num_particles=int(num_particles),
            vectorize_particles=bool(vectorize_particles),
            clip_norm=clip_norm,
            lr_schedule=lr_schedule,
            early_stopping=early_stopping,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            resume=bool(resume),
            seed=int(seed),
            jit=bool(jit),
        )
        self._guide_obj = guide if callable(guide) else None
        self._optim_obj = optim if not isinstance(optim, str) else None
        self.progress = progress
        self.on_step = on_step

    # ------------------------------------------------------------------ set-up
    def _setup(self, pair, args, kwargs, probe_args, probe_kwargs, data_size):
        """Resolve the loss and guide for this model; returns (guide, elbo, info).

        The model's structure is read from one trace on ``probe_args`` (the first mini-batch
        when batching, the data otherwise); ``data_size`` is N when already known.
        """
        cfg = self.config
        model = pair.model
        tr = trace_model(model, probe_args, probe_kwargs)
        sample_sites = {n: s for n, s in tr.nodes.items() if s["type"] == "sample"}
        enumerated = [
            n
            for n, s in sample_sites.items()
            if s["infer"].get("enumerate") == "parallel" and not s["is_observed"]
        ]
        latent = [
            n for n, s in sample_sites.items() if not s["is_observed"] and n not in enumerated
        ]
        loss = cfg["loss"] or ("enum" if enumerated else "trace")
        loss_fn = self._loss_fn
        if cfg["loss"] is None and callable(getattr(pair, "default_loss", None)):
            # A pair whose objective is not an ELBO (e.g. InfoMax) names it, like default_guide.
            loss, loss_fn = "callable", pair.default_loss
        if enumerated and loss not in ("enum", "callable"):
            raise InputError(
                f"SVI: the model enumerates site(s) {enumerated}; use loss='enum' (or None)"
            )
        guide_spec = cfg["guide"]
        if self._guide_obj is not None:
            guide, guide_kind = self._guide_obj, "callable"
        elif guide_spec is None and getattr(pair, "guide", None) is not None:
            guide, guide_kind = pair.guide, "pair"
        else:
            guide_kind = guide_spec or getattr(pair, "default_guide", None) or "normal"
            if not latent:
                guide, guide_kind = _empty_guide, "none"
            else:
                guide = _autoguide(guide_kind, pair, model, args, kwargs, cfg["seed"])
        if data_size is None:
            for s in sample_sites.values():
                for f in s["cond_indep_stack"]:
                    if f.name == DATA_PLATE:
                        data_size = f.size
        if cfg["batch_size"] is not None:
            local = [
                n
                for n in latent
                if any(f.name == DATA_PLATE for f in sample_sites[n]["cond_indep_stack"])
            ]
            if local and guide_kind in GUIDES:
                raise InputError(
                    f"SVI: mini-batching with local latent site(s) {local} needs an amortised "
                    f"guide (an encoder), not the {guide_kind!r} autoguide"
                )
        nesting = max_plate_nesting(tr)
        common = dict(
            num_particles=cfg["num_particles"], vectorize_particles=cfg["vectorize_particles"]
        )
        if cfg["vectorize_particles"] or loss == "enum":
            common["max_plate_nesting"] = nesting
        if loss == "callable":
            elbo = _CallableLoss(loss_fn)
        elif loss in ("trace", "meanfield") and cfg["num_particles"] == 1:
            # The same estimator without the general bookkeeping when the guide is fully
            # reparameterised (it hands any other step to Pyro's class itself).
            elbo = ReparamELBO(analytic_kl=loss == "meanfield")
        elif loss == "trace":
            elbo = Trace_ELBO(**common)
        elif loss == "meanfield":
            elbo = TraceMeanField_ELBO(**common)
        elif loss == "renyi":
            elbo = RenyiELBO(alpha=0.5, **{**common, "num_particles": max(2, cfg["num_particles"])})
        else:
            elbo = (JitTraceEnum_ELBO if cfg["jit"] else TraceEnum_ELBO)(**common)
        return guide, elbo, {"loss": loss, "guide": guide_kind, "data_size": data_size}

    def _make_optim(self) -> pyro.optim.PyroOptim:
        if self._optim_obj is not None:
            return self._optim_obj
        name, lr = self.config["optim"], self.config["lr"]
        cls = _optim_class(name)
        if name == "clippedadam":
            return pyro.optim.ClippedAdam({"lr": lr})
        if name not in TORCH_OPTIMS:
            # jointkl.optim integrators: lr is their step size ε (docs/optim.md)
            return pyro_optim(name, step_size=lr)
        # One torch optimiser for all params: per-param optimisers cost more than the maths
        # on networks with many weight tensors (inference/fused_optim.py); Adam's fused
        # kernel where the device has one (the same update, to rounding).
        kernel = {"fused": True} if name in FUSED_KERNELS else {}
        return FusedPyroOptim(cls, {"lr": lr, **kernel})

    def _lr_factor(self, step: int) -> float:
        sched, total = self.config["lr_schedule"], self.config["steps"]
        frac = step / max(1, total - 1)
        if sched == "exponential":
            return 0.01**frac
        if sched == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    # ------------------------------------------------------------------ fitting
    def fit(self, pair, *args, **kwargs) -> Fit:
        """Fit ``pair`` to the data ``model(*args, **kwargs)``; returns a :class:`Fit`."""
        pair = as_pair(pair)
        cfg = self.config
        check_finite_data(args, kwargs)
        pyro.clear_param_store()
        pyro.set_rng_seed(cfg["seed"])
        model, B = pair.model, cfg["batch_size"]
        batches = None
        if B is None:
            guide, elbo, info = self._setup(pair, args, kwargs, args, kwargs, None)
            init_model, init_guide, init_args, init_kwargs = model, guide, args, kwargs
        else:
            # Everything before the first step sees one mini-batch, never the full data: a
            # conditional model over a large output (a full softmax over 50k words) would
            # otherwise pay a full-data pass just to create its parameters, whose shapes do
            # not depend on the batch for a model written with the "data" plate.
            N = data_plate_size(model, args, kwargs)
            if N is None:
                raise InputError(
                    f"SVI: batch_size needs a pyro.plate({DATA_PLATE!r}, N) in the model"
                )
            batches = _Batches(N, B, cfg["seed"], sliceable_arguments(args, kwargs, N))
            init_args, init_kwargs, scale = batches.arguments(0, args, kwargs)
            guide, elbo, info = self._setup(pair, args, kwargs, init_args, init_kwargs, N)
            init_model, init_guide = ScaleDataPlate(scale)(model), ScaleDataPlate(scale)(guide)
        ckdir = Path(cfg["checkpoint_dir"]) if cfg["checkpoint_dir"] else None

        # Create every param (model and guide) once, so a checkpoint can be poured in.
        with torch.no_grad(), poutine.block():
            elbo.loss(init_model, init_guide, *init_args, **init_kwargs)
        optim = self._make_optim()
        store = pyro.get_param_store()
        state = SVIState(0, {}, {}, torch.get_rng_state(), [])
        latest = _latest_checkpoint(ckdir) if cfg["resume"] and ckdir else None
        if latest is not None:
            state = SVIState.load(latest)
            _load_params(store, state.params)
            optim.set_state(state.optim)
            torch.set_rng_state(state.rng)

        def checkpoint(st: SVIState) -> None:
            st.params = {k: v.detach().clone() for k, v in store.get_state()["params"].items()}
            st.optim = optim.get_state()
            st.rng = torch.get_rng_state()
            st.save(ckdir / f"step-{st.step:08d}.pt")

        history = state.history
        es = cfg["early_stopping"]
        smooth = None
        smoothed: list[float] = []
        for h in history:  # rebuild the smoothed curve so early stopping resumes exactly
            smooth = h if smooth is None else 0.9 * smooth + 0.1 * h
            smoothed.append(smooth)
        converged, stop_reason = False, "max steps"
        completed = state.step  # steps whose update has been applied
        bar = tqdm(
            range(state.step, cfg["steps"]),
            disable=not self.progress,
            desc="svi",
            initial=state.step,
            total=cfg["steps"],
            mininterval=1.0,
        )
        t0 = time.perf_counter()
        try:
            for step in bar:
                if batches is not None:
                    b_args, b_kwargs, scale = batches.arguments(step, args, kwargs)
                    m = ScaleDataPlate(scale)(model)
                    g = ScaleDataPlate(scale)(guide)
                else:
                    b_args, b_kwargs, m, g = args, kwargs, model, guide
                loss = self._step(elbo, m, g, optim, self._lr_factor(step), b_args, b_kwargs, step)
                history.append(loss)
                completed = step + 1
                # Early stopping on the exponentially smoothed loss.
                smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
                smoothed.append(smooth)
                if self.progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
                if ckdir is not None and cfg["checkpoint_every"]:
                    if completed % cfg["checkpoint_every"] == 0:
                        checkpoint(SVIState(completed, {}, {}, None, history))
                if self.on_step is not None:
                    self.on_step(step, loss)
                if es is not None and len(smoothed) > es["window"]:
                    old, new = smoothed[-es["window"] - 1], smoothed[-1]
                    if abs(new - old) <= es["tol"] * max(abs(new), 1e-12):
                        converged, stop_reason = True, "early stopping"
                        break
        except KeyboardInterrupt:
            stop_reason = f"interrupted after step {completed}"
        except FitDivergedError:
            if ckdir is not None and completed > 0:
                checkpoint(SVIState(completed, {}, {}, None, history))
            raise
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        if ckdir is not None:
            checkpoint(SVIState(completed, {}, {}, None, history))
        step = completed
        return self._make_fit(
            pair, guide, info, args, kwargs, history, step, converged, stop_reason, elapsed
        )

    def _step(self, elbo, model, guide, optim, lr_factor, args, kwargs, step) -> float:
        try:
            if isinstance(elbo, ReparamELBO):  # it notes the params it touched itself
                loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
                params = elbo.last_params
            else:
                with poutine.trace(param_only=True) as capture:
                    loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
                params = [s["value"].unconstrained() for s in capture.trace.nodes.values()]
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
        bad = not math.isfinite(loss)
        if not bad:
            bad = not _grads_finite([p.grad for p in params if p.grad is not None])
        if bad:
            pyro.infer.util.zero_grads(set(params))
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise FitDivergedError(
                f"SVI: non-finite {what} at step {step} (loss={loss}); parameters kept at the "
                f"last good step {step}; lower lr, set clip_norm, or check the data"
            )
        if self.config["clip_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config["clip_norm"])
        if lr_factor != 1.0:
            for opt in optim.optim_objs.values():
                for group in opt.param_groups:
                    key = "lr" if "lr" in group else "step_size"  # jointkl.optim: step size ε
                    group.setdefault("initial_lr", group[key])
                    group[key] = group["initial_lr"] * lr_factor
        optim(params)
        for p in params:
            # None, not zeros: the next backward assigns instead of allocating and adding
            # (torch's zero_grad(set_to_none=True)); optimisers skip None-grad params.
            p.grad = None
        return loss

    def _make_fit(
        self, pair, guide, info, args, kwargs, history, step, converged, reason, elapsed
    ) -> Fit:
        store = pyro.get_param_store()
        params = {k: store[k].detach().clone() for k in store.keys()}
        if hasattr(guide, "median"):
            with torch.no_grad():
                params.update(
                    {k: v.detach().clone() for k, v in guide.median(*args, **kwargs).items()}
                )
        unconstrained = {k: v.detach().clone() for k, v in store.get_state()["params"].items()}
        config = {**self.config, "resolved_loss": info["loss"], "resolved_guide": info["guide"]}
        fit = Fit(
            engine=self.name,
            config=config,
            params=params,
            history=history,
            objective="loss",
            converged=converged,
            n_iter=step,
            state={f"param:{k}": v for k, v in unconstrained.items()},
            info={"stop_reason": reason, "seconds": elapsed, "data_size": info["data_size"]},
            model_spec=getattr(pair, "spec", lambda: None)() if hasattr(pair, "spec") else None,
            pair=pair,
            args=args,
            kwargs=kwargs,
        )
        fit._guide = guide  # in-memory: a callable guide cannot be rebuilt from disk
        return fit

    # ------------------------------------------------------------------ posterior
    @classmethod
    def _guide_for(cls, fit: Fit):
        g = getattr(fit, "_guide", None)
        if g is not None:
            return g
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
        fit._guide = guide
        pyro.clear_param_store()
        rng = torch.get_rng_state()
        with torch.no_grad(), poutine.block():
            poutine.trace(guide).get_trace(*fit.args, **fit.kwargs)
            gtr = poutine.trace(guide).get_trace(*fit.args, **fit.kwargs)
            poutine.trace(poutine.replay(fit.pair.model, trace=gtr)).get_trace(
                *fit.args, **fit.kwargs
            )
        torch.set_rng_state(rng)
        saved = {
            k.removeprefix("param:"): v for k, v in fit.state.items() if k.startswith("param:")
        }
        _load_params(pyro.get_param_store(), saved)

    @classmethod
    def posterior_draws(cls, fit: Fit, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``num_samples`` guide draws of every latent site, as one chain."""
        guide = cls._guide_for(fit)
        model_tr = trace_model(fit.pair.model, fit.args, fit.kwargs)
        latent = {
            n
            for n, s in model_tr.nodes.items()
            if s["type"] == "sample"
            and not s["is_observed"]
            and s["infer"].get("enumerate") != "parallel"
        }
        pyro.set_rng_seed(seed)
        rows = []
        with torch.no_grad():
            for _ in range(num_samples):
                tr = poutine.trace(guide).get_trace(*fit.args, **fit.kwargs)
                rows.append(
                    {
                        n: s["value"]
                        for n, s in tr.nodes.items()
                        if s["type"] == "sample" and n in latent
                    }
                )
        if not rows or not rows[0]:
            return {}
        return {k: torch.stack([r[k] for r in rows]).unsqueeze(0) for k in rows[0]}


# ---------------------------------------------------------------------- helpers
class _Batches:
    """The mini-batch of each step: a function of (seed, step) alone, so a resumed run draws
    the same batches as one that never stopped (one permutation of the N points per epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, sliced):
        self.n, self.batch_size, self.seed, self.sliced = n, batch_size, seed, sliced
        self._epoch: tuple[int, torch.Tensor] | None = None

    def arguments(self, step: int, args: tuple, kwargs: Mapping) -> tuple[tuple, dict, float]:
        """The step's batch of the per-point arguments, and its N/B scale."""
        epoch, j = divmod(step, -(-self.n // self.batch_size))
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.n, generator=gen))
        idx = self._epoch[1][j * self.batch_size : (j + 1) * self.batch_size]
        b_args, b_kwargs = slice_arguments(args, kwargs, self.sliced, idx)
        return b_args, b_kwargs, self.n / len(idx)


class _PlateFound(Exception):
    pass


class _DataPlateSize(Messenger):
    """Stops the model at the creation of its ``"data"`` plate, keeping the plate's size."""

    size: int | None = None

    def _process_message(self, msg):
        if msg["name"] == DATA_PLATE and isinstance(msg["fn"], _Subsample):
            self.size = msg["fn"].size
            raise _PlateFound


def data_plate_size(model, args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """N of the model's ``pyro.plate("data", N)``, or ``None`` if it has none.

    The model runs only up to the plate's creation, so nothing inside the plate (where a
    model's per-point work is) is computed on the full data.
    """
    finder = _DataPlateSize()
    try:
        with torch.no_grad(), poutine.block(), finder:
            model(*args, **kwargs)
    except _PlateFound:
        pass
    return finder.size


def check_checkpointing(
    owner: str, checkpoint_every: Any, checkpoint_dir: Any, resume: bool
) -> None:
    """The checkpoint settings SVI and NCE share: a positive whole ``checkpoint_every``, and a
    ``checkpoint_dir`` whenever checkpoints are written or read."""
    if checkpoint_every is not None:
        if (
            not isinstance(checkpoint_every, (int, float))
            or isinstance(checkpoint_every, bool)
            or not float(checkpoint_every).is_integer()
            or checkpoint_every <= 0
        ):
            raise InputError(
                f"{owner}: checkpoint_every must be a positive int, got {checkpoint_every!r}"
            )
        if checkpoint_dir is None:
            raise InputError(f"{owner}: checkpoint_every needs checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise InputError(f"{owner}: resume=True needs checkpoint_dir")


def _check_positive(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not value > 0:
        raise InputError(f"SVI: {name} must be a positive {kind.__name__}, got {value!r}")


def _grads_finite(grads: list[torch.Tensor]) -> bool:
    """All gradient entries finite? One fused reduction and one host sync, not one per param:
    the per-tensor norms are finite iff every entry is (or none is so large its square
    overflows, which is divergence all the same)."""
    if not grads:
        return True
    try:
        norms = torch._foreach_norm(grads)
    except (RuntimeError, TypeError):  # e.g. sparse gradients
        return all(bool(torch.isfinite(g).all()) for g in grads)
    return bool(torch.isfinite(torch.stack([n.to(norms[0]) for n in norms])).all())


def _optim_class(name: str):
    if name == "clippedadam":
        return None
    if name in TORCH_OPTIMS:
        return TORCH_OPTIMS[name]
    if name == "heun":
        raise InputError(
            "SVI: optim 'heun' needs a closure (two gradients per step), which Pyro's SVI step "
            "cannot give; use jointkl.optim.Heun in a torch loop, or another integrator"
        )
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    known = sorted([*TORCH_OPTIMS, "clippedadam", *OPTIMIZERS])
    raise InputError(f"SVI: unknown optim {name!r}; known: {', '.join(known)}")


def _autoguide(kind: str, pair, model, args, kwargs, seed: int):
    hide = lambda msg: msg["infer"].get("enumerate") == "parallel"  # noqa: E731
    blocked = poutine.block(model, hide_fn=hide)
    init = init_to_median
    if hasattr(pair, "init_values"):
        init = init_to_value(
            values=pair.init_values(*args, seed=seed, **kwargs), fallback=init_to_median
        )
    cls = {"delta": AutoDelta, "normal": AutoNormal, "lowrank": AutoLowRankMultivariateNormal}[kind]
    return cls(blocked, init_loc_fn=init)


def _load_params(store, params: Mapping[str, torch.Tensor]) -> None:
    current = store.get_state()["params"]
    missing = sorted(set(params) - set(current))
    if missing:
        raise InputError(f"checkpoint has params the model/guide did not create: {missing}")
    with torch.no_grad():
        for k, v in params.items():
            current[k].copy_(v.to(current[k]))  # in place: nn.Module params stay linked


def _latest_checkpoint(ckdir: Path) -> Path | None:
    if not ckdir.is_dir():
        return None
    found = sorted(ckdir.glob("step-*.pt"))
    return found[-1] if found else None
