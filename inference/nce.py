"""Noise-contrastive estimation: fit a density known only up to its normaliser.

The model states an unnormalised log-density G(x; θ) with Pyro primitives (``pyro.factor``
or an observed site of an unnormalised distribution) inside ``pyro.plate("data", N)``;
p(x) = e^{G(x;θ)} / Z(θ) with Z too costly to compute. NCE turns density estimation into
classification: each datum (label 1) meets ν samples of a noise q (label 0), and

    P(1 | x) = σ(G(x;θ) − γ − log(ν q(x)))                                  (binary)

with γ a trainable estimate of log Z. The loss is −E_data log σ(·) − ν E_noise log(1 − σ(·));
its optimum has e^{G−γ} = p̃, so γ → log Z and θ → the maximum-likelihood fit, with the
efficiency of maximum likelihood approached as ν grows (Gutmann & Hyvärinen 2012). In the
joint-KL picture of DESIGN.md this is maximum likelihood on the joint of (x, label) under the
data+noise mixture, a proper KL with a normalised model even though G is not.

Two relatives share the machinery:

* ``"ranking"`` (ranking NCE / sampled softmax, Jozefowicz et al. 2016; Ma & Collins 2018):
  −log softmax over {datum} ∪ noise of the scores G − log q. Any constant per context
  cancels in the softmax, so Z is neither needed nor estimated.
* ``"negative-sampling"`` (word2vec, Mikolov et al. 2013): the binary loss with γ = 0 and no
  log(ν q) term, P(1|x) = σ(G). Its optimum is G = log p̃(x|c) − log(ν q(x)) — for unigram
  noise the pointwise mutual information minus log ν (Levy & Goldberg 2014) — not log p.

Conditional models (a word given its context) work the same way: every per-datum argument
after the first is the datum's context; noise for a datum is drawn for its own context (a
callable noise returns the per-context distribution) and the model scores the noise with the
context repeated. Data and noise go through the model in one vectorised pass over its
``"data"`` plate: the first argument becomes [x_batch; noise] of size B(1 + ν).

When the noise does not depend on the context (unigram^0.75) the ν draws can be shared by
every context of a mini-batch (TensorFlow's ``sampled_softmax_loss``/``nce_loss``): each
context is still contrasted with ν independent draws from q, so every per-datum loss keeps
its expectation, and a pair that can score all (context, candidate) pairs at once
(``pair.candidate_scores``) turns the noise scores into one (B, d) @ (d, ν) product that
touches ν + B output rows instead of B(1 + ν).

The whole progress of a stochastic fit is one :class:`NCEState` (params and γ, optimiser
state, torch's RNG, step, history), saved as a checkpoint and poured back in to resume
exactly; the batch order is a function of (seed, step) alone.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from jointkl.inference.svi import (  # one optimiser table, one checkpoint format
    TORCH_OPTIMS,
    SVIState,
    _latest_checkpoint,
    _load_params,
    check_checkpointing,
)
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from jointkl.engine import Engine, recreate_params, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.pair import as_pair
from jointkl.sites import DATA_PLATE

__all__ = ["NCE", "NCEState", "NoiseModel", "nce_loss", "pointwise_log_density", "resolve_noise"]

VARIANTS = ("binary", "ranking", "negative-sampling")
_UNIGRAM = re.compile(r"^unigram(?:\^(\d+(?:\.\d*)?|\.\d+))?$")
_CHUNK = 1 << 16  # rows per pass when checking the noise against the whole data set


# ---------------------------------------------------------------------- the losses
def nce_loss(
    g_data: torch.Tensor,
    g_noise: torch.Tensor,
    logq_data: torch.Tensor,
    logq_noise: torch.Tensor,
    variant: str,
    log_z: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """The per-datum NCE loss, shape ``(B,)``.

    :param g_data: unnormalised log-density G at the data, ``(B,)``.
    :param g_noise: G at each datum's ν noise samples, ``(B, ν)``.
    :param logq_data: noise log-density at the data, ``(B,)``.
    :param logq_noise: noise log-density at the noise samples, ``(B, ν)``, or ``(ν,)`` when
        the batch shares one set of draws (it broadcasts over the contexts).
    :param variant: ``"binary"``, ``"ranking"`` or ``"negative-sampling"``.
    :param log_z: γ, the estimate of log Z (binary only).
    """
    nu = g_noise.shape[-1]
    if variant == "ranking":
        # Sampled softmax with the log q correction: −log [e^{s_0} / Σ_j e^{s_j}],
        # s = G − log q. A per-context constant shifts every s_j alike and cancels.
        s = torch.cat([(g_data - logq_data).unsqueeze(-1), g_noise - logq_noise], -1)
        return torch.logsumexp(s, -1) - s[..., 0]
    if variant == "binary":
        # Log-odds of "data" against "noise": log p_θ(x) − log(ν q(x)), p_θ = e^{G−γ}.
        shift = log_z + math.log(nu)
        l_data, l_noise = g_data - shift - logq_data, g_noise - shift - logq_noise
    elif variant == "negative-sampling":
        # word2vec: the score itself is the log-odds (γ = 0, no log(ν q) term).
        l_data, l_noise = g_data, g_noise
    else:
        raise InputError(f"nce_loss: variant must be one of {VARIANTS}, got {variant!r}")
    # −log σ(l) = softplus(−l) and −log(1 − σ(l)) = softplus(l), stable for large |l|.
    return F.softplus(-l_data) + F.softplus(l_noise).sum(-1)


# ---------------------------------------------------------------------- reading G from a trace
def _data_frame(site: Mapping[str, Any]):
    return next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)


def pointwise_log_density(
    model: Callable, args: tuple, kwargs: Mapping[str, Any], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's unnormalised log-density per point of its ``"data"`` plate.

    Runs ``model(*args, **kwargs)`` under ``poutine.trace`` and sums, per point, the
    log-density (scaled and masked as Pyro does) of every observed site and factor inside
    the data plate; dimensions of inner plates and events are summed too.

    :returns: ``(G, global_term)``: G of shape ``(size,)`` and the summed log-density of the
        sites outside the data plate (a scalar, e.g. a prior on the parameters).
    """
    tr = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s) and not s["is_observed"]
    ]
    if latent:
        raise InputError(
            f"NCE: the model has latent sample site(s) {latent}; NCE needs a fully observed "
            "unnormalised density (pyro.factor or observed sites only): sum the latents out "
            "in the energy, or fit with SVI/EM"
        )
    tr.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
    ref = args[0] if args and isinstance(args[0], torch.Tensor) else torch.zeros(())
    g = torch.zeros(size, dtype=_float_dtype(ref), device=ref.device)
    global_term = g.new_zeros(())
    found = False
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["log_prob"]
        frame = _data_frame(site)
        if frame is None:
            global_term = global_term + lp.sum()
            continue
        if frame.size != size:
            raise InputError(
                f"NCE: site {name!r} sits in pyro.plate({DATA_PLATE!r}) of size {frame.size}, "
                f"but the first model argument has {size} rows; size the plate from the data "
                "(x.shape[0])"
            )
        found = True
        d = frame.dim
        if lp.dim() < -d:  # broadcast over the data plate: the same value at every point
            lp = lp.reshape((1,) * (-d - lp.dim()) + tuple(lp.shape))
        lp = lp.movedim(d, 0)
        g = g + lp.reshape(lp.shape[0], -1).sum(-1)
    if not found:
        raise InputError(
            f"NCE: no observed site or factor inside pyro.plate({DATA_PLATE!r}, N): put the "
            f"per-datum energy in the data plate, e.g. `with pyro.plate({DATA_PLATE!r}, "
            'len(x)): pyro.factor("energy", -E(x))`'
        )
    return g, global_term


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype.is_floating_point else torch.get_default_dtype()


