"""EM's initial values: k-means++ or random responsibilities then an M-step, or the user's.

``"kmeans++"`` clusters the observations attached to each enumerated variable (greedy
k-means++ seeding, Arthur & Vassilvitskii 2007, and Lloyd steps to convergence, as
scikit-learn's ``KMeans``), ``"random"`` draws random
responsibilities (scikit-learn's ``init_params="random"``); either labelling gives the
weights of one M-step from the model's own initial values. A callable gives initial values of
(some of) the parameters and MAP globals directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from jointkl.inference.em.factor_model import FactorModel

if TYPE_CHECKING:
    from jointkl.inference.em.engine import Steps

from jointkl.errors import InputError

__all__ = ["initial_theta", "initial_labels"]

# Initial responsibilities mix the k-means labels with a little uniform mass, so that no
# discrete emission probability starts at an exact (and, under EM, absorbing) zero.
LABEL_SMOOTHING = 0.05
# Families whose M-step has no absorbing zero to avoid: their k-means labels are kept hard
# (as scikit-learn's GaussianMixture starts), so the initial means are the cluster means.
CONTINUOUS_FAMILIES = ("normal", "mvn")
# Lloyd's stopping tolerance, relative to the data's mean per-coordinate variance
# (scikit-learn's KMeans default tol).
KMEANS_TOL = 1e-4
# Seeding and the first Lloyd steps run on a random sample of this many points when there
# are more (each Lloyd step over all of 20k points costs about an EM iteration); Lloyd steps
# on all of them then start near their fixed point and take a few.
KMEANS_SAMPLE = 4096
# From this many coordinates on, Lloyd's cluster sums run along the points' rows
# (index_add_ over dim 0 of (n, D)); below it along the transposed points' rows, which is
# faster for narrow data (measured, n = 1797: D = 4 0.017 against 0.023 ms, D = 16 0.043
# against 0.030, D = 64 0.116 against 0.036).
WIDE = 16


def initial_theta(
    steps: Steps,
    init: str | Callable[..., Mapping[str, torch.Tensor]],
    kmeans_iter: int,
    seed: int,
    args: tuple,
    kwargs: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """θ to start one restart from.

    :param steps: EM's steps on the compiled model (whose M-step follows a labelling).
    :param init: ``"kmeans++"``, ``"random"``, or ``init(*args, seed=seed, **kwargs)``
        returning initial values by name (checked: known, shape, constraint).
    :param kmeans_iter: Lloyd steps of ``"kmeans++"``.
    :param seed: this restart's seed; ``args``, ``kwargs``: the data.
    """
    fm = steps.fm
    theta = {k: v.clone() for k, v in fm.init.items()}
    if callable(init):
        return _given(fm, theta, init(*args, seed=seed, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    labels = initial_labels(fm, init, gen, fm.dtype, kmeans_iter)
    return steps.initial_m_step(theta, fm.label_weights(labels))


def _given(fm: FactorModel, theta: dict[str, torch.Tensor], given: Any) -> dict[str, torch.Tensor]:
    """``theta`` with the values an init callable gave, each checked."""
    if not isinstance(given, Mapping):
        raise InputError(
            f"EM: init callable must return a dict of initial values, got {type(given).__name__}"
        )
    for k, v in given.items():
        if k not in fm.free:
            raise InputError(
                f"EM: init gave a value for {k!r}, which is not a parameter or MAP "
                f"global of the model; known: {sorted(fm.free)}"
            )
        v = torch.as_tensor(v, dtype=fm.dtype, device=fm.device)
        if v.shape != fm.free[k].shape:
            raise InputError(
                f"EM: init value of {k!r} has shape {tuple(v.shape)}, expected "
                f"{tuple(fm.free[k].shape)}"
            )
        if not bool(fm.free[k].constraint.check(v).all()):
            raise InputError(f"EM: init value of {k!r} violates its constraint")
        theta[k] = v
    return theta


def initial_labels(
    fm: FactorModel, how: str, gen: torch.Generator, dtype: torch.dtype, iters: int
) -> dict[str, torch.Tensor]:
    """Initial marginals of every enumerated variable, ``(plates..., card)``.

    ``"kmeans++"``: the observations attached to a variable (sites that depend on it alone)
    are clustered by greedy k-means++ seeding and at most ``iters`` Lloyd steps (to
    convergence, see :func:`_kmeans`); Gaussian observations keep hard labels, discrete
    ones get ``LABEL_SMOOTHING`` uniform mass; variables of one stacked
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
            smooth = g.family not in CONTINUOUS_FAMILIES
            lab = _kmeans(pts, var.card, gen, iters, live, smooth)
            if lab is None:
                continue
            lab = lab.reshape((len(vs),) + sizes + (var.card,))
            for r, v in enumerate(vs):
                labels[v] = lab[r]
    for v, var in fm.vars.items():
        if v not in labels:
            sizes = tuple(fm.plate_sizes[p] for p in var.plates)
            r = torch.rand(sizes + (var.card,), generator=gen, dtype=dtype).to(fm.device)
            labels[v] = r / r.sum(-1, keepdim=True)
    return labels


