"""Hidden Markov model: a chain of enumerated states per sequence, Gaussian or categorical
emissions.

    init    ~ Dirichlet(α·1)                               (priors="weak")
    trans_k ~ Dirichlet(α·1)            k = 1..K           (plate "states")
    s_{i,0} ~ Categorical(init)                            (plate "data": the sequences)
    s_{i,t} ~ Categorical(trans_{s_{i,t-1}})   t = 1..T-1  (pyro.markov: enumerated)
    x_{i,t} ~ Normal(locs_s, scales_s) (diag) | MultivariateNormal(locs_s, L_s) (full)
            | Categorical(emit_s)                          (categorical)

Time is a ``pyro.markov`` loop, so Pyro's TraceEnum_ELBO (SVI) sums the states out by
variable elimination, and EM recognises the chain and runs one forward recursion over all
sequences at once (forward-backward by autograd).

Sequences of different lengths (hmmlearn's ``lengths``) are padded to the longest, T, and
``lengths`` (S,) gives each one's own. The observations of steps t >= length are masked
(``poutine.mask``: they score 0); the states there still follow the transitions, which sum to
one over each padded step, so the log-likelihood is exactly that of the unpadded sequences.
(Masking the states would change nothing: Pyro's TraceEnum_ELBO, and EM with it, score an
enumerated latent's own factor unmasked.) EM then also counts the padded transitions in its
M-step, whose posterior is the transition matrix itself: a valid EM for this model, with the
same fixed points as hmmlearn's, reached in a few more iterations when much is padding.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

from jointkl.errors import InputError
from jointkl.settings import check_all, one_of, optional, positive_float, positive_int
from jointkl.zoo import ZooModel, register_model

__all__ = ["HMM"]

EMISSIONS = ("gaussian", "categorical")
COVARIANCES = ("diag", "full")


@register_model
class HMM(ZooModel):
    """K-state hidden Markov model over sequences padded to one length T (``lengths`` gives
    each sequence's own; see the module docstring).

    :param int n_states: number of hidden states K.
    :param str emission: ``"gaussian"`` (data ``(S, T)`` or ``(S, T, D)`` floats) or
        ``"categorical"`` (data ``(S, T)`` integers in ``0..n_symbols-1``).
    :param str covariance: ``"diag"`` or ``"full"`` (Gaussian emissions).
    :param n_symbols: number of symbols (categorical); ``None`` reads it from the data.
    :param priors: ``"weak"`` (Dirichlet start/transition/emission probabilities, Normal
        means, LogNormal scales [+ LKJ correlations]: MAP under EM) or ``None``
        (``pyro.param`` globals: maximum likelihood).
    :param float concentration: Dirichlet concentration α.
    :param loc_prior: (mean, scale) of the Normal prior on every mean coordinate.
    :param scale_prior: (mu, sigma) of the LogNormal prior on the standard deviations.
    """

    name: ClassVar[str] = "hmm"
    description: ClassVar[str] = (
        "hidden Markov model, Gaussian or categorical emissions, states enumerated "
        "(synthetic regime-switching sequences by default)"
    )
    # SVI: a Gaussian over the continuous globals (assignments still enumerated), so a fit
    # has posterior spread; EM needs no guide.
    default_guide: ClassVar[str] = "normal"

    def __init__(
        self,
        n_states: int = 3,
        emission: str = "gaussian",
        covariance: str = "diag",
        n_symbols: int | None = None,
        priors: str | None = None,
        concentration: float = 1.0,
        loc_prior: tuple[float, float] = (0.0, 10.0),
        scale_prior: tuple[float, float] = (0.0, 2.0),
    ):
        (
            self.n_states,
            self.emission,
            self.covariance,
            self.n_symbols,
            self.priors,
            self.concentration,
        ) = check_all(
            [
                ("n_states", n_states, positive_int),
                ("emission", emission, one_of(*EMISSIONS)),
                ("covariance", covariance, one_of(*COVARIANCES)),
                ("n_symbols", n_symbols, optional(positive_int)),
                ("priors", priors, one_of("weak", None)),
                ("concentration", concentration, positive_float),
            ],
            "HMM",
        )
        self.loc_prior = tuple(float(v) for v in loc_prior)
        self.scale_prior = tuple(float(v) for v in scale_prior)

    # -------------------------------------------------------------- zoo hooks
    def settings(self) -> dict[str, Any]:
        return {
            "n_states": self.n_states,
            "emission": self.emission,
            "covariance": self.covariance,
            "n_symbols": self.n_symbols,
            "priors": self.priors,
            "concentration": self.concentration,
            "loc_prior": list(self.loc_prior),
            "scale_prior": list(self.scale_prior),
        }

    def default_data(self, seed: int = 0) -> tuple[tuple[torch.Tensor], dict]:
        """Synthetic sequences drawn with ``seed`` from a known, sticky 3-state chain
        (stay with probability 0.9, else move to either other state).

        Gaussian: 20 sequences x 100 steps of a 1-D regime-switching signal with state means
        (-2, 0, 2.5) and standard deviations (0.5, 0.7, 0.5), shape (20, 100, 1).
        Categorical: the "occasionally dishonest casino" (Durbin et al. 1998) with a third
        state: fair die, die loaded on six (p=0.5), die loaded on one (p=0.5); 20 x 100 rolls
        as integers 0..5, shape (20, 100).
        """
        g = torch.Generator().manual_seed(seed)
        S, T, K = 20, 100, 3
        trans = torch.full((K, K), 0.05) + 0.85 * torch.eye(K)
        states = torch.empty(S, T, dtype=torch.long)
        states[:, 0] = torch.randint(K, (S,), generator=g)
        for t in range(1, T):
            states[:, t] = torch.multinomial(trans[states[:, t - 1]], 1, generator=g).squeeze(-1)
        if self.emission == "categorical":
            emit = torch.full((K, 6), 0.1)
            emit[0] = 1 / 6
            emit[1, 5] = 0.5
            emit[2, 0] = 0.5
            x = torch.multinomial(emit[states.reshape(-1)], 1, generator=g).reshape(S, T)
            return (x,), {}
        means = torch.tensor([-2.0, 0.0, 2.5])
        sds = torch.tensor([0.5, 0.7, 0.5])
        noise = torch.randn(S, T, generator=g)
        x = (means[states] + sds[states] * noise).unsqueeze(-1)
        return (x.to(torch.get_default_dtype()),), {}

    def init_values(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Uniform start and transition probabilities; means at spread-out observations;
        scales at the data's; emission probabilities near the symbol frequencies (padding
        beyond ``lengths`` left out)."""
        x = self._check(x)
        lengths = self._check_lengths(lengths, x)
        if lengths is not None:
            x = x[torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1)].unsqueeze(0)
        g = torch.Generator().manual_seed(seed)
        K = self.n_states
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        vals = {
            "init": torch.full((K,), 1.0 / K, dtype=dtype, device=x.device),
            "trans": torch.full((K, K), 1.0 / K, dtype=dtype, device=x.device),
        }
        if self.emission == "categorical":
            M = self._symbols(x)
            freq = torch.bincount(x.reshape(-1), minlength=M).to(dtype) + 1.0
            noise = 1 + 0.2 * torch.rand(K, M, generator=g, dtype=dtype).to(x.device)
            emit = freq / freq.sum() * noise
            vals["emit"] = emit / emit.sum(-1, keepdim=True)
            return vals
        flat = x.reshape(-1, x.shape[-1])
        q = torch.linspace(0.1, 0.9, K, dtype=dtype, device=x.device)
        # Means at quantiles of the first coordinate's order: distinct, deterministic.
        order = flat[:, 0].argsort()
        idx = (q * (len(order) - 1)).round().long()
        vals["locs"] = flat[order[idx]].clone()
        sd = (
            flat.std(0).clamp_min(1e-3)
            if len(flat) > 1
            else torch.ones(flat.shape[1], device=x.device)
        )
        vals["scales"] = sd.expand(K, -1).clone()
        if self.covariance == "full":
            vals["corr_chol"] = (
                torch.eye(flat.shape[1], dtype=dtype, device=x.device).expand(K, -1, -1).clone()
            )
        return vals

    def em_time_steps(self, x: Any, lengths: Any = None) -> dict[str, Any]:
        """The model as a chain of identical steps, for EM's compiler
        (:func:`jointkl.inference.em.time_steps.compile_by_time_steps`): T steps of sites
        ``state_t`` and ``obs_t``; the same model on the first n steps is the data cut to
        them (lengths capped at n); ``obs_t``'s value is ``x[:, t]`` and its mask
        ``t < lengths``."""
        x = self._check(x)
        lengths = self._check_lengths(lengths, x)
        T = x.shape[1]

        def short(n: int) -> tuple[tuple, dict]:
            if lengths is None:
                return (x[:, :n],), {}
            return (x[:, :n], lengths.clamp(max=n)), {}

        out = {
            "steps": T,
            "stems": ("state", "obs"),
            "short": short,
            "values": {"obs": x.movedim(1, 0)},
        }
        if lengths is not None:
            steps = torch.arange(T, device=x.device).unsqueeze(-1)
            out["masks"] = {"obs": steps < lengths}
        return out

    def em_chain(self, x: Any, lengths: Any = None) -> dict[str, Any] | None:
        """The model's whole structure, for EM's compiler
        (:func:`jointkl.inference.em.declared_chain.compile_declared_chain`): states
        ``state_t`` (Categorical, ``init`` then ``trans[s_{t-1}]``) and emissions ``obs_t``
        (``Normal(locs[s_t], scales[s_t])`` over D coordinates, or ``Categorical(emit[s_t])``)
        observing ``x[:, t]``, masked by ``t < lengths``. ``None`` for a full covariance
        (its emission's scale is not one free variable under the priors) and for a
        subclass that overrides :meth:`model`."""
        if type(self).model is not HMM.model or (
            self.emission == "gaussian" and self.covariance != "diag"
        ):
            return None
        x = self._check(x)
        lengths = self._check_lengths(lengths, x)
        T = x.shape[1]
        if self.emission == "categorical":
            emission = {"family": "categorical", "slots": {"probs": "emit"}, "event_dims": 0}
        else:
            slots = {"loc": "locs", "scale": "scales"}
            emission = {"family": "normal", "slots": slots, "event_dims": 1}
        masks = None
        if lengths is not None:
            masks = torch.arange(T, device=x.device).unsqueeze(-1) < lengths
        emission.update(stem="obs", values=x.movedim(1, 0), masks=masks)
        return {
            "stem": "state",
            "steps": T,
            "states": self.n_states,
            "init": "init",
            "trans": "trans",
            "emission": emission,
        }

    # -------------------------------------------------------------- the model
    def _symbols(self, x: torch.Tensor) -> int:
        return self.n_symbols if self.n_symbols is not None else int(x.max()) + 1

    def _check(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"HMM: x must be a tensor, got {type(x).__name__}")
        if self.emission == "categorical":
            if x.dim() != 2 or x.numel() == 0:
                raise InputError(f"HMM: categorical data must be (S, T), got {tuple(x.shape)}")
            if x.is_floating_point():
                if not bool((x == x.round()).all()):
                    raise InputError("HMM: categorical data must be integers")
                x = x.long()
            if int(x.min()) < 0 or (self.n_symbols is not None and int(x.max()) >= self.n_symbols):
                raise InputError(
                    f"HMM: symbols must lie in 0..{self._symbols(x) - 1}, got "
                    f"{int(x.min())}..{int(x.max())}"
                )
            return x
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        if x.dim() != 3 or x.numel() == 0:
            raise InputError(
                f"HMM: Gaussian data must be (S, T) or (S, T, D), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        return x

    def _check_lengths(self, lengths: Any, x: torch.Tensor) -> torch.Tensor | None:
        if lengths is None:
            return None
        S, T = x.shape[:2]
        lengths = torch.as_tensor(lengths, device=x.device)
        if lengths.is_floating_point() and bool((lengths == lengths.round()).all()):
            lengths = lengths.long()
        if lengths.shape != (S,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise InputError(
                f"HMM: lengths must be {S} integers (one per sequence), got "
                f"{lengths.dtype} of shape {tuple(lengths.shape)}"
            )
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise InputError(
                f"HMM: lengths must lie in 1..{T} (the padded length), got "
                f"{int(lengths.min())}..{int(lengths.max())}"
            )
        return lengths.to(x.device)

    def _globals(self, x: torch.Tensor, lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        K = self.n_states
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        opts = dict(dtype=dtype, device=x.device)
        if self.priors is None:
            init = self.init_values(x, lengths)
            out = {
                "init": pyro.param("init", init["init"].to(**opts), constraint=constraints.simplex),
                "trans": pyro.param(
                    "trans", init["trans"].to(**opts), constraint=constraints.simplex
                ),
            }
            if self.emission == "categorical":
                out["emit"] = pyro.param(
                    "emit", init["emit"].to(**opts), constraint=constraints.simplex
                )
            elif self.covariance == "diag":
                out["locs"] = pyro.param("locs", init["locs"].to(**opts))
                out["scales"] = pyro.param(
                    "scales", init["scales"].to(**opts), constraint=constraints.positive
                )
            else:
                out["locs"] = pyro.param("locs", init["locs"].to(**opts))
                out["scale_tril"] = pyro.param(
                    "scale_tril",
                    torch.diag_embed(init["scales"]).to(**opts),
                    constraint=constraints.lower_cholesky,
                )
            return out
        a = torch.tensor(self.concentration, **opts)
        out = {"init": pyro.sample("init", dist.Dirichlet(a.expand(K)))}
        with pyro.plate("states", K, dim=-1):
            out["trans"] = pyro.sample("trans", dist.Dirichlet(a.expand(K, K)))
            if self.emission == "categorical":
                M = self._symbols(x)
                out["emit"] = pyro.sample("emit", dist.Dirichlet(a.expand(K, M)))
                return out
            D = x.shape[-1]
            m, s = self.loc_prior
            lm, ls = self.scale_prior
            out["locs"] = pyro.sample(
                "locs", dist.Normal(torch.tensor(m, **opts), s).expand([D]).to_event(1)
            )
            scales = pyro.sample(
                "scales", dist.LogNormal(torch.tensor(lm, **opts), ls).expand([D]).to_event(1)
            )
            if self.covariance == "diag":
                out["scales"] = scales
            elif D == 1:  # a 1 x 1 correlation is 1: no LKJ factor to learn
                out["scale_tril"] = scales.unsqueeze(-1)
            else:
                corr = pyro.sample("corr_chol", dist.LKJCholesky(D, torch.tensor(1.0, **opts)))
                out["scale_tril"] = scales.unsqueeze(-1) * corr
        return out

    def _emission(self, g: dict[str, torch.Tensor], s: torch.Tensor):
        if self.emission == "categorical":
            return dist.Categorical(Vindex(g["emit"])[..., s, :])
        if "scale_tril" in g:
            loc, tril = Vindex(g["locs"])[..., s, :], Vindex(g["scale_tril"])[..., s, :, :]
            return dist.MultivariateNormal(loc, scale_tril=tril)
        return dist.Normal(Vindex(g["locs"])[..., s, :], Vindex(g["scales"])[..., s, :]).to_event(1)

    def model(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """``x``: (S, T[, D]) sequences; ``lengths``: (S,) their lengths when they differ
        (``None``: all T)."""
        x = self._check(x)
        lengths = self._check_lengths(lengths, x)
        g = self._globals(x, lengths)
        if self.priors is not None:
            # the "states" plate's dim becomes the "data" plate's once indexed by a state: a
            # singleton keeps batch dims left of it (draws, particles) left of the data plate
            g = {
                k: v if k == "init" else v.unsqueeze(-4 if k == "scale_tril" else -3)
                for k, v in g.items()
            }
        S, T = x.shape[:2]
        with pyro.plate("data", S, dim=-1):
            s = None
            for t in pyro.markov(range(T)):
                probs = g["init"] if t == 0 else Vindex(g["trans"])[..., s, :]
                s = pyro.sample(
                    f"state_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                )
                live = nullcontext() if lengths is None else poutine.mask(mask=t < lengths)
                with live:
                    pyro.sample(f"obs_{t}", self._emission(g, s), obs=x[:, t])