# ---------------------------------------------------------------------- noise
class NoiseModel:
    """The noise q, unconditional or per context, in the (B, ν) layout the engine uses.

    :param source: a ``torch.distributions.Distribution`` over one datum (batch shape ``()``,
        event shape = the datum's shape), or a callable ``noise(*context_args,
        **context_kwargs)`` returning a distribution with batch shape ``(B,)``: one noise
        distribution per datum's context.
    :param description: a short JSON-friendly name recorded in the Fit.
    """

    def __init__(self, source: Any, description: str):
        self.source = source
        self.conditional = not isinstance(source, torch.distributions.Distribution)
        self.description = description

    def _dist(self, ctx_args: tuple, ctx_kwargs: Mapping[str, Any]):
        return self.source(*ctx_args, **ctx_kwargs) if self.conditional else self.source

    def sample(
        self, batch: int, nu: int, ctx_args: tuple = (), ctx_kwargs: Mapping | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ν noise samples per datum, ``(B, ν, *event)``, and their log q, ``(B, ν)``."""
        d = self._dist(ctx_args, ctx_kwargs or {})
        if self.conditional:
            y = d.sample((nu,))  # (ν, B, *event): one row of draws per context
            return y.movedim(0, 1), d.log_prob(y).movedim(0, 1)
        y = d.sample((batch, nu))
        return y, d.log_prob(y)

    def sample_shared(self, nu: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ν draws for a whole batch to share, ``(ν, *event)``, and their log q, ``(ν,)``.

        Only for noise that ignores the context: every datum then meets ν independent draws
        from its own q, as in :meth:`sample`, only not independent of its neighbours'.
        """
        if self.conditional:
            raise InputError(
                f"NCE: the per-context noise {self.description!r} cannot be shared across a "
                "batch's contexts; use shared_noise=False"
            )
        y = self.source.sample((nu,))
        return y, self.source.log_prob(y)

    def log_prob(
        self, x: torch.Tensor, ctx_args: tuple = (), ctx_kwargs: Mapping | None = None
    ) -> torch.Tensor:
        """log q at the data, ``(B,)``."""
        return self._dist(ctx_args, ctx_kwargs or {}).log_prob(x)


def resolve_noise(
    spec: Any, x: torch.Tensor, ctx_args: tuple = (), ctx_kwargs: Mapping | None = None
) -> NoiseModel:
    """Build the noise from ``spec`` and check it covers every datum.

    ``spec``: ``"gaussian"`` (a Gaussian with the data's mean and covariance; float data of
    shape ``(N,)`` or ``(N, D)``), ``"unigram"`` / ``"unigram^α"`` (category frequencies to
    the power α; integer data of shape ``(N,)``), a distribution, or a per-context callable.
    Raises :class:`InputError` when the noise gives zero density to any datum: NCE's
    log-odds log p − log(ν q) is undefined there, and the model is never contrasted with
    noise in that region.
    """
    ctx_kwargs = ctx_kwargs or {}
    if isinstance(spec, str):
        m = _UNIGRAM.match(spec)
        if spec == "gaussian":
            noise = _gaussian(x)
        elif m:
            noise = _unigram(x, float(m.group(1)) if m.group(1) else 1.0, spec)
        else:
            raise InputError(
                f"NCE: noise must be 'gaussian', 'unigram', 'unigram^α', a distribution or a "
                f"callable, got {spec!r}"
            )
    elif isinstance(spec, torch.distributions.Distribution):
        if spec.batch_shape != torch.Size():
            raise InputError(
                f"NCE: noise {type(spec).__name__} has batch_shape {tuple(spec.batch_shape)}; "
                f"it must describe one datum (batch_shape ()), e.g. call .to_event(1)"
            )
        if tuple(spec.event_shape) != tuple(x.shape[1:]):
            raise InputError(
                f"NCE: noise event_shape {tuple(spec.event_shape)} does not match the shape of "
                f"one datum {tuple(x.shape[1:])}"
            )
        noise = NoiseModel(spec, f"{type(spec).__name__}")
    elif callable(spec):
        noise = NoiseModel(spec, getattr(spec, "__name__", type(spec).__name__))
    else:
        raise InputError(
            f"NCE: noise must be a name, a torch/Pyro distribution or a callable, got "
            f"{type(spec).__name__}"
        )
    _check_support(noise, x, ctx_args, ctx_kwargs)
    return noise


def _gaussian(x: torch.Tensor) -> NoiseModel:
    if not x.dtype.is_floating_point:
        raise InputError(
            f"NCE: noise='gaussian' needs real-valued data, got {x.dtype}; use "
            "noise='unigram^0.75' for categorical data"
        )
    if x.dim() == 1:
        sd = x.std().clamp_min(1e-6) if len(x) > 1 else x.new_ones(())
        return NoiseModel(dist.Normal(x.mean(), sd, validate_args=False), "gaussian")
    if x.dim() != 2:
        raise InputError(
            f"NCE: noise='gaussian' needs data of shape (N,) or (N, D), got {tuple(x.shape)}"
        )
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, len(x) - 1)
    # A ridge keeps the covariance positive definite for collinear or constant columns.
    cov = cov + 1e-6 * cov.diagonal().mean().clamp_min(1e-6) * torch.eye(
        x.shape[1], dtype=x.dtype, device=x.device
    )
    return NoiseModel(
        dist.MultivariateNormal(mean, covariance_matrix=cov, validate_args=False), "gaussian"
    )