def _nearest(xt: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of every column of ``xt`` (the points transposed,
    ``(D, n)``): argmin_c ‖c‖² - 2 c·x (‖x‖² is the same for every centre), one
    ``(k, D) @ (D, n)`` product (faster than ``(n, D) @ (D, k)`` for few centres), and the
    first index of the minimum down the k rows (``min(0)``, which returns the first index
    of a tie as ``argmin`` does, at a tenth of ``argmin(0)``'s time on this layout)."""
    scores = torch.addmm(centres.square().sum(-1, keepdim=True), centres, xt, alpha=-2)
    return scores.min(0).indices


def _lloyd(
    xt: torch.Tensor, centres: torch.Tensor, iters: int, tol: float, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The centres after at most ``iters`` Lloyd steps on the points ``xt`` (transposed,
    ``(D, n)``) from ``centres``, stopping when the assignments no longer change or the
    centres move by less than ``tol`` (summed squared shift), and the points' nearest
    centres when the last step found them unchanged (``None`` otherwise). ``x``: the same
    points untransposed, ``(n, D)`` contiguous, given for wide data (cluster sums along its
    rows)."""
    k = centres.shape[0]
    assign = None
    for _ in range(iters):
        new_assign = _nearest(xt, centres)
        if assign is not None and torch.equal(new_assign, assign):
            return centres, assign
        assign = new_assign
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1)
        if x is not None:
            sums = x.new_zeros(k, x.shape[1]).index_add_(0, assign, x)
        else:
            sums = xt.new_zeros(xt.shape[0], k).index_add_(1, assign, xt).T
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        shift = float((new - centres).square().sum())
        centres = new
        if shift <= tol:
            break
    return centres, None


def _without_zero_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, D) without its columns that are 0 in every row, contiguous (``x`` itself
    when it has none)."""
    if x.shape[0] == 0 or x.shape[1] < 2:
        return x
    zero = x.amax(0).eq_(0).logical_and_(x.amin(0).eq_(0))  # (any(0) is slower)
    if not bool(zero.any()) or bool(zero.all()):
        return x
    # selected as rows of the transpose: index_select along dim 1 is several times slower
    return x.T.index_select(0, zero.logical_not_().nonzero().squeeze(-1)).T.contiguous()


def _kmeans(
    x: torch.Tensor,
    k: int,
    gen: torch.Generator,
    iters: int,
    live: torch.Tensor | None = None,
    smooth: bool = True,
) -> torch.Tensor | None:
    """Labels of every row of ``x`` from greedy k-means++ seeding and Lloyd steps on the
    ``live`` rows, as scikit-learn's ``KMeans(n_init=1)`` computes them: each new centre is
    the best (lowest potential Σ min_c ‖x - c‖²) of 2 + ⌊log k⌋ candidates drawn with
    probability ∝ D(x)² (Arthur & Vassilvitskii 2007), then at most ``iters`` Lloyd steps,
    stopping when the assignments no longer change or the centres move by less than
    ``KMEANS_TOL`` times the data's mean per-coordinate variance (summed squared shift).
    Beyond ``KMEANS_SAMPLE`` live rows, seeding and Lloyd steps run on a random sample of
    that many, and Lloyd steps on all live rows then start from the sample's centres (a
    fixed point of Lloyd on all of them, as without the sample, reached in a few steps).
    ``smooth``: mix ``LABEL_SMOOTHING`` uniform mass into the one-hot labels.

    A coordinate that is 0 in every row (the border pixels of images) adds exactly 0 to
    every distance and every centre: the steps run on the other coordinates."""
    width = x.shape[1]  # the tolerance's mean variance is over every coordinate
    x = _without_zero_columns(x)
    every = x
    x = x if live is None else x[live]
    n = x.shape[0]
    if n < k:
        return None
    if n > KMEANS_SAMPLE:
        # drawn on the CPU with the CPU generator: the same sample on every device
        x = x[torch.randperm(n, generator=gen)[:KMEANS_SAMPLE].to(x.device)]
        n = KMEANS_SAMPLE
    trials = 2 + int(math.log(k))
    # Squared distances to candidate centres by one product with the rows' squared norms
    # cached, on the points centred (k-means does not see a shift, and centring keeps
    # ‖x‖² - 2 c·x + ‖c‖² from cancelling for data far from the origin).
    xc = x - x.mean(0)
    norms = xc.square().sum(-1)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    d2 = (xc - xc[first]).square().sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        p = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        # drawn on the CPU with the CPU generator: the same centres on every device
        idx = torch.multinomial(p.cpu(), trials, replacement=True, generator=gen).to(x.device)
        cand = xc[idx]  # (t, D)
        dc = torch.addmm(norms, cand, xc.T, alpha=-2).add_(norms[idx].unsqueeze(-1))
        dc = torch.minimum(dc.clamp_min_(0), d2)  # (t, n)
        best = int(dc.sum(-1).argmin())
        chosen.append(int(idx[best]))
        d2 = dc[best]
    centres = x[chosen]
    # the mean per-coordinate variance, Σ (x - x̄)² / (n D) (x.var is several times slower)
    tol = KMEANS_TOL * float(norms.sum()) / norms.numel() / width if n > 1 else 0.0
    wide = x.shape[1] >= WIDE
    xs = x.contiguous()
    xst = xs.T.contiguous()
    centres, assign = _lloyd(xst, centres, iters, tol, xs if wide else None)
    pts = every if live is None else every[live]
    if n < pts.shape[0]:  # the sample's centres, polished by Lloyd steps on every point
        pts = pts.contiguous()
        centres, assign = _lloyd(pts.T.contiguous(), centres, iters, tol, pts if wide else None)
    # Lloyd's last assignment, when it found one for these centres, is that of the live
    # points; every point needs one when some are padding
    if assign is None or live is not None:
        whole = live is None and n == every.shape[0]  # x is every point, xst its transpose
        assign = _nearest(xst if whole else every.T.contiguous(), centres)
    onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)
    if live is not None:  # padding says nothing of its label
        onehot = torch.where(live.unsqueeze(-1), onehot, 1.0 / k)
    if not smooth:
        return onehot
    return (1 - LABEL_SMOOTHING) * onehot + LABEL_SMOOTHING / k
