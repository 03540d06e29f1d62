"""EM on data larger than memory and across processes: the E-step as a pass over blocks of rows.

A mixture's E-step statistics are sums over data points, so they can be accumulated a block
of rows at a time and, under ``torch.distributed``, summed across processes:

* **Rows.** The data argument may be any *row source*: a NumPy array (a ``numpy.memmap``
  or ``np.load(path, mmap_mode="r")``, read a block at a time), a tensor, or any object with
  ``.shape``, ``.dtype``, ``len()`` and row slicing ``x[a:b]`` returning a NumPy array.
* **One pass per iteration.** The model is compiled once per distinct block size into a
  :class:`~jointkl.inference.em.factor_model.FactorModel` whose observed values are replaced
  by each block in turn (the compiled structure does not depend on them). Each block's
  E-step gives its log-likelihood and posterior weights, from which the block's sufficient
  statistics are summed (:func:`block_statistics`): counts Σ_n r_nk for probability vectors,
  Σ_n r_nk x_n for Bernoulli / Poisson means, and the moments Σ_n r_nk Φ(x_n) for a Gaussian
  (Φ = [(x - c)(x - c)^T, x - c, 1] about a fixed centre c, the initial subsample's mean). The
  M-step (:meth:`StreamedSteps.maximise`) is the in-memory closed forms applied to those sums
  (:mod:`jointkl.inference.em.updates`), so the iterates are the in-memory fit's up to
  float summation order.
* **Distributed.** When ``torch.distributed`` is initialised with more than one process,
  rank r of P takes the contiguous rows [⌊rN/P⌋, ⌊(r+1)N/P⌋); the statistics and the
  log-likelihood are packed into one flat tensor and summed by one ``all_reduce`` per
  iteration, so P processes follow the iterates of one.
* **Initialisation in bounded memory.** k-means++ (or a random labelling, or the user's
  callable) runs on a seeded subsample of ``init_rows`` rows (all of them when there are no
  more), one per stratum of N / ``init_rows`` consecutive rows, read by every process alike;
  rank 0's initial values are broadcast so every rank starts from the same θ.

Limits: mixtures (one enumerated variable per data point) whose every free variable has a
closed-form M-step of the kinds in :data:`STREAMED_KINDS`; the observations are the one
row-source argument (other arguments are passed whole). Anything else is refused with an
:class:`~jointkl.errors.InputError` naming the reason.
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jointkl.inference.em.factor_model import FactorModel
from jointkl.inference.em.gaussian import (
    DIAGONAL_VIEWS,
    data_moments,
    diagonal_features,
    moment_parts,
    weighted_diagonal,
    weighted_moments,
)
from jointkl.inference.em.mstep import SingularCovariance, Update
from jointkl.inference.em.statistics import counts, target_shape, to_param, weighted_sums, wsum
from jointkl.inference.em.updates import (
    categorical_from_counts,
    diagonal_scale_from_sums,
    full_scale_from_sums,
    mean_from_sums,
    mvn_loc_from_sums,
)

from jointkl.distributed import rank, world_size
from jointkl.errors import FitDivergedError, InputError

__all__ = [
    "STREAMED_KINDS",
    "BLOCK_BYTES",
    "IN_MEMORY_BYTES",
    "is_row_source",
    "world",
    "block_rows_for",
    "subsample_rows",
    "RowStream",
    "block_statistics",
    "StreamedSteps",
]

# Closed-form updates whose statistics are sums over points (and so stream).
STREAMED_KINDS = (
    "categorical",
    "bernoulli",
    "poisson",
    "normal_loc",
    "normal_scale",
    "mvn_loc",
    "mvn_scale",
)
# The working set of one block by default: its data, moment features and responsibilities.
BLOCK_BYTES = 64 * 2**20
# Subsample rows read from a memory-mapped array at a time (each maps at most a few pages).
SUBSAMPLE_CHUNK = 1024


def is_row_source(a: Any) -> bool:
    """A NumPy array (memory-mapped or not) or an object with ``shape``, ``dtype``,
    ``len()`` and slicing: data EM reads a block of rows at a time (not a tensor)."""
    if isinstance(a, torch.Tensor):
        return False
    if isinstance(a, np.ndarray):
        return a.ndim >= 1
    return all(hasattr(a, n) for n in ("shape", "dtype", "__len__", "__getitem__")) and bool(
        len(getattr(a, "shape", ()))
    )


# Row sources up to this size (at EM's dtype) are read into memory when no block size is set.
IN_MEMORY_BYTES = 1 << 30


def world() -> tuple[int, int]:
    """``(rank, world size)`` of ``torch.distributed`` (``(0, 1)`` when not initialised)."""
    return rank(), world_size()


def block_rows_for(D: int, K: int, itemsize: int = 8, budget: int = BLOCK_BYTES) -> int:
    """Rows per block so that a block's working set — its D values, its D(D+1)/2 + D + 1
    moment features and its K responsibilities per row — is about ``budget`` bytes."""
    per_row = itemsize * (D + D * (D + 1) // 2 + D + 1 + K)
    return max(1, budget // per_row)


def read_rows(x: Any, a: int, b: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    """Rows [a, b) of a row source as a tensor (floating values cast to ``dtype``); NaN/inf
    refused, naming the rows."""
    block = x[a:b]
    t = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block, copy=True))
    release_pages(x, a, b)
    if t.dtype.is_floating_point:
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise InputError(
                f"data {where}: rows {a}..{b - 1} hold NaN/inf value(s); clean or drop them first"
            )
    return t


def release_pages(x: Any, a: int, b: int) -> None:
    """Unmap rows [a, b) of a ``numpy.memmap`` from this process once copied (madvise
    ``MADV_DONTNEED``): the pages stay in the OS's file cache, but no longer count in the
    process's resident memory, which then stays about one block whatever the file's size."""
    mm = getattr(x, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or not x.flags.c_contiguous or b <= a:
        return
    row = x.itemsize * math.prod(x.shape[1:])
    start = int(x.offset) + a * row
    first = start - start % mmap.PAGESIZE  # madvise needs a page-aligned start
    try:
        mm.madvise(advice, first, start + (b - a) * row - first)
    except (OSError, ValueError):  # a view whose offset is not the mapping's: leave it
        return


def subsample_rows(x: Any, m: int, seed: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A seeded subsample of ``m`` rows of ``x`` (all rows, in order, when ``len(x) <= m``):
    one uniformly drawn row in each of ``m`` strata of ⌊N/m⌋-ish consecutive rows, so it is
    spread over the file and costs O(m) memory. The same on every process."""
    n = len(x)
    if n <= m:
        return read_rows(x, 0, n, dtype, where)
    gen = torch.Generator().manual_seed(seed)
    lo = (torch.arange(m, dtype=torch.float64) * (n / m)).long()
    hi = torch.cat([lo[1:], torch.tensor([n])])
    idx = lo + (torch.rand(m, generator=gen, dtype=torch.float64) * (hi - lo)).long()
    idx = torch.minimum(idx, hi - 1)
    if isinstance(x, torch.Tensor):
        t = x[idx]
    elif isinstance(x, np.ndarray):
        parts = []
        for c in range(0, m, SUBSAMPLE_CHUNK):
            part = idx[c : c + SUBSAMPLE_CHUNK].numpy()
            parts.append(torch.from_numpy(np.array(x[part])))
            # the reads mapped pages (and their neighbours) across this stretch: unmap them,
            # so that the subsample, too, costs memory for itself only
            release_pages(x, int(part[0]), int(part[-1]) + 1)
        t = torch.cat(parts)
    else:
        t = torch.cat([read_rows(x, int(i), int(i) + 1, dtype, where) for i in idx])
    if t.dtype.is_floating_point:
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"data {where} holds NaN/inf value(s); clean or drop them first")
    return t