def _unigram(x: torch.Tensor, alpha: float, name: str) -> NoiseModel:
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() != 1:
        raise InputError(
            f"NCE: noise={name!r} needs integer category ids of shape (N,), got {x.dtype} "
            f"{tuple(x.shape)}; use noise='gaussian' for real-valued data"
        )
    if (x < 0).any():
        raise InputError(f"NCE: noise={name!r}: category ids must be >= 0, found {int(x.min())}")
    # word2vec's smoothed unigram: frequencies to the power α (0.75) flatten the head.
    counts = torch.bincount(x).to(torch.get_default_dtype())
    probs = counts**alpha
    return NoiseModel(dist.Categorical(probs=probs / probs.sum(), validate_args=False), name)


def _check_support(
    noise: NoiseModel, x: torch.Tensor, ctx_args: tuple, ctx_kwargs: Mapping[str, Any]
) -> None:
    n = len(x)
    per_args, per_kwargs = _per_datum(ctx_args, ctx_kwargs, n)
    with torch.no_grad():
        for lo in range(0, n, _CHUNK):
            idx = slice(lo, min(n, lo + _CHUNK))
            a, k = _take(ctx_args, ctx_kwargs, per_args, per_kwargs, idx)
            xb = x[idx]
            try:
                d = noise._dist(a, k)
                inside = d.support.check(xb)
                if not inside.all():
                    bad = int((~inside).sum())
                    first = lo + int((~inside).nonzero()[0, 0])
                    raise InputError(
                        f"NCE: the noise {noise.description!r} has support {d.support} that "
                        f"misses {bad} datum/data (first at row {first}: {x[first].tolist()}); "
                        "choose a noise whose support covers the data"
                    )
                lq = d.log_prob(xb)
            except (ValueError, RuntimeError, IndexError) as e:
                if isinstance(e, InputError):
                    raise
                raise InputError(
                    f"NCE: the noise {noise.description!r} cannot score the data: "
                    f"{type(e).__name__}: {str(e).splitlines()[0]}"
                ) from e
            if tuple(lq.shape) != (xb.shape[0],):
                raise InputError(
                    f"NCE: the noise's log_prob at a batch of {xb.shape[0]} data has shape "
                    f"{tuple(lq.shape)}, expected ({xb.shape[0]},)"
                )
            zero = ~torch.isfinite(lq)
            if zero.any():
                first = lo + int(zero.nonzero()[0, 0])
                raise InputError(
                    f"NCE: the noise {noise.description!r} gives zero density to "
                    f"{int(zero.sum())} datum/data (first at row {first}: {x[first].tolist()}); "
                    "its support must cover the data"
                )


# ---------------------------------------------------------------------- batches
def _per_datum(args: tuple, kwargs: Mapping[str, Any], n: int) -> tuple[set[int], set[str]]:
    """Which arguments carry one row per datum (a tensor whose first dim is N)."""

    def per_point(a: Any) -> bool:
        return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n

    return (
        {i for i, a in enumerate(args) if per_point(a)},
        {k for k, a in kwargs.items() if per_point(a)},
    )


def _take(args, kwargs, per_args, per_kwargs, idx):
    return (
        tuple(a[idx] if i in per_args else a for i, a in enumerate(args)),
        {k: (a[idx] if k in per_kwargs else a) for k, a in kwargs.items()},
    )


