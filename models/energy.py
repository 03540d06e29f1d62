"""Energy models: a continuous density known only up to its normaliser.

    p(x) = e^{−E(x; θ)} / Z(θ),   Z(θ) = ∫ e^{−E(x; θ)} dx  (unknown)

The model states −E(x) with ``pyro.factor`` inside ``pyro.plate("data", N)``; it has no
latent sites and no normalised likelihood, so it is fitted by NCE, which learns log Z as
a by-product. Named energies:

* ``"mlp"``: a two-hidden-layer network f(x) plus a learned quadratic confinement
  ½ e^{κ} ‖x‖². The confinement keeps ∫ e^{−E} finite whatever f does: a bounded-growth
  network alone can leave Z infinite, and then there is no density to estimate.
* ``"quadratic"``: E = ½ ‖Pᵀ(x − μ)‖², P lower-triangular: an unnormalised Gaussian with
  precision P Pᵀ, whose log Z = (D/2) log 2π − log det P is known (a check on NCE).

``energy`` may also be any ``torch.nn.Module`` or callable mapping ``(N, D) -> (N,)``.
The 2-D example data sets (ring, two moons, mixture of eight Gaussians) come from
:func:`energy_data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pyro
import torch
from pyro.distributions import constraints
from torch import nn

from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["EnergyModel", "energy_data", "DATASETS"]

DATASETS = ("ring", "moons", "mixture")
NAMED = ("mlp", "quadratic")


def energy_data(kind: str = "ring", n: int = 5000, seed: int = 0) -> torch.Tensor:
    """A seeded 2-D sample, ``(n, 2)``.

    * ``"ring"``: radius 2 plus N(0, 0.2²) radial noise, uniform angle.
    * ``"moons"``: two interleaved half circles (scikit-learn's two moons), noise 0.1.
    * ``"mixture"``: eight equal Gaussians (sd 0.25) on a circle of radius 2.
    """
    kind, n = check_all([("kind", kind, one_of(*DATASETS)), ("n", n, positive_int)], "energy_data")
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    if kind == "ring":
        angle = 2 * math.pi * torch.rand(n, generator=g, dtype=dtype)
        r = 2.0 + 0.2 * torch.randn(n, generator=g, dtype=dtype)
        return torch.stack([r * angle.cos(), r * angle.sin()], -1)
    if kind == "moons":
        upper = torch.rand(n, generator=g) < 0.5
        t = math.pi * torch.rand(n, generator=g, dtype=dtype)
        x = torch.where(upper, t.cos(), 1.0 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        return torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2, generator=g, dtype=dtype)
    k = torch.randint(8, (n,), generator=g)
    centre = 2.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], -1)
    return centre.to(dtype) + 0.25 * torch.randn(n, 2, generator=g, dtype=dtype)


class _MLPEnergy(nn.Module):
    """E(x) = f(x) + ½ e^{κ} ‖x‖²: a smooth network plus a confinement that makes Z finite."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        self.log_confinement = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quad = 0.5 * self.log_confinement.exp() * (x**2).sum(-1)
        return self.f(x).squeeze(-1) + quad


@register_model
class EnergyModel(ZooModel):
    """An unnormalised continuous density e^{−E(x)} over R^D, for NCE.

    :param energy: ``"mlp"``, ``"quadratic"``, an ``nn.Module`` or a callable ``E(x)``
        mapping ``(N, D)`` to ``(N,)`` (a plain callable may create ``pyro.param`` s).
    :param int dim: D, the dimension of a datum.
    :param int hidden: hidden width of the ``"mlp"`` energy.
    """

    name: ClassVar[str] = "energy"
    description: ClassVar[str] = "unnormalised 2-D energy model e^{-E(x)} (a ring by default)"

    def __init__(
        self,
        energy: str | nn.Module | Callable[[torch.Tensor], torch.Tensor] = "mlp",
        dim: int = 2,
        hidden: int = 64,
    ):
        if isinstance(energy, str) and energy not in NAMED:
            raise InputError(
                f"EnergyModel: energy must be one of {NAMED}, an nn.Module or a callable, "
                f"got {energy!r}"
            )
        if not isinstance(energy, str) and not callable(energy):
            raise InputError(
                f"EnergyModel: energy must be a name, an nn.Module or a callable, got "
                f"{type(energy).__name__}"
            )
        self.dim, self.hidden = check_all(
            [("dim", dim, positive_int), ("hidden", hidden, positive_int)], "EnergyModel"
        )
        self.energy = energy
        self._net: nn.Module | None = energy if isinstance(energy, nn.Module) else None
        # A user's module restarts from its state at construction in every fit, so two fits
        # with the same seed give the same numbers.
        self._initial = (
            {k: v.detach().clone() for k, v in energy.state_dict().items()}
            if isinstance(energy, nn.Module)
            else None
        )

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "energy": self.energy if isinstance(self.energy, str) else "custom",
            "dim": self.dim,
            "hidden": self.hidden,
        }

    def spec(self) -> dict[str, Any] | None:
        """The zoo spec; ``None`` for a user's energy, which cannot be rebuilt from JSON."""
        return super().spec() if isinstance(self.energy, str) else None

    @staticmethod
    def default_data(seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """5,000 points of the seeded 2-D ring (:func:`energy_data`)."""
        return (energy_data("ring", 5000, seed),), {}

    # -------------------------------------------------------------- the model
    def _check(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise InputError(
                f"EnergyModel: x must be a float tensor, got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.dim() == 1 and self.dim == 1:
            x = x.unsqueeze(-1)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"EnergyModel: x must be (N, {self.dim}), got {tuple(x.shape)}")
        return x

    def _module(self, x: torch.Tensor) -> nn.Module | None:
        """The energy network registered in the param store (fresh at the start of a fit)."""
        if not isinstance(self.energy, str) and not isinstance(self.energy, nn.Module):
            return None
        store = pyro.get_param_store()
        fresh = not any(k.startswith("energy$$$") for k in store.keys())
        if fresh and self.energy == "mlp":
            # Built from the global RNG, which the engine seeded: the seed fixes the init.
            self._net = _MLPEnergy(self.dim, self.hidden)
        elif fresh and self._initial is not None:
            with torch.no_grad():
                self._net.load_state_dict(self._initial)
        self._net.to(dtype=x.dtype, device=x.device)
        return pyro.module("energy", self._net)

    def energy_of(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) under the current parameters (the param store's), shape ``(N,)``."""
        x = self._check(x)
        if self.energy == "quadratic":
            mu = pyro.param("loc", lambda: torch.zeros(self.dim, dtype=x.dtype, device=x.device))
            tril = pyro.param(
                "precision_tril",
                lambda: torch.eye(self.dim, dtype=x.dtype, device=x.device),
                constraint=constraints.lower_cholesky,
            )
            return 0.5 * ((x - mu) @ tril).pow(2).sum(-1)
        net = self._module(x)
        e = (net if net is not None else self.energy)(x)
        if e.dim() == 2 and e.shape[-1] == 1:
            e = e.squeeze(-1)
        if tuple(e.shape) != (x.shape[0],):
            raise InputError(
                f"EnergyModel: the energy must map (N, D) to (N,), got {tuple(e.shape)}"
            )
        return e

    def model(self, x: torch.Tensor) -> None:
        x = self._check(x)
        e = self.energy_of(x)
        with pyro.plate("data", x.shape[0]):
            pyro.factor("energy", -e)

    # -------------------------------------------------------------- plotting
    def log_density_grid(
        self, fit: Any, bounds: tuple[float, float, float, float], grid: int = 200
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """log p on a ``grid × grid`` lattice over ``(xmin, xmax, ymin, ymax)`` (2-D only).

        Normalised with the fit's learned ``log_Z`` when it has one, else with the grid's
        own Riemann sum. Returns ``(xs, ys, log_p, grid_log_Z)``; ``grid_log_Z`` is the
        Riemann estimate of log Z, a check on the learned one when the grid covers the mass.
        """
        if self.dim != 2:
            raise InputError(f"EnergyModel: density plots need dim=2, this model has {self.dim}")
        from jointkl.engine import engine_class

        engine_class(fit.engine).activate(fit)
        x0, x1, y0, y1 = bounds
        dtype = fit.args[0].dtype if fit.args else torch.get_default_dtype()
        device = fit.args[0].device if fit.args else None  # where the fit's params are
        xs = torch.linspace(x0, x1, grid, dtype=dtype, device=device)
        ys = torch.linspace(y0, y1, grid, dtype=dtype, device=device)
        pts = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        with torch.no_grad():
            g = -self.energy_of(pts).reshape(grid, grid)
        cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
        grid_log_z = float(torch.logsumexp(g.reshape(-1), 0)) + math.log(cell)
        log_z = float(fit.params["log_Z"]) if "log_Z" in fit.params else grid_log_z
        return xs.cpu(), ys.cpu(), (g - log_z).cpu(), grid_log_z

    def plot_density(
        self,
        fit: Any,
        ax: Any = None,
        bounds: tuple[float, float, float, float] | None = None,
        grid: int = 200,
        data: torch.Tensor | None = None,
    ):
        """Draw the fitted density e^{−E(x) − log Z} (2-D) with the data on top.

        :param fit: a Fit of this model.
        :param ax: a matplotlib axes (a new figure when ``None``).
        :param bounds: ``(xmin, xmax, ymin, ymax)``; the data's range plus a margin if
            ``None``.
        :param data: points to scatter (the fit's data when ``None``).
        :returns: the axes.
        """
        import matplotlib.pyplot as plt

        data = fit.args[0] if data is None and fit.args else data
        if bounds is None:
            if data is None:
                raise InputError("EnergyModel.plot_density: give bounds or data")
            lo, hi = data.min(0).values, data.max(0).values
            pad = 0.15 * (hi - lo)
            bounds = (
                float(lo[0] - pad[0]),
                float(hi[0] + pad[0]),
                float(lo[1] - pad[1]),
                float(hi[1] + pad[1]),
            )
        xs, ys, log_p, grid_log_z = self.log_density_grid(fit, bounds, grid)
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 5))
        mesh = ax.pcolormesh(xs.numpy(), ys.numpy(), log_p.exp().numpy(), shading="auto")
        ax.figure.colorbar(mesh, ax=ax, label="p(x)")
        if data is not None:
            d = data[:2000].detach().cpu().numpy()
            ax.scatter(d[:, 0], d[:, 1], s=1, c="white", alpha=0.3)
        title = f"grid log Z = {grid_log_z:.3f}"
        if "log_Z" in fit.params:
            title = f"learned log Z = {float(fit.params['log_Z']):.3f}, {title}"
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        return ax
