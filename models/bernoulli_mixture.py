"""Bernoulli mixture: binary vectors from K prototypes, the assignment enumerated.

    weights ~ Dirichlet(α·1)                              (priors="weak")
    probs_k ~ Beta(a, b) per coordinate   k = 1..K        (plate "components")
    z_i     ~ Categorical(weights)        i = 1..N        (plate "data", enumerated)
    x_i     ~ Bernoulli(probs_{z_i})      (D coordinates, independent given z_i)

With ``priors=None`` the globals are ``pyro.param``\\s (maximum likelihood). The priors are
conjugate, so EM's M-step is closed form: Dirichlet(1) leaves the weights at their
maximum-likelihood values, and the default Beta(1.001, 1.001) makes the probabilities
(Σ r x + 0.001) / (Σ r + 0.002): a pseudo-count of a thousandth of an image, which keeps a
pixel no image of a cluster has switched on from probability exactly 0 (a new image with it
on would score -inf) while moving the fit's log-likelihood by less than 1e-3 nats per image
on the digits (Beta(2, 2), add-one smoothing, moved it by 0.14).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, positive_float, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["BernoulliMixture"]


@register_model
class BernoulliMixture(ZooModel):
    """K-component mixture of products of Bernoullis (a latent-class model).

    :param int n_components: number of components K.
    :param priors: ``"weak"`` (Dirichlet weights, Beta probabilities: sample sites, MAP under
        EM and the default ``"delta"`` SVI guide) or ``None`` (``pyro.param`` globals).
    :param float concentration: Dirichlet concentration α of the weights.
    :param beta: (a, b) of the Beta prior on every probability.
    """

    name: ClassVar[str] = "bmm"
    description: ClassVar[str] = (
        "Bernoulli mixture of binary vectors, enumerated assignments (binarised digits by default)"
    )
    # SVI: a Gaussian over the continuous globals (assignments still enumerated), so a fit
    # has posterior spread; EM needs no guide.
    default_guide: ClassVar[str] = "normal"

    def __init__(
        self,
        n_components: int = 10,
        priors: str | None = "weak",
        concentration: float = 1.0,
        beta: tuple[float, float] = (1.001, 1.001),
    ):
        beta = tuple(beta)
        if len(beta) != 2:
            raise InputError(f"BernoulliMixture: beta must be two positive numbers, got {beta!r}")
        self.n_components, self.priors, self.concentration, a, b = check_all(
            [
                ("n_components", n_components, positive_int),
                ("priors", priors, one_of("weak", None)),
                ("concentration", concentration, positive_float),
                ("beta[0]", beta[0], positive_float),
                ("beta[1]", beta[1], positive_float),
            ],
            "BernoulliMixture",
        )
        self.beta = (a, b)

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "priors": self.priors,
            "concentration": self.concentration,
            "beta": list(self.beta),
        }

    @staticmethod
    def default_data(seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """scikit-learn's handwritten digits (1797 images, 8 x 8, grey levels 0..16),
        binarised at grey level > 7: a (1797, 64) tensor of 0/1."""
        from sklearn.datasets import load_digits

        x = torch.as_tensor(load_digits().data > 7, dtype=torch.get_default_dtype())
        return (x,), {}

    def init_values(self, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """Uniform weights; each component's probabilities halfway between a random data
        point and the data mean (so none starts at exactly 0 or 1)."""
        x = self._check(x)
        g = torch.Generator().manual_seed(seed)
        K = self.n_components
        rows = x[torch.randint(len(x), (K,), generator=g)]
        probs = 0.5 * rows + 0.5 * x.mean(0).clamp(0.05, 0.95)
        return {"weights": x.new_full((K,), 1.0 / K), "probs": probs}

    def em_mixture(self, x: Any) -> dict[str, Any] | None:
        """The model's structure, for EM's compiler
        (:func:`jointkl.inference.em.declared_mixture.compile_declared_mixture`): one
        enumerated ``assignment`` per row of ``x``, Categorical over K values with
        probabilities ``weights``, and ``obs`` Bernoulli with probabilities ``probs[z]``
        (D coordinates summed) observing ``x``. ``None`` for a subclass that overrides
        :meth:`model` (whose structure this does not describe)."""
        if type(self).model is not BernoulliMixture.model:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            return None
        # the values are checked by the model itself, which EM runs up to the data plate
        # before using this (a refusal there falls back to the generic compilation)
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        obs = {"site": "obs", "family": "bernoulli", "slot": "probs", "param": "probs"}
        return {
            "variable": "assignment",
            "components": self.n_components,
            "weights": "weights",
            "emissions": [{**obs, "event_dims": 1, "value": x}],
        }

    # -------------------------------------------------------------- the model
    def _check(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"BernoulliMixture: x must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[0] == 0:
            raise InputError(
                f"BernoulliMixture: x must be (N, D) with N >= 1, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        # x (1 - x) is 0 exactly at 0 and 1 and nonzero elsewhere (NaN at NaN), so a sum of
        # its magnitudes is 0 iff every value is 0 or 1 (a third of the cost of x == 0 | x == 1).
        if not bool(x.mul(1 - x).abs_().sum() == 0):
            raise InputError("BernoulliMixture: x must hold only 0 and 1")
        return x

    def model(self, x: torch.Tensor) -> None:
        x = self._check(x)
        K, D = self.n_components, x.shape[1]
        opts = dict(dtype=x.dtype, device=x.device)
        if self.priors is None:
            init = self.init_values(x)
            weights = pyro.param(
                "weights", init["weights"].to(**opts), constraint=constraints.simplex
            )
            probs = pyro.param(
                "probs", init["probs"].to(**opts), constraint=constraints.unit_interval
            )
        else:
            weights = pyro.sample(
                "weights", dist.Dirichlet(torch.full((K,), self.concentration, **opts))
            )
            a, b = (torch.tensor(v, **opts) for v in self.beta)
            with pyro.plate("components", K, dim=-1):
                probs = pyro.sample("probs", dist.Beta(a, b).expand([D]).to_event(1))
            probs = probs.unsqueeze(-3)  # batch dims left of "components" stay left of "data"
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(
                "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
            )
            pyro.sample("obs", dist.Bernoulli(Vindex(probs)[..., z, :]).to_event(1), obs=x)
