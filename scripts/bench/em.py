"""Benchmark: jointkl's EM against scikit-learn, pomegranate, hmmlearn and Pyro's tutorial
recipe, same data, same initial parameters, one process.

Cases (one JSON object each on stdout):

- ``defaults``: what a user runs, each from its own initialisation at its own defaults, to
  the same tolerance (1e-3 on the mean log-likelihood per point; max_iter 1000 on both sides
  so that neither stops early): ``EM().fit(GaussianMixture(8, cov), x)`` for full, diag and
  spherical against scikit-learn's ``GaussianMixture(8, covariance_type=cov)`` at N=20k (and
  N=200k without ``--quick``), D=4, overlapping clusters; ``BernoulliMixture()`` on the
  binarised digits against a NumPy Bernoulli-mixture EM (and both from the anchor's k-means
  start, a *same start* row, as for every covariance); ``HMM()`` on its default data and
  ``HMM(6)`` on 100 x 500 steps against hmmlearn's ``GaussianHMM``. Times, iteration counts
  and the per-point log-likelihood gap (anchor minus jointkl's log-likelihood, the prior
  left out). ``--seeds 0,1,2,3,4`` measures every row at each seed and adds a
  ``defaults-seeds`` summary per row (times and iterations summed over the seeds).

- ``gmm``: Gaussian mixture, full covariances, N=200,000 points, D=4, K=8 overlapping
  clusters. Every EM runs the same number of iterations from the same start (k-means++ seeds,
  equal weights, the data covariance): the count scikit-learn needs at tol=1e-3, at least 30.
  All reach the same final log-likelihood (the figure ``loglik_per_point`` checks it).
- ``gmm-pyro``: time to the maximum-likelihood fit (EM run to tol 1e-7 per point): plain EM's
  and ``EM(accelerate="squarem")``'s, read off their histories, against Pyro's tutorial
  approach (TraceEnum_ELBO + AutoDelta + Adam(lr=0.1, betas=(0.8, 0.99)), the weak-prior zoo
  GMM) from the same start, until its marginal log-likelihood comes within 1e-3 nats/point of
  the better fit, or a time budget runs out.
- ``hmm``: Gaussian HMM (diagonal), 100 sequences x 500 steps, 6 states, against hmmlearn's
  GaussianHMM (its faster ``"scaling"`` implementation, and its default ``"log"`` one), same
  start and iteration count.
- ``hard``: the soft -> hard limit: soft EM with equal weights and a fixed shared spherical
  variance sigma^2 against k-means from the same centres (agreement of the partitions as
  sigma shrinks), and ``EM(assign="hard")`` (equal to k-means).
- ``scaling``: jointkl EM seconds per iteration (compile excluded) for N = 10^4 .. 10^6.

Times are wall-clock and this process's CPU seconds; ``ratio`` = jointkl / other (below 1:
jointkl is faster). Each contender first runs once on a small problem (imports, lazy
initialisation), so what is timed is fitting. One thread for torch and NumPy (``--threads``
changes torch's).

    python scripts/bench/em.py                   # every case
    python scripts/bench/em.py --cases gmm,hmm --quick
    python scripts/bench/em.py --cases defaults --rows gmm --sizes 200000
    python scripts/bench/em.py --cases defaults --quick --repeat 3 --rows gmm,bmm,hmm-default \
        --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator

# One thread for every library (set before NumPy loads its BLAS): on a shared machine,
# multi-threaded kernels mostly measure contention. --threads N changes torch's count only.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from jointkl.inference import EM  # noqa: E402
from jointkl.inference.em import FactorModel, m_step, plan_updates  # noqa: E402
from jointkl.models import HMM, BernoulliMixture, GaussianMixture  # noqa: E402

warnings.filterwarnings("ignore")


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def interleaved(contenders: dict, repeat: int, threads: int):
    """Run each contender ``repeat`` times, alternating, and keep the median wall and CPU
    seconds (a busy machine slows every contender alike; the ratio is what is compared)."""
    walls = {k: [] for k in contenders}
    cpus = {k: [] for k in contenders}
    results = {}
    for _ in range(repeat):
        for name, fn in contenders.items():
            gc.collect()
            # pomegranate sets torch's thread count when it fits: put ours back every time.
            torch.set_num_threads(threads)
            results[name], w, c = clock(fn)
            walls[name].append(w)
            cpus[name].append(c)

    def med(v):
        return sorted(v)[len(v) // 2]

    return results, {k: med(v) for k, v in walls.items()}, {k: med(v) for k, v in cpus.items()}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# --------------------------------------------------------------------------- data
def gmm_data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """Overlapping clusters: centres N(0, 1.5^2 I), random covariances around I."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (k, d))
    z = rng.integers(k, size=n)
    a = rng.normal(0, 0.4, (k, d, d)) + np.eye(d)
    return centres[z] + np.einsum("nij,nj->ni", a[z], rng.normal(size=(n, d)))


