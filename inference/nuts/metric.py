"""The Euclidean metric of the Hamiltonian: a diagonal or a dense inverse mass matrix M⁻¹
per chain, and what the trajectory needs of it.

The kinetic energy is K(r) = ½ rᵀ M⁻¹ r, the velocity dθ/dt = ∂K/∂r = M⁻¹ r (p♯ of the
U-turn criterion), and a fresh momentum is r ~ N(0, M). M⁻¹ is held as

* a diagonal, shape (C, D): K = ½ Σ_i r_i² m_i, velocity r ⊙ m, r = z / √m;
* a dense matrix, shape (C, D, D), symmetric positive definite: K = ½ rᵀ Σ r, velocity
  Σ r (O(D²) per leapfrog step instead of O(D)), and with Σ = L Lᵀ (Cholesky), r = L⁻ᵀ z,
  whose covariance L⁻ᵀ L⁻¹ = Σ⁻¹ = M.

z ~ N(0, I) in both cases, drawn by the caller, so that the diagonal and the dense metric
consume the same random numbers. The form is told by the number of dimensions alone (a
shape, fixed for a whole fit), so a traced graph holds one branch.
"""

from __future__ import annotations

import torch

__all__ = [
    "is_dense",
    "velocity",
    "kinetic",
    "momentum",
    "as_dense",
    "dense_metric",
    "AUTO_MAX_DIM",
]

# ``dense_mass="auto"`` adapts a dense metric up to this many coordinates: above it the
# O(D²) matrix-vector product of every leapfrog step and the D(D + 1)/2 entries to estimate
# from a window's draws outweigh what the correlations cost a diagonal metric.
AUTO_MAX_DIM = 200


def is_dense(inv_mass: torch.Tensor) -> bool:
    """Whether ``inv_mass`` is a batch of dense matrices (C, D, D) rather than diagonals (C, D)."""
    return inv_mass.dim() == 3


def velocity(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """M⁻¹ r for momenta ``r`` of shape (..., C, D) (leading dimensions broadcast)."""
    if is_dense(inv_mass):
        return (inv_mass @ r.unsqueeze(-1)).squeeze(-1)
    return r * inv_mass


def kinetic(r: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """½ rᵀ M⁻¹ r, shape (..., C)."""
    return 0.5 * (r * velocity(r, inv_mass)).sum(-1)


def momentum(z: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """A draw of N(0, M) from standard normal ``z`` (C, D): z / √m for a diagonal M⁻¹ = m,
    L⁻ᵀ z for a dense M⁻¹ = L Lᵀ (one triangular solve per chain)."""
    if not is_dense(inv_mass):
        return z / inv_mass.sqrt()
    chol = torch.linalg.cholesky(inv_mass)
    return torch.linalg.solve_triangular(chol.mT, z.unsqueeze(-1), upper=True).squeeze(-1)


def as_dense(inv_mass: torch.Tensor) -> torch.Tensor:
    """A diagonal M⁻¹ (C, D) as the dense matrices (C, D, D) with that diagonal."""
    return inv_mass if is_dense(inv_mass) else torch.diag_embed(inv_mass)


def dense_metric(setting: bool | str, dim: int) -> bool:
    """Whether a fit adapts a dense M⁻¹: ``setting`` itself when a bool; for ``"auto"``,
    dense when the model has at most :data:`AUTO_MAX_DIM` unconstrained coordinates.

    :param setting: the engine's ``dense_mass`` (``True``, ``False`` or ``"auto"``).
    :param int dim: the number of unconstrained coordinates D.
    """
    if setting == "auto":
        return dim <= AUTO_MAX_DIM
    return bool(setting)