@dataclass
class RowStream:
    """A pass over rows [start, stop) of the row source ``args[pos]`` in blocks of
    ``block_rows``, each as a compiled FactorModel holding that block.

    :param model: the Pyro model; ``args``, ``kwargs``: its arguments, ``args[pos]`` the rows.
    :param dtype, seed: as :class:`~jointkl.inference.em.factor_model.FactorModel`'s.
    """

    model: Callable
    args: tuple
    kwargs: Mapping[str, Any]
    pos: int
    start: int
    stop: int
    block_rows: int
    dtype: torch.dtype
    seed: int
    templates: dict[int, tuple[FactorModel, list[int]]] = field(default_factory=dict)
    compile_seconds: float = 0.0

    @property
    def where(self) -> str:
        return f"argument {self.pos}"

    @property
    def single(self) -> bool:
        """This process's rows are one block: compiled once, never re-read or swapped."""
        return self.stop - self.start <= self.block_rows

    def block_args(self, block: torch.Tensor) -> tuple:
        return self.args[: self.pos] + (block,) + self.args[self.pos + 1 :]

    def template(self, block: torch.Tensor) -> tuple[FactorModel, list[int]]:
        """The FactorModel compiled for blocks of this many rows, and its groups that hold
        observed values (whose ``data`` are swapped per block)."""
        n = block.shape[0]
        if n not in self.templates:
            t0 = time.perf_counter()
            fm = FactorModel(self.model, self.block_args(block), self.kwargs, self.seed, self.dtype)
            self.templates[n] = (fm, [] if self.single else data_groups(fm, block))
            self.compile_seconds += time.perf_counter() - t0
        return self.templates[n]

    def blocks(self) -> Iterator[FactorModel]:
        """Each block's FactorModel (valid until the next block is read)."""
        if self.single and self.templates:
            yield next(iter(self.templates.values()))[0]
            return
        for a in range(self.start, self.stop, self.block_rows):
            b = min(a + self.block_rows, self.stop)
            block = read_rows(self.args[self.pos], a, b, self.dtype, self.where)
            fm, swapped = self.template(block)
            for gi in swapped:
                g = fm.groups[gi]
                # The compiled layout (rows, 1.., points, event) of the observed values.
                g.data = block.to(g.data.dtype).reshape(g.data.shape)
            yield fm