def _with_noise(args, kwargs, per_args, per_kwargs, y):
    """[x; noise] as the first argument, each context row repeated for its ν noise rows."""
    batch, nu = y.shape[:2]
    x = args[0]

    def extend(a):
        # repeat_interleave puts datum b's context next to its noise rows b·ν … b·ν + ν − 1,
        # the row-major order of y.reshape(B·ν, ...).
        return torch.cat([a, a.repeat_interleave(nu, 0)])

    x_all = torch.cat([x, y.reshape(batch * nu, *y.shape[2:]).to(x.dtype)])
    rest = tuple(extend(a) if i in per_args else a for i, a in enumerate(args) if i > 0)
    return (x_all, *rest), {k: (extend(a) if k in per_kwargs else a) for k, a in kwargs.items()}


# ---------------------------------------------------------------------- the state
@dataclass
class NCEState(SVIState):
    """Everything a stochastic NCE fit needs to continue exactly: one value, one checkpoint.

    The fields (and ``save``/``load``) are :class:`~jointkl.inference.svi.SVIState`'s:
    ``step`` (updates applied), ``params`` (unconstrained, by param-store name, plus γ under
    ``"log_Z"`` when it is learned), ``optim`` (the optimisers' state dicts, sparse-row Adam
    included), ``rng`` (torch's global RNG, which draws the noise) and ``history``. The batch
    order needs no state: it is a function of (seed, step).
    """


def _batch_rows(step: int, n: int, size: int, seed: int, cache: dict) -> torch.Tensor:
    """The data rows of step ``step``: epochs of seeded permutations, the last partial batch
    of each epoch dropped (so every step has ``size`` rows)."""
    epoch, j = divmod(step, n // size)
    if cache.get("epoch") != epoch:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1 + epoch)
        cache.update(epoch=epoch, perm=torch.randperm(n, generator=gen))
    return cache["perm"][j * size : (j + 1) * size]


