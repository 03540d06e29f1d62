"""Semirings for dynamic programmes written once (Goodman 1999; torch-struct).

A dynamic programme over a chain or lattice only needs ``plus`` (combine alternatives),
``times`` (extend a path) and their identities. The log semiring gives log-partitions,
and, by autograd of the log-partition, marginals and expected counts (Eisner 2016); the
max semiring gives Viterbi scores. Log-zero is a true ``-inf``: the reductions below keep
values *and* gradients finite when every alternative is impossible.
"""

from __future__ import annotations

import torch

__all__ = ["Semiring", "LogSemiring", "MaxSemiring"]


class Semiring:
    """Abstract semiring on tensors; ``zero`` annihilates, ``one`` is the identity of times."""

    zero: float
    one: float = 0.0

    @staticmethod
    def plus(x: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @classmethod
    def matmul(cls, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(..., I, J) ⊗ (..., J, K) -> (..., I, K), the semiring matrix product."""
        return cls.plus(cls.times(a.unsqueeze(-1), b.unsqueeze(-3)), dim=-2)

    @classmethod
    def identity(cls, n: int, like: torch.Tensor) -> torch.Tensor:
        """The n x n semiring identity matrix (``one`` on the diagonal, ``zero`` elsewhere)."""
        eye = torch.full((n, n), cls.zero, dtype=like.dtype, device=like.device)
        return eye.fill_diagonal_(cls.one)


class LogSemiring(Semiring):
    """(logsumexp, +): path sums in log space -> log-partition functions."""

    zero = float("-inf")

    @staticmethod
    def plus(x: torch.Tensor, dim: int) -> torch.Tensor:
        m = x.amax(dim, keepdim=True).detach()
        # An all -inf slice has max -inf; shifting by it would give nan (-inf - -inf).
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = (x - m).exp().sum(dim)
        # log(0) = -inf is right, but its gradient is inf * 0 = nan: route it through log(1).
        pos = s > 0
        out = torch.where(pos, torch.where(pos, s, torch.ones_like(s)).log(), -torch.inf)
        return out + m.squeeze(dim)


class MaxSemiring(Semiring):
    """(max, +): best path scores -> Viterbi; argmax by autograd or back-pointers."""

    zero = float("-inf")

    @staticmethod
    def plus(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.amax(dim)
