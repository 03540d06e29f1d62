"""Expectation-maximisation: exact EM for any Pyro model with discrete enumerable latents.

EM minimises the joint KL divergence KL(p_data(x) q(z | x) ‖ p(x, z | θ)) by coordinate
descent (Neal & Hinton 1998), alternating:

* **E-step** — q(z | x) ← p(z | x, θ), the exact posterior over every enumerated site (the
  KL's minimum in q). The model's factors are summed out
  (:mod:`jointkl.inference.em.estep`); the log-partition is the marginal log-likelihood and
  its gradient with respect to each factor table is that factor's posterior marginal. No
  E-step code is asked of the model author.
* **M-step** — θ ← argmax_θ E_q log p(x, z | θ) (+ log p(θ) for MAP globals): closed forms
  where a site is a standard exponential family with free parameters, L-BFGS on the expected
  complete-data log-likelihood for the rest (:mod:`jointkl.inference.em.mstep`).

Both steps work on the model compiled once into factor tables
(:mod:`jointkl.inference.em.compile`), so iterations do not re-run the model unless some site
can only be computed by running it. The marginal log-likelihood never decreases.

Requirements: every discrete latent is enumerated in parallel (``config_enumerate`` or
``infer={"enumerate": "parallel"}``); continuous sample sites are globals outside the ``"data"``
plate (point-estimated, MAP under their prior); parameters are ``pyro.param``\\s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyro
import torch
from jointkl.inference.em.criteria import degrees_of_freedom
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.fused_mixture import fused_steps
from jointkl.inference.em.initial import initial_theta
from jointkl.inference.em.laplace import laplace_draws
from jointkl.inference.em.mstep import SingularCovariance, Update, m_step, plan_updates
from jointkl.inference.em.squarem import squarem_step
from jointkl.inference.em.streaming import (
    IN_MEMORY_BYTES,
    RowStream,
    StreamedSteps,
    block_rows_for,
    broadcast_theta,
    is_row_source,
    subsample_rows,
    world,
)
from tqdm.auto import tqdm

from jointkl.distributed import shard_bounds
from jointkl.engine import Engine, Result, recreate_params, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import DEFAULT_DRAWS, Fit
from jointkl.settings import (
    Settings,
    boolean,
    compute_device,
    nonnegative_float,
    nonnegative_int,
    one_of,
    optional,
    or_callable,
    positive_int,
    setting,
)
from jointkl.zoo import hook

__all__ = ["EM", "EMSettings", "Steps", "Trajectory"]

INITS = ("kmeans++", "random")
ACCELERATORS = (None, "squarem")
ASSIGNMENTS = ("soft", "hard")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# A log-likelihood lower than the one before by more than this (relative) counts as a
# decrease (EM cannot decrease it; rounding can, by less).
DECREASE_TOLERANCE = 1e-9


def float_dtype(value: Any, where: str) -> torch.dtype:
    """``torch.float64``/``torch.float32``, or their names (``"float32"``,
    ``"torch.float32"``), as a torch dtype."""
    if isinstance(value, str):
        if value.removeprefix("torch.") not in DTYPES:
            raise InputError(f"{where} must be one of {sorted(DTYPES)}, got {value!r}")
        value = DTYPES[value.removeprefix("torch.")]
    if value not in DTYPES.values():
        raise InputError(f"{where} must be torch.float64 or torch.float32, got {value!r}")
    return value


def objective_name(fm: FactorModel, hard: bool = False) -> str:
    """What EM increases: ``"log_posterior"`` (log p(x | θ) + log p(θ), up to the evidence)
    for a model with MAP globals, ``"log_likelihood"`` for a model of ``pyro.param`` sites
    only; with hard assignments the classification versions (``"classification_..."``:
    log p(x, ẑ | θ) at the most probable assignments ẑ)."""
    has_prior = any(f.kind == "global" for f in fm.free.values())
    name = "log_posterior" if has_prior else "log_likelihood"
    return f"classification_{name}" if hard else name


@dataclass(frozen=True)
class EMSettings(Settings):
    """The EM engine's settings (see :class:`EM`)."""

    owner: ClassVar[str] = "EM"
    max_iter: int = setting(100, nonnegative_int)
    tol: float = setting(1e-3, nonnegative_float)
    n_init: int = setting(1, positive_int)
    init: str | Callable[..., Mapping[str, torch.Tensor]] = setting(
        "kmeans++", or_callable(one_of(*INITS))
    )
    dtype: torch.dtype = setting(torch.float64, float_dtype)
    seed: int = setting(0, nonnegative_int)
    device: str | None = setting(None, compute_device)
    progress: bool = setting(True, boolean, json=False)
    reg_covar: float = setting(0.0, nonnegative_float)
    mstep_iter: int = setting(20, nonnegative_int)
    kmeans_iter: int = setting(300, nonnegative_int)
    accelerate: str | None = setting(None, one_of(*ACCELERATORS))
    assign: str = setting("soft", one_of(*ASSIGNMENTS))
    block_rows: int | None = setting(None, optional(positive_int))
    init_rows: int = setting(100_000, positive_int)