# ---------------------------------------------------------------------- the engine
@register_engine
class NCE(Engine):
    """Noise-contrastive estimation of an unnormalised Pyro model (no latent sites).

    The model is ``model(x, *context, **kwargs)``: the first argument holds the data that
    are contrasted with noise (one row per datum); other arguments with one row per datum are
    the datum's context (conditional models) and are repeated for its noise.

    :param noise: ``None`` (``"gaussian"`` for real data, ``"unigram^0.75"`` for integer
        ids), ``"gaussian"``, ``"unigram"``/``"unigram^α"``, a torch/Pyro distribution over
        one datum, or a callable ``noise(*context, **kwargs) -> Distribution`` with batch
        shape ``(B,)`` (per-context noise).
    :param int nu: ν, noise samples per datum (with shared noise: per step, met by every datum).
    :param variant: ``"binary"`` (NCE, learns γ = log Z), ``"ranking"`` (sampled softmax,
        Z cancels) or ``"negative-sampling"`` (word2vec: γ = 0, no log(ν q) term).
    :param log_z: ``"learn"`` (γ is a parameter, recorded as ``log_Z``), or a number to fix γ
        (0 gives the self-normalised NCE of Mnih & Teh 2012). Binary variant only.
    :param optim: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``, a
        :mod:`jointkl.optim` integrator name (fresh noise every step, mini-batches), or
        ``"lbfgs"`` (full batch, noise drawn once: the deterministic objective of the
        original NCE, solved to a tight optimum).
    :param lr: step size; ``None`` gives 1.0 for L-BFGS and 0.01 otherwise.
    :param int steps: gradient steps (L-BFGS: the iteration limit).
    :param batch_size: data per step (each with ν noise samples); ``None`` for full batch.
    :param shared_noise: ``True``: one set of ν draws per step, shared by every datum of the
        batch (context-independent noise only); ``False``: ν draws per datum; ``None``
        (default): shared when the noise ignores the context and the pair offers
        ``candidate_scores(candidates, *context, **kwargs) -> (B, K)`` — G for every
        (context, candidate) pair, which scores the shared noise in one matrix product — and
        the optimiser is stochastic (L-BFGS draws its noise once for the whole fit).
        Without that hook, shared noise is scored by the model on the B·ν (context, draw)
        rows, as per-datum noise is.
    :param clip_norm: clip the global gradient norm (``None``: no clipping).
    :param int seed: the one seed for parameter initialisation, noise and batch order.
    :param checkpoint_every: save an :class:`NCEState` every N steps into ``checkpoint_dir``
        (stochastic optimisers; an L-BFGS solve writes none).
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints; the state is also
        saved when the fit ends, is interrupted, or stops on a NaN/inf (the last good state).
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any; the
        numbers are those of a fit that never stopped.
    :param bool progress: show a tqdm bar with the running loss.
    :param on_step: called as ``on_step(step, loss)`` after every step (L-BFGS: every
        evaluation); raising ``KeyboardInterrupt`` there ends the fit early, keeping it.
    """

    name = "nce"
    description = "noise-contrastive estimation: unnormalised models, log Z learned (no latents)"

    def __init__(
        self,
        noise: Any = None,
        nu: int = 10,
        variant: str = "binary",
        log_z: str | float = "learn",
        optim: str = "adam",
        lr: float | None = None,
        steps: int = 1000,
        batch_size: int | None = None,
        shared_noise: bool | None = None,
        clip_norm: float | None = None,
        seed: int = 0,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        on_step: Callable[[int, float], None] | None = None,
    ):
        if variant not in VARIANTS:
            raise InputError(f"NCE: variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(noise, str):
            if noise != "gaussian" and not _UNIGRAM.match(noise):
                raise InputError(
                    f"NCE: noise must be 'gaussian', 'unigram', 'unigram^α', a distribution or "
                    f"a callable, got {noise!r}"
                )
        elif noise is not None and not (
            isinstance(noise, torch.distributions.Distribution) or callable(noise)
        ):
            raise InputError(
                f"NCE: noise must be a name, a torch/Pyro distribution or a callable, got "
                f"{type(noise).__name__}"
            )
        _check_positive("nu", nu, int)
        _check_positive("steps", steps, int)
        if lr is not None:
            _check_positive("lr", lr, float)
        if batch_size is not None:
            _check_positive("batch_size", batch_size, int)
        if clip_norm is not None:
            _check_positive("clip_norm", clip_norm, float)
        if shared_noise not in (None, True, False):
            raise InputError(f"NCE: shared_noise must be True, False or None, got {shared_noise!r}")
        check_checkpointing("NCE", checkpoint_every, checkpoint_dir, resume)
        if shared_noise and optim == "lbfgs":
            raise InputError(
                "NCE: shared_noise=True with optim='lbfgs' would draw only ν noise points for "
                "the whole fit (L-BFGS draws its noise once); use a stochastic optimiser"
            )
        if resume and optim == "lbfgs":
            raise InputError(
                "NCE: resume needs a stochastic optimiser; an L-BFGS solve is one call with no "
                "checkpoints"
            )
        if not (log_z == "learn" or _is_number(log_z)):
            raise InputError(f"NCE: log_z must be 'learn' or a number, got {log_z!r}")
        optim_class(optim)  # validate the name now, not at the first step
        if optim == "lbfgs" and batch_size is not None:
            raise InputError(
                "NCE: optim='lbfgs' works on the full batch with noise drawn once (a "
                "deterministic objective); drop batch_size or pick a stochastic optimiser"
            )
        super().__init__(
            noise=noise if isinstance(noise, str) or noise is None else _describe(noise),
            nu=int(nu),
            variant=variant,
            log_z=log_z if log_z == "learn" else float(log_z),
            optim=optim,
            lr=float(lr) if lr is not None else (1.0 if optim == "lbfgs" else 0.01),
            steps=int(steps),
            batch_size=int(batch_size) if batch_size is not None else None,
            shared_noise=shared_noise,
            clip_norm=clip_norm,
            seed=int(seed),
            checkpoint_every=int(checkpoint_every) if checkpoint_every is not None else None,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            resume=bool(resume),
        )
        self._noise_spec = noise
        self.progress = progress
        self.on_step = on_step

    # ------------------------------------------------------------------ fitting
    def fit(self, pair: Any, *args: Any, **kwargs: Any) -> Fit:
        """Fit ``pair.model(x, *context, **kwargs)`` to the data; returns a :class:`Fit`."""
        pair = as_pair(pair)
        cfg = self.config
        x = _check_data(args, kwargs)
        n, nu = len(x), cfg["nu"]
        per_args, per_kwargs = _per_datum(args, kwargs, n)
        ctx = (args[1:], kwargs)
        ctx_per = ({i - 1 for i in per_args if i > 0}, per_kwargs)
        spec = self._noise_spec
        if spec is None:
            spec = "gaussian" if x.dtype.is_floating_point else "unigram^0.75"
        noise = resolve_noise(spec, x, *ctx)
        hook = getattr(pair, "candidate_scores", None)
        shared = cfg["shared_noise"]
        if shared is None:
            # L-BFGS draws its noise once for the whole fit: sharing would leave ν draws in all.
            shared = hook is not None and not noise.conditional and cfg["optim"] != "lbfgs"
        elif shared and noise.conditional:
            raise InputError(
                f"NCE: shared_noise=True needs noise that ignores the context; the noise "
                f"{noise.description!r} is per context (use shared_noise=False)"
            )
        if not shared:
            hook = None  # per-datum draws are scored by the model, row by row

        pyro.clear_param_store()
        pyro.set_rng_seed(cfg["seed"])
        model = pair.model

        def batch_terms(idx, drawn=None):
            """G and log q at a batch of data and its noise; idx=None is the whole data.

            ``drawn``: a fixed (y, log q(y), log q(x)) to reuse (L-BFGS), else fresh noise.
            """
            b_args, b_kwargs = (
                (args, kwargs) if idx is None else _take(args, kwargs, per_args, per_kwargs, idx)
            )
            b = len(b_args[0])
            if drawn is None:
                # the context alone feeds per-context noise
                c_args, c_kwargs = ctx if idx is None else _take(*ctx, *ctx_per, idx)
                with torch.no_grad():
                    if shared:
                        y, logq_n = noise.sample_shared(nu)  # (ν, ...), (ν,)
                    else:
                        y, logq_n = noise.sample(b, nu, c_args, c_kwargs)  # (B, ν, ...)
                    drawn = (y, logq_n, noise.log_prob(b_args[0], c_args, c_kwargs))
            y, logq_n, logq_d = drawn
            if hook is not None:
                # Shared draws, scored for every context at once: (B, ν), ν + B rows touched.
                g_d, global_term = pointwise_log_density(model, b_args, b_kwargs, b)
                g_n = hook(y.to(x.dtype), *b_args[1:], **b_kwargs)
                return g_d, g_n, logq_d, logq_n, global_term, drawn
            rows = y.expand(b, *y.shape) if shared else y  # shared: every datum sees all ν
            j_args, j_kwargs = _with_noise(b_args, b_kwargs, per_args, per_kwargs, rows)
            g, global_term = pointwise_log_density(model, j_args, j_kwargs, b * (1 + nu))
            return g[:b], g[b:].reshape(b, nu), logq_d, logq_n, global_term, drawn

        # One pass creates the model's params and seeds γ at the importance-sampling estimate
        # log Z ≈ log mean_j e^{G(y_j) − log q(y_j)}, y_j ~ q: near the optimum from step 0.
        first_idx = None if cfg["batch_size"] is None else torch.arange(min(n, cfg["batch_size"]))
        with torch.no_grad():
            try:
                _, g_n, _, logq_n, _, _ = batch_terms(first_idx)
            except ValueError as e:
                if isinstance(e, InputError):
                    raise
                # Pyro's validation: a site of the model refused the data or the noise.
                raise InputError(
                    f"NCE: the model cannot score the data or the {noise.description!r} noise "
                    f"(the noise must lie inside the model's support): "
                    + " ".join(str(e).splitlines()[:2])
                ) from e
            w = (g_n - logq_n).reshape(-1)
            log_z0 = float(torch.logsumexp(w, 0) - math.log(w.numel()))
            if hook is not None:
                _check_candidate_scores(hook, model, args, kwargs, per_args, per_kwargs)
        if not math.isfinite(log_z0):
            log_z0 = 0.0
        learn_z = cfg["variant"] == "binary" and cfg["log_z"] == "learn"
        fixed_z = cfg["log_z"] if _is_number(cfg["log_z"]) else 0.0
        gamma = torch.tensor(log_z0 if learn_z else fixed_z, dtype=_float_dtype(x))
        gamma.requires_grad_(learn_z)
        store = pyro.get_param_store()
        params = [p for _, p in store.named_parameters()]
        if learn_z:
            params.append(gamma)
        if not params:
            raise InputError("NCE: the model has no parameters (pyro.param or pyro.module) to fit")

        def objective(parts):
            g_d, g_n, lq_d, lq_n, global_term, _ = parts
            per = nce_loss(g_d, g_n, lq_d, lq_n, cfg["variant"], gamma)
            # Sites outside the data plate (a prior on θ) enter once per data set: −log p(θ)/N
            # per datum, the MAP analogue of the NCE objective.
            return per.mean() - global_term / n

        t0 = time.perf_counter()
        # The first pass above ran with Pyro's validation (the model's sites checked the
        # data and the noise); the loop skips those per-step support checks.
        with pyro.validation_enabled(False):
            if cfg["optim"] == "lbfgs":
                history, n_iter, converged, reason = self._run_lbfgs(params, batch_terms, objective)
            else:
                history, n_iter, converged, reason = self._run_stochastic(
                    params, gamma if learn_z else None, batch_terms, objective, n
                )
        elapsed = time.perf_counter() - t0

        out = {k: store[k].detach().clone() for k in store.keys()}
        info: dict[str, Any] = {
            "stop_reason": reason,
            "seconds": elapsed,
            "data_size": n,
            "noise": noise.description,
            "shared_noise": bool(shared),
            "noise_scores": "candidate_scores" if hook is not None else "model",
        }
        if learn_z:
            out["log_Z"] = gamma.detach().clone()
        elif cfg["variant"] == "binary":
            info["log_Z"] = f"fixed at {fixed_z}"
        else:
            info["log_Z"] = f"not estimated: the {cfg['variant']} loss does not identify it"
        return Fit(
            engine=self.name,
            config=dict(cfg),
            params=out,
            history=history,
            objective="loss",
            converged=converged,
            n_iter=n_iter,
            state={f"param:{k}": v.detach().clone() for k, v in store.named_parameters()},
            info=info,
            model_spec=pair.spec() if hasattr(pair, "spec") else None,
            pair=pair,
            args=args,
            kwargs=kwargs,
        )

    def _run_stochastic(self, params, gamma, batch_terms, objective, n):
        """The step loop; its whole progress is one :class:`NCEState`, checkpointed and
        resumed when ``checkpoint_dir`` is set. ``gamma``: the learned γ, or ``None``."""
        cfg = self.config
        store = pyro.get_param_store()
        opt = _Stepper(cfg["optim"], cfg["lr"], params)
        bsz = cfg["batch_size"]
        ckdir = Path(cfg["checkpoint_dir"]) if cfg["checkpoint_dir"] else None
        state = NCEState(0, {}, {}, torch.get_rng_state(), [])
        latest = _latest_checkpoint(ckdir) if cfg["resume"] and ckdir else None
        if latest is not None:
            state = NCEState.load(latest)
            saved = dict(state.params)
            log_z = saved.pop("log_Z", None)
            if (log_z is None) != (gamma is None):
                raise InputError(
                    f"NCE: checkpoint {latest} was written by a fit that "
                    f"{'did not learn' if log_z is None else 'learned'} log Z; this one "
                    f"{'does' if log_z is None else 'does not'}: resume with the same settings"
                )
            _load_params(store, saved)
            if gamma is not None:
                with torch.no_grad():
                    gamma.copy_(log_z)
            opt.load_state_dict(state.optim)
            torch.set_rng_state(state.rng)
        history = state.history

        def checkpoint(completed: int) -> None:
            values = {k: v.detach().clone() for k, v in store.get_state()["params"].items()}
            if gamma is not None:
                values["log_Z"] = gamma.detach().clone()
            snapshot = NCEState(completed, values, opt.state_dict(), torch.get_rng_state(), history)
            snapshot.save(ckdir / f"step-{completed:08d}.pt")

        reason = "max steps"
        bar = tqdm(
            range(state.step, cfg["steps"]),
            disable=not self.progress,
            desc="nce",
            initial=state.step,
            total=cfg["steps"],
        )
        smooth = None
        completed = state.step  # steps whose update has been applied
        rows: dict = {}  # the current epoch's permutation
        try:
            for step in bar:
                idx = None
                if bsz is not None and bsz < n:
                    idx = _batch_rows(step, n, bsz, cfg["seed"], rows)
                loss = objective(batch_terms(idx))
                value = float(loss.detach())
                opt.zero_grad()
                if math.isfinite(value):
                    loss.backward()
                # One reduction per gradient: any NaN/inf entry makes the norm non-finite.
                norm = _grad_norm(params)
                if not (math.isfinite(value) and math.isfinite(norm)):
                    opt.zero_grad()
                    raise FitDivergedError(
                        f"NCE: non-finite loss or gradient at step {step} (loss={value}); no "
                        f"update was applied (parameters as after step {step - 1}); lower lr "
                        "or set clip_norm"
                    )
                if cfg["clip_norm"] is not None:
                    norm = _grad_norm(params, exact=True)
                if cfg["clip_norm"] is not None and norm > cfg["clip_norm"]:
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(cfg["clip_norm"] / norm)
                opt.step()
                history.append(value)
                completed = step + 1
                smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
                if self.progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
                if ckdir is not None and cfg["checkpoint_every"]:
                    if completed % cfg["checkpoint_every"] == 0:
                        checkpoint(completed)
                if self.on_step is not None:
                    self.on_step(step, value)
        except KeyboardInterrupt:
            reason = f"interrupted after step {completed}"
        except FitDivergedError:
            if ckdir is not None and completed > 0:
                checkpoint(completed)  # the last good state: the bad step applied nothing
            raise
        finally:
            bar.close()
        if ckdir is not None:
            checkpoint(completed)
        return history, completed, False, reason

    def _run_lbfgs(self, params, batch_terms, objective):
        cfg = self.config
        with torch.no_grad():
            fixed = batch_terms(None)  # the noise sample of the whole fit: drawn once
        drawn = fixed[5]
        opt = torch.optim.LBFGS(
            params,
            lr=cfg["lr"],
            max_iter=cfg["steps"],
            max_eval=cfg["steps"] * 5 // 4 + 10,
            # torch's defaults: stop when the gradient's largest entry or the change in
            # loss/parameters falls to round-off level for a loss of order one.
            tolerance_grad=1e-7,
            tolerance_change=1e-9,
            history_size=50,
            line_search_fn="strong_wolfe",
        )
        history: list[float] = []
        good = [p.detach().clone() for p in params]
        bar = tqdm(disable=not self.progress, desc="nce (lbfgs evaluations)")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = objective(batch_terms(None, drawn))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FitDivergedError(
                    f"NCE: non-finite loss at L-BFGS evaluation {len(history)} (loss={value}); "
                    "parameters kept at the last good point"
                )
            loss.backward()
            for g, p in zip(good, params, strict=True):
                g.copy_(p.detach())
            history.append(value)
            bar.update(1)
            if self.progress:
                bar.set_postfix(loss=f"{value:.6g}")
            if self.on_step is not None:
                self.on_step(len(history) - 1, value)
            return loss

        reason = "converged"
        try:
            opt.step(closure)
        except FitDivergedError:
            with torch.no_grad():
                for g, p in zip(good, params, strict=True):
                    p.copy_(g)
            raise
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            bar.close()
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
        converged = reason == "converged" and n_iter < cfg["steps"]
        if reason == "converged" and not converged:
            reason = "max steps"
        return history, n_iter, converged, reason

    # ------------------------------------------------------------------ re-use
    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Recreate the fit's parameters in Pyro's param store (γ is not a model param)."""
        recreate_params(fit.pair.model, args=fit.args, kwargs=fit.kwargs)
        saved = {k.removeprefix("param:"): v for k, v in fit.state.items()}
        current = dict(pyro.get_param_store().named_parameters())
        missing = sorted(set(saved) - set(current))
        if missing:
            raise InputError(f"NCE fit has params the model did not create: {missing}")
        with torch.no_grad():
            for k, v in saved.items():
                current[k].copy_(v.to(current[k]))  # in place: nn.Module params stay linked

    @classmethod
    def log_density_offset(cls, fit: Fit) -> float:
        """−γ: the model's density is e^{G − log Z} and the binary variant learned γ ≈ log Z."""
        return -float(fit.params["log_Z"]) if "log_Z" in fit.params else 0.0


# ---------------------------------------------------------------------- helpers
def _check_candidate_scores(hook, model, args, kwargs, per_args, per_kwargs, rows: int = 16):
    """Refuse a ``candidate_scores`` hook that does not agree with the model: scoring the
    first rows' own data as candidates must give the model's G on its diagonal."""
    idx = torch.arange(min(rows, len(args[0])))
    b_args, b_kwargs = _take(args, kwargs, per_args, per_kwargs, idx)
    g_model, _ = pointwise_log_density(model, b_args, b_kwargs, len(idx))
    try:
        g_hook = hook(b_args[0], *b_args[1:], **b_kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise InputError(
            f"NCE: pair.candidate_scores(candidates, *context) failed on the data: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    expected = (len(idx), len(idx))
    if not isinstance(g_hook, torch.Tensor) or tuple(g_hook.shape) != expected:
        got = tuple(g_hook.shape) if isinstance(g_hook, torch.Tensor) else type(g_hook).__name__
        raise InputError(
            f"NCE: pair.candidate_scores must return G for every (context, candidate) pair, "
            f"shape {expected} here; got {got}"
        )
    diag = g_hook.diagonal().to(g_model.dtype)
    if not torch.allclose(diag, g_model, rtol=1e-4, atol=1e-4):
        worst = float((diag - g_model).abs().max())
        raise InputError(
            f"NCE: pair.candidate_scores disagrees with the model's log-density at the data "
            f"(largest difference {worst:.3g}); fix the hook or pass shared_noise=False"
        )


class _Stepper:
    """The optimiser(s) of a stochastic fit, built at the first step once gradients exist.

    Parameters whose gradients arrive sparse (embedding rows looked up with ``sparse=True``,
    as in a large-vocabulary model) are stepped row-wise: ``sgd`` and ``adagrad`` take sparse
    gradients natively; ``adam``/``adamw`` hand them to :class:`LazyAdam` (Adam on the rows a
    batch touched). A dense step would cost O(V·d) per step and
    undo what NCE saves by never touching the other V − ν rows.
    """

    SPARSE_OK = ("sgd", "adagrad")

    def __init__(self, name: str, lr: float, params: list[torch.Tensor]):
        self.name, self.lr, self.params = name, lr, params
        self.optims: list[torch.optim.Optimizer] | None = None
        self.pending: dict[str, Any] | None = None  # state to load once the optims exist

    def _build(self) -> None:
        sparse = [p for p in self.params if p.grad is not None and p.grad.is_sparse]
        dense = [p for p in self.params if not (p.grad is not None and p.grad.is_sparse)]
        cls = optim_class(self.name)
        if not sparse or self.name in self.SPARSE_OK:
            self.optims = [cls(self.params, lr=self.lr)]
            return
        if self.name not in ("adam", "adamw"):
            raise InputError(
                f"NCE: optim={self.name!r} cannot step the sparse gradients of this model's "
                "embeddings; use adam, sgd or adagrad"
            )
        self.optims = [LazyAdam(sparse, lr=self.lr)]
        if dense:
            self.optims.append(cls(dense, lr=self.lr))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        if self.optims is None:
            self._build()
            if self.pending:  # a resumed fit: the optimisers exist only now
                for o, sd in zip(self.optims, self.pending["optims"], strict=True):
                    o.load_state_dict(sd)
            self.pending = None
        for o in self.optims:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' state dicts (empty before the first step)."""
        if self.optims is None:
            return dict(self.pending or {})
        return {"optims": [o.state_dict() for o in self.optims]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Pour in :meth:`state_dict`'s value; applied when the optimisers are built."""
        if self.optims is not None:
            raise RuntimeError("_Stepper.load_state_dict must come before the first step")
        self.pending = dict(state) if state else None


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient touches: torch's ``SparseAdam`` update, with one
    coalesce per parameter and row gathers/scatters instead of sparse-dense arithmetic.

    For the touched rows r, with t the step count: m_r ← β₁ m_r + (1 − β₁) g_r,
    v_r ← β₂ v_r + (1 − β₂) g_r², θ_r ← θ_r − lr · (m_r / (1 − β₁ᵗ)) / (√(v_r / (1 − β₂ᵗ)) + ε).
    Rows a step does not touch keep their moments and values ("lazy" Adam).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
                rows, vals = g._indices()[0], g._values()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                m = st["exp_avg"].index_select(0, rows).lerp_(vals, 1 - b1)
                v = (
                    st["exp_avg_sq"]
                    .index_select(0, rows)
                    .mul_(b2)
                    .addcmul_(vals, vals, value=1 - b2)
                )
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                t = st["step"]
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - b1**t))


def _grad_norm(params: list[torch.Tensor], exact: bool = False) -> float:
    """The global L2 norm of the gradients. A sparse gradient's stored values may repeat a row
    (uncoalesced): their norm is finite exactly when the true one is, which is all the
    divergence check needs; ``exact=True`` coalesces first (for clipping)."""
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()._values() if exact else g._values()
        total += float(torch.linalg.vector_norm(g)) ** 2
    return math.sqrt(total)


def optim_class(name: str) -> type[torch.optim.Optimizer]:
    """The torch optimiser class for an engine's ``optim`` name."""
    if name == "lbfgs":
        return torch.optim.LBFGS
    if name in TORCH_OPTIMS:
        return TORCH_OPTIMS[name]
    try:
        from jointkl.optim import OPTIMIZERS
    except ImportError:
        OPTIMIZERS = {}
    if isinstance(name, str) and name in OPTIMIZERS:
        return OPTIMIZERS[name]
    known = sorted([*TORCH_OPTIMS, "lbfgs", *OPTIMIZERS])
    raise InputError(f"NCE: unknown optim {name!r}; known: {', '.join(known)}")


def _check_positive(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not value > 0:
        raise InputError(f"NCE: {name} must be a positive {kind.__name__}, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _describe(noise: Any) -> str:
    if isinstance(noise, torch.distributions.Distribution):
        return type(noise).__name__
    return getattr(noise, "__name__", type(noise).__name__)


def _check_data(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        got = type(args[0]).__name__ if args else "nothing"
        raise InputError(
            f"NCE: the first model argument must be the data tensor (one row per datum), got {got}"
        )
    x = args[0]
    if x.dim() == 0 or len(x) == 0:
        raise InputError(f"NCE: the data must have at least one row, got shape {tuple(x.shape)}")
    for where, a in [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
            bad = ~torch.isfinite(a)
            if bad.any():
                raise InputError(
                    f"NCE: data {where} has {int(bad.sum())} NaN/inf value(s); clean them first"
                )
    return x
