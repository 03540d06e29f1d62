"""Expectation-maximisation: exact EM for any Pyro model with discrete enumerable latents.

EM minimises the joint KL of DESIGN.md by alternating (SEEDS.md §1):

* **E-step** — the exact posterior p(z | x, θ) over every enumerated site. The model's factors
  are summed out (a forward recursion over :mod:`jointkl.chain` for mixtures and chains such as
  ``pyro.markov`` HMMs, Pyro's tensor contraction otherwise); the log-partition is the marginal
  log-likelihood and its gradient with respect to each factor table is that factor's posterior
  marginal. No E-step code is asked of the model author.
* **M-step** — θ ← argmax_θ E_{p(z|x,θ_old)} log p(x, z | θ) (+ log p(θ) for MAP globals):
  closed forms where a site is a standard exponential family with free parameters, L-BFGS on
  the expected complete-data log-likelihood for the rest (:mod:`jointkl.inference.em.mstep`
  says how the engine decides).

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
from typing import Any

import pyro
import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.factors import transform_for
from jointkl.inference.em.mstep import SingularCovariance, m_step, plan_updates
from pyro.distributions import constraints
from tqdm.auto import tqdm

from jointkl.engine import Engine, recreate_params, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.pair import as_pair

__all__ = ["EM", "bic", "aic", "n_parameters"]

INITS = ("kmeans++", "random")
ACCELERATORS = (None, "squarem")
# SQUAREM's step length |α| is capped (the scheme's own safeguard against a near-zero
# second difference, which would throw the point arbitrarily far).
SQUAREM_MAX_STEP = 64.0
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Initial responsibilities mix the k-means labels with a little uniform mass, so that no
# discrete emission probability starts at an exact (and, under EM, absorbing) zero.
LABEL_SMOOTHING = 0.05


@register_engine
class EM(Engine):
    """Exact expectation-maximisation for Pyro models with enumerated discrete latents.

    :param int max_iter: most EM iterations (M-steps) per restart.
    :param float tol: stop when the log-likelihood changes by less than ``tol`` per data
        point (per element of the ``"data"`` plate; scikit-learn's convention).
    :param int n_init: restarts from different initialisations; the best final
        log-likelihood wins.
    :param init: ``"kmeans++"`` (k-means++ seeding and a few Lloyd steps on the observations
        attached to each enumerated variable, then an M-step), ``"random"`` (random
        responsibilities, then an M-step, as scikit-learn's ``init_params="random"``), or a
        callable ``init(*args, seed=int, **kwargs) -> {name: value}`` giving initial values
        of (some of) the parameters and MAP globals.
    :param dtype: ``torch.float64`` (default) or ``torch.float32``; floating data is cast to it.
    :param int seed: the one seed for probes, initialisation and restarts.
    :param bool progress: show a tqdm bar per restart.
    :param float reg_covar: added to the diagonal of covariance (and to variance) estimates
        (scikit-learn's ``reg_covar``); 0 is exact EM.
    :param int mstep_iter: L-BFGS iterations of the gradient M-step per EM iteration.
    :param int kmeans_iter: Lloyd iterations of the ``"kmeans++"`` initialisation.
    :param accelerate: ``None`` (default: plain EM, iteration for iteration what
        scikit-learn and hmmlearn compute) or ``"squarem"`` (SQUAREM, Varadhan & Roland
        2008: two EM steps θ1 = M(θ0), θ2 = M(θ1), then the point
        θ0 - 2α r + α² v with r = θ1 - θ0, v = θ2 - 2θ1 + θ0, α = -‖r‖/‖v‖, in
        unconstrained coordinates; kept only when its log-likelihood is at least θ1's, else
        θ2 is). The log-likelihood still never decreases; slow, nearly linear EM (overlapping
        clusters) typically needs several times fewer iterations. ``max_iter`` then counts
        log-likelihood evaluations, and only plain EM steps are tested against ``tol``.
    """

    name = "em"
    description = "expectation-maximisation: exact E-step over enumerated discrete latents"

    def __init__(
        self,
        max_iter: int = 100,
        tol: float = 1e-3,
        n_init: int = 1,
        init: str | Callable[..., Mapping[str, torch.Tensor]] = "kmeans++",
        dtype: torch.dtype | str = torch.float64,
        seed: int = 0,
        progress: bool = True,
        reg_covar: float = 0.0,
        mstep_iter: int = 20,
        kmeans_iter: int = 10,
        accelerate: str | None = None,
    ):
        _check_int("max_iter", max_iter, 0)
        _check_int("n_init", n_init, 1)
        _check_int("mstep_iter", mstep_iter, 0)
        _check_int("kmeans_iter", kmeans_iter, 0)
        _check_int("seed", seed, 0)
        if not _is_number(tol) or tol < 0:
            raise InputError(f"EM: tol must be a number >= 0, got {tol!r}")
        if not _is_number(reg_covar) or reg_covar < 0:
            raise InputError(f"EM: reg_covar must be a number >= 0, got {reg_covar!r}")
        if accelerate not in ACCELERATORS:
            raise InputError(f"EM: accelerate must be one of {ACCELERATORS}, got {accelerate!r}")
        if not callable(init) and init not in INITS:
            raise InputError(f"EM: init must be one of {INITS} or a callable, got {init!r}")
        if isinstance(dtype, str):
            if dtype.removeprefix("torch.") not in DTYPES:
                raise InputError(f"EM: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype.removeprefix("torch.")]
        if dtype not in DTYPES.values():
            raise InputError(f"EM: dtype must be torch.float64 or torch.float32, got {dtype!r}")
        self._init_fn = init if callable(init) else None
        self.dtype = dtype
        self.progress = progress
        super().__init__(
            max_iter=int(max_iter),
            tol=float(tol),
            n_init=int(n_init),
            init="callable" if callable(init) else init,
            dtype=str(dtype).removeprefix("torch."),
            seed=int(seed),
            reg_covar=float(reg_covar),
            mstep_iter=int(mstep_iter),
            kmeans_iter=int(kmeans_iter),
            accelerate=accelerate,
        )

    # ------------------------------------------------------------------ fitting
    def fit(self, pair: Any, *args: Any, **kwargs: Any) -> Fit:
        """Fit ``pair.model`` to the data ``model(*args, **kwargs)``; returns a :class:`Fit`
        whose history is the log-likelihood after each M-step (``history[0]`` at the
        initial values; for models with MAP globals, log p(x | θ) + log p(θ))."""
        pair = as_pair(pair)
        cfg = self.config
        args, kwargs = _cast_data(args, kwargs, self.dtype)
        t_start = time.perf_counter()
        pyro.clear_param_store()
        pyro.set_rng_seed(cfg["seed"])
        fm = FactorModel(pair.model, args, kwargs, seed=cfg["seed"], dtype=self.dtype)
        closed, gradient = plan_updates(fm)
        t_compiled = time.perf_counter()
        best, restarts, last_error = None, [], None
        for r in range(cfg["n_init"]):
            seed = cfg["seed"] + r
            try:
                theta0 = self._initial(fm, closed, gradient, seed, args, kwargs)
                run = self._run(fm, theta0, closed, gradient, r)
            except FitDivergedError as e:
                restarts.append({"seed": seed, "error": str(e)})
                last_error = e
                continue
            restarts.append(
                {"seed": seed, "log_likelihood": run["history"][-1], "n_iter": run["n_iter"]}
            )
            if best is None or run["history"][-1] > best["history"][-1]:
                best = run
        if best is None:
            raise FitDivergedError(
                f"EM: all {cfg['n_init']} restart(s) diverged; last: {last_error}"
            ) from last_error
        fit = self._make_fit(pair, fm, closed, gradient, best, restarts, args, kwargs, t_start)
        fit.info["compile_seconds"] = t_compiled - t_start
        return fit

    def _run(self, fm, theta, closed, gradient, restart: int) -> dict[str, Any]:
        """EM iterations from ``theta`` (SQUAREM cycles when ``accelerate="squarem"``).

        Every entry of the history is the log-likelihood of a point the fit visited, and
        each is at least the one before: an EM step cannot lower it (Dempster et al. 1977),
        and an extrapolated point is kept only when it is no worse than the EM step it
        extrapolates from.
        """
        cfg = self.config
        history: list[float] = []
        state = {"converged": False, "reason": "max_iter", "decreases": 0}
        bar = tqdm(
            total=cfg["max_iter"],
            disable=not self.progress,
            desc=f"em[{restart}]" if cfg["n_init"] > 1 else "em",
        )

        def evaluate(th, it, strict=True):
            """E-step at ``th``: (log-likelihood, weights); a non-finite value stops the fit
            (``strict``) or returns ``None`` (a rejected extrapolation)."""
            ll, W = fm.e_step(th)
            if math.isfinite(ll):
                return ll, W
            if not strict:
                return None
            err = FitDivergedError(
                f"EM: the log-likelihood became {ll} at iteration {it}; the last good "
                f"state (iteration {it - 1}) is in this error's .state; check the data "
                "or set reg_covar > 0"
            )
            err.state = {"theta": theta, "history": history}
            raise err

        def maximise(th, W, it):
            try:
                return m_step(fm, th, W, closed, gradient, cfg["reg_covar"], cfg["mstep_iter"])
            except SingularCovariance as e:
                err = FitDivergedError(f"EM: at iteration {it}: {e}")
                err.state = {"theta": theta, "history": history}
                raise err from e

        def record(ll, em_step):
            """Append a log-likelihood; True when the fit should stop. Only a plain EM step's
            change is a convergence test (an extrapolation's gain says nothing of it)."""
            change = ll - history[-1]
            if change < -1e-9 * max(1.0, abs(history[-1])):
                state["decreases"] += 1
            history.append(ll)
            bar.update(1)
            bar.set_postfix(ll=f"{ll / fm.n_points:.6g}")
            if em_step and abs(change) <= cfg["tol"] * fm.n_points:
                state["converged"], state["reason"] = True, "tol"
                return True
            return len(history) - 1 >= cfg["max_iter"]

        try:
            ll, W = evaluate(theta, 0)
            history.append(ll)
            done = cfg["max_iter"] == 0
            while not done:
                it = len(history)
                theta1 = maximise(theta, W, it)
                ll1, W1 = evaluate(theta1, it)
                theta0, theta = theta, theta1
                done = record(ll1, True)
                if done or cfg["accelerate"] is None:
                    W = W1
                    continue
                # SQUAREM (Varadhan & Roland 2008, scheme S3): a second EM step, then a
                # squared extrapolation of the two; kept only if the log-likelihood there is
                # at least the first step's, else the plain second step is taken.
                theta2 = maximise(theta1, W1, it + 1)
                jump = squarem_point(fm, theta0, theta1, theta2)
                tried = None
                if jump is not None:
                    try:
                        tried = evaluate(jump, it + 1, strict=False)
                    except (RuntimeError, ValueError):  # e.g. a Cholesky factor that fails
                        tried = None
                if tried is not None and tried[0] >= ll1:
                    theta, (ll, W) = jump, tried
                    state["accepted"] = state.get("accepted", 0) + 1
                else:
                    theta = theta2
                    ll, W = evaluate(theta2, it + 1)
                done = record(ll, tried is None or tried[0] < ll1)
        except KeyboardInterrupt:
            state["reason"] = f"interrupted after {len(history) - 1} iterations"
        finally:
            bar.close()
        return {
            "theta": theta,
            "history": history,
            "converged": state["converged"],
            "reason": state["reason"],
            "n_iter": len(history) - 1,
            "decreases": state["decreases"],
            "extrapolations": state.get("accepted", 0),
        }

    # ------------------------------------------------------------------ initialisation
    def _initial(self, fm, closed, gradient, seed, args, kwargs) -> dict[str, torch.Tensor]:
        cfg = self.config
        theta = {k: v.clone() for k, v in fm.init.items()}
        if self._init_fn is not None:
            given = self._init_fn(*args, seed=seed, **kwargs)
            if not isinstance(given, Mapping):
                raise InputError(
                    f"EM: init callable must return a dict of initial values, got "
                    f"{type(given).__name__}"
                )
            for k, v in given.items():
                if k not in fm.free:
                    raise InputError(
                        f"EM: init gave a value for {k!r}, which is not a parameter or MAP "
                        f"global of the model; known: {sorted(fm.free)}"
                    )
                v = torch.as_tensor(v, dtype=self.dtype)
                if v.shape != fm.free[k].shape:
                    raise InputError(
                        f"EM: init value of {k!r} has shape {tuple(v.shape)}, expected "
                        f"{tuple(fm.free[k].shape)}"
                    )
                if not bool(fm.free[k].constraint.check(v).all()):
                    raise InputError(f"EM: init value of {k!r} violates its constraint")
                theta[k] = v
            return theta
        gen = torch.Generator().manual_seed(seed)
        labels = initial_labels(fm, cfg["init"], gen, self.dtype, cfg["kmeans_iter"])
        W = fm.label_weights(labels)
        try:
            return m_step(fm, theta, W, closed, gradient, cfg["reg_covar"], cfg["mstep_iter"])
        except SingularCovariance as e:
            raise FitDivergedError(f"EM: initial M-step: {e}") from e

    # ------------------------------------------------------------------ the result
    def _make_fit(self, pair, fm, closed, gradient, run, restarts, args, kwargs, t_start) -> Fit:
        theta = {k: v.detach().clone() for k, v in run["theta"].items()}
        with torch.no_grad():
            log_prior = fm.log_prior(theta)
        ll = run["history"][-1] - log_prior
        k = sum(_dof(fm.free[n].constraint, v) for n, v in theta.items())
        n = fm.n_points
        info = {
            "stop_reason": run["reason"],
            "seconds": time.perf_counter() - t_start,
            "n_points": n,
            "log_likelihood": ll,
            "log_prior": log_prior,
            "n_parameters": k,
            "bic": -2 * ll + k * math.log(n),
            "aic": -2 * ll + 2 * k,
            "restarts": restarts,
            "decreases": run["decreases"],
            "extrapolations": run["extrapolations"],
            "free": {name: f.kind for name, f in fm.free.items()},
            "closed_form": [name for up in closed for name in up.names],
            "gradient": list(gradient),
            "e_step": "chain" if fm.chain is not None else "contract",
            "traced_sites": [s for g in fm.groups if g.kind == "traced" for s in g.sites],
        }
        return Fit(
            engine=self.name,
            config=dict(self.config),
            params=theta,
            history=list(run["history"]),
            objective="log_likelihood",
            converged=run["converged"],
            n_iter=run["n_iter"],
            info=info,
            model_spec=pair.spec() if callable(getattr(pair, "spec", None)) else None,
            pair=pair,
            args=args,
            kwargs=kwargs,
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
    def posterior_draws(cls, fit: Fit, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """Draws from the Laplace approximation at the optimum: a Gaussian in unconstrained
        coordinates whose precision is minus the Hessian of the (penalised) marginal
        log-likelihood, mapped to the constrained space. Keyed by parameter / MAP site name,
        each ``(1, num_samples, *shape)``."""
        lap = laplace(fit)
        gen = torch.Generator().manual_seed(seed)
        mean, factor = lap["mean"], lap["factor"]
        eps = torch.randn(num_samples, factor.shape[1], generator=gen, dtype=mean.dtype)
        u = mean + eps @ factor.T
        out, start = {}, 0
        for name, shape, size in zip(lap["names"], lap["shapes"], lap["sizes"], strict=True):
            uu = u[:, start : start + size].reshape((num_samples,) + tuple(shape))
            start += size
            t = transform_for(lap["constraints"][name])
            out[name] = t(uu).unsqueeze(0)
        return out


# --------------------------------------------------------------------------- SQUAREM
def squarem_point(
    fm: FactorModel,
    theta0: Mapping[str, torch.Tensor],
    theta1: Mapping[str, torch.Tensor],
    theta2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor] | None:
    """SQUAREM's extrapolation θ0 - 2α r + α² v (scheme S3, α = -‖r‖/‖v‖ clamped to
    [-SQUAREM_MAX_STEP, -1]; α = -1 gives θ2) of three successive EM iterates, taken in
    unconstrained coordinates so that the point satisfies every constraint. ``None`` when
    there is nothing to extrapolate (a fixed point, or a value on its constraint's boundary,
    e.g. an exact zero probability, whose unconstrained coordinate is infinite)."""
    names = list(theta0)
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    us = [{n: ts[n].inv(th[n]) for n in names} for th in (theta0, theta1, theta2)]
    if not all(bool(torch.isfinite(u[n]).all()) for u in us for n in names):
        return None
    r = {n: us[1][n] - us[0][n] for n in names}
    v = {n: us[2][n] - 2 * us[1][n] + us[0][n] for n in names}
    rr = sum(float(t.square().sum()) for t in r.values())
    vv = sum(float(t.square().sum()) for t in v.values())
    if vv == 0.0 or rr == 0.0:
        return None
    alpha = max(-math.sqrt(rr / vv), -SQUAREM_MAX_STEP)
    if alpha >= -1.0:
        return None  # the plain second step: nothing gained by a third evaluation
    out = {}
    for n in names:
        u = us[0][n] - 2 * alpha * r[n] + alpha**2 * v[n]
        out[n] = ts[n](u)
    return out


# --------------------------------------------------------------------------- Laplace
def laplace(fit: Fit) -> dict[str, Any]:
    """The Laplace approximation of a fit (computed once, cached in ``fit.state``)."""
    if fit.pair is None:
        raise InputError("this Fit has no model attached; load it with Fit.load(dir, pair=...)")
    dtype = DTYPES.get(fit.config.get("dtype", "float64"), torch.float64)
    fm = FactorModel(
        fit.pair.model, fit.args, fit.kwargs, seed=fit.config.get("seed", 0), dtype=dtype
    )
    names = [n for n in fm.free if n in fit.params]
    ts = {n: transform_for(fm.free[n].constraint) for n in names}
    theta = {n: fit.params[n].to(dtype) for n in names}
    us = {n: ts[n].inv(theta[n]).detach() for n in names}
    shapes = [tuple(us[n].shape) for n in names]
    sizes = [us[n].numel() for n in names]
    mean = torch.cat([us[n].reshape(-1) for n in names])
    if "laplace:factor" in fit.state:
        factor = fit.state["laplace:factor"].to(dtype)
    else:
        factor = _laplace_factor(fm, names, ts, theta, us, mean, sizes)
        fit.state["laplace:factor"] = factor
    return {
        "names": names,
        "shapes": shapes,
        "sizes": sizes,
        "mean": mean,
        "factor": factor,
        "constraints": {n: fm.free[n].constraint for n in names},
    }


def _laplace_factor(fm, names, ts, theta, us, mean, sizes) -> torch.Tensor:
    """A factor F with F F^T = (-H)^-1 on the coordinates that move the constrained value
    (lower_cholesky's unused upper triangle does not); directions where -H is not positive
    (flat or saddle: e.g. an empty component) get a tiny variance instead."""
    # Active coordinates: a random direction through the transform's Jacobian.
    active = []
    for n in names:
        u = us[n].clone().requires_grad_()
        with torch.enable_grad():
            y = ts[n](u)
            (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), u)
        active.append(g.reshape(-1) != 0)
    active = torch.cat(active)
    idx = active.nonzero().squeeze(-1)

    def f(v):
        u = mean.clone().index_copy(0, idx, v)
        th, start = {}, 0
        for n, size in zip(names, sizes, strict=True):
            th[n] = ts[n](u[start : start + size].reshape(us[n].shape))
            start += size
        return fm.log_partition(fm.tables(th), twice_differentiable=True)

    H = _hessian(f, mean[idx].clone())
    P = -(H + H.T) / 2
    lam, V = torch.linalg.eigh(P)
    floor = lam.abs().max().clamp_min(1.0) * 1e-8
    lam = torch.where(lam > floor, lam, floor.expand_as(lam) * 1e8)
    factor = torch.zeros(mean.numel(), idx.numel(), dtype=mean.dtype)
    factor[idx] = V / lam.sqrt()
    return factor


HESSIAN_CHUNK = 16


def _hessian(f, v0: torch.Tensor) -> torch.Tensor:
    """Hessian of a scalar function by Hessian-vector products, ``HESSIAN_CHUNK`` rows at a
    time (a fully vectorised Hessian holds one copy of the graph per row: gigabytes for a
    digits mixture's 649 parameters)."""
    n = v0.numel()
    with torch.enable_grad():
        v = v0.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(f(v), v, create_graph=True)
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        rows = []
        for s in range(0, n, HESSIAN_CHUNK):
            basis = eye[s : s + HESSIAN_CHUNK]
            try:
                (h,) = torch.autograd.grad(
                    g, v, grad_outputs=basis, retain_graph=True, is_grads_batched=True
                )
            except RuntimeError:  # an op without a batching rule: one row at a time
                h = torch.stack(
                    [torch.autograd.grad(g, v, grad_outputs=b, retain_graph=True)[0] for b in basis]
                )
            rows.append(h.detach())
    return torch.cat(rows)


# --------------------------------------------------------------------------- information criteria
def n_parameters(fit: Fit) -> int:
    """Free parameters of a fit, counted in unconstrained coordinates (a K-simplex has K-1,
    a D x D Cholesky factor D(D+1)/2, a correlation Cholesky factor D(D-1)/2)."""
    if "n_parameters" in fit.info:
        return int(fit.info["n_parameters"])
    raise InputError("this Fit has no parameter count: it was not made by the EM engine")


def bic(fit: Fit, n: int | None = None) -> float:
    """Bayesian information criterion, -2 log L + k log n (lower is better); ``n`` defaults
    to the size of the ``"data"`` plate."""
    n = fit.info["n_points"] if n is None else n
    return -2 * float(fit.info["log_likelihood"]) + n_parameters(fit) * math.log(n)


def aic(fit: Fit) -> float:
    """Akaike information criterion, -2 log L + 2 k (lower is better)."""
    return -2 * float(fit.info["log_likelihood"]) + 2 * n_parameters(fit)


def _dof(constraint: Any, value: torch.Tensor) -> int:
    if isinstance(constraint, type(constraints.simplex)):
        return value.numel() - value.numel() // max(value.shape[-1], 1)
    if isinstance(
        constraint, (type(constraints.lower_cholesky), type(constraints.positive_definite))
    ):
        d = value.shape[-1]
        return value.numel() // (d * d) * d * (d + 1) // 2
    if isinstance(constraint, type(constraints.corr_cholesky)):
        d = value.shape[-1]
        return value.numel() // (d * d) * d * (d - 1) // 2
    return transform_for(constraint).inv(value).numel()


# --------------------------------------------------------------------------- initial labels
def initial_labels(fm, how: str, gen, dtype, iters: int) -> dict[str, torch.Tensor]:
    """Initial marginals of every enumerated variable, ``(plates..., card)``.

    ``"kmeans++"``: the observations attached to a variable (sites that depend on it alone)
    are clustered by k-means++ seeding and ``iters`` Lloyd steps; variables of one stacked
    group (all time steps of an HMM) share the clustering. Others, and ``"random"``: uniform
    random responsibilities.
    """
    labels: dict[str, torch.Tensor] = {}
    if how == "kmeans++":
        for g in fm.groups:
            if g.value != "data" or len(g.cards) != 1 or g.data is None:
                continue
            vs = [r[0] for r in g.roles]
            var = fm.vars[vs[0]]
            if any(v in labels for v in vs) or tuple(g.plates) != var.plates:
                continue
            sizes = tuple(fm.plate_sizes[p] for p in var.plates)
            x = g.data[:, 0]  # (rows, plates..., event)
            if tuple(x.shape[1 : 1 + len(sizes)]) != sizes:
                continue
            if g.family == "categorical" or not x.is_floating_point():
                x = torch.nn.functional.one_hot(x.long(), int(x.max()) + 1)
            pts = x.reshape(x.shape[0] * math.prod(sizes), -1).to(dtype)
            live = None
            if g.mask is not None:  # padding (masked observations) places no centre
                live = g.mask[:, 0].expand((x.shape[0],) + sizes).reshape(-1)
            lab = _kmeans(pts, var.card, gen, iters, live)
            if lab is None:
                continue
            lab = lab.reshape((len(vs),) + sizes + (var.card,))
            for r, v in enumerate(vs):
                labels[v] = lab[r]
    for v, var in fm.vars.items():
        if v not in labels:
            sizes = tuple(fm.plate_sizes[p] for p in var.plates)
            r = torch.rand(sizes + (var.card,), generator=gen, dtype=dtype)
            labels[v] = r / r.sum(-1, keepdim=True)
    return labels


def _kmeans(x: torch.Tensor, k: int, gen, iters: int, live=None) -> torch.Tensor | None:
    """Soft labels of every row of ``x`` from k-means++ and Lloyd steps on the ``live`` rows."""
    every = x
    x = x if live is None else x[live]
    n = x.shape[0]
    if n < k:
        return None
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = (x - centres[0]).square().sum(-1)
    for _ in range(1, k):
        # k-means++ (Arthur & Vassilvitskii 2007): next centre with probability ∝ D(x)^2.
        total = d2.sum()
        p = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        i = torch.multinomial(p, 1, generator=gen)
        centres = torch.cat([centres, x[i]])
        d2 = torch.minimum(d2, (x - x[i]).square().sum(-1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(-1)
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(new, centres):
            break
        centres = new
    assign = torch.cdist(every, centres).argmin(-1)
    onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)
    if live is not None:  # padding says nothing of its label
        onehot = torch.where(live.unsqueeze(-1), onehot, 1.0 / k)
    return (1 - LABEL_SMOOTHING) * onehot + LABEL_SMOOTHING / k


# --------------------------------------------------------------------------- helpers
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, value: Any, low: int) -> None:
    ok = _is_number(value) and float(value).is_integer() and value >= low
    if not ok:
        raise InputError(f"EM: {name} must be an integer >= {low}, got {value!r}")


def _cast_data(args: tuple, kwargs: Mapping[str, Any], dtype: torch.dtype):
    """Floating data to the EM dtype (integer data, e.g. categories, is left alone); refuse
    NaN/inf before any work starts."""

    def cast(where: str, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            if not torch.isfinite(a).all():
                bad = int((~torch.isfinite(a)).sum())
                raise InputError(f"EM: data {where} has {bad} NaN/inf value(s)")
            return a.to(dtype)
        return a

    return (
        tuple(cast(f"argument {i}", a) for i, a in enumerate(args)),
        {k: cast(repr(k), a) for k, a in kwargs.items()},
    )
