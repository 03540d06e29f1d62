"""Noise-contrastive estimation: fit a density known only up to its normaliser.

The model states an unnormalised log-density G(x; θ) with Pyro primitives (``pyro.factor``
or an observed site of an unnormalised distribution) inside ``pyro.plate("data", N)``;
p(x) = e^{G(x;θ)} / Z(θ) with Z too costly to compute. NCE turns density estimation into
classification: each datum (label 1) meets ν samples of a noise q (label 0), and

    P(1 | x) = σ(G(x;θ) − γ − log(ν q(x)))                                  (binary)

with γ a trainable estimate of log Z. The loss is −E_data log σ(·) − ν E_noise log(1 − σ(·));
its optimum has e^{G−γ} = p̃, so γ → log Z and θ → the maximum-likelihood fit, with the
efficiency of maximum likelihood approached as ν grows (Gutmann & Hyvärinen 2012). In the
joint-KL picture (fitting a model's joint to the data's by a KL) this is maximum likelihood
on the joint of (x, label) under the data+noise mixture: a proper KL with a normalised model
even though G is not.

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

The whole progress of a stochastic fit is one :class:`~jointkl.checkpoint.LoopState` (params
and γ, optimiser state, torch's RNG, step, history), saved as a checkpoint and poured back in
to resume exactly; the batch order is a function of (seed, step) alone.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from jointkl import distributed
from jointkl.checkpoint import (
    LoopState,
    check_checkpointing,
    latest_checkpoint,
    load_params,
    with_step_size,
)
from jointkl.data.arrays import is_row_array
from jointkl.engine import Engine, Result, recreate_params, register_engine
from jointkl.errors import FitDivergedError, InputError
from jointkl.fit import Fit
from jointkl.minibatch import (
    SAMPLE_ROWS,
    BatchOrder,
    slice_arguments,
    sliceable_arguments,
    spread_indices,
    streamed_rows,
)
from jointkl.optim import optim_class
from jointkl.optim.gradients import grad_norm, grads_finite
from jointkl.optim.loop import StepLoop
from jointkl.optim.sparse import SparseAwareOptimizer
from jointkl.settings import (
    Settings,
    boolean,
    compute_device,
    function,
    integer,
    is_number,
    one_of,
    optional,
    path_or_none,
    positive_float,
    positive_int,
    setting,
)
from jointkl.sites import DATA_PLATE
from jointkl.zoo import hook

__all__ = ["NCE", "NCESettings", "NoiseModel", "nce_loss", "pointwise_log_density", "resolve_noise"]

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


def _refuse_latents(model: Callable, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Refuse a model with latent sites before any noise reaches it: run on noise, such a
    model (a mixture of binary data, a VAE) fails on its own data checks first, with a
    message that does not say what NCE needs. Leaves the param store empty."""
    try:
        with torch.no_grad():
            tr = poutine.trace(model).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001  (the model's own error surfaces at the first pass)
        return
    finally:
        pyro.clear_param_store()
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
    if is_row_array(x):  # a file read in batches: the moments of an even spread of its rows
        x = x.tensor(spread_indices(len(x), SAMPLE_ROWS))
    if not x.dtype.is_floating_point:
        raise InputError(
            f"NCE: noise='gaussian' needs real-valued data, got {x.dtype}; use "
            "noise='unigram^0.75' for categorical data"
        )
    if distributed.active():  # the data set's moments, not this rank's rows'
        return _gaussian_of_shards(x)
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


def _gaussian_of_shards(x: torch.Tensor) -> NoiseModel:
    """The Gaussian noise of :func:`_gaussian` from the whole data set's moments when each
    rank holds a shard: N and Σx summed over ranks give the mean, then Σ(x − mean)(x −
    mean)ᵀ summed over ranks the covariance (two passes, as the one-process formula)."""
    if x.dim() not in (1, 2):
        raise InputError(
            f"NCE: noise='gaussian' needs data of shape (N,) or (N, D), got {tuple(x.shape)}"
        )
    flat = x.reshape(len(x), -1).to(torch.float64)
    first = distributed.all_reduce_sum(torch.cat([flat.new_tensor([len(x)]), flat.sum(0)]))
    n, mean = first[0], first[1:] / first[0]
    xc = flat - mean
    cov = distributed.all_reduce_sum(xc.T @ xc) / max(1.0, float(n) - 1)
    mean, cov = mean.to(x.dtype), cov.to(x.dtype)
    if x.dim() == 1:
        sd = cov[0, 0].sqrt().clamp_min(1e-6) if n > 1 else x.new_ones(())
        return NoiseModel(dist.Normal(mean[0], sd, validate_args=False), "gaussian")
    cov = cov + 1e-6 * cov.diagonal().mean().clamp_min(1e-6) * torch.eye(
        x.shape[1], dtype=x.dtype, device=x.device
    )
    return NoiseModel(
        dist.MultivariateNormal(mean, covariance_matrix=cov, validate_args=False), "gaussian"
    )


def _unigram(x: torch.Tensor, alpha: float, name: str) -> NoiseModel:
    if is_row_array(x):  # a file read in batches: the exact counts, a block at a time
        if x.dtype.kind not in "iu" or x.ndim != 1:
            raise InputError(
                f"NCE: noise={name!r} needs integer category ids of shape (N,), got {x.dtype} "
                f"{x.shape}; use noise='gaussian' for real-valued data"
            )
        counts = torch.zeros(0, dtype=torch.int64)
        for _, block in x.blocks():
            if block.size and block.min() < 0:
                raise InputError(
                    f"NCE: noise={name!r}: category ids must be >= 0, found {int(block.min())}"
                )
            c = torch.bincount(torch.from_numpy(block))
            counts = torch.cat([counts, counts.new_zeros(max(0, len(c) - len(counts)))])
            counts[: len(c)] += c
        probs = counts.to(torch.get_default_dtype()) ** alpha
        return NoiseModel(dist.Categorical(probs=probs / probs.sum(), validate_args=False), name)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() != 1:
        raise InputError(
            f"NCE: noise={name!r} needs integer category ids of shape (N,), got {x.dtype} "
            f"{tuple(x.shape)}; use noise='gaussian' for real-valued data"
        )
    if (x < 0).any():
        raise InputError(f"NCE: noise={name!r}: category ids must be >= 0, found {int(x.min())}")
    # word2vec's smoothed unigram: frequencies to the power α (0.75) flatten the head.
    counts = torch.bincount(x).to(torch.get_default_dtype())
    if distributed.active():  # the whole data set's frequencies, not this rank's rows'
        k = int(distributed.all_reduce_max(torch.tensor([len(counts)]))[0])
        counts = distributed.all_reduce_sum(torch.nn.functional.pad(counts, (0, k - len(counts))))
    probs = counts**alpha
    return NoiseModel(dist.Categorical(probs=probs / probs.sum(), validate_args=False), name)


def _check_support(
    noise: NoiseModel, x: torch.Tensor, ctx_args: tuple, ctx_kwargs: Mapping[str, Any]
) -> None:
    n = len(x)
    per_datum = sliceable_arguments(ctx_args, ctx_kwargs, n)
    with torch.no_grad():
        for lo in range(0, n, _CHUNK):
            idx = slice(lo, min(n, lo + _CHUNK))
            a, k = slice_arguments(ctx_args, ctx_kwargs, per_datum, idx)
            xb = x.tensor(idx) if is_row_array(x) else x[idx]  # a file: every row, in blocks
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


# ---------------------------------------------------------------------- settings
def _noise_setting(value: Any, where: str) -> Any:
    """``None``, a noise name, a torch/Pyro distribution, or a per-context callable."""
    if isinstance(value, str):
        if value != "gaussian" and not _UNIGRAM.match(value):
            raise InputError(
                f"{where} must be 'gaussian', 'unigram', 'unigram^α', a distribution or a "
                f"callable, got {value!r}"
            )
    elif value is not None and not (
        isinstance(value, torch.distributions.Distribution) or callable(value)
    ):
        raise InputError(
            f"{where} must be a name, a torch/Pyro distribution or a callable, got "
            f"{type(value).__name__}"
        )
    return value


def _log_z_setting(value: Any, where: str) -> str | float:
    """``"learn"``, or a number (γ fixed there)."""
    if value == "learn":
        return value
    if not is_number(value):
        raise InputError(f"{where} must be 'learn' or a number, got {value!r}")
    return float(value)


def _optim_setting(value: Any, where: str) -> str:
    # L-BFGS runs its own loop, which passes step() a closure; the step loop passes none.
    optim_class(value, "NCE", closure=value == "lbfgs")
    return value


@dataclass(frozen=True)
class NCESettings(Settings):
    """The settings of :class:`NCE` (see its docstring for each one)."""

    owner: ClassVar[str] = "NCE"

    noise: Any = setting(None, _noise_setting)
    nu: int = setting(10, positive_int)
    variant: str = setting("binary", one_of(*VARIANTS))
    log_z: str | float = setting("learn", _log_z_setting)
    optim: str = setting("adam", _optim_setting)
    lr: float | None = setting(None, optional(positive_float))
    steps: int = setting(1000, positive_int)
    batch_size: int | None = setting(None, optional(positive_int))
    shared_noise: bool | None = setting(None, optional(boolean))
    clip_norm: float | None = setting(None, optional(positive_float))
    seed: int = setting(0, integer)
    device: str | None = setting(None, compute_device)
    checkpoint_every: int | None = setting(None, optional(positive_int))
    checkpoint_dir: str | None = setting(None, path_or_none)
    resume: bool = setting(False, boolean)
    progress: bool = setting(True, boolean, json=False)
    on_step: Callable[[int, float], None] | None = setting(None, optional(function), json=False)

    def validate(self) -> None:
        check_checkpointing(self.owner, self.checkpoint_every, self.checkpoint_dir, self.resume)
        lbfgs = self.optim == "lbfgs"
        if self.shared_noise and lbfgs:
            self.fail(
                "shared_noise=True with optim='lbfgs' would draw only ν noise points for the "
                "whole fit (L-BFGS draws its noise once); use a stochastic optimiser"
            )
        if self.resume and lbfgs:
            self.fail(
                "resume needs a stochastic optimiser; an L-BFGS solve is one call with no "
                "checkpoints"
            )
        if lbfgs and self.batch_size is not None:
            self.fail(
                "optim='lbfgs' works on the full batch with noise drawn once (a deterministic "
                "objective); drop batch_size or pick a stochastic optimiser"
            )
        if self.lr is None:  # L-BFGS's line search starts from a unit step
            object.__setattr__(self, "lr", 1.0 if lbfgs else 0.01)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.noise is not None and not isinstance(self.noise, str):
            out["noise"] = _describe(self.noise)
        return out


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
    :param optim: an optimiser name of :data:`jointkl.optim.OPTIM_CLASSES` (``"adam"``,
        ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``, ``"clippedadam"`` or a
        :mod:`jointkl.optim` integrator, whose step size ε is ``lr``: fresh noise every step,
        mini-batches), or ``"lbfgs"`` (full batch, noise drawn once: the deterministic
        objective of the original NCE, solved to a tight optimum).
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
    :param device: where the fit computes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        (CUDA when available, else the CPU) or ``None`` (where the data already are: the
        CPU for data read from files); data and parameters move there once, at bind time.
    :param checkpoint_every: save the :class:`~jointkl.checkpoint.LoopState` every N steps
        into ``checkpoint_dir`` (stochastic optimisers; an L-BFGS solve writes none).
    :param checkpoint_dir: folder for ``step-XXXXXXXX.pt`` checkpoints; the state is also
        saved when the fit ends, is interrupted, or stops on a NaN/inf (the last good state).
    :param bool resume: continue from the latest checkpoint in ``checkpoint_dir`` if any; the
        numbers are those of a fit that never stopped.
    :param bool progress: show a tqdm bar with the running loss.
    :param on_step: called as ``on_step(step, loss)`` after every step (L-BFGS: every
        evaluation); raising ``KeyboardInterrupt`` there ends the fit early, keeping it.
    """

    name = "nce"
    data_parallel = True
    description = "noise-contrastive estimation: unnormalised models, log Z learned (no latents)"
    Settings = NCESettings
    settings: NCESettings

    # ------------------------------------------------------------------ fitting
    def streams_rows(self) -> bool:
        """With a ``batch_size``, data given as a memory-mapped row array are read one
        mini-batch at a time (never whole)."""
        return self.settings.batch_size is not None

    def bind_data(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """The skeleton's checks, after NCE's own: the first argument is the data tensor (or
        a memory-mapped row array, with a batch size), with at least one row."""
        streamed_rows("NCE", self.settings.batch_size, args, kwargs)
        if not args or not (isinstance(args[0], torch.Tensor) or is_row_array(args[0])):
            got = type(args[0]).__name__ if args else "nothing"
            raise InputError(
                f"NCE: the first model argument must be the data tensor (one row per datum), "
                f"got {got}"
            )
        if len(args[0].shape) == 0 or len(args[0]) == 0:
            raise InputError(
                f"NCE: the data must have at least one row, got shape {tuple(args[0].shape)}"
            )
        return super().bind_data(pair, args, kwargs)

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """Fit ``pair.model(x, *context, **kwargs)`` to the bound data."""
        s = self.settings
        x = args[0]
        n, nu = len(x), s.nu
        # Under a process group the data are this rank's rows (jointkl.distributed).
        if distributed.active() and s.optim == "lbfgs":
            raise InputError(
                "NCE: optim='lbfgs' does not run data-parallel (its line search is one "
                "process's loop); use a stochastic optimiser, or one process"
            )
        shard = distributed.Shard.of_local(n) if distributed.active() else None
        big_n = shard.n if shard is not None else n
        per_args, per_kwargs = sliceable_arguments(args, kwargs, n)
        ctx = (args[1:], kwargs)
        ctx_per = ({i - 1 for i in per_args if i > 0}, per_kwargs)
        # Rows from a file (a RowArray) are read a batch at a time; what runs outside the
        # loop on data in memory sees an even spread of at most SAMPLE_ROWS of them (all
        # rows of a small file), and the noise's support is checked on every row, in blocks.
        streamed = streamed_rows("NCE", s.batch_size, args, kwargs) is not None
        held_args, held_kwargs = (
            slice_arguments(args, kwargs, (per_args, per_kwargs), spread_indices(n, SAMPLE_ROWS))
            if streamed
            else (args, kwargs)
        )
        spec = s.noise
        if spec is None:
            spec = "gaussian" if held_args[0].dtype.is_floating_point else "unigram^0.75"
        noise = resolve_noise(spec, x, *ctx)
        scores = hook(pair, "candidate_scores")
        shared = s.shared_noise
        if shared is None:
            # L-BFGS draws its noise once for the whole fit: sharing would leave ν draws in all.
            shared = scores is not None and not noise.conditional and s.optim != "lbfgs"
        elif shared and noise.conditional:
            raise InputError(
                f"NCE: shared_noise=True needs noise that ignores the context; the noise "
                f"{noise.description!r} is per context (use shared_noise=False)"
            )
        if not shared:
            scores = None  # per-datum draws are scored by the model, row by row

        pyro.clear_param_store()
        model = pair.model
        _refuse_latents(model, held_args, held_kwargs)

        def batch_terms(idx, drawn=None, pos=None, global_b=None):
            """G and log q at a batch of data and its noise; idx=None is the whole data.

            ``drawn``: a fixed (y, log q(y), log q(x)) to reuse (L-BFGS), else fresh noise.
            ``pos``, ``global_b`` (data-parallel runs): the batch's positions in a global
            batch of ``global_b`` rows, whose per-datum noise is drawn whole on every rank
            and cut to these rows, so the ranks' draws are the 1-process run's.
            """
            if idx is None and streamed:  # a batch_size of at least N: every row, read now
                idx = torch.arange(n)
            b_args, b_kwargs = (
                (args, kwargs)
                if idx is None
                else slice_arguments(args, kwargs, (per_args, per_kwargs), idx)
            )
            b = len(b_args[0])
            if drawn is None:
                # the context alone feeds per-context noise
                c_args, c_kwargs = ctx if idx is None else slice_arguments(*ctx, ctx_per, idx)
                with torch.no_grad():
                    if shared:
                        y, logq_n = noise.sample_shared(nu)  # (ν, ...), (ν,)
                    elif pos is not None and not noise.conditional:
                        y, logq_n = noise.sample(global_b, nu)
                        y, logq_n = y[pos], logq_n[pos]
                    else:
                        y, logq_n = noise.sample(b, nu, c_args, c_kwargs)  # (B, ν, ...)
                    drawn = (y, logq_n, noise.log_prob(b_args[0], c_args, c_kwargs))
            y, logq_n, logq_d = drawn
            if scores is not None:
                # Shared draws, scored for every context at once: (B, ν), ν + B rows touched.
                g_d, global_term = pointwise_log_density(model, b_args, b_kwargs, b)
                g_n = scores(y.to(b_args[0].dtype), *b_args[1:], **b_kwargs)
                return g_d, g_n, logq_d, logq_n, global_term, drawn
            rows = y.expand(b, *y.shape) if shared else y  # shared: every datum sees all ν
            j_args, j_kwargs = _with_noise(b_args, b_kwargs, per_args, per_kwargs, rows)
            g, global_term = pointwise_log_density(model, j_args, j_kwargs, b * (1 + nu))
            return g[:b], g[b:].reshape(b, nu), logq_d, logq_n, global_term, drawn

        # One pass creates the model's params and seeds γ at the importance-sampling estimate
        # log Z ≈ log mean_j e^{G(y_j) − log q(y_j)}, y_j ~ q: near the optimum from step 0.
        first_idx = None if s.batch_size is None else torch.arange(min(n, s.batch_size))
        first, counted = {}, True
        if shard is not None:  # this rank's part of the 1-process first batch
            gb = min(big_n, s.batch_size or big_n)
            pos, first_idx = shard.part(torch.arange(gb))
            first = {"pos": pos, "global_b": gb}
            if len(first_idx) == 0:  # none of it here: one row creates the params
                first_idx, first, counted = torch.arange(1), {}, False
        with torch.no_grad():
            try:
                _, g_n, _, logq_n, _, _ = batch_terms(first_idx, **first)
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
            if shard is None:
                log_z0 = float(torch.logsumexp(w, 0) - math.log(w.numel()))
            else:
                log_z0 = _log_mean_exp_of_shards(w if counted else w[:0])
            if scores is not None:
                _check_candidate_scores(scores, model, args, kwargs, (per_args, per_kwargs))
        if not math.isfinite(log_z0):
            log_z0 = 0.0
        learn_z = s.variant == "binary" and s.log_z == "learn"
        fixed_z = s.log_z if is_number(s.log_z) else 0.0
        held = held_args[0]
        gamma = torch.tensor(
            log_z0 if learn_z else fixed_z, dtype=_float_dtype(held), device=held.device
        )
        gamma.requires_grad_(learn_z)
        store = pyro.get_param_store()
        params = [p for _, p in store.named_parameters()]
        if learn_z:
            params.append(gamma)
        if not params:
            raise InputError("NCE: the model has no parameters (pyro.param or pyro.module) to fit")

        def objective(parts):
            g_d, g_n, lq_d, lq_n, global_term, _ = parts
            per = nce_loss(g_d, g_n, lq_d, lq_n, s.variant, gamma)
            # Sites outside the data plate (a prior on θ) enter once per data set: −log p(θ)/N
            # per datum, the MAP analogue of the NCE objective.
            return per.mean() - global_term / big_n

        t0 = time.perf_counter()
        # The first pass above ran with Pyro's validation (the model's sites checked the
        # data and the noise); the loop skips those per-step support checks.
        with pyro.validation_enabled(False):
            if s.optim == "lbfgs":
                history, n_iter, converged, reason = self._run_lbfgs(params, batch_terms, objective)
            else:
                history, n_iter, converged, reason = self._run_stochastic(
                    params, gamma if learn_z else None, batch_terms, objective, big_n, shard
                )
        elapsed = time.perf_counter() - t0

        out = {k: store[k].detach().clone() for k in store.keys()}
        info: dict[str, Any] = {
            "stop_reason": reason,
            "seconds": elapsed,
            "data_size": big_n,
            "noise": noise.description,
            "shared_noise": bool(shared),
            "noise_scores": "candidate_scores" if scores is not None else "model",
        }
        if learn_z:
            out["log_Z"] = gamma.detach().clone()
        elif s.variant == "binary":
            info["log_Z"] = f"fixed at {fixed_z}"
        else:
            info["log_Z"] = f"not estimated: the {s.variant} loss does not identify it"
        return Result(
            params=out,
            history=history,
            objective="loss",
            converged=converged,
            n_iter=n_iter,
            state={f"param:{k}": v.detach().clone() for k, v in store.named_parameters()},
            info=info,
        )

    def _run_stochastic(self, params, gamma, batch_terms, objective, n, shard=None):
        """The step loop; its whole progress is one LoopState, checkpointed and resumed when
        ``checkpoint_dir`` is set. ``gamma``: the learned γ, or ``None``; ``n``: the rows
        over all ranks; ``shard``: this rank's rows in a data-parallel run, else ``None``."""
        s = self.settings
        store = pyro.get_param_store()
        opt = SparseAwareOptimizer(s.optim, s.lr, params, owner="NCE")
        # Every step has batch_size rows (the epoch's last partial batch is dropped); stream 1
        # keeps the order apart from other users of the same seed.
        order = None
        if s.batch_size is not None and s.batch_size < n:
            order = BatchOrder(n, s.batch_size, s.seed, drop_last=True, stream=1)
        state = LoopState(0)
        latest = latest_checkpoint(s.checkpoint_dir) if s.resume else None
        latest = distributed.broadcast_object(latest)  # every rank resumes from one file
        if latest is not None:
            state = LoopState.load(latest)
            saved = dict(state.params)
            log_z = saved.pop("log_Z", None)
            if (log_z is None) != (gamma is None):
                raise InputError(
                    f"NCE: checkpoint {latest} was written by a fit that "
                    f"{'did not learn' if log_z is None else 'learned'} log Z; this one "
                    f"{'does' if log_z is None else 'does not'}: resume with the same settings"
                )
            load_params(store, saved)
            if gamma is not None:
                with torch.no_grad():
                    gamma.copy_(log_z)
            # this run's lr, not the checkpoint's (a resume after a divergence lowers it)
            opt.load_state_dict(with_step_size(state.optim, s.lr))
            state.restore_torch_rng()
        # The live tensors the optimiser moves: the model's unconstrained params, and γ.
        state.params = dict(store.named_parameters())
        if gamma is not None:
            state.params["log_Z"] = gamma
        distributed.broadcast_start(params if shard is not None else [])

        def save() -> None:
            state.optim = opt.state_dict()
            state.rng = LoopState.torch_rng()
            if distributed.is_main():  # rank 0 alone writes; the state is every rank's
                state.save(s.checkpoint_dir)

        def step(i: int) -> float:
            idx = None if order is None else order.indices(i)
            if shard is None:
                loss = objective(batch_terms(idx))
            else:  # this rank's part of the global batch, weighted by w_r = B_r/B
                whole = torch.arange(n) if idx is None else idx
                pos, local = shard.part(whole)
                weight = len(local) / len(whole)
                terms = batch_terms(local, pos=pos, global_b=len(whole)) if len(local) else None
                loss = objective(terms) if terms is not None else None
            value = float(loss.detach()) if loss is not None else 0.0
            opt.zero_grad()
            if loss is not None and math.isfinite(value):
                loss.backward()
            if shard is not None:
                value = distributed.all_reduce_step(params, weight, value, i)
            if not (math.isfinite(value) and grads_finite(params)):
                opt.zero_grad()
                raise FitDivergedError(
                    f"NCE: non-finite loss or gradient at step {i} (loss={value}); no update "
                    f"was applied (parameters as after step {i - 1}); lower lr or set clip_norm"
                )
            if s.clip_norm is not None:
                norm = grad_norm(params)
                if norm > s.clip_norm:
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(s.clip_norm / norm)
            opt.step()
            return value

        loop = StepLoop(
            steps=s.steps,
            save=save if s.checkpoint_dir is not None else None,
            checkpoint_every=s.checkpoint_every,
            on_step=s.on_step,
            progress=s.progress and distributed.is_main(),
            desc="nce",
            smoothing=0.05,
        )
        converged, reason = loop.run(state, step)
        return state.history, state.step, converged, reason

    def _run_lbfgs(self, params, batch_terms, objective):
        s = self.settings
        with torch.no_grad():
            fixed = batch_terms(None)  # the noise sample of the whole fit: drawn once
        drawn = fixed[5]
        opt = torch.optim.LBFGS(
            params,
            lr=s.lr,
            max_iter=s.steps,
            max_eval=s.steps * 5 // 4 + 10,
            # torch's defaults: stop when the gradient's largest entry or the change in
            # loss/parameters falls to round-off level for a loss of order one.
            tolerance_grad=1e-7,
            tolerance_change=1e-9,
            history_size=50,
            line_search_fn="strong_wolfe",
        )
        history: list[float] = []
        good = [p.detach().clone() for p in params]
        bar = tqdm(disable=not s.progress, desc="nce (lbfgs evaluations)")

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
            if s.progress:
                bar.set_postfix(loss=f"{value:.6g}")
            if s.on_step is not None:
                s.on_step(len(history) - 1, value)
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
        converged = reason == "converged" and n_iter < s.steps
        if reason == "converged" and not converged:
            reason = "max steps"
        return history, n_iter, converged, reason

    # ------------------------------------------------------------------ re-use
    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Recreate the fit's parameters in Pyro's param store (γ is not a model param)."""
        recreate_params(fit.pair.model, args=fit.args, kwargs=fit.kwargs)
        saved = {k.removeprefix("param:"): v for k, v in fit.state.items()}
        load_params(pyro.get_param_store(), saved)

    @classmethod
    def log_density_offset(cls, fit: Fit) -> float:
        """−γ: the model's density is e^{G − log Z} and the binary variant learned γ ≈ log Z."""
        return -float(fit.params["log_Z"]) if "log_Z" in fit.params else 0.0


# ---------------------------------------------------------------------- helpers
def _log_mean_exp_of_shards(w: torch.Tensor) -> float:
    """log mean_j e^{w_j} over the ranks' ``w`` together: each rank's log-sum-exp, shifted
    by their maximum m, summed as m + log Σ_r e^{lse_r − m}, minus the log of the count."""
    w = w.to(torch.float64)
    lse = torch.logsumexp(w, 0) if w.numel() else w.new_tensor(-math.inf)
    m = distributed.all_reduce_max(lse.reshape(1).clone())
    total = distributed.all_reduce_sum(torch.stack([(lse - m[0]).exp(), w.new_tensor(w.numel())]))
    return float(m[0] + total[0].log() - total[1].log())


def _check_candidate_scores(scores, model, args, kwargs, per_datum, rows: int = 16):
    """Refuse a ``candidate_scores`` hook that does not agree with the model: scoring the
    first rows' own data as candidates must give the model's G on its diagonal."""
    idx = torch.arange(min(rows, len(args[0])))
    b_args, b_kwargs = slice_arguments(args, kwargs, per_datum, idx)
    g_model, _ = pointwise_log_density(model, b_args, b_kwargs, len(idx))
    try:
        g_hook = scores(b_args[0], *b_args[1:], **b_kwargs)
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


def _describe(noise: Any) -> str:
    if isinstance(noise, torch.distributions.Distribution):
        return type(noise).__name__
    return getattr(noise, "__name__", type(noise).__name__)