@dataclass(frozen=True)
class Steps:
    """EM's two steps on one compiled model; a step that fails raises
    :class:`~jointkl.errors.FitDivergedError` naming the iteration.

    :param closed, gradient: the M-step's plan (:func:`~.mstep.plan_updates`).
    """

    name: ClassVar[str] = "generic"
    fm: FactorModel
    closed: list[Update]
    gradient: list[str]
    reg_covar: float
    mstep_iter: int
    hard: bool = False

    @property
    def n_points(self) -> int:
        """Data points (elements of the ``"data"`` plate)."""
        return self.fm.n_points

    def expect(self, theta: Mapping[str, torch.Tensor], iteration: int):
        """E-step at θ: (log-likelihood, posterior weights of every table); with ``hard``,
        (classification log-likelihood, one-hot weights)."""
        ll, W = self.fm.e_step(theta, self.hard)
        if not math.isfinite(ll):
            raise FitDivergedError(
                f"EM: the log-likelihood became {ll} at iteration {iteration}; the last good "
                f"state (iteration {iteration - 1}) is in this error's .state; check the data "
                "or set reg_covar > 0"
            )
        return ll, W

    def initial_m_step(self, theta, W) -> dict[str, torch.Tensor]:
        """The M-step that follows an initial labelling (weights W) from θ."""
        try:
            return m_step(
                self.fm, theta, W, self.closed, self.gradient, self.reg_covar, self.mstep_iter
            )
        except SingularCovariance as e:
            raise FitDivergedError(f"EM: initial M-step: {e}") from e

    def maximise(self, theta, W, iteration: int) -> dict[str, torch.Tensor]:
        """M-step from θ with the weights W."""
        try:
            return m_step(
                self.fm, theta, W, self.closed, self.gradient, self.reg_covar, self.mstep_iter
            )
        except SingularCovariance as e:
            raise FitDivergedError(f"EM: at iteration {iteration}: {e}") from e


@dataclass
class Trajectory:
    """One restart's path: the current θ and its weights, the log-likelihood of every point
    visited (each at least the one before: an EM step cannot lower it, Dempster et al. 1977,
    and an extrapolated point is kept only when no worse), and why it stopped.

    :param tolerance: the convergence test's bound on a step's change (``tol`` x points).
    :param on_record: called with each new log-likelihood (the progress bar; ``None`` when
        it is hidden).
    """

    theta: dict[str, torch.Tensor]
    max_iter: int
    tolerance: float
    on_record: Callable[[float], None] | None = None
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    converged: bool = False
    reason: str = "max_iter"
    decreases: int = 0
    extrapolations: int = 0

    @property
    def n_iter(self) -> int:
        return len(self.history) - 1

    @property
    def done(self) -> bool:
        return self.converged or self.n_iter >= self.max_iter

    def start(self, ll: float, W: dict[int, torch.Tensor]) -> None:
        """The initial point's log-likelihood and weights."""
        self.weights = W
        self.history.append(ll)

    def advance(self, theta, ll: float, W, tested: bool) -> None:
        """Move to θ (log-likelihood ``ll``, weights ``W``); ``tested``: a plain EM step,
        whose change is the convergence test (an extrapolation's gain says nothing of it)."""
        change = ll - self.history[-1]
        if change < -DECREASE_TOLERANCE * max(1.0, abs(self.history[-1])):
            self.decreases += 1
        self.theta, self.weights = theta, W
        self.history.append(ll)
        if self.on_record is not None:
            self.on_record(ll)
        if tested and abs(change) <= self.tolerance:
            self.converged, self.reason = True, "tol"