def gmm_start(x: np.ndarray, k: int, seed: int):
    from sklearn.cluster import kmeans_plusplus

    means, _ = kmeans_plusplus(x, k, random_state=seed)
    cov = np.cov(x.T)
    return np.full(k, 1.0 / k), means, np.stack([cov] * k)


def gmm_loglik(x: torch.Tensor, w, m, tril) -> float:
    d = torch.distributions.MultivariateNormal(m, scale_tril=tril)
    return float(torch.logsumexp(d.log_prob(x.unsqueeze(-2)) + w.log(), -1).sum())


# --------------------------------------------------------------------------- contenders
def run_sklearn_gmm(x, w0, m0, c0, iters, tol=0.0):
    from sklearn.mixture import GaussianMixture as SK

    sk = SK(
        len(w0),
        covariance_type="full",
        max_iter=iters,
        tol=tol,
        reg_covar=0.0,
        weights_init=w0,
        means_init=m0,
        precisions_init=np.linalg.inv(c0),
    )
    sk.fit(x)
    return sk


def run_jointkl_gmm(x, w0, m0, c0, iters):
    init = {
        "weights": torch.tensor(w0),
        "locs": torch.tensor(m0),
        "scale_tril": torch.linalg.cholesky(torch.tensor(c0)),
    }
    em = EM(max_iter=iters, tol=0.0, init=lambda x, seed: init, progress=False)
    return em.fit(GaussianMixture(len(w0), "full", priors=None), torch.as_tensor(x))


def run_pomegranate_gmm(x, w0, m0, c0, iters):
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    dists = [
        Normal(means=torch.tensor(m0[j]), covs=torch.tensor(c0[j]), covariance_type="full")
        for j in range(len(w0))
    ]
    model = GeneralMixtureModel(
        dists, priors=torch.tensor(w0), max_iter=iters, tol=-math.inf, verbose=False
    )
    model.fit(torch.as_tensor(x))
    return model


def case_gmm(args) -> dict:
    n, d, k = (20_000 if args.quick else 200_000), 4, 8
    x = gmm_data(n, d, k, args.seed)
    w0, m0, c0 = gmm_start(x, k, args.seed)
    sk_tol = run_sklearn_gmm(x, w0, m0, c0, 1000, tol=1e-3)
    iters = max(30, int(sk_tol.n_iter_))
    # warm-up: imports and lazy initialisation of every contender
    small = x[:2000]
    run_sklearn_gmm(small, w0, m0, c0, 2)
    run_jointkl_gmm(small, w0, m0, c0, 2)
    have_pom = True
    try:
        run_pomegranate_gmm(small, w0, m0, c0, 2)
    except ImportError:
        have_pom = False
    contenders = {
        "sklearn": lambda: run_sklearn_gmm(x, w0, m0, c0, iters),
        "jointkl": lambda: run_jointkl_gmm(x, w0, m0, c0, iters),
    }
    if have_pom:
        contenders["pomegranate"] = lambda: run_pomegranate_gmm(x, w0, m0, c0, iters)
    res, times, cpu = interleaved(contenders, args.repeat, args.threads)
    fit = res["jointkl"]
    ll = {"sklearn": float(res["sklearn"].score(x)), "jointkl": fit.history[-1] / n}
    if have_pom:
        pom_ll = res["pomegranate"].log_probability(torch.as_tensor(x)).sum()
        ll["pomegranate"] = float(pom_ll) / n
    return {
        "case": "gmm",
        "n": n,
        "d": d,
        "k": k,
        "iterations": iters,
        "sklearn_iterations_at_tol_1e-3": int(sk_tol.n_iter_),
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": {o: times["jointkl"] / times[o] for o in times if o != "jointkl"},
        "cpu_ratio": {o: cpu["jointkl"] / cpu[o] for o in cpu if o != "jointkl"},
        "loglik_per_point": ll,
        "jointkl_compile_seconds": fit.info.get("compile_seconds"),
        "ratio_after_compile": {
            o: (times["jointkl"] - fit.info.get("compile_seconds", 0.0)) / times[o]
            for o in times
            if o != "jointkl"
        },
    }


