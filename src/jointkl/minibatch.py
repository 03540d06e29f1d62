"""Mini-batching through the model's ``"data"`` plate, shared by the gradient engines.

An engine slices every per-data-point argument (a tensor whose first dimension is the plate's
size N) to a batch of B points and scales the log-density of every site inside the plate by
N/B, so the batch objective is an unbiased estimate of the full-data one while global sites
keep scale 1. Models keep their ordinary form (``with pyro.plate("data", len(x)): ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pyro.poutine.messenger import Messenger

from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE

__all__ = [
    "BatchOrder",
    "ScaleDataPlate",
    "check_finite_data",
    "sliceable_arguments",
    "slice_arguments",
]


class ScaleDataPlate(Messenger):
    """Multiply the log-density of every site inside the ``"data"`` plate by N/B.

    The engine slices the data arguments to a mini-batch and the model sees a plate of size
    B; scaling those sites by N/B keeps the ELBO an unbiased estimate of the full-data one,
    while global sites keep scale 1.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if any(f.name == DATA_PLATE for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def check_finite_data(args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Refuse NaN/inf in floating data arguments before any work starts."""
    for where, a in [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if (
            isinstance(a, torch.Tensor)
            and a.dtype.is_floating_point
            and not torch.isfinite(a).all()
        ):
            n = int((~torch.isfinite(a)).sum())
            raise InputError(f"data {where} has {n} NaN/inf value(s); clean or drop them first")


def sliceable_arguments(
    args: tuple, kwargs: Mapping[str, Any], n: int
) -> tuple[set[int], set[str]]:
    """Which arguments are per-data-point (a tensor whose first dim is the plate size)."""

    def per_point(a):
        return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n

    return (
        {i for i, a in enumerate(args) if per_point(a)},
        {k for k, a in kwargs.items() if per_point(a)},
    )


def slice_arguments(args: tuple, kwargs: Mapping[str, Any], which, idx: torch.Tensor):
    """The batch ``idx`` of the arguments marked by :func:`sliceable_arguments`."""
    ai, ki = which
    return (
        tuple(a[idx] if i in ai else a for i, a in enumerate(args)),
        {k: (a[idx] if k in ki else a) for k, a in kwargs.items()},
    )


class BatchOrder:
    """The rows of each step's mini-batch, a function of (seed, step) alone: epochs of seeded
    permutations of the N rows. A resumed run draws the same batches as one that never
    stopped, with no state to save.

    :param int n: rows in the data (the ``"data"`` plate's size).
    :param int batch_size: rows per step.
    :param int seed: the fit's seed.
    :param bool drop_last: drop each epoch's last partial batch (every step then has exactly
        ``batch_size`` rows) instead of keeping it as a smaller batch.
    :param int stream: offsets the seed, so that several orders from one seed (an engine's
        chains) are independent. Epoch e of stream k uses generator seed
        ``seed * 1_000_003 + k + e``, so streams meant to differ must lie further apart than
        the number of epochs a run takes (Langevin spaces its chains' streams 62,500 apart).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, drop_last: bool = False, stream: int = 0
    ):
        if batch_size > n:
            raise InputError(f"batch_size={batch_size} exceeds the data size {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.stream = drop_last, stream
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> torch.Tensor:
        """The rows of step ``step`` (0-based), a LongTensor of at most ``batch_size``."""
        epoch, j = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream + epoch)
            self._epoch = (epoch, torch.randperm(self.n, generator=gen))
        return self._epoch[1][j * self.batch_size : (j + 1) * self.batch_size]

    def scale(self, idx: torch.Tensor) -> float:
        """N/B for the batch ``idx``: the factor that keeps the batch objective unbiased."""
        return self.n / len(idx)
