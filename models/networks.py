"""The parts the amortised-encoder models (VAE, InfoMax) share: their networks, how those
networks join Pyro's param store, and the checks on their data and settings.

Both models read x as rows of D features (images as rows of H·W pixels) and encode each row
to a diagonal Gaussian p(z | x) = N(μ(x), diag σ²(x)) under a N(0, I) prior on z.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.params.param_store import param_with_module_name
from torch import nn

from jointkl.errors import InputError
from jointkl.settings import positive_int

__all__ = [
    "GaussianEncoder",
    "data_rows",
    "hidden_sizes",
    "mlp",
    "register_module",
    "standard_normal_prior",
]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x (..., D) -> (μ, σ) of a diagonal Gaussian over z (..., L), through an MLP.

    σ = softplus(·) + 1e-4: positive without exp's overflow, and bounded away from 0 so
    log σ² in the KL stays finite.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp([input_dim, *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(x).split(self.latent_dim, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-4


def register_module(name: str, module: nn.Module, cache: dict) -> None:
    """``pyro.module(name, module)`` for a module whose set of parameters does not change.

    Every call must still pass each parameter through ``pyro.param`` (that is how the engine
    finds what to optimise), but walking the module tree to list them is done once and kept
    in ``cache`` (rebuilt if a different module is registered under ``name``).
    """
    entry = cache.get(name)
    if entry is None or entry[0] is not module:
        pairs = [
            (param_with_module_name(name, n), p)
            for n, p in module.named_parameters()
            if p.requires_grad
        ]
        entry = cache[name] = (module, pairs)
    for full_name, p in entry[1]:
        pyro.param(full_name, p)


def standard_normal_prior(x: torch.Tensor, latent_dim: int) -> dist.TorchDistribution:
    """N(0, I) over z ∈ R^L, on x's device and dtype (one event of L dims)."""
    zeros, ones = x.new_zeros(latent_dim), x.new_ones(latent_dim)
    return dist.Normal(zeros, ones, validate_args=False).to_event(1)


def hidden_sizes(hidden: int | Sequence[int], who: str) -> tuple[int, ...]:
    """Hidden layer widths as a tuple: one int, or a list of them, each >= 1.

    :param who: the model's name, for the error messages.
    """
    sizes = tuple(hidden) if isinstance(hidden, Sequence) else (hidden,)
    return tuple(positive_int(h, f"{who}: hidden") for h in sizes)


def data_rows(x: Any, who: str, input_dim: int | None) -> torch.Tensor:
    """x as (N, D) rows: a float tensor (N, D), or images (N, H, W) flattened to H·W pixels.

    :param who: the model's name, for the error messages.
    :param input_dim: the D the networks were built for, or ``None`` before they are.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise InputError(f"{who}: x must be a float tensor, got {type(x).__name__}")
    if x.dim() == 3:  # (N, H, W) images: the pixels are the features
        x = x.reshape(x.shape[0], -1)
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{who}: x must be (N, D) or (N, H, W) with N >= 1, got {tuple(x.shape)}")
    if input_dim is not None and x.shape[1] != input_dim:
        raise InputError(f"{who}: x has {x.shape[1]} features, the networks expect {input_dim}")
    return x