def case_gmm_pyro(args) -> dict:
    """Time to the maximum-likelihood fit: EM and Pyro's tutorial recipe, from one start,
    until each comes within 1e-3 nats/point of the log-likelihood EM converges to (tol 1e-7
    per point), or the recipe's time budget runs out."""
    import pyro
    import pyro.poutine as poutine
    from pyro.infer import SVI, TraceEnum_ELBO
    from pyro.infer.autoguide import AutoDelta, init_to_value
    from pyro.optim import Adam

    n, d, k = (20_000 if args.quick else 200_000), 4, 8
    x_np = gmm_data(n, d, k, args.seed)
    w0, m0, c0 = gmm_start(x_np, k, args.seed)
    init = {
        "weights": torch.tensor(w0),
        "locs": torch.tensor(m0),
        "scale_tril": torch.linalg.cholesky(torch.tensor(c0)),
    }
    x = torch.as_tensor(x_np)
    warm = EM(max_iter=2, init=lambda x, seed: init, progress=False, accelerate="squarem")
    warm.fit(GaussianMixture(k, "full", priors=None), x[:2000])  # imports, lazy initialisation
    runs = {}
    for accelerate in (None, "squarem"):
        em = EM(
            max_iter=3000,
            tol=1e-7,
            init=lambda x, seed: init,
            progress=False,
            accelerate=accelerate,
        )
        runs[accelerate] = clock(lambda em=em: em.fit(GaussianMixture(k, "full", priors=None), x))
    fit, em_wall, em_cpu = runs[None]
    target = max(f.history[-1] for f, _, _ in runs.values()) - 1e-3 * n

    def to_target(fit, wall):
        """Compile time plus the iterations to the target at the fit's mean iteration time."""
        first = next(i for i, h in enumerate(fit.history) if h >= target)
        per_iter = (wall - fit.info["compile_seconds"]) / max(fit.n_iter, 1)
        return first, fit.info["compile_seconds"] + first * per_iter

    first, em_to_target = to_target(fit, em_wall)
    sq_fit, sq_wall, sq_cpu = runs["squarem"]
    sq_first, sq_to_target = to_target(sq_fit, sq_wall)
    x = torch.as_tensor(x_np)
    model = GaussianMixture(k, "full", priors="weak")
    start = {
        "weights": torch.tensor(w0),
        "locs": torch.tensor(m0),
        "precision": torch.linalg.inv(torch.tensor(c0)),
    }
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = AutoDelta(
        poutine.block(model.model, hide=["assignment", "obs"]),
        init_loc_fn=init_to_value(values=start),
    )
    svi = SVI(
        model.model,
        guide,
        Adam({"lr": 0.1, "betas": (0.8, 0.99)}),
        TraceEnum_ELBO(max_plate_nesting=1),
    )
    budget = args.pyro_budget
    spent, spent_cpu, steps, best, reached = 0.0, 0.0, 0, -math.inf, None
    while spent < budget:
        _, w, c = clock(lambda: [svi.step(x) for _ in range(10)])
        spent, spent_cpu, steps = spent + w, spent_cpu + c, steps + 10
        with torch.no_grad():  # evaluated off the clock
            med = guide.median(x)
            tril = torch.linalg.cholesky(torch.linalg.inv(med["precision"]))
            ll = gmm_loglik(x, med["weights"], med["locs"], tril)
        best = max(best, ll)
        if ll >= target:
            reached = spent
            break
    speedup = "speedup" if reached is not None else "speedup_at_least"
    return {
        "case": "gmm-pyro",
        "n": n,
        "d": d,
        "k": k,
        "target_loglik_per_point": target / n,
        # plain EM (accelerate=None)
        "em_iterations_to_converge": fit.n_iter,
        "em_iterations_to_target": first,
        "em_seconds_to_target": em_to_target,
        "em_seconds_to_converge": em_wall,
        "em_cpu_seconds_to_converge": em_cpu,
        "em_compile_seconds": fit.info["compile_seconds"],
        "em_loglik_per_point": fit.history[-1] / n,
        # EM(accelerate="squarem")
        "squarem_iterations_to_converge": sq_fit.n_iter,
        "squarem_iterations_to_target": sq_first,
        "squarem_seconds_to_target": sq_to_target,
        "squarem_seconds_to_converge": sq_wall,
        "squarem_compile_seconds": sq_fit.info["compile_seconds"],
        "squarem_loglik_per_point": sq_fit.history[-1] / n,
        # Pyro's tutorial recipe
        "pyro_steps": steps,
        "pyro_seconds": spent,
        "pyro_cpu_seconds": spent_cpu,
        "reached_target": reached is not None,
        "pyro_best_loglik_per_point": best / n,
        f"{speedup}_plain_em": spent / em_to_target,
        f"{speedup}_squarem": spent / sq_to_target,
        # CPU: EM's share up to the target taken in proportion to its wall time
        "cpu_speedup_plain_em": spent_cpu / (em_cpu * em_to_target / em_wall),
        "cpu_speedup_squarem": spent_cpu / (sq_cpu * sq_to_target / sq_wall),
        "budget_seconds": budget,
    }