def data_groups(fm: FactorModel, block: torch.Tensor) -> list[int]:
    """The groups of ``fm`` whose observed values are ``block`` in a reshaped layout (so a
    new block can replace them); refuses a model whose tables depend on the data otherwise."""
    why = refusal(fm)
    if why:
        raise InputError(
            f"EM: data streamed in several blocks of rows need {why} (other models are "
            "streamed only when a process's rows fit one block: raise block_rows)"
        )
    out = []
    flat = block.reshape(-1)
    for gi, g in enumerate(fm.groups):
        if g.kind == "fixed" and g.fn is None and g.plates:
            raise InputError(
                "EM: data streamed in blocks of rows need every observation to depend on the "
                f"enumerated variable; site {g.sites[0]!r} does not"
            )
        if g.value != "data" or g.data is None:
            continue
        if g.mask is not None or g.rows != 1 or g.data.numel() != flat.numel():
            raise InputError(
                f"EM: data streamed in blocks of rows need the observed site {g.sites[0]!r} "
                "to be the row-source argument itself, unmasked"
            )
        if not torch.equal(g.data.reshape(-1).to(flat.dtype), flat):
            raise InputError(
                f"EM: data streamed in blocks of rows need the observed site {g.sites[0]!r} "
                "to observe the row-source argument as given (not transformed in the model)"
            )
        out.append(gi)
    return out


def refusal(fm: FactorModel) -> str | None:
    """Why ``fm`` cannot be streamed, or ``None``."""
    if not fm._is_mixture():
        return "a mixture (one enumerated variable per data point); this model is not one"
    if any(g.kind == "traced" for g in fm.groups):
        traced = [g.sites[0] for g in fm.groups if g.kind == "traced"]
        return f"every site scored by a known family; {traced} must be traced"
    return None


