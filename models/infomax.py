"""Encoder-only representation learning: the prior term plus mutual information (Deep InfoMax).

The VAE's joint KL splits as

    KL(p̃(x) p(z|x) ‖ q(z) q(x|z)) = E_x KL(p(z|x) ‖ q(z)) − E log[q(x|z) / p̃(x)],

and with a decoder expressive enough the second term is −I(x; z). Dropping the decoder
leaves an objective on the encoder p(z|x) = N(μ(x), diag σ²(x)) alone:

    min  −α·I_global(x; z) − β·I_local(x; z) + γ·E_x KL(p(z|x) ‖ N(0, I)).

Each I is the Jensen–Shannon lower bound of a discriminator T (Nowozin et al. 2016;
Hjelm et al. 2019, Deep InfoMax), maximised jointly over T and the encoder:

    I_JS = E_{p(x,z)}[log σ(T(x, z))] + E_{p(x)p(z)}[log(1 − σ(T(x, z')))]
         = −E_joint softplus(−T) − E_product softplus(T).

``estimator="nce"`` uses InfoNCE instead (Oord et al. 2018), the log-loss of picking the
true z_i among the batch's codes: I_NCE = E[T(x_i, z_i) − log mean_j exp T(x_i, z_j)].

Samples of the product of marginals come from the batch itself: x_i paired with the z_j of
another image. ``negatives="all"`` scores every pair i ≠ j (B − 1 negatives per image, for
the price of one matrix product); ``"shuffle"`` pairs each x_i with one z_perm(i).

Both discriminators are separable, T(f, z) = ⟨φ(f), ψ(z)⟩ / √h (Deep InfoMax's
"encode-and-dot-product" critic), which is what makes all-pairs scoring cheap:

* global: f = the image x itself and φ *linear*, so T(x, z) = xᵀ W ψ(z). The MI term then
  rewards codes from which the pixel pattern is linearly predictable — the contrastive
  counterpart of a decoder — rather than any code that merely tells images apart;
* local (image inputs only): f = every position of the encoder's intermediate feature map
  (5x5 receptive fields), φ = 1x1 convolutions: z must carry what all patches share.

Measured on the digits (8-dim z, linear probe on μ; scripts/vae_digits.py, docs/models/vae.md):
a global critic on the encoder's own features with one shuffled negative reached 0.79, the
pixel critic 0.88 with one negative and 0.90 with all pairs; an untrained encoder gives 0.58
(exploratory runs on the test split; later choices, the JS vs InfoNCE estimator among them,
were made on a validation split: docs/models/vae.md).
Reference weights (Deep InfoMax): α = 0.5, β = 1.5, γ = 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from torch import nn
from torch.nn.functional import softplus

from jointkl.device import follow
from jointkl.errors import InputError
from jointkl.settings import (
    check_all,
    nonnegative_float,
    one_of,
    optional,
    positive_int,
)
from jointkl.zoo import ZooModel, register_model

from .networks import (
    GaussianEncoder,
    data_rows,
    hidden_sizes,
    mlp,
    register_module,
    standard_normal_prior,
)

__all__ = [
    "InfoMax",
    "ConvFeatures",
    "SeparableCritic",
    "js_mutual_information",
    "nce_mutual_information",
]

NEGATIVES = ("all", "shuffle")
ESTIMATORS = ("js", "nce")


def js_mutual_information(joint: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The Jensen–Shannon MI lower bound from discriminator scores, per data point.

    :param joint: T on pairs (x_i, z_i) drawn from p(x, z), shape ``(N, ...)``.
    :param product: T on pairs (x_i, z_j), j ≠ i (samples of p(x)p(z)), shape ``(N, ...)``:
        one negative per point, or ``(N, K, ...)`` for K of them.
    :returns: ``(N,)``: mean log σ(T_joint) + mean log(1 − σ(T_product)), the means over all
        but the first dim; log σ(t) = −softplus(−t) and log(1 − σ(t)) = −softplus(t) are the
        overflow-free forms.
    """
    n = joint.shape[0]
    return -softplus(-joint).reshape(n, -1).mean(-1) - softplus(product).reshape(n, -1).mean(-1)