def hmm_sample(S, T, K, seed):
    g = torch.Generator().manual_seed(seed)
    trans = torch.full((K, K), 0.1 / (K - 1)) + 0.9 * torch.eye(K) - 0.1 / (K - 1) * torch.eye(K)
    means = torch.linspace(-3, 3, K)
    states = torch.empty(S, T, dtype=torch.long)
    states[:, 0] = torch.randint(K, (S,), generator=g)
    for t in range(1, T):
        states[:, t] = torch.multinomial(trans[states[:, t - 1]], 1, generator=g).squeeze(-1)
    x = means[states] + 0.8 * torch.randn(S, T, generator=g)
    return x.unsqueeze(-1).double()


def case_hmm(args) -> dict:
    from hmmlearn.hmm import GaussianHMM

    S, T, K = (20 if args.quick else 100), 500, 6
    x = hmm_sample(S, T, K, args.seed)
    flat = x.reshape(-1, 1).numpy()
    iters = 30
    q = np.quantile(flat[:, 0], np.linspace(0.1, 0.9, K))
    init = {
        "init": torch.full((K,), 1.0 / K, dtype=torch.float64),
        "trans": torch.full((K, K), 0.5 / K, dtype=torch.float64)
        + 0.5 * torch.eye(K, dtype=torch.float64),
        "locs": torch.tensor(q).unsqueeze(-1),
        "scales": torch.full((K, 1), float(flat.std()), dtype=torch.float64),
    }

    def hmmlearn_fit(data, lengths, n_iter, implementation="scaling"):
        h = GaussianHMM(
            K,
            "diag",
            n_iter=n_iter,
            tol=-math.inf,
            init_params="",
            params="stmc",
            min_covar=0.0,
            implementation=implementation,
        )
        h.startprob_, h.transmat_ = init["init"].numpy(), init["trans"].numpy()
        h.means_, h.covars_ = init["locs"].numpy(), init["scales"].numpy() ** 2
        return h.fit(data, lengths)

    def jointkl_fit(data, n_iter):
        return EM(max_iter=n_iter, tol=0.0, init=lambda x, seed: init, progress=False).fit(
            HMM(K), data
        )

    hmmlearn_fit(flat[: 5 * T], [T] * 5, 2)  # warm-up
    jointkl_fit(x[:5], 2)
    res, times, cpu = interleaved(
        {
            "hmmlearn": lambda: hmmlearn_fit(flat, [T] * S, iters),
            "hmmlearn-log": lambda: hmmlearn_fit(flat, [T] * S, iters, "log"),
            "jointkl": lambda: jointkl_fit(x, iters),
        },
        args.repeat,
        args.threads,
    )
    h, fit = res["hmmlearn"], res["jointkl"]
    return {
        "case": "hmm",
        "sequences": S,
        "steps": T,
        "states": K,
        "iterations": iters,
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": {o: times["jointkl"] / times[o] for o in times if o != "jointkl"},
        "cpu_ratio": {o: cpu["jointkl"] / cpu[o] for o in cpu if o != "jointkl"},
        "loglik_per_step": {
            "jointkl": fit.history[-1] / (S * T),
            "hmmlearn": float(h.score(flat, [T] * S)) / (S * T),
        },
        "jointkl_compile_seconds": fit.info.get("compile_seconds"),
        "ratio_after_compile": {
            o: (times["jointkl"] - fit.info.get("compile_seconds", 0.0)) / times[o]
            for o in times
            if o != "jointkl"
        },
    }


