"""Gaussian mixture: the assignment is enumerated, the globals are MAP or variational.

    weights     ~ Dirichlet(α·1)                            (priors="weak", the default)
    locs_k      ~ Normal(m, s) per coordinate   k = 1..K    (plate "components")
    precision_k ~ Wishart(D + 1, ψ⁻¹ I)  (full: a D x D precision matrix)
                | Gamma(1, ψ/2) per dimension  (diag) | Gamma(1, Dψ/2)  (spherical)
    z_i         ~ Categorical(weights)          i = 1..N    (plate "data", enumerated)
    x_i         ~ MultivariateNormal(locs_{z_i}, precision_{z_i}⁻¹)

The priors are conjugate, so EM's M-step is closed form (MAP): with α = 1 the weights are the
maximum-likelihood ones, each mean is shrunk towards m by the precision 1/s² (negligible for
s = 10 and data within about ±30 units of m), and each covariance is the component's weighted
scatter with ψ added, (S_k + ψ I) / n_k — the Wishart with ν = D + 1 (Gamma with shape 1)
adds no pseudo-count, only ψ to the scatter, which keeps a component on fewer than D points
from a singular covariance. ψ (``covariance_prior``) is in the data's squared units: the
defaults suit data on the scale of about one unit; rescale the data or set them otherwise.

With ``priors=None`` the globals are ``pyro.param`` sites (maximum likelihood).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from jointkl.models.wishart import PrecisionWishart
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex

from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, positive_float, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["GaussianMixture"]

COVARIANCES = ("full", "diag", "spherical")


@register_model
class GaussianMixture(ZooModel):
    """K-component Gaussian mixture as a Pyro model.

    :param int n_components: number of components K.
    :param str covariance: ``"full"``, ``"diag"`` or ``"spherical"``.
    :param priors: ``"weak"`` (conjugate Dirichlet / Normal / Wishart or Gamma priors, see the
        module docstring; globals are sample sites, MAP under EM and the default ``"delta"``
        guide) or ``None`` (``pyro.param`` globals: maximum likelihood).
    :param float concentration: Dirichlet concentration α of the weights.
    :param loc_prior: (mean m, scale s) of the Normal prior on every location coordinate.
    :param float covariance_prior: ψ, what the precision prior adds to each component's
        scatter (the MAP covariance is (S_k + ψ I) / n_k; squared data units).
    """

    name: ClassVar[str] = "gmm"
    description: ClassVar[str] = "Gaussian mixture, enumerated assignments (iris by default)"
    # SVI: a Gaussian over the continuous globals (assignments still enumerated), so a fit
    # has posterior spread; EM needs no guide.
    default_guide: ClassVar[str] = "normal"

    def __init__(
        self,
        n_components: int = 3,
        covariance: str = "full",
        priors: str | None = "weak",
        concentration: float = 1.0,
        loc_prior: tuple[float, float] = (0.0, 10.0),
        covariance_prior: float = 1e-3,
    ):
        where = "GaussianMixture"
        (
            self.n_components,
            self.covariance,
            self.priors,
            self.concentration,
            self.covariance_prior,
        ) = check_all(
            [
                ("n_components", n_components, positive_int),
                ("covariance", covariance, one_of(*COVARIANCES)),
                ("priors", priors, one_of("weak", None)),
                ("concentration", concentration, positive_float),
                ("covariance_prior", covariance_prior, positive_float),
            ],
            where,
        )
        self.loc_prior = _pair(loc_prior, "loc_prior", "(mean, scale), the scale > 0")

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "covariance": self.covariance,
            "priors": self.priors,
            "concentration": self.concentration,
            "loc_prior": list(self.loc_prior),
            "covariance_prior": self.covariance_prior,
        }

    @staticmethod
    def default_data(seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """Fisher's iris measurements (150 x 4, cm) as shipped with scikit-learn."""
        from sklearn.datasets import load_iris

        x = torch.as_tensor(load_iris().data, dtype=torch.get_default_dtype())
        return (x,), {}

    def init_values(self, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """k-means++-style seeding: locations at spread-out data points, scales at the data's."""
        x = self._check(x)
        g = torch.Generator().manual_seed(seed)
        K = self.n_components
        centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
        for _ in range(1, K):
            d2 = torch.cdist(x, torch.stack(centres)).min(-1).values ** 2
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            centres.append(x[torch.multinomial(p.cpu(), 1, generator=g)].squeeze(0))  # CPU draws
        sd = x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones(x.shape[1], device=x.device)
        vals = {"weights": torch.full((K,), 1.0 / K, device=x.device), "locs": torch.stack(centres)}
        if self.priors is None:  # standard deviations (the model's params)
            spread = sd.expand(K, -1) if self.covariance != "spherical" else sd.mean().expand(K)
            vals["scales"] = spread.clone()
            return vals
        prec = sd.pow(-2)  # the MAP sites are precisions
        if self.covariance == "full":
            vals["precision"] = torch.diag_embed(prec).expand(K, -1, -1).clone()
        elif self.covariance == "diag":
            vals["precision"] = prec.expand(K, -1).clone()
        else:
            vals["precision"] = sd.mean().pow(-2).expand(K).clone()
        return vals

    # -------------------------------------------------------------- the model
    def _check(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"GaussianMixture: x must be a tensor, got {type(x).__name__}")
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if x.dim() != 2 or x.shape[0] == 0:
            raise InputError(f"GaussianMixture: x must be (N, D) with N >= 1, got {tuple(x.shape)}")
        return x

    def _globals(self, x: torch.Tensor):
        K, D = self.n_components, x.shape[1]
        opts = dict(dtype=x.dtype, device=x.device)
        if self.priors is None:
            # Lazy initial values: the k-means++ seeding runs once, when the param store first
            # meets these names, not on every call of the model.
            cache: dict[str, dict[str, torch.Tensor]] = {}

            def init(name: str) -> torch.Tensor:
                if not cache:
                    cache["v"] = self.init_values(x)
                return cache["v"][name].to(**opts)

            weights = pyro.param("weights", lambda: init("weights"), constraint=constraints.simplex)
            locs = pyro.param("locs", lambda: init("locs"))
            if self.covariance == "full":
                tril = pyro.param(
                    "scale_tril",
                    lambda: torch.diag_embed(init("scales")),
                    constraint=constraints.lower_cholesky,
                )
            else:
                scales = pyro.param(
                    "scales", lambda: init("scales"), constraint=constraints.positive
                )
                tril = _tril(scales, D, self.covariance)
            return weights, locs, tril
        weights = pyro.sample(
            "weights", dist.Dirichlet(torch.full((K,), self.concentration, **opts))
        )
        m, s = self.loc_prior
        psi = self.covariance_prior
        with pyro.plate("components", K, dim=-1):
            locs = pyro.sample(
                "locs", dist.Normal(torch.tensor(m, **opts), s).expand([D]).to_event(1)
            )
            if self.covariance == "full":
                prec = pyro.sample(
                    "precision",
                    PrecisionWishart(
                        torch.tensor(D + 1.0, **opts),
                        precision_matrix=psi * torch.eye(D, **opts),
                    ),
                )
                return weights, locs, _covariance_tril(prec)
            one = torch.tensor(1.0, **opts)
            if self.covariance == "diag":
                prec = pyro.sample("precision", dist.Gamma(one, psi / 2).expand([D]).to_event(1))
            else:
                prec = pyro.sample("precision", dist.Gamma(one, D * psi / 2))
        return weights, locs, _tril(prec.rsqrt(), D, self.covariance)

    def model(self, x: torch.Tensor) -> None:
        x = self._check(x)
        weights, locs, tril = self._globals(x)
        if self.priors is not None:
            # the "components" plate's dim becomes the "data" plate's once indexed by z: a
            # singleton keeps batch dims left of it (draws, particles) left of the data plate
            locs, tril = locs.unsqueeze(-3), tril.unsqueeze(-4)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(
                "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
            )
            loc, scale_tril = Vindex(locs)[..., z, :], Vindex(tril)[..., z, :, :]
            pyro.sample("obs", dist.MultivariateNormal(loc, scale_tril=scale_tril), obs=x)

    # -------------------------------------------------------------- prediction
    def predict_proba(self, x: torch.Tensor, fit) -> torch.Tensor:
        """Posterior responsibilities p(z_i = k | x_i, θ̂), (N, K), at the fit's estimate.

        Exact marginals of the enumerated assignment (TraceEnum_ELBO.compute_marginals) with
        the globals fixed at the fit's point estimate.
        """
        x = self._check(x)
        from jointkl.engine import engine_class

        engine = engine_class(fit.engine)
        engine.activate(fit)
        point = {k: v for k, v in fit.params.items() if k in ("weights", "locs", "precision")}
        model = poutine.condition(self.model, data=point) if self.priors else self.model
        marg = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(model, _no_guide, x)
        logits = marg["assignment"].logits
        return torch.softmax(logits.reshape(-1, self.n_components), -1)

    def predict(self, x: torch.Tensor, fit) -> torch.Tensor:
        """Most probable component per point, (N,)."""
        return self.predict_proba(x, fit).argmax(-1)


def _no_guide(*args, **kwargs) -> None:
    pass


def _pair(value: Any, name: str, expected: str) -> tuple[float, float]:
    """Two finite numbers, the second positive (a location and a scale)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"GaussianMixture: {name} must be {expected}, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and b > 0):
        raise InputError(f"GaussianMixture: {name} must be {expected}, got {value!r}")
    return a, b


def _covariance_tril(precision: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of the covariance precision⁻¹ (batched)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(precision)))


def _tril(scales: torch.Tensor, D: int, covariance: str) -> torch.Tensor:
    if covariance == "spherical":
        scales = scales.unsqueeze(-1).expand(*scales.shape, D)
    return torch.diag_embed(scales)
