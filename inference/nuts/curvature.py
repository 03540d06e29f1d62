"""The warmup's starting point and first mass matrix: each chain's nearest mode and the
marginal variances of the Laplace approximation there.

With M⁻¹ = I a posterior whose scales differ by orders of magnitude (a mixture's locations,
known to ±0.05, beside its precision entries, known to ±1) forces a step size set by the
narrowest direction, and trees of 2¹⁰ leapfrog steps until the first slow window of Stan's
schedule replaces I by the draws' variances. Starting from the mode with the Laplace
variances instead gives the first windows a step size and tree near the final ones.

For chain c, from its start θ_c: a few iterations of L-BFGS on U (all chains at once, on
ΣU: the chains' potentials are separate, so the sum's minimiser is every chain's own; each
chain keeps the result only where it lowered its U), then the Hessian H of U there by
central differences of ∇U, column by column (2 D gradient calls of all chains), and

    M⁻¹_c = diag(H⁻¹)      (the Laplace approximation's marginal variances)

where H is positive-definite, else 1 / H_ii where that is positive, else 1; clipped to
[10⁻⁶, 10⁶]. The windows of Stan's schedule then adapt M⁻¹ from the draws as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["mode_and_variances", "MAX_DIM"]

MAX_DIM = 512  # above this many coordinates the Hessian's 2 D gradient calls are skipped


def mode_and_variances(
    value_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    iterations: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chain's start moved toward its nearest mode, and the diagonal M⁻¹ there.

    :param value_and_grad: U (C,) and ∇U (C, D) at a batch of points (C, D).
    :param theta: (C, D) the chains' starts (U and ∇U finite there).
    :param int iterations: the most L-BFGS iterations.
    :return: (C, D) positions and (C, D) inverse mass diagonals.
    """
    u0, _ = value_and_grad(theta)
    x = theta.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        u, g = value_and_grad(x.detach())
        bad = ~torch.isfinite(u) | ~torch.isfinite(g).all(-1)
        # An infinite U (a point the model cannot evaluate) is a wall for the line search.
        total = torch.where(bad, torch.full_like(u, 1e30), u).sum()
        x.grad = torch.where(bad.unsqueeze(-1), torch.zeros_like(g), g)
        return total

    try:
        opt.step(closure)
        moved = x.detach()
        u1, g1 = value_and_grad(moved)
        keep = torch.isfinite(u1) & torch.isfinite(g1).all(-1) & (u1 <= u0)
        theta = torch.where(keep.unsqueeze(-1), moved, theta)
    except RuntimeError:  # the optimiser met a point it could not handle: keep the starts
        pass
    return theta, _inverse_mass(value_and_grad, theta)


def _inverse_mass(value_and_grad, theta: torch.Tensor) -> torch.Tensor:
    C, D = theta.shape
    if D > MAX_DIM:
        return torch.ones_like(theta)
    h = 1e-3 * (1 + theta.abs())  # (C, D): a step relative to each coordinate
    cols = []
    for i in range(D):
        e = torch.zeros_like(theta)
        e[:, i] = h[:, i]
        _, gp = value_and_grad(theta + e)
        _, gm = value_and_grad(theta - e)
        cols.append((gp - gm) / (2 * h[:, i : i + 1]))
    H = torch.stack(cols, -1)  # (C, D, D): column i is ∂∇U/∂θ_i
    H = 0.5 * (H + H.transpose(-1, -2)).double()
    finite = torch.isfinite(H).flatten(1).all(-1)  # (C,)
    eye = torch.eye(D, dtype=H.dtype, device=H.device)
    H = torch.where(finite[:, None, None], H, eye)  # a chain with a non-finite H keeps 1
    L, info = torch.linalg.cholesky_ex(H)  # all chains at once
    pd = finite & (info == 0)
    d = H.diagonal(dim1=-2, dim2=-1)
    var = torch.where(
        pd.unsqueeze(-1),
        torch.cholesky_inverse(torch.where(pd[:, None, None], L, eye)).diagonal(dim1=-2, dim2=-1),
        torch.where(finite.unsqueeze(-1) & (d > 0), 1 / d, torch.ones_like(d)),
    )
    return var.to(theta.dtype).clamp(1e-6, 1e6)