def _per_iteration(x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Seconds (wall, CPU) of one E-step + M-step on a compiled full-covariance GMM."""
    fm = FactorModel(GaussianMixture(8, "full", priors=None).model, (x,), {}, dtype=torch.float64)
    closed, grad = plan_updates(fm)

    def iterate():
        theta = fm.init
        for _ in range(reps):
            _, W = fm.e_step(theta)
            theta = m_step(fm, theta, W, closed, grad)

    _, w, c = clock(iterate)
    return w / reps, c / reps


def case_scaling(args) -> list[dict]:
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    out = []
    for n in sizes:
        w, c = _per_iteration(torch.as_tensor(gmm_data(n, 4, 8, args.seed)), reps=5)
        out.append(
            {
                "case": "scaling",
                "n": n,
                "seconds_per_iteration": w,
                "cpu_seconds_per_iteration": c,
                "cpu_microseconds_per_point_iteration": 1e6 * c / n,
            }
        )
    return out


# --------------------------------------------------------------------------- the defaults
# What a user runs: EM() on GaussianMixture(K, cov), BernoulliMixture(), HMM(), each against
# its anchor at the anchor's defaults, from each one's own initialisation. Both use the same
# tolerance (1e-3: the change of the mean log-likelihood per point, scikit-learn's meaning)
# and a max_iter high enough that neither stops on it (1000), so iteration counts compare.
MAX_ITER = 1000


def run_default_gmm(x: np.ndarray, k: int, cov: str, seed: int):
    fit = EM(max_iter=MAX_ITER, seed=seed, progress=False).fit(
        GaussianMixture(k, cov), torch.as_tensor(x)
    )
    return fit


def run_sklearn_default_gmm(x: np.ndarray, k: int, cov: str, seed: int):
    from sklearn.mixture import GaussianMixture as SK

    return SK(k, covariance_type=cov, max_iter=MAX_ITER, random_state=seed).fit(x)


def kmeans_start(x: np.ndarray, k: int, cov: str, seed: int) -> dict[str, np.ndarray]:
    """scikit-learn's GaussianMixture start, computed as it computes it: KMeans(k, n_init=1,
    random_state=seed) labels, then one M-step from those hard responsibilities (reg_covar
    1e-6); the precisions in the layout of both ``precisions_init`` and the zoo model's
    ``precision`` site."""
    from sklearn.cluster import KMeans

    labels = KMeans(k, n_init=1, random_state=seed).fit(x).labels_
    r = np.eye(k)[labels]
    nk = r.sum(0) + 10 * np.finfo(float).eps
    means = (r.T @ x) / nk[:, None]
    diff = x[None] - means[:, None]  # (k, n, d)
    if cov == "full":
        c = np.einsum("nk,kni,knj->kij", r, diff, diff) / nk[:, None, None]
        prec = np.linalg.inv(c + 1e-6 * np.eye(x.shape[1]))
    elif cov == "diag":
        prec = 1.0 / (np.einsum("nk,knd->kd", r, diff**2) / nk[:, None] + 1e-6)
    else:
        prec = 1.0 / ((np.einsum("nk,knd->kd", r, diff**2) / nk[:, None]).mean(-1) + 1e-6)
    return {"weights": nk / len(x), "locs": means, "precision": prec}


def same_start_gmm_row(x: np.ndarray, k: int, cov: str, args) -> dict:
    """jointkl and scikit-learn from one start (:func:`kmeans_start`), each at its defaults
    otherwise: the correctness pin (same iterates up to the priors' shrinkage)."""
    from sklearn.mixture import GaussianMixture as SK

    n = len(x)
    start = kmeans_start(x, k, cov, args.seed)
    init = {key: torch.as_tensor(v) for key, v in start.items()}

    def sk_fit():
        return SK(
            k,
            covariance_type=cov,
            max_iter=MAX_ITER,
            weights_init=start["weights"],
            means_init=start["locs"],
            precisions_init=start["precision"],
        ).fit(x)

    def em_fit():
        return EM(max_iter=MAX_ITER, progress=False, init=lambda x, seed: init).fit(
            GaussianMixture(k, cov), torch.as_tensor(x)
        )

    res, times, cpu = interleaved({"sklearn": sk_fit, "jointkl": em_fit}, args.repeat, args.threads)
    fit, sk = res["jointkl"], res["sklearn"]
    ll = {"jointkl": fit.info["log_likelihood"] / n, "sklearn": float(sk.score(x))}
    return {
        "case": "defaults",
        "row": f"GaussianMixture({k}, {cov!r}) N={n}, same start (scikit-learn's k-means)",
        "anchor": "sklearn GaussianMixture(weights_init, means_init, precisions_init)",
        "n": n,
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": times["jointkl"] / times["sklearn"],
        "iterations": {"jointkl": fit.n_iter, "sklearn": int(sk.n_iter_)},
        "loglik_per_point": ll,
        "loglik_gap_per_point": ll["sklearn"] - ll["jointkl"],
        "jointkl_objective": fit.objective,
        "jointkl_compile_seconds": fit.info["compile_seconds"],
    }


def default_gmm_rows(args, n: int, covs: tuple[str, ...]) -> list[dict]:
    d, k = 4, 8
    x = gmm_data(n, d, k, args.seed)
    small = x[:2000]
    out = []
    for cov in covs:
        run_default_gmm(small, k, cov, args.seed)  # warm-up
        run_sklearn_default_gmm(small, k, cov, args.seed)
        res, times, cpu = interleaved(
            {
                "sklearn": lambda cov=cov: run_sklearn_default_gmm(x, k, cov, args.seed),
                "jointkl": lambda cov=cov: run_default_gmm(x, k, cov, args.seed),
            },
            args.repeat,
            args.threads,
        )
        fit, sk = res["jointkl"], res["sklearn"]
        ll = {"jointkl": fit.info["log_likelihood"] / n, "sklearn": float(sk.score(x))}
        out.append(
            {
                "case": "defaults",
                "row": f"GaussianMixture({k}, {cov!r}) N={n}",
                "anchor": "sklearn GaussianMixture(covariance_type=..., max_iter=1000)",
                "n": n,
                "seconds": times,
                "cpu_seconds": cpu,
                "ratio": times["jointkl"] / times["sklearn"],
                "iterations": {"jointkl": fit.n_iter, "sklearn": int(sk.n_iter_)},
                "converged": {"jointkl": fit.converged, "sklearn": bool(sk.converged_)},
                "loglik_per_point": ll,
                "loglik_gap_per_point": ll["sklearn"] - ll["jointkl"],
                "jointkl_objective": fit.objective,
                "jointkl_compile_seconds": fit.info["compile_seconds"],
            }
        )
        out.append(same_start_gmm_row(x, k, cov, args))
    return out


def bernoulli_m_step(x: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The anchor's M-step: weights and probabilities (clipped to [1e-10, 1 - 1e-10]) from
    responsibilities ``r``."""
    nk = r.sum(0) + 10 * np.finfo(float).eps
    return nk / len(x), np.clip((r.T @ x) / nk[:, None], 1e-10, 1 - 1e-10)


def bernoulli_kmeans_start(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The anchor's start: ``KMeans(k, n_init=1, random_state=seed)`` hard labels, then one
    M-step (scikit-learn's mixture initialisation)."""
    from sklearn.cluster import KMeans

    labels = KMeans(k, n_init=1, random_state=seed).fit(x).labels_
    return bernoulli_m_step(x, np.eye(k)[labels])


def numpy_bernoulli_mixture(
    x: np.ndarray, k: int, tol: float, max_iter: int, seed: int, start=None
):
    """The anchor: Bernoulli-mixture EM written in NumPy as scikit-learn writes its mixtures
    (k-means responsibilities to start, log-space E-step with logsumexp, probabilities kept
    in [1e-10, 1 - 1e-10], stop when the mean log-likelihood changes by less than ``tol``).
    ``start``: given (weights, probs) instead of the k-means start.
    Returns (weights, probs, mean log-likelihood, iterations)."""
    from scipy.special import logsumexp

    def m_step(r):
        return bernoulli_m_step(x, r)

    def e_step(w, p):
        lp = x @ np.log(p).T + (1 - x) @ np.log1p(-p).T + np.log(w)
        norm = logsumexp(lp, axis=1)
        return norm.mean(), np.exp(lp - norm[:, None])

    w, p = bernoulli_kmeans_start(x, k, seed) if start is None else start
    ll = -np.inf
    for it in range(1, max_iter + 1):
        new, r = e_step(w, p)
        w, p = m_step(r)
        if abs(new - ll) < tol:
            return w, p, e_step(w, p)[0], it
        ll = new
    return w, p, e_step(w, p)[0], max_iter


def default_bmm_row(args) -> dict:
    (x,), _ = BernoulliMixture.default_data()
    x = x.double()
    k = BernoulliMixture().n_components
    xn = x.numpy()
    numpy_bernoulli_mixture(xn[:300], k, 1e-3, 2, args.seed)  # warm-up
    EM(max_iter=2, progress=False).fit(BernoulliMixture(), x[:300])
    res, times, cpu = interleaved(
        {
            "numpy": lambda: numpy_bernoulli_mixture(xn, k, 1e-3, MAX_ITER, args.seed),
            "jointkl": lambda: EM(max_iter=MAX_ITER, seed=args.seed, progress=False).fit(
                BernoulliMixture(), x
            ),
        },
        args.repeat,
        args.threads,
    )
    fit = res["jointkl"]
    ll = {"jointkl": fit.info["log_likelihood"] / len(x), "numpy": float(res["numpy"][2])}
    return {
        "case": "defaults",
        "row": f"BernoulliMixture() (K={k}) on binarised digits, N={len(x)}, D={x.shape[1]}",
        "anchor": "NumPy Bernoulli-mixture EM (k-means start, tol 1e-3)",
        "n": len(x),
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": times["jointkl"] / times["numpy"],
        "iterations": {"jointkl": fit.n_iter, "numpy": int(res["numpy"][3])},
        "loglik_per_point": ll,
        "loglik_gap_per_point": ll["numpy"] - ll["jointkl"],
        "jointkl_objective": fit.objective,
        "jointkl_compile_seconds": fit.info["compile_seconds"],
    }


def same_start_bmm_row(args) -> dict:
    """jointkl's ``BernoulliMixture()`` and the NumPy anchor from the anchor's own start
    (:func:`bernoulli_kmeans_start`, given to EM as ``init=``): the same iterates up to the
    Beta(1.001, 1.001) prior's smoothing and the anchor's clipping."""
    (x,), _ = BernoulliMixture.default_data()
    x = x.double()
    k = BernoulliMixture().n_components
    xn = x.numpy()
    start = bernoulli_kmeans_start(xn, k, args.seed)
    init = {"weights": torch.as_tensor(start[0]), "probs": torch.as_tensor(start[1])}
    res, times, cpu = interleaved(
        {
            "numpy": lambda: numpy_bernoulli_mixture(xn, k, 1e-3, MAX_ITER, args.seed, start),
            "jointkl": lambda: EM(max_iter=MAX_ITER, progress=False, init=lambda x, seed: init).fit(
                BernoulliMixture(), x
            ),
        },
        args.repeat,
        args.threads,
    )
    fit = res["jointkl"]
    ll = {"jointkl": fit.info["log_likelihood"] / len(x), "numpy": float(res["numpy"][2])}
    return {
        "case": "defaults",
        "row": f"BernoulliMixture() (K={k}), same start (the anchor's k-means)",
        "anchor": "NumPy Bernoulli-mixture EM (same start, tol 1e-3)",
        "n": len(x),
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": times["jointkl"] / times["numpy"],
        "iterations": {"jointkl": fit.n_iter, "numpy": int(res["numpy"][3])},
        "loglik_per_point": ll,
        "loglik_gap_per_point": ll["numpy"] - ll["jointkl"],
        "jointkl_objective": fit.objective,
        "jointkl_compile_seconds": fit.info["compile_seconds"],
    }


def default_hmm_row(args, label: str, x: torch.Tensor, k: int) -> dict:
    from hmmlearn.hmm import GaussianHMM

    x = x.double()
    S, T = x.shape[:2]
    flat = x.reshape(-1, 1).numpy()
    tol = 1e-3  # EM's default, per sequence (the "data" plate); hmmlearn's tol is a total

    def hmmlearn_fit(data, lengths):
        h = GaussianHMM(k, "diag", n_iter=MAX_ITER, tol=tol * len(lengths), random_state=0)
        return h.fit(data, lengths)

    def jointkl_fit(data):
        return EM(max_iter=MAX_ITER, seed=args.seed, progress=False).fit(HMM(k), data)

    hmmlearn_fit(flat[: 2 * T], [T] * 2)  # warm-up
    jointkl_fit(x[:2])
    res, times, cpu = interleaved(
        {"hmmlearn": lambda: hmmlearn_fit(flat, [T] * S), "jointkl": lambda: jointkl_fit(x)},
        args.repeat,
        args.threads,
    )
    h, fit = res["hmmlearn"], res["jointkl"]
    ll = {
        "jointkl": fit.info["log_likelihood"] / (S * T),
        "hmmlearn": float(h.score(flat, [T] * S)) / (S * T),
    }
    return {
        "case": "defaults",
        "row": label,
        "anchor": "hmmlearn GaussianHMM(K, 'diag', n_iter=1000, tol=1e-3 x sequences)",
        "seconds": times,
        "cpu_seconds": cpu,
        "ratio": times["jointkl"] / times["hmmlearn"],
        "iterations": {"jointkl": fit.n_iter, "hmmlearn": int(h.monitor_.iter)},
        "loglik_per_step": ll,
        "loglik_gap_per_step": ll["hmmlearn"] - ll["jointkl"],
        "jointkl_objective": fit.objective,
        "jointkl_compile_seconds": fit.info["compile_seconds"],
    }


def case_defaults(args) -> Iterator[dict]:
    """:func:`defaults_rows` for every seed of ``--seeds`` (default: ``--seed`` alone), each
    row tagged with its seed, then, for several seeds, one ``"defaults-seeds"`` summary per
    row: the seconds, CPU seconds and iterations summed over the seeds on each side (a
    single seed is one draw of both sides' initialisations: a start in a slow basin on
    either side decides a row's ratio)."""
    import copy

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        seeded = copy.copy(args)
        seeded.seed = seed
        for r in defaults_rows(seeded):
            r = {**r, "seed": seed}
            rows.setdefault(r["row"], []).append(r)
            if not args.summary_only:
                yield r
    if len(seeds) < 2:
        return
    for label, rs in rows.items():
        anchor = next(k for k in rs[0]["seconds"] if k != "jointkl")
        sides = [anchor, "jointkl"]
        total = {k: sum(r["seconds"][k] for r in rs) for k in sides}
        cpu = {k: sum(r["cpu_seconds"][k] for r in rs) for k in sides}
        gap = "loglik_gap_per_point" if "loglik_gap_per_point" in rs[0] else "loglik_gap_per_step"
        yield {
            "case": "defaults-seeds",
            "row": label,
            "seeds": seeds,
            "seconds": total,
            "cpu_seconds": cpu,
            "ratio": total["jointkl"] / total[anchor],
            "cpu_ratio": cpu["jointkl"] / cpu[anchor],
            "iterations": {k: [r["iterations"][k] for r in rs] for k in sides},
            "iterations_total": {k: sum(r["iterations"][k] for r in rs) for k in sides},
            gap: [r[gap] for r in rs],
        }


def defaults_rows(args) -> Iterator[dict]:
    """The rows named by ``--rows`` (gmm, bmm, hmm), each as soon as it is measured; the
    mixtures at N = 20k, and 200k without ``--quick`` (``--sizes`` names others)."""
    covs = tuple(args.covs.split(","))
    which = set(args.rows.split(","))
    if "gmm" in which:
        sizes = args.sizes or ("20000" if args.quick else "20000,200000")
        for n in sizes.split(","):
            yield from default_gmm_rows(args, int(n), covs)
    if "bmm" in which:
        yield default_bmm_row(args)
        yield same_start_bmm_row(args)
    if which & {"hmm", "hmm-default"}:
        (x,), _ = HMM().default_data(args.seed)
        yield default_hmm_row(args, "HMM() on its default data (20 x 100 steps)", x, 3)
    if which & {"hmm", "hmm-long"}:
        x = hmm_sample(100, 500, 6, args.seed)
        yield default_hmm_row(args, "HMM(6) on 100 x 500 steps", x, 6)


# --------------------------------------------------------------------------- soft -> hard
def case_hard(args) -> list[dict]:
    """Soft EM on a mixture with equal fixed weights and one fixed shared spherical variance
    sigma^2, against k-means (scikit-learn's Lloyd KMeans) from the same centres: the share of
    points soft EM's most probable component puts where k-means does, as sigma shrinks; and
    EM(assign="hard") itself."""
    import pyro
    import pyro.distributions as dist
    from sklearn.cluster import KMeans

    n, d, k = 5000, 2, 8
    x = torch.as_tensor(gmm_data(n, d, k, args.seed))
    start = torch.as_tensor(gmm_start(x.numpy(), k, args.seed)[1])

    def shared(x, sigma):
        locs = pyro.param("locs", lambda: start.clone())
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z",
                dist.Categorical(torch.full((k,), 1.0 / k, dtype=x.dtype)),
                infer={"enumerate": "parallel"},
            )
            pyro.sample("obs", dist.Normal(locs[z], sigma).to_event(1), obs=x)

    km = KMeans(k, init=start.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=1000)
    km_labels = torch.as_tensor(km.fit(x.numpy()).labels_)
    out = []
    for sigma in (2.0, 1.0, 0.5, 0.25, 0.1, 0.05, None):
        em = EM(
            max_iter=1000,
            tol=0.0 if sigma is None else 1e-9,
            progress=False,
            assign="hard" if sigma is None else "soft",
            init=lambda x, seed: {"locs": start},
        )
        fit = em.fit(lambda x, s=(sigma or 1.0): shared(x, s), x)
        labels = torch.cdist(x, fit.params["locs"]).argmin(-1)
        out.append(
            {
                "case": "hard",
                "assign": "hard" if sigma is None else "soft",
                "sigma": sigma,
                "n": n,
                "iterations": fit.n_iter,
                "agreement_with_kmeans": float((labels == km_labels).double().mean()),
                "max_centre_distance_to_kmeans": float(
                    (fit.params["locs"] - torch.as_tensor(km.cluster_centers_)).norm(dim=-1).max()
                ),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="defaults,gmm,gmm-pyro,hmm,scaling")
    p.add_argument("--quick", action="store_true", help="smaller problems (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="timed runs per contender (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--rows",
        default="gmm,bmm,hmm",
        help="defaults case: which rows (gmm, bmm, hmm = hmm-default + hmm-long)",
    )
    p.add_argument(
        "--covs", default="full,diag,spherical", help="defaults case: the mixtures' covariances"
    )
    p.add_argument("--sizes", default=None, help="defaults case: the mixtures' N, comma-separated")
    p.add_argument(
        "--seeds",
        default=None,
        help="defaults case: seeds, comma-separated (each: its own data where generated and "
        "both sides' initialisations), with a summary over them; default: --seed alone",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="defaults case with several --seeds: print the summaries over the seeds only",
    )
    p.add_argument(
        "--pyro-budget", type=float, default=600.0, help="most seconds for the Pyro tutorial recipe"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {
        "defaults": case_defaults,
        "gmm": case_gmm,
        "gmm-pyro": case_gmm_pyro,
        "hmm": case_hmm,
        "scaling": case_scaling,
        "hard": case_hard,
    }
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}
    for name in args.cases.split(","):
        if name not in cases:
            p.error(f"unknown case {name!r}; cases: {', '.join(cases)}")
        res = cases[name](args)
        for r in [res] if isinstance(res, dict) else res:
            emit({**r, **meta, "repeat": args.repeat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
