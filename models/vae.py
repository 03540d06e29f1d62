"""Variational auto-encoder, read as a joint-KL fit: the Bayesian view of the VAE loss.

    z_i ~ N(0, I)                         i = 1..N   (plate "data")
    x_i ~ q(x | z_i) = decoder(z_i)                  (Bernoulli or Gaussian, per pixel)

    guide  p(z_i | x_i) = N(μ(x_i), diag σ²(x_i))    (the amortised encoder)

SVI on this pair minimises KL(p̃(x) p(z|x) ‖ q(x|z) q(z)), i.e. per image

    E_{z∼p(z|x)}[−log q(x|z)] + KL(p(z|x) ‖ N(0, I)),
    KL = ½ Σ_k (μ_k² + σ_k² − log σ_k² − 1)          (closed form; ``loss="meanfield"``)

The decoder's likelihood decides what the "reconstruction error" is:

* ``"bernoulli"``: −log q(x|z) is the binary cross-entropy of the sigmoid output (binary data);
* ``"gaussian"``: fixed scale σ̃, −log q(x|z) = ‖x − m(z)‖² / (2σ̃²) + D log(σ̃√(2π)): MSE,
  with σ̃ setting how much reconstruction counts against the KL term;
* ``"gaussian-learned-scale"``: σ̃ is a parameter (shared, or one per pixel), so the model
  picks that balance itself: at the optimum σ̃² is the mean squared reconstruction error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from jointkl.device import follow
from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, optional, positive_float, positive_int
from jointkl.zoo import ZooModel, register_model

from .networks import (
    GaussianEncoder,
    data_rows,
    hidden_sizes,
    mlp,
    register_module,
    standard_normal_prior,
)

__all__ = ["VAE", "LearnedScale"]

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned-scale")
SCALE_SHARING = ("shared", "pixel")


class LearnedScale(nn.Module):
    """A positive scale σ̃ = min_scale + softplus(ρ), one per pixel or one shared (size 1).

    Softplus keeps the gradient in ρ bounded as σ̃ shrinks, where exp(ρ) would let a
    near-perfect reconstruction drive ρ → −∞ in a few steps.
    """

    def __init__(self, size: int, init: float, min_scale: float):
        super().__init__()
        if not init > min_scale:
            raise InputError(f"LearnedScale: init {init!r} must exceed min_scale {min_scale!r}")
        self.min_scale = min_scale
        # softplus⁻¹(y) = log(expm1(y)): start exactly at σ̃ = init.
        rho = math.log(math.expm1(init - min_scale))
        self.rho = nn.Parameter(torch.full((size,), rho))

    def forward(self) -> torch.Tensor:
        scale = self.min_scale + nn.functional.softplus(self.rho)
        return scale if scale.numel() > 1 else scale.squeeze(0)


@register_model
class VAE(ZooModel):
    """Variational auto-encoder: N(0, I) prior, diagonal-Gaussian amortised guide.

    :param int latent_dim: dimension L of z.
    :param hidden: hidden layer width(s) of the default MLP encoder and decoder (int or list).
    :param str likelihood: ``"bernoulli"`` (binary pixels; logits out), ``"gaussian"`` (fixed
        scale ``scale``) or ``"gaussian-learned-scale"`` (scale is a learned parameter).
    :param encoder: an ``nn.Module`` mapping x ``(..., D)`` to ``(loc, scale)``, each
        ``(..., L)``; ``None`` builds an MLP (:class:`GaussianEncoder`).
    :param decoder: an ``nn.Module`` mapping z ``(..., L)`` to ``(..., D)``: logits (Bernoulli)
        or the mean (Gaussian); ``None`` builds an MLP.
    :param float scale: the fixed decoder scale σ̃ of ``"gaussian"``.
    :param str learned_scale: ``"shared"`` (one σ̃ for all pixels) or ``"pixel"`` (one each),
        for ``"gaussian-learned-scale"``; starts at ``scale``.
    :param float min_scale: floor of the learned σ̃ — a Gaussian density on quantised data is
        unbounded as σ̃ → 0 on pixels that never change.
    :param input_dim: D; ``None`` takes it from the data at the first call (the networks are
        then initialised from torch's RNG there, i.e. from the engine's seed).
    :param image_shape: (H, W) of an image when plotting; ``None``: square if D is a square.

    Fitting the same instance again continues from its current weights (the networks are
    the instance's state); build a new instance for a fresh start.
    """

    name: ClassVar[str] = "vae"
    description: ClassVar[str] = "variational auto-encoder, Gaussian latents (digits by default)"

    def __init__(
        self,
        latent_dim: int = 8,
        hidden: int | Sequence[int] = (256, 256),
        likelihood: str = "bernoulli",
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        scale: float = 1.0,
        learned_scale: str = "shared",
        min_scale: float = 1e-3,
        input_dim: int | None = None,
        image_shape: Sequence[int] | None = None,
    ):
        (
            self.latent_dim,
            self.input_dim,
            self.likelihood,
            self.learned_scale,
            self.scale,
            self.min_scale,
        ) = check_all(
            [
                ("latent_dim", latent_dim, positive_int),
                ("input_dim", input_dim, optional(positive_int)),
                ("likelihood", likelihood, one_of(*LIKELIHOODS)),
                ("learned_scale", learned_scale, one_of(*SCALE_SHARING)),
                ("scale", scale, positive_float),
                ("min_scale", min_scale, positive_float),
            ],
            "VAE",
        )
        for arg, value in (("encoder", encoder), ("decoder", decoder)):
            if value is not None and not isinstance(value, nn.Module):
                raise InputError(
                    f"VAE: {arg} must be a torch.nn.Module, got {type(value).__name__}"
                )
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 2:
                raise InputError(f"VAE: image_shape must be (H, W), got {image_shape!r}")
        self.hidden = hidden_sizes(hidden, "VAE")
        self.image_shape = image_shape
        self._custom = encoder is not None or decoder is not None
        self.encoder = encoder
        self.decoder = decoder
        # σ̃ lives in a module on the instance (not only in Pyro's param store), so a fitted
        # VAE keeps its scale after the store is cleared by the next fit.
        self.obs_scale: LearnedScale | None = None
        self._registry: dict[str, tuple[nn.Module, list]] = {}
        if self.input_dim is not None:
            self._build(self.input_dim)

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "likelihood": self.likelihood,
            "scale": self.scale,
            "learned_scale": self.learned_scale,
            "min_scale": self.min_scale,
            "input_dim": self.input_dim,
            "image_shape": list(self.image_shape) if self.image_shape else None,
        }

    def spec(self) -> dict[str, Any] | None:
        """The zoo spec; ``None`` with user-supplied networks, which are code, not settings
        (such a fit is loaded with ``Fit.load(dir, pair=...)``)."""
        return None if self._custom else super().spec()

    def default_data(self, seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """The digits training split (1,437 x 64): binarised for ``"bernoulli"``, grey levels
        in [0, 1] otherwise (:func:`jointkl.data.digits`; the split is fixed, ``seed`` unused)."""
        from jointkl.data.digits import digits

        x, _ = digits("train", binarize=self.likelihood == "bernoulli")
        return (x,), {}

    # -------------------------------------------------------------- networks
    def _build(self, input_dim: int) -> None:
        self.input_dim = input_dim
        if self.encoder is None:
            self.encoder = GaussianEncoder(input_dim, self.hidden, self.latent_dim)
        if self.decoder is None:
            self.decoder = mlp([self.latent_dim, *reversed(self.hidden), input_dim])
        if self.likelihood == "gaussian-learned-scale" and self.obs_scale is None:
            size = input_dim if self.learned_scale == "pixel" else 1
            self.obs_scale = LearnedScale(size, self.scale, self.min_scale)

    def _check(self, x: Any, values: bool = True) -> torch.Tensor:
        """x as (N, D), validated; ``values=False`` skips the O(N·D) look at the values (the
        guide and the model see the same x, and the model looks)."""
        if isinstance(x, torch.Tensor) and x.dim() == 3 and self.image_shape is None:
            self.image_shape = tuple(x.shape[1:])  # for plotting
        x = data_rows(x, "VAE", self.input_dim)
        if values and self.likelihood == "bernoulli" and torch.jit.is_tracing():
            # Under SVI's traced loss (jointkl.inference.traced_elbo) the check is data flow
            # in the graph: a non-binary batch gives a NaN loss, and the engine redoes that
            # step eagerly, where the branch below raises.
            x = torch.where((x * (1 - x) == 0).all(), x, torch.nan)
        elif values and self.likelihood == "bernoulli" and bool((x * (1 - x) != 0).any()):
            raise InputError(
                "VAE: likelihood='bernoulli' needs binary x (0/1); binarise the data "
                "(e.g. digits(binarize=True)) or use a Gaussian likelihood"
            )
        if self.encoder is None or self.decoder is None:
            self._build(x.shape[1])
        for net in (self.encoder, self.decoder, self.obs_scale):
            follow(net, x)  # built on the CPU: to the data's device, once
        return x

    def likelihood_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """q(x | z) from the decoder output ``out`` (..., D), one event of D pixels."""
        if self.likelihood == "bernoulli":
            # Validation would re-check the 0/1 support per call; _check already did it once.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        scale = self.obs_scale() if self.likelihood == "gaussian-learned-scale" else self.scale
        return dist.Normal(out, scale, validate_args=self._validate).to_event(1)

    # -------------------------------------------------------------- the pair
    @property
    def _validate(self) -> bool | None:
        # Our networks give a finite loc and σ = softplus(·) + ε > 0 by construction, so
        # re-checking the constraints on every call is pure overhead (a NaN still reaches the
        # loss, where the engine stops); user-supplied networks keep Pyro's validation.
        return None if self._custom else False

    def model(self, x: torch.Tensor) -> None:
        x = self._check(x)
        register_module("decoder", self.decoder, self._registry)
        if self.obs_scale is not None:
            register_module("x_scale", self.obs_scale, self._registry)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", standard_normal_prior(x, self.latent_dim))
            pyro.sample("x", self.likelihood_dist(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        x = self._check(x, values=False)
        register_module("encoder", self.encoder, self._registry)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale, validate_args=self._validate).to_event(1))

    # -------------------------------------------------------------- use
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's (μ(x), σ(x)), each (N, L): μ is the feature a linear probe reads."""
        x = self._check(x)
        return self.encoder(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean E[x | z]: pixel probabilities (Bernoulli) or means (Gaussian)."""
        if self.decoder is None:
            raise InputError("VAE: the networks are not built yet; fit the model or pass input_dim")
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = μ(x)]: the decoder's mean at the encoder's mean."""
        loc, _ = self.encode(x)
        return self.decode(loc)

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """Means E[x | z] of ``n`` draws z ~ N(0, I) (the generative side on its own)."""
        if self.decoder is None:
            raise InputError("VAE: the networks are not built yet; fit the model or pass input_dim")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        p = next(self.decoder.parameters())
        z = torch.randn(n, self.latent_dim, generator=g, dtype=p.dtype).to(p.device)
        return self.decode(z)

    def diagnostic_plots(self, fit, out_dir) -> list:
        """Reconstructions, prior samples and the latent means, as PNGs in ``out_dir``
        (called by ``jointkl diagnose``)."""
        from jointkl.vae_plots import vae_figures

        return vae_figures(self, fit, out_dir)

    def __repr__(self) -> str:
        return (
            f"VAE(latent_dim={self.latent_dim}, hidden={list(self.hidden)}, "
            f"likelihood={self.likelihood!r})"
        )