def nce_mutual_information(joint: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The InfoNCE MI lower bound from critic scores, per data point (Oord et al. 2018).

        I_NCE = E[T(x_i, z_i) − log (1/(K+1)) Σ_{j ∈ {i} ∪ negatives} exp T(x_i, z_j)] ≤ I(x; z)

    the log-loss of picking the true z_i among K + 1 candidates, plus log(K + 1); it is
    bounded above by log(K + 1), so it needs many negatives (all pairs of the batch) to be a
    useful bound, and in exchange has far lower variance than the JS or NWJ bounds.

    :param joint: T on the true pairs, shape ``(N, ...)``.
    :param product: T on the negatives, ``(N, ...)`` for one per point or ``(N, K, ...)``.
    :returns: ``(N,)``, averaged over any trailing (position) dims.
    """
    n = joint.shape[0]
    if product.dim() == joint.dim():
        product = product.unsqueeze(1)
    scores = torch.cat([joint.unsqueeze(1), product], dim=1)  # (N, K+1, ...), true pair first
    k1 = scores.shape[1]
    nce = joint - torch.logsumexp(scores, dim=1) + math.log(k1)
    return nce.reshape(n, -1).mean(-1)


MI_BOUNDS = {"js": js_mutual_information, "nce": nce_mutual_information}


class ConvFeatures(nn.Module):
    """Image (N, H·W) -> local feature map (N, C, H, W) -> global feature vector (N, F).

    Two 3x3 same-size convolutions give the map the local critic reads (each position sees a
    5x5 patch); a stride-2 convolution and a flatten give the global feature. The
    normalisations (GroupNorm on the map, LayerNorm on the vector) matter: with default
    initialisation the features of [0, 1] pixels are ~10⁻², so μ(x) starts buried under the
    σ ≈ 0.7 sampling noise of z, the critics see pure noise, and the MI terms sit at their
    −log 4 saddle (measured: without them the probe accuracy of μ barely left an untrained
    encoder's).
    """

    def __init__(self, image_shape: tuple[int, int], channels: Sequence[int]):
        super().__init__()
        c1, c2 = channels
        self.image_shape = image_shape
        self.local = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.GroupNorm(1, c2),  # per image, over channels and positions
        )
        h, w = image_shape
        self.out_features = c2 * ((h + 1) // 2) * ((w + 1) // 2)
        self.down = nn.Sequential(
            nn.Conv2d(c2, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(1),
            nn.LayerNorm(self.out_features),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.local(x.reshape(-1, 1, *self.image_shape))
        return m, self.down(m)


class _Encoder(nn.Module):
    """x -> (μ, σ, local feature map or None): the InfoMax encoder."""

    def __init__(self, input_dim, image_shape, channels, hidden, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim
        if image_shape is not None:
            self.features = ConvFeatures(image_shape, channels)
            width = self.features.out_features
        else:  # vectors: one dense layer (LayerNorm: see ConvFeatures)
            width = hidden[0]
            self.features = nn.Sequential(
                nn.Linear(input_dim, width), nn.ReLU(), nn.LayerNorm(width)
            )
        self.head = GaussianEncoder(width, hidden, latent_dim)  # the VAE's, on the features

    def forward(self, x):
        if isinstance(self.features, ConvFeatures):
            local, flat = self.features(x)
        else:
            local, flat = None, self.features(x)
        loc, scale = self.head(flat)
        return loc, scale, local


class SeparableCritic(nn.Module):
    """T(f, z) = ⟨φ(f), ψ(z)⟩ / √h for the true pairs and for the negatives.

    :param int features: size of f: a vector (N, F), or the channels C of a map
        (N, C, H, W) when ``local=True`` (φ = 1x1 convolutions, T scored at every position).
    :param int latent_dim: L, the size of z.
    :param int hidden: h, the width of φ and ψ. The 1/√h keeps initial scores O(1).
    :param bool linear: φ is one linear map (global critic on pixels) instead of an MLP.
    """

    def __init__(
        self, features: int, latent_dim: int, hidden: int, local: bool = False, linear=False
    ):
        super().__init__()
        self.local = local
        self.scale = hidden**-0.5
        if local:
            self.phi = nn.Sequential(
                nn.Conv2d(features, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1)
            )
        elif linear:
            self.phi = nn.Linear(features, hidden)
        else:
            self.phi = mlp([features, hidden, hidden])
        self.psi = mlp([latent_dim, hidden, hidden])

    def forward(
        self, f: torch.Tensor, z: torch.Tensor, negatives: str | torch.Tensor = "all"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(joint, product)`` scores. ``joint[i] = T(f_i, z_i)``; with ``negatives="all"``
        ``product[i, k]`` runs over every z_j, j ≠ i (shape (N, N−1, ...)); with a
        permutation tensor ``product[i] = T(f_i, z_perm[i])``. Trailing dims: (H, W) if local.
        """
        a, b = self.phi(f), self.psi(z) * self.scale  # (N, h[, H, W]), (N, h)
        if isinstance(negatives, torch.Tensor):
            if self.local:
                return (
                    torch.einsum("nc...,nc->n...", a, b),
                    torch.einsum("nc...,nc->n...", a, b[negatives]),
                )
            return (a * b).sum(-1), (a * b[negatives]).sum(-1)
        n = a.shape[0]
        scores = torch.einsum("ic...,jc->ij...", a, b)  # every (x_i, z_j) pair at once
        off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
        joint = scores.diagonal(dim1=0, dim2=1).movedim(-1, 0)
        return joint, scores[off].reshape(n, n - 1, *scores.shape[2:])


@register_model
class InfoMax(ZooModel):
    """Encoder-only learner: Jensen–Shannon mutual information plus a N(0, I) prior term.

    :param int latent_dim: dimension L of z (the representation).
    :param hidden: hidden width(s) of the encoder's head (features -> μ, σ).
    :param int critic_hidden: width h of the critics' φ and ψ.
    :param channels: (C1, C2) convolution channels of the image encoder.
    :param image_shape: ``(H, W)`` when x holds images as rows of H·W pixels (then a conv
        encoder and the local critic are used); ``None`` for plain vectors (MLP encoder,
        global critic only).
    :param float global_weight: α, weight of the global MI term.
    :param float local_weight: β, weight of the local MI term (images only).
    :param float prior_weight: γ, weight of E_x KL(p(z|x) ‖ N(0, I)).
    :param str negatives: ``"all"`` (every other image of the batch) or ``"shuffle"`` (one,
        by a random permutation).
    :param str estimator: the MI lower bound each critic feeds: ``"js"`` (Jensen–Shannon,
        :func:`js_mutual_information`) or ``"nce"`` (InfoNCE, :func:`nce_mutual_information`).
    :param input_dim: D; ``None`` takes it from the data at the first call (the networks are
        then initialised from torch's RNG there, i.e. from the engine's seed).

    Fit with the SVI engine and this model's objective plugged in::

        im = InfoMax(8)
        fit = SVI(loss=im.loss, batch_size=128, steps=2000).fit(im, x)
        features = im.encode(x_test)

    (``SVI()`` with no ``loss`` picks it up from :attr:`default_loss`.)
    """

    name: ClassVar[str] = "infomax"
    description: ClassVar[str] = "encoder-only mutual-information + prior learner (Deep InfoMax)"
    # The settings every measurement in docs/models/vae.md used (scripts/vae_digits.py).
    # SVI's own defaults (full batch, 1,000 steps) score all 1,797² image pairs at every
    # position of the local critic each step: measured 11 s a step on a shared 2-core CPU
    # (1,000 steps: about 3 hours).
    engine_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "svi": {"batch_size": 128, "lr": 1e-3, "steps": 3000}
    }

    def __init__(
        self,
        latent_dim: int = 8,
        hidden: int | Sequence[int] = 256,
        critic_hidden: int = 64,
        channels: Sequence[int] = (16, 32),
        image_shape: Sequence[int] | None = (8, 8),
        global_weight: float = 0.5,
        local_weight: float = 1.5,
        prior_weight: float = 0.01,
        negatives: str = "all",
        estimator: str = "js",
        input_dim: int | None = None,
    ):
        channels = tuple(channels)
        if len(channels) != 2:
            raise InputError(f"InfoMax: channels must be two positive ints, got {channels!r}")
        self.channels = tuple(positive_int(c, "InfoMax: channels") for c in channels)
        (
            self.latent_dim,
            self.input_dim,
            self.global_weight,
            self.local_weight,
            self.prior_weight,
            self.negatives,
            self.estimator,
        ) = check_all(
            [
                ("latent_dim", latent_dim, positive_int),
                ("input_dim", input_dim, optional(positive_int)),
                ("global_weight", global_weight, nonnegative_float),
                ("local_weight", local_weight, nonnegative_float),
                ("prior_weight", prior_weight, nonnegative_float),
                ("negatives", negatives, one_of(*NEGATIVES)),
                ("estimator", estimator, one_of(*ESTIMATORS)),
            ],
            "InfoMax",
        )
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 2 or min(image_shape) < 1:
                raise InputError(
                    f"InfoMax: image_shape must be (H, W) or None, got {image_shape!r}"
                )
        if global_weight == 0 and (local_weight == 0 or image_shape is None):
            raise InputError("InfoMax: every MI weight is 0: nothing would make z informative")
        self.hidden = hidden_sizes(hidden, "InfoMax")
        self.critic_hidden = positive_int(critic_hidden, "InfoMax: critic_hidden")
        self.image_shape = image_shape
        if image_shape is None:  # vectors: no feature map, so no local term
            self.local_weight = 0.0
        self.encoder: _Encoder | None = None
        self.global_critic: SeparableCritic | None = None
        self.local_critic: SeparableCritic | None = None
        self._registry: dict[str, tuple[nn.Module, list]] = {}
        if self.input_dim is not None:
            self._build(self.input_dim)

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "critic_hidden": self.critic_hidden,
            "channels": list(self.channels),
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "global_weight": self.global_weight,
            "local_weight": self.local_weight,
            "prior_weight": self.prior_weight,
            "negatives": self.negatives,
            "estimator": self.estimator,
            "input_dim": self.input_dim,
        }

    def default_data(self, seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """The digits training split, grey levels in [0, 1] (1,437 x 64; ``seed`` unused)."""
        from jointkl.data.digits import digits

        x, _ = digits("train")
        return (x,), {}

    # -------------------------------------------------------------- networks
    def _build(self, input_dim: int) -> None:
        self.input_dim = input_dim
        self.encoder = _Encoder(
            input_dim, self.image_shape, self.channels, self.hidden, self.latent_dim
        )
        h = self.critic_hidden
        self.global_critic = SeparableCritic(input_dim, self.latent_dim, h, linear=True)
        if self.image_shape is not None and self.local_weight > 0:
            self.local_critic = SeparableCritic(self.channels[1], self.latent_dim, h, local=True)

    def _check(self, x: Any) -> torch.Tensor:
        x = data_rows(x, "InfoMax", self.input_dim)
        d = x.shape[1]
        if self.image_shape is not None and d != self.image_shape[0] * self.image_shape[1]:
            raise InputError(
                f"InfoMax: x has {d} features but image_shape={self.image_shape} needs "
                f"{self.image_shape[0] * self.image_shape[1]}; set image_shape=None for vectors"
            )
        if self.encoder is None:
            self._build(d)
        for net in (self.encoder, self.global_critic, self.local_critic):
            follow(net, x)  # built on the CPU: to the data's device, once
        return x

    # -------------------------------------------------------------- the pair
    def model(self, x: torch.Tensor) -> None:
        """The generative side that is left: only the prior q(z) = N(0, I)."""
        x = self._check(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", standard_normal_prior(x, self.latent_dim))

    def guide(self, x: torch.Tensor):
        """The encoder p(z|x); returns the local feature map the local critic reads.

        The critics are registered here too: they belong to the variational side of the
        objective, and the engine (checkpoints, ``activate``) sees exactly the params that
        the model and the guide create.
        """
        x = self._check(x)
        register_module("encoder", self.encoder, self._registry)
        register_module("global_critic", self.global_critic, self._registry)
        if self.local_critic is not None:
            register_module("local_critic", self.local_critic, self._registry)
        with pyro.plate("data", x.shape[0]):
            loc, scale, local = self.encoder(x)
            # σ = softplus(·) + ε > 0 by construction: validation would only cost time.
            pyro.sample("z", dist.Normal(loc, scale, validate_args=False).to_event(1))
        return local

    def loss(self, model, guide, x: torch.Tensor) -> torch.Tensor:
        """The InfoMax objective, summed over the batch and scaled like an ELBO.

        ``loss(model, guide, x)`` is the signature of the SVI engine's plugged-in losses;
        ``model`` and ``guide`` are this pair's, possibly wrapped by the engine (e.g. to scale
        a mini-batch by N/B): the scale is read from the guide's ``z`` site.
        """
        x = self._check(x)
        guide_tr = poutine.trace(guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
        q, p = guide_tr.nodes["z"], model_tr.nodes["z"]
        local = guide_tr.nodes["_RETURN"]["value"]
        # The prior term in closed form: KL(N(μ, σ²) ‖ N(0, I)) per image.
        kl = kl_divergence(q["fn"], p["fn"])
        negatives = self.negatives
        if negatives == "shuffle":
            # ~1 fixed point per permutation (a true pair scored as a negative): an O(1/B)
            # bias, not worth a derangement's rejection loop.
            negatives = torch.randperm(x.shape[0], device=x.device)
        per_point = -self._mutual_information(x, q["value"], local, negatives)
        per_point = per_point + self.prior_weight * kl
        return q["scale"] * per_point.sum()

    def _mutual_information(self, x, z, local, negatives) -> torch.Tensor:
        """α·I_global(x; z) + β·I_local(x; z) per image (the chosen bound)."""
        bound = MI_BOUNDS[self.estimator]
        mi = self.global_weight * bound(*self.global_critic(x, z, negatives))
        if self.local_critic is not None:
            mi = mi + self.local_weight * bound(*self.local_critic(local, z, negatives))
        return mi

    @property
    def default_loss(self):
        """The objective the SVI engine uses when it is given no ``loss``."""
        return self.loss

    # -------------------------------------------------------------- use
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The representation μ(x), (N, L): the encoder's mean, as a linear probe reads it."""
        x = self._check(x)
        return self.encoder(x)[0]

    def mutual_information(self, x: torch.Tensor, seed: int = 0) -> float:
        """α·I_global + β·I_local: the JS estimates per image on ``x`` with the current
        networks (z drawn from the encoder with a seeded generator, all-pairs negatives)."""
        x = self._check(x)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            loc, scale, local = self.encoder(x)
            z = loc + scale * torch.randn(loc.shape, generator=g, dtype=loc.dtype).to(loc.device)
            return float(self._mutual_information(x, z, local, "all").mean())

    def diagnostic_plots(self, fit, out_dir) -> list:
        """The latent means of the training data (PCA scatter), as a PNG in ``out_dir``."""
        from jointkl.vae_plots import infomax_figures

        return infomax_figures(self, fit, out_dir)

    def __repr__(self) -> str:
        return f"InfoMax(latent_dim={self.latent_dim}, image_shape={self.image_shape})"
