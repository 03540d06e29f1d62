"""A Wishart prior for precision matrices that every engine can use.

``PrecisionWishart`` is Pyro's ``Wishart`` with two changes:

* its support, :data:`precision_matrices`, has a registered bijection from unconstrained
  vectors (:class:`CholeskyVectorTransform`: the D(D+1)/2 entries of a lower Cholesky factor,
  log on the diagonal), so autoguides that need one (``AutoNormal``) and the Laplace
  approximation work in unconstrained coordinates; torch registers none for positive-definite
  matrices;
* ``rsample`` tests its draws for singularity the right way round (torch's warns "Singular
  sample detected" for every regular draw).

EM reads it as a ``Wishart``: a conjugate prior with a closed-form MAP update.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform
from torch.distributions.utils import tril_matrix_to_vec, vec_to_tril_matrix

__all__ = ["PrecisionWishart", "CholeskyVectorTransform", "precision_matrices"]


class _PrecisionMatrices(constraints._PositiveDefinite):
    """Positive-definite matrices, with :class:`CholeskyVectorTransform` as their bijection."""


precision_matrices = _PrecisionMatrices()


class CholeskyVectorTransform(Transform):
    """u ∈ R^{D(D+1)/2} ↦ P = L L^T, with L lower triangular holding u row by row and the
    exponential of its entries on the diagonal.

    log |det J| = D log 2 + Σ_i (D - i + 1) u_ii (i = 0..D-1): the exponential contributes
    Π L_ii, and L ↦ L L^T contributes 2^D Π L_ii^(D - i).
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = precision_matrices
    bijective = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CholeskyVectorTransform)

    def __hash__(self) -> int:
        return hash(type(self))

    @staticmethod
    def _size(n: int) -> int:
        return (math.isqrt(8 * n + 1) - 1) // 2

    def _call(self, u: torch.Tensor) -> torch.Tensor:
        L = vec_to_tril_matrix(u)
        L = L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).exp())
        return L @ L.transpose(-1, -2)

    def _inverse(self, P: torch.Tensor) -> torch.Tensor:
        L = torch.linalg.cholesky(P)
        L = L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())
        return tril_matrix_to_vec(L)

    def log_abs_det_jacobian(self, u: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        D = P.shape[-1]
        log_diag = torch.linalg.cholesky(P).diagonal(dim1=-2, dim2=-1).log()
        power = torch.arange(D + 1, 1, -1, dtype=P.dtype, device=P.device)
        return D * math.log(2.0) + (power * log_diag).sum(-1)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        D = self._size(shape[-1])
        return torch.Size(shape[:-1]) + (D, D)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        D = shape[-1]
        return torch.Size(shape[:-2]) + (D * (D + 1) // 2,)


@biject_to.register(_PrecisionMatrices)
@transform_to.register(_PrecisionMatrices)
def _cholesky_vector(constraint: _PrecisionMatrices) -> Transform:
    return CholeskyVectorTransform()


class PrecisionWishart(dist.Wishart):
    """``Wishart(df, ...)`` over precision matrices (same parameters as Pyro's), with a
    bijective support and a correct singular-draw test (see the module docstring)."""

    support = precision_matrices

    def rsample(self, sample_shape=(), max_try_correction=None) -> torch.Tensor:
        """Bartlett draws; a draw that is not positive definite in floating point is drawn
        again (at most ``max_try_correction`` times, default 10)."""
        tries = 10 if max_try_correction is None else max_try_correction
        sample = self._bartlett_sampling(torch.Size(sample_shape))
        for _ in range(tries):
            bad = ~constraints.positive_definite.check(sample)
            if not bool(bad.any()):
                break
            sample = torch.where(
                bad[..., None, None], self._bartlett_sampling(torch.Size(sample_shape)), sample
            )
        return sample
