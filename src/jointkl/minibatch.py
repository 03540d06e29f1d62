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

from jointkl.data.arrays import is_row_array
from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE

__all__ = [
    "BatchOrder",
    "ScaleDataPlate",
    "check_finite_data",
    "sliceable_arguments",
    "slice_arguments",
    "streamed_rows",
    "spread_indices",
    "SAMPLE_ROWS",
]

# Rows of streamed data an engine reads into memory for what happens outside its loop (an
# autoguide's start, a noise fitted to the data): all rows of a small file, a bound on a
# large one.
SAMPLE_ROWS = 1 << 16


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
            # A finite sum means every value is finite (one inf or NaN makes it inf or NaN),
            # and costs a tenth of the elementwise test, which runs when the sum is not
            # finite (a NaN/inf, or finite values whose sum overflows).
            and not bool(a.sum().isfinite())
            and not torch.isfinite(a).all()
        ):
            n = int((~torch.isfinite(a)).sum())
            raise InputError(f"data {where} has {n} NaN/inf value(s); clean or drop them first")


def sliceable_arguments(
    args: tuple, kwargs: Mapping[str, Any], n: int
) -> tuple[set[int], set[str]]:
    """Which arguments are per-data-point (a tensor whose first dim is the plate size)."""

    def per_point(a):
        if is_row_array(a):  # a memory-mapped file, read a batch at a time
            return len(a) == n
        return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n

    return (
        {i for i, a in enumerate(args) if per_point(a)},
        {k for k, a in kwargs.items() if per_point(a)},
    )


def slice_arguments(args: tuple, kwargs: Mapping[str, Any], which, idx: torch.Tensor):
    """The batch ``idx`` of the arguments marked by :func:`sliceable_arguments`; a
    :class:`~jointkl.data.arrays.RowArray` gives only those rows, read from its files and
    made a tensor (the same tensor as indexing the rows in memory)."""
    ai, ki = which

    def rows(a):
        return a.tensor(idx) if is_row_array(a) else a[idx]

    return (
        tuple(rows(a) if i in ai else a for i, a in enumerate(args)),
        {k: (rows(a) if k in ki else a) for k, a in kwargs.items()},
    )


def spread_indices(n: int, count: int) -> torch.Tensor:
    """``count`` row indices evenly spaced over ``0 … n−1`` (every row when ``n <= count``),
    in order."""
    if n <= count:
        return torch.arange(n)
    return torch.linspace(0, n - 1, count, dtype=torch.float64).round().long()


def streamed_rows(
    owner: str, batch_size: int | None, args: tuple, kwargs: Mapping[str, Any]
) -> int | None:
    """N of the data given as :class:`~jointkl.data.arrays.RowArray` (files read a batch at
    a time), or ``None`` when every argument is in memory. Such data need a ``batch_size``
    (a full batch would be the whole file as one tensor), and every streamed argument the
    same number of rows."""
    lengths = {len(a) for a in [*args, *kwargs.values()] if is_row_array(a)}
    if not lengths:
        return None
    if batch_size is None:
        raise InputError(
            f"{owner}: data from a memory-mapped file are read one mini-batch at a time: set "
            f"batch_size (or pass the rows in memory as a tensor, torch.as_tensor(x[:]))"
        )
    if len(lengths) > 1:
        raise InputError(f"{owner}: the streamed data arguments differ in rows {sorted(lengths)}")
    return lengths.pop()


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
            # int32 holds the same permutation as int64 (one algorithm, whatever the dtype) in
            # half the memory: 4 bytes a row is what a streamed file's order costs.
            wide = torch.int64 if self.n >= 2**31 else torch.int32
            self._epoch = (epoch, torch.randperm(self.n, generator=gen, dtype=wide))
        return self._epoch[1][j * self.batch_size : (j + 1) * self.batch_size].long()

    def scale(self, idx: torch.Tensor) -> float:
        """N/B for the batch ``idx``: the factor that keeps the batch objective unbiased."""
        return self.n / len(idx)