def per_row(a: Any, n: int) -> bool:
    """A tensor or array with one entry per row of ``n`` (it would need splitting too)."""
    shape = getattr(a, "shape", None)
    return bool(shape) and len(shape) > 0 and shape[0] == n


@register_engine
class EM(Engine):
    """Exact expectation-maximisation for Pyro models with enumerated discrete latents.

    :param int max_iter: most EM iterations (M-steps) per restart.
    :param float tol: stop when the log-likelihood changes by less than ``tol`` per data
        point (per element of the ``"data"`` plate; scikit-learn's convention).
    :param int n_init: restarts from different initialisations; the best final
        log-likelihood wins.
    :param init: ``"kmeans++"`` (greedy k-means++ seeding and Lloyd steps to convergence on the observations
        attached to each enumerated variable, then an M-step), ``"random"`` (random
        responsibilities, then an M-step, as scikit-learn's ``init_params="random"``), or a
        callable ``init(*args, seed=int, **kwargs) -> {name: value}`` giving initial values
        of (some of) the parameters and MAP globals.
    :param dtype: ``torch.float64`` (default) or ``torch.float32``; floating data is cast to it.
    :param int seed: the one seed for probes, initialisation and restarts.
    :param device: where the fit computes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        (CUDA when available, else the CPU) or ``None`` (where the data already are: the
        CPU for data read from files); data and parameters move there once, at bind time.
    :param bool progress: show a tqdm bar per restart.
    :param float reg_covar: added to the diagonal of covariance (and to variance) estimates
        (scikit-learn's ``reg_covar``); 0 is exact EM.
    :param int mstep_iter: L-BFGS iterations of the gradient M-step per EM iteration.
    :param int kmeans_iter: most Lloyd iterations of the ``"kmeans++"`` initialisation
        (it stops earlier at convergence, as scikit-learn's ``KMeans(max_iter=300)``).
    :param str assign: ``"soft"`` (default: exact EM, responsibilities are the posterior)
        or ``"hard"`` (classification EM, mixtures only: each point is assigned wholly to its
        most probable component, and the history is the classification log-likelihood
        Σ_n max_k log p(x_n, z_n = k | θ) (+ log-prior); with equal fixed weights and one
        shared spherical variance this is k-means' Lloyd iteration).
    :param block_rows: rows per block when the data are streamed (``None``: about 64 MB of
        working set per block, :func:`~jointkl.inference.em.streaming.block_rows_for`).
    :param int init_rows: rows of the seeded subsample the initialisation runs on when the
        data are streamed (all rows when there are no more).

    **Data larger than memory, and several processes**
    (:mod:`jointkl.inference.em.streaming`): a mixture's observations may be given as a row
    source — a ``numpy.memmap`` / ``np.load(path, mmap_mode="r")`` array, or any object with
    ``shape``, ``dtype``, ``len()`` and row slicing — and each iteration is then one pass
    over the rows in blocks of ``block_rows``; under ``torch.distributed`` (more than one
    process) each rank passes over its contiguous share of the rows and the statistics are
    all-reduced once per iteration. The iterates are the in-memory fit's.
    :param accelerate: ``None`` (default: plain EM, iteration for iteration what
        scikit-learn and hmmlearn compute) or ``"squarem"`` (SQUAREM,
        :mod:`jointkl.inference.em.squarem`: after each EM step a second one and a squared
        extrapolation of the two, kept only when no worse). The log-likelihood still never
        decreases; slow, nearly linear EM (overlapping clusters) typically needs several
        times fewer iterations. ``max_iter`` then counts log-likelihood evaluations, and only
        plain EM steps are tested against ``tol``.

    A fit's history is the objective after each M-step (``history[0]`` at the initial
    values): the log-likelihood log p(x | θ) (``fit.objective == "log_likelihood"``), or for
    models with MAP globals log p(x | θ) + log p(θ) (``"log_posterior"``); ``fit.info``
    holds the final ``log_likelihood`` and ``log_prior`` apart.
    """

    name = "em"
    data_parallel = True
    picks_own_rows = True
    description = "expectation-maximisation: exact E-step over enumerated discrete latents"
    Settings = EMSettings

    def bind_data(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """NaN/inf refused; floating data cast to ``dtype`` (integer data, e.g. categories,
        is left alone)."""
        args, kwargs = super().bind_data(pair, args, kwargs)
        dtype = self.settings.dtype

        def cast(a: Any) -> Any:
            floating = isinstance(a, torch.Tensor) and a.dtype.is_floating_point
            return a.to(dtype) if floating else a

        return tuple(cast(a) for a in args), {k: cast(a) for k, a in kwargs.items()}

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """Compile the model, run ``n_init`` restarts (seeds ``seed``, ``seed + 1``, ...; one
        that diverges is recorded and skipped) and keep the best final log-likelihood."""
        s = self.settings
        t_start = time.perf_counter()
        pyro.clear_param_store()
        args, kwargs = self._read_small_sources(args, kwargs)
        if any(is_row_source(a) for a in (*args, *kwargs.values())) or world()[1] > 1:
            return self._run_streamed(pair, args, kwargs, t_start)
        fm = FactorModel(
            pair.model,
            args,
            kwargs,
            seed=s.seed,
            dtype=s.dtype,
            time_steps=_declaration(pair, "em_time_steps", args, kwargs),
            mixture=_declaration(pair, "em_mixture", args, kwargs),
            chain=_declaration(pair, "em_chain", args, kwargs),
        )
        hard = s.assign == "hard"
        self._check_model(fm, hard)
        steps = Steps(fm, *plan_updates(fm), s.reg_covar, s.mstep_iter, hard)
        steps = fused_steps(steps, s.accelerate)
        t_compiled = time.perf_counter()
        result = self._restarts(steps, lambda seed: (steps, args), kwargs, t_start)
        result.info["compile_seconds"] = t_compiled - t_start
        return result

    def streams_rows(self) -> bool:
        """Data from a memory-mapped file are handed to EM as rows; :meth:`run` reads them
        into memory unless they are larger than ``IN_MEMORY_BYTES``, ``block_rows`` is set,
        or the fit is distributed."""
        return True

    def _read_small_sources(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Row sources that fit in memory as one tensor (at most ``IN_MEMORY_BYTES`` at EM's
        dtype), read whole: the in-memory path, with everything it offers (SQUAREM, gradient
        M-steps, multi-block HMMs); streaming is for data larger than that, for an explicit
        ``block_rows``, and for distributed fits."""
        if self.settings.block_rows is not None or world()[1] > 1:
            return args, kwargs
        itemsize = torch.empty((), dtype=self.settings.dtype).element_size()

        def read(a: Any) -> Any:
            if not is_row_source(a) or math.prod(a.shape) * itemsize > IN_MEMORY_BYTES:
                return a
            rows = np.asarray(a[0 : len(a)])
            floating = np.issubdtype(rows.dtype, np.floating)
            return torch.as_tensor(rows, dtype=self.settings.dtype if floating else None)

        return tuple(read(a) for a in args), {k: read(a) for k, a in kwargs.items()}

    @staticmethod
    def _check_model(fm: FactorModel, hard: bool) -> None:
        """Refuse a model EM has nothing to infer in, or hard assignments off a mixture."""
        single = [v for v, var in fm.vars.items() if var.card < 2]
        if single:
            # The M-step reads a one-value variable's tables as constants and has no
            # statistics for them; the E-step alone (FactorModel.e_step) handles them.
            raise InputError(
                f"EM: the enumerated variable {single[0]!r} takes a single value, so there is "
                "nothing to infer; EM needs at least 2 values (a mixture: n_components >= 2)"
            )
        if hard and not fm._is_mixture():
            raise InputError(
                "EM: assign='hard' needs a mixture (one enumerated variable per data point, "
                "like GaussianMixture or BernoulliMixture); this model's latents form a chain "
                "or a larger structure — use assign='soft'"
            )

    def _run_streamed(self, pair: Any, args: tuple, kwargs: dict[str, Any], t_start: float):
        """EM with the E-step as a pass over blocks of rows of this process's share of the
        data (:mod:`jointkl.inference.em.streaming`), initialised on a seeded subsample."""
        s = self.settings
        if kwargs and any(is_row_source(a) for a in kwargs.values()):
            raise InputError("EM: streamed data (a row source) must be a positional argument")
        sources = [i for i, a in enumerate(args) if is_row_source(a)]
        if not sources:  # several processes, data in memory: each takes its rows
            sources = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim()]
        if len(sources) != 1:
            raise InputError(
                "EM: streamed data need exactly one positional argument holding the rows "
                f"(an array or row source); got {len(sources)}"
            )
        if s.accelerate is not None:
            raise InputError(
                "EM: accelerate='squarem' is not available when the data are streamed in "
                "blocks or split across processes; use accelerate=None"
            )
        pos = sources[0]
        rows = args[pos]
        n = int(rows.shape[0])
        others = [*(f"argument {i}" for i, a in enumerate(args) if i != pos and per_row(a, n))]
        others += [repr(k) for k, a in kwargs.items() if per_row(a, n)]
        if others:
            raise InputError(
                f"EM: streamed data: {others[0]} has one entry per row too and would have to be "
                "split with the rows; only one per-row argument can be streamed"
            )
        rank, size = world()
        if n < size:
            raise InputError(f"EM: {n} rows cannot be split over {size} processes")
        where = f"argument {pos}"
        sub = subsample_rows(rows, s.init_rows, s.seed, s.dtype, where)
        sub_args = args[:pos] + (sub,) + args[pos + 1 :]
        fm = FactorModel(pair.model, sub_args, kwargs, seed=s.seed, dtype=s.dtype)
        hard = s.assign == "hard"
        self._check_model(fm, hard)
        closed, gradient = plan_updates(fm)
        sub_steps = Steps(fm, closed, gradient, s.reg_covar, s.mstep_iter, hard)
        flat = sub.reshape(sub.shape[0], -1)
        centre = flat.to(s.dtype).mean(0) if flat.is_floating_point() else None
        block = s.block_rows or block_rows_for(flat.shape[-1], fm.chain["K"] if fm.chain else 2)
        start, stop = shard_bounds(n, rank, size)
        stream = RowStream(pair.model, args, kwargs, pos, start, stop, block, s.dtype, s.seed)
        steps = StreamedSteps(
            fm, closed, gradient, s.reg_covar, s.mstep_iter, hard, stream, centre, n
        )
        steps.check()
        t_compiled = time.perf_counter()

        def start_from(seed: int):
            return sub_steps, sub_args

        result = self._restarts(steps, start_from, kwargs, t_start, broadcast_theta)
        result.info["compile_seconds"] = t_compiled - t_start + stream.compile_seconds
        result.info["streamed"] = {
            "block_rows": block,
            "init_rows": int(sub.shape[0]),
            "processes": size,
            "rank_rows": [start, stop],
            "passes": steps.passes,
            "pass_seconds": steps.pass_seconds,
            "all_reduce_seconds": steps.reduce_seconds,
        }
        return result

    def _restarts(self, steps, start_from, kwargs, t_start, share=lambda theta: theta) -> Result:
        """``n_init`` restarts (seeds ``seed``, ``seed + 1``, ...; one that diverges is
        recorded and skipped); ``start_from(seed)`` gives the steps and data the initial
        values are computed from, ``share`` makes them every process's."""
        s = self.settings
        best, restarts, last_error = None, [], None
        for r in range(s.n_init):
            seed = s.seed + r
            try:
                init_steps, init_args = start_from(seed)
                theta0 = initial_theta(init_steps, s.init, s.kmeans_iter, seed, init_args, kwargs)
                path = self._em(steps, share(theta0), r)
            except FitDivergedError as e:
                restarts.append({"seed": seed, "error": str(e)})
                last_error = e
                continue
            restarts.append(
                {"seed": seed, "log_likelihood": path.history[-1], "n_iter": path.n_iter}
            )
            if best is None or path.history[-1] > best.history[-1]:
                best = path
        if best is None:
            raise FitDivergedError(
                f"EM: all {s.n_init} restart(s) diverged; last: {last_error}"
            ) from last_error
        return self._result(steps, best, restarts, t_start)

    def _em(self, steps: Steps, theta: dict[str, torch.Tensor], restart: int) -> Trajectory:
        """EM iterations from θ until the change of a plain step is below ``tol`` per point,
        or ``max_iter`` (scikit-learn's ``BaseMixture.fit`` loop); with
        ``accelerate="squarem"`` each plain step is followed by a SQUAREM step."""
        s = self.settings
        fm = steps.fm
        bar = tqdm(
            total=s.max_iter,
            disable=not s.progress or world()[0] != 0,
            desc=f"em[{restart}]" if s.n_init > 1 else "em",
        )

        label = "lp" if objective_name(fm).endswith("posterior") else "ll"

        def show(ll: float) -> None:
            bar.update(1)
            bar.set_postfix({label: f"{ll / steps.n_points:.6g}"})

        path = Trajectory(
            theta, s.max_iter, s.tol * steps.n_points, show if not bar.disable else None
        )
        try:
            path.start(*steps.expect(theta, 0))  # E-step at the initial values
            while not path.done:
                it, previous = path.n_iter + 1, path.theta
                theta = steps.maximise(path.theta, path.weights, it)  # M-step
                path.advance(theta, *steps.expect(theta, it), tested=True)  # E-step, test
                if s.accelerate == "squarem" and not path.done:
                    squarem_step(steps, path, previous)
        except FitDivergedError as e:
            e.state = {"theta": path.theta, "history": path.history}  # the last good state
            raise
        except KeyboardInterrupt:
            path.reason = f"interrupted after {path.n_iter} iterations"
        finally:
            bar.close()
        return path

    def _result(self, steps: Steps, path: Trajectory, restarts: list, t_start: float) -> Result:
        fm = steps.fm
        theta = {k: v.detach().clone() for k, v in path.theta.items()}
        with torch.no_grad():
            log_prior = fm.log_prior(theta)
        ll = path.history[-1] - log_prior
        k = sum(degrees_of_freedom(fm.free[n].constraint, v) for n, v in theta.items())
        n = steps.n_points
        info = {
            "stop_reason": path.reason,
            "seconds": time.perf_counter() - t_start,
            "n_points": n,
            "log_likelihood": ll,
            "log_prior": log_prior,
            "n_parameters": k,
            "bic": -2 * ll + k * math.log(n),
            "aic": -2 * ll + 2 * k,
            "restarts": restarts,
            "decreases": path.decreases,
            "extrapolations": path.extrapolations,
            "free": {name: f.kind for name, f in fm.free.items()},
            "closed_form": [name for up in steps.closed for name in up.names],
            "gradient": list(steps.gradient),
            "e_step": "chain" if fm.chain is not None else "contract",
            "steps": steps.name,
            "traced_sites": [s for g in fm.groups if g.kind == "traced" for s in g.sites],
        }
        return Result(
            params=theta,
            history=list(path.history),
            objective=objective_name(fm, steps.hard),
            converged=path.converged,
            n_iter=path.n_iter,
            info=info,
        )

    # ------------------------------------------------------------------ posterior
    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Put the fitted ``pyro.param`` values into Pyro's param store."""
        recreate_params(fit.pair.model, args=fit.args, kwargs=fit.kwargs)
        store = pyro.get_param_store()
        kinds = fit.info.get("free", {})
        for k, v in fit.params.items():
            if kinds.get(k, "param") == "param" and k in store:
                store[k] = v.to(store[k].dtype)

    @classmethod
    def posterior_draws(
        cls, fit: Fit, num_samples: int | None, seed: int, num_chains: int = 4
    ) -> dict[str, torch.Tensor]:
        """Independent draws from the Laplace approximation at the optimum
        (:mod:`jointkl.inference.em.laplace`), keyed by parameter / MAP site name, each
        ``(num_chains, num_samples, *shape)`` (``num_samples=None``: 100)."""
        return laplace_draws(fit, num_samples or DEFAULT_DRAWS, seed, num_chains)

    @classmethod
    def draws_kind(cls, fit: Fit) -> tuple[str, str]:
        """Independent draws from the Laplace approximation (not a Markov chain)."""
        return "independent", "laplace"


def _declaration(
    pair: Any, name: str, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """The model's declaration ``name`` on these data (its ``em_time_steps`` hook: identical
    time steps; ``em_mixture``, ``em_chain``: a mixture's, a hidden Markov chain's
    structure), or ``None``: none, or one that fails
    on them (the generic compilation then runs the model and reports what is wrong)."""
    declare = hook(pair, name)
    if declare is None:
        return None
    try:
        return declare(*args, **kwargs)
    except Exception:  # noqa: BLE001 (as the docstring says)
        return None