# --------------------------------------------------------------------------- statistics
def block_statistics(
    fm: FactorModel,
    theta: Mapping[str, torch.Tensor],
    W: Mapping[int, torch.Tensor],
    closed: list[Update],
    centre: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """One block's sufficient statistics of the closed-form updates, by key:
    ``"counts:<name>"``, ``"s0:<name>"``/``"s1:<name>"`` (Bernoulli / Poisson Σ w, Σ w x),
    and ``"moments:<group>"`` (a Gaussian group's Σ w Φ per cell about ``centre``; its
    diagonal form [(x - c)^2, x - c, 1] for a diagonal or spherical view). All are sums over
    the block's points, so blocks (and processes) add."""
    stats: dict[str, torch.Tensor] = {}
    for up in closed:
        name = up.names[0]
        dtype = theta[name].dtype
        if up.kind == "categorical":
            stats[f"counts:{name}"] = counts(fm, theta, W, name, up.uses, dtype)
        elif up.kind in ("bernoulli", "poisson"):
            s0, s1 = weighted_sums(
                fm,
                theta,
                W,
                up.uses,
                theta[name].shape,
                dtype,
                lambda gi, dt=dtype: (None, fm.value(gi, dt).to(dt)),
            )
            stats[f"s0:{name}"], stats[f"s1:{name}"] = s0, s1
        elif up.kind in ("normal_loc", "normal_scale"):
            ((gi, _, _),) = up.uses
            key = f"normal:{gi}"
            if key not in stats:
                stats[key] = normal_moments(fm, gi, theta, W[gi], centre)
        elif up.kind in ("mvn_loc", "mvn_scale"):
            ((gi, _, _),) = up.uses
            key = f"moments:{gi}"
            if key not in stats:
                stats[key] = gaussian_moments(fm, gi, theta, W[gi], centre)
        else:  # planned out by StreamedSteps.check
            raise AssertionError(up.kind)
    return stats


def normal_moments(
    fm: FactorModel,
    gi: int,
    theta: Mapping[str, torch.Tensor],
    W: torch.Tensor,
    centre: torch.Tensor,
) -> torch.Tensor:
    """[Σ w, Σ w (x - c), Σ w (x - c)^2] per cell of a Normal group's ``loc`` slot input (its
    canonical layout), stacked on a new first axis; ``c`` is the centre's mean (a scalar)."""
    g = fm.groups[gi]
    x = fm.value(gi, centre.dtype) - centre.mean()
    w = W.reshape(W.shape + (1,) * g.n_event)
    target = target_shape(fm, gi, "loc", 0, theta)
    return torch.stack(
        [wsum(target, w, torch.ones_like(x)), wsum(target, w, x), wsum(target, w, x.square())]
    )


def diagonal_view(fm: FactorModel, gi: int, theta: Mapping[str, torch.Tensor]) -> bool:
    return fm.slot_inputs(gi, "scale_tril", theta)[0] in DIAGONAL_VIEWS


def gaussian_moments(
    fm: FactorModel,
    gi: int,
    theta: Mapping[str, torch.Tensor],
    W: torch.Tensor,
    centre: torch.Tensor,
) -> torch.Tensor:
    """Σ_n W[cell, n] Φ(x_n) per cell about ``centre``: the block's cached weighted moments
    (about the block's own mean b) moved to the common centre c with d = b - c:
    Σ w (x-c) = m1 + n d and Σ w (x-c)(x-c)^T = m2 + m1 d^T + d m1^T + n d d^T
    (per dimension for the diagonal form: m2 + 2 d m1 + n d²)."""
    g = fm.groups[gi]
    x = fm.value(gi, centre.dtype)
    D = x.shape[-1]
    if diagonal_view(fm, gi, theta):
        S = weighted_diagonal(g, x, W)
        if S is None:
            raise InputError(f"EM: streamed site {g.sites[0]!r} has an unsupported layout")
        d = diagonal_features(g, x)[0] - centre
        m2, m1, n = S[..., :D], S[..., D : 2 * D], S[..., -1:]
        return torch.cat([m2 + 2 * d * m1 + n * d.square(), m1 + n * d, n], -1)
    S = weighted_moments(g, x, W)
    if S is None:
        raise InputError(f"EM: streamed site {g.sites[0]!r} has an unsupported layout")
    d = data_moments(g, x)[0] - centre
    m2, m1, n = moment_parts(S, D)
    outer = m1.unsqueeze(-1) * d + d.unsqueeze(-1) * m1.unsqueeze(-2)
    m2 = m2 + outer + n[..., None, None] * (d.unsqueeze(-1) * d)
    i, j = torch.triu_indices(D, D, device=S.device)
    return torch.cat([m2[..., i, j], m1 + n.unsqueeze(-1) * d, n.unsqueeze(-1)], -1)


# --------------------------------------------------------------------------- the steps
@dataclass
class StreamedSteps:
    """EM's two steps over a row source (the interface of
    :class:`~jointkl.inference.em.engine.Steps`): :meth:`expect` is one pass over this
    process's rows returning the log-likelihood and the summed statistics (all-reduced across
    processes), :meth:`maximise` the closed forms applied to them.

    :param fm: a FactorModel compiled on a subsample (structure, priors, initialisation).
    :param stream: this process's pass over its rows.
    :param centre: the Gaussian moments' common centre c.
    :param n_points: rows over all processes.
    """

    name = "streamed"
    fm: FactorModel
    closed: list[Update]
    gradient: list[str]
    reg_covar: float
    mstep_iter: int
    hard: bool
    stream: RowStream
    centre: torch.Tensor
    n_points: int
    passes: int = 0
    pass_seconds: float = 0.0
    reduce_seconds: float = 0.0

    def check(self) -> None:
        """Refuse what the streamed M-step cannot do, naming it."""
        why = None if self.stream.single else refusal(self.fm)
        if why:
            raise InputError(
                f"EM: data streamed in several blocks of rows need {why} (other models are "
                "streamed only when a process's rows fit one block: raise block_rows)"
            )
        if self.gradient:
            raise InputError(
                "EM: data streamed in blocks of rows need a closed-form M-step for every "
                f"parameter; {self.gradient} would need the gradient M-step (load the data "
                "into memory as a tensor for this model)"
            )
        for up in self.closed:
            if up.kind not in STREAMED_KINDS:
                raise InputError(
                    f"EM: data streamed in blocks of rows: the {up.kind!r} update of "
                    f"{up.names} is not streamed (streamed: {', '.join(STREAMED_KINDS)})"
                )

    def expect(self, theta: Mapping[str, torch.Tensor], iteration: int):
        """One pass: (log p(x | θ) [+ log p(θ)], statistics summed over every row)."""
        t0, compiling = time.perf_counter(), self.stream.compile_seconds
        total: dict[str, torch.Tensor] = {}
        ll = 0.0
        with torch.no_grad():
            log_prior = self.fm.log_prior(theta)
            for fm in self.stream.blocks():
                ll_b, W = fm.e_step(theta, self.hard)
                # each block's E-step adds the globals' log-prior once: count it once in all
                ll += ll_b - fm.log_prior(theta)
                for k, v in block_statistics(fm, theta, W, self.closed, self.centre).items():
                    total[k] = total[k] + v if k in total else v.clone()
        t1 = time.perf_counter()
        ll, total = all_reduce(ll, total)
        self.reduce_seconds += time.perf_counter() - t1
        # the first pass compiles the model for its block sizes: not part of a pass's cost
        self.pass_seconds += t1 - t0 - (self.stream.compile_seconds - compiling)
        self.passes += 1
        ll += log_prior
        if not math.isfinite(ll):
            raise FitDivergedError(
                f"EM: the log-likelihood became {ll} at iteration {iteration}; the last good "
                f"state (iteration {iteration - 1}) is in this error's .state; check the data "
                "or set reg_covar > 0"
            )
        return ll, total

    def maximise(self, theta, stats: Mapping[str, torch.Tensor], iteration: int):
        """The closed forms (in their ECM stage order) from the summed statistics."""
        try:
            theta = dict(theta)
            with torch.no_grad():
                for up in self.closed:
                    theta.update(self.update(theta, stats, up))
            return theta
        except SingularCovariance as e:
            raise FitDivergedError(f"EM: at iteration {iteration}: {e}") from e

    def update(self, theta, stats, up: Update) -> dict[str, torch.Tensor]:
        fm, reg, c = self.fm, self.reg_covar, self.centre
        name = up.names[0]
        if up.kind == "categorical":
            return categorical_from_counts(stats[f"counts:{name}"], theta[name], up)
        if up.kind in ("bernoulli", "poisson"):
            return mean_from_sums(stats[f"s0:{name}"], stats[f"s1:{name}"], theta[name], up)
        ((gi, slot, which),) = up.uses
        if up.kind.startswith("normal"):
            return self.normal_update(theta, stats[f"normal:{gi}"], up)
        S = stats[f"moments:{gi}"]
        D = c.shape[-1]
        target = target_shape(fm, gi, slot, which, theta)
        diagonal = diagonal_view(fm, gi, theta)
        if diagonal:
            m2, m1, n = S[..., :D], S[..., D : 2 * D], S[..., -1]
        else:
            m2, m1, n = moment_parts(S, D)
        if up.kind == "mvn_loc":
            s0 = n.reshape(target[:-1] + (1,))
            s1 = (m1 + n.unsqueeze(-1) * c).reshape(target)
            return mvn_loc_from_sums(fm, theta, up, target, s0, s1)
        _, (mu,) = fm.slot_inputs(gi, "loc", theta)
        m = mu.reshape(m1.shape) - c  # the means about the centre
        if diagonal:
            s2 = m2 - 2 * m * m1 + n.unsqueeze(-1) * m.square()
            if up.view.startswith("diag"):
                s0 = n.unsqueeze(-1).expand(m1.shape).reshape(target)
                return diagonal_scale_from_sums(fm, theta, up, s0, s2.reshape(target), reg)
            s0, s2 = (n * D).reshape(target), s2.sum(-1).reshape(target)
            return diagonal_scale_from_sums(fm, theta, up, s0, s2, reg)
        mc = m.unsqueeze(-1)
        m1c = m1.unsqueeze(-1)
        s2 = (
            m2
            - m1c @ mc.transpose(-1, -2)
            - mc @ m1c.transpose(-1, -2)
            + n[..., None, None] * (mc @ mc.transpose(-1, -2))
        ).reshape(target)
        s0 = n.reshape(target[:-2] + (1, 1)).expand(target)
        return full_scale_from_sums(fm, theta, up, s0, s2, reg)

    def normal_update(self, theta, S: torch.Tensor, up: Update) -> dict[str, torch.Tensor]:
        """:func:`~.updates.normal_loc_update` / :func:`~.updates.normal_scale_update` from
        the per-cell sums [Σ w, Σ w (x - c), Σ w (x - c)^2] (the scale constant in each cell of
        the mean, so the precision weight is one factor per cell)."""
        fm = self.fm
        ((gi, slot, which),) = up.uses
        name = up.names[0]
        old = theta[name]
        tiny = torch.finfo(old.dtype).tiny
        c = self.centre.mean()
        s0, s1, s2 = S[0], S[1], S[2]
        if up.kind == "normal_loc":
            view, (sc,) = fm.slot_inputs(gi, "scale", theta)
            sd = sc.exp() if view == "exp" else sc
            tau = sd.pow(-2)
            if any(n not in (1, t) for n, t in zip(tau.shape, s0.shape, strict=True)):
                raise InputError(
                    f"EM: streamed {name!r}: its scale varies within a cell of the mean"
                )
            T0 = to_param(fm, gi, slot, which, old.shape, tau * s0)
            T1 = to_param(fm, gi, slot, which, old.shape, tau * (s1 + c * s0))
            if up.prior:
                m, s = up.prior[1]["loc"], up.prior[1]["scale"]
                T1, T0 = T1 + m / s**2, T0 + 1 / s**2
            return {name: torch.where(T0 <= 0, old, T1 / T0.clamp_min(tiny))}
        _, (mu,) = fm.slot_inputs(gi, "loc", theta)
        m = mu - c
        r2 = s2 - 2 * m * s1 + m.square() * s0  # Σ w (x - mu)^2 per cell
        if tuple(target_shape(fm, gi, slot, which, theta)) != tuple(r2.shape):
            raise InputError(f"EM: streamed {name!r}: its cells differ from its mean's")
        T0 = to_param(fm, gi, slot, which, old.shape, s0)
        T2 = to_param(fm, gi, slot, which, old.shape, r2)
        sd = (T2 / T0.clamp_min(tiny) + self.reg_covar).sqrt()
        new = sd.log() if up.view == "exp" else sd
        return {name: torch.where(T0 <= 0, old, new)}


def all_reduce(ll: float, stats: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """Sum the log-likelihood and the statistics over the processes of ``torch.distributed``
    with one ``all_reduce`` of one flat float64 tensor (unchanged in one process)."""
    _, size = world()
    if size == 1:
        return ll, stats
    keys = sorted(stats)
    some = stats[keys[0]] if keys else torch.zeros(())
    flat = torch.cat(
        [torch.tensor([ll], dtype=torch.float64, device=some.device)]
        + [stats[k].reshape(-1).to(torch.float64) for k in keys]
    )
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, at = {}, 1
    for k in keys:
        v = stats[k]
        out[k] = flat[at : at + v.numel()].reshape(v.shape).to(v.dtype)
        at += v.numel()
    return float(flat[0]), out


def broadcast_theta(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's θ on every process (one broadcast per variable, in name order)."""
    _, size = world()
    if size == 1:
        return theta
    out = {}
    for k in sorted(theta):
        v = theta[k].detach().clone().contiguous()
        torch.distributed.broadcast(v, src=0)
        out[k] = v
    return out
