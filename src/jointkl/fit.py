"""The result of a fit: parameters, objective history, convergence, and the way back to data.

A :class:`Fit` is what every engine returns. It holds plain values (tensors, floats, JSON), so
``fit.save(dir)`` writes ``fit.json`` plus one ``tensors.pt`` read back with
``torch.load(weights_only=True)`` — nothing on disk is ever unpickled.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jointkl.errors import InputError
from jointkl.registry import engine_class
from jointkl.runs import atomic_save_tensors, atomic_write_text

__all__ = ["Fit", "point_draws", "stored_draws"]

FORMAT = 1
DEFAULT_DRAWS = 100  # draws per chain of an approximation (4 chains: 400 draws)


@dataclass
class Fit:
    """What an engine learned.

    :param engine: the registered name of the engine that made it (``"svi"``, ``"em"`` ...).
    :param config: the engine's settings (JSON values).
    :param params: constrained parameter tensors by param or site name.
    :param history: the objective per step or iteration (``objective`` says which).
    :param objective: the objective's name, e.g. ``"loss"`` (negative ELBO, lower is better)
        or ``"log_likelihood"`` (higher is better).
    :param converged: whether the engine's convergence test passed.
    :param n_iter: steps or iterations taken.
    :param state: engine-specific tensors needed to restore it (e.g. unconstrained params).
    :param samples: stored posterior draws by site, each ``(chain, draw, *site_shape)``.
    :param info: extra JSON facts (a stop reason, the best restart, timings).
    :param model_spec: how to rebuild the pair on load (``{"zoo": name, "settings": {...}}``
        or ``{"file": path, "name": attr}``); ``None`` when the pair must be passed to ``load``.
    :param pair: the fitted model/guide pair (in memory only).
    :param guide: the fitted guide, when the engine has one (in memory only; engines rebuild
        it from ``config`` and ``state`` after :meth:`load`).
    :param args, kwargs: the data the fit saw, passed to the model as ``model(*args, **kwargs)``.
    """

    engine: str
    config: dict[str, Any]
    params: dict[str, torch.Tensor]
    history: list[float]
    objective: str = "loss"
    converged: bool = False
    n_iter: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    model_spec: dict[str, Any] | None = None
    pair: Any = field(default=None, repr=False)
    guide: Any = field(default=None, repr=False)
    args: tuple[Any, ...] = field(default=(), repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ summaries
    @property
    def final_objective(self) -> float:
        return self.history[-1] if self.history else math.nan

    def __repr__(self) -> str:
        return (
            f"Fit(engine={self.engine!r}, {self.objective}={self.final_objective:.6g}, "
            f"n_iter={self.n_iter}, converged={self.converged}, params={sorted(self.params)})"
        )

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(
        self,
        num_samples: int | None = None,
        seed: int = 0,
        *,
        num_chains: int = 4,
        iwae_k: int = 64,
        progress: bool | None = None,
    ):
        """An ``arviz.InferenceData`` with posterior (deterministic sites included),
        posterior_predictive, log_likelihood, observed_data and sample_stats (see
        :func:`jointkl.inferencedata.to_inference_data`).

        :param num_samples: draws per chain. ``None``: every draw a sampler kept, and
            :data:`DEFAULT_DRAWS` per chain of an approximation the engine draws from
            (Laplace, a guide); a sampler's draws are thinned evenly only when it is given.
        :param seed: seeds the draws of an approximation and the posterior predictive.
        :param num_chains: chains of independent draws (R-hat and ESS need >= 2); a
            sampler's chains are its own.
        :param iwae_k: importance samples per data point of the IWAE log-likelihood of a
            model whose latents are all per-datum (a VAE).
        :param progress: a progress bar over the draws; ``None``: when stderr is a terminal.

        ``idata.posterior.attrs["draws"]`` (and the same attribute of ``log_likelihood`` and
        ``sample_stats``) says what the draws are: ``"markov_chain"``, ``"independent"``
        (``attrs["method"]`` names the approximation) or ``"point_estimate"`` (no posterior
        spread: the log-likelihood is computed once).
        """
        import sys

        import pyro

        from jointkl.inferencedata import to_inference_data

        if self.pair is None:
            raise InputError(
                "this Fit has no model attached; load it with Fit.load(dir, pair=...) first"
            )
        for what, value in (("num_chains", num_chains), ("iwae_k", iwae_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{what} must be an int >= 1, got {value!r}")
        if num_samples is not None and (
            not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1
        ):
            raise InputError(f"num_samples must be an int >= 1 or None, got {num_samples!r}")
        if progress is None:
            progress = sys.stderr.isatty()
        engine = engine_class(self.engine)
        engine.activate(self)
        pyro.set_rng_seed(seed)
        draws = self.posterior_draws(num_samples, seed, num_chains=num_chains)
        kind, method = engine.draws_kind(self)
        pyro.set_rng_seed(seed)
        return to_inference_data(
            self.pair.model,
            self.args,
            self.kwargs,
            draws,
            history=self.history,
            objective=self.objective,
            log_density_offset=engine.log_density_offset(self),
            draws_kind=kind,
            method=method,
            guide=engine.importance_guide(self),
            iwae_k=iwae_k,
            seed=seed,
            num_predictive=num_samples or DEFAULT_DRAWS,
            progress=progress,
            sample_stats=engine.sample_stats(self, num_samples, seed),
        )

    def posterior_draws(
        self, num_samples: int | None = None, seed: int = 0, *, num_chains: int = 4
    ) -> dict[str, torch.Tensor]:
        """Posterior draws of every latent/global site, each ``(chain, draw, *shape)``
        (``num_samples`` and ``num_chains`` as in :meth:`to_arviz`)."""
        hook = engine_class(self.engine).posterior_draws
        if "num_chains" in inspect.signature(hook).parameters:
            return hook(self, num_samples, seed, num_chains=num_chains)
        # an engine whose draws come in its own chains (a sampler) need not take the count
        return hook(self, num_samples, seed)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``fit.json`` and ``tensors.pt`` into ``directory`` (atomically, file by file)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arg_tensors, arg_meta = _split_args(self.args, self.kwargs)
        meta = {
            "format": FORMAT,
            "engine": self.engine,
            "config": self.config,
            "history": [float(h) for h in self.history],
            "objective": self.objective,
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
            "info": self.info,
            "model_spec": self.model_spec,
            "data": arg_meta,
        }
        tensors = {
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "state": {k: v.detach().cpu() for k, v in self.state.items()},
            "samples": {k: v.detach().cpu() for k, v in self.samples.items()},
            "data": arg_tensors,
        }
        atomic_save_tensors(tensors, d / "tensors.pt")
        atomic_write_text(json.dumps(meta, indent=2, default=_json_default), d / "fit.json")
        return d

    @classmethod
    def load(
        cls, directory: str | Path, pair: Any = None, trust: bool = False, device: Any = "cpu"
    ) -> Fit:
        """Read a fit written by :meth:`save`. Loading runs no code from the directory.

        :param pair: the fitted model/guide pair; when ``None`` it is rebuilt from the
            recorded ``model_spec``: a zoo model from the registry; a model from a user's
            file only with ``trust=True`` and only if the file still has the content hash
            recorded at fit time (else :class:`InputError`).
        :param trust: allow importing (running) the model file the fit names.
        :param device: where the loaded parameters, samples and data live: ``"cpu"`` (the
            default, whatever device the fit ran on), ``"cuda"``, ``"cuda:N"`` or ``"auto"``
            (checked as an engine's ``device`` setting); the networks of a given ``pair``
            move there too. ``fit.info["device"]`` still says where the fit ran.
        Every defect of the directory (a missing, truncated or foreign file; missing keys)
        is an :class:`InputError` naming the file and what was expected."""
        from jointkl.device import move_modules, resolve_device
        from jointkl.settings import compute_device

        target = resolve_device(compute_device(device, "Fit.load: device") or "cpu")
        d = Path(directory)
        meta_path, tensor_path = d / "fit.json", d / "tensors.pt"
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise InputError(f"{p} not found: expected a fit saved by Fit.save()")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{meta_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise InputError(f"{meta_path}: unsupported fit format {got!r}; expected {FORMAT}")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise InputError(f"{meta_path} lacks {missing}: expected a fit saved by Fit.save()")
        try:
            tensors = torch.load(tensor_path, weights_only=True, map_location=target)
        except Exception as e:  # truncated, corrupted or foreign: one line, not a pickle trace
            first = str(e).splitlines()[0] if str(e) else ""
            raise InputError(
                f"{tensor_path} could not be read ({type(e).__name__}: {first[:160]}); "
                f"expected the tensors of a fit saved by Fit.save()"
            ) from e
        lacking = [k for k in ("params", "state", "samples", "data") if k not in tensors]
        if not isinstance(tensors, dict) or lacking:
            raise InputError(f"{tensor_path} lacks {lacking}: expected a fit's tensors")
        try:
            args, kwargs = _join_args(tensors["data"], meta["data"])
        except (KeyError, TypeError) as e:
            raise InputError(f"{meta_path}: its data entries do not match {tensor_path}") from e
        if pair is None and meta.get("model_spec"):
            from jointkl.zoo import build_pair

            pair = build_pair(meta["model_spec"], trust=trust)
        if pair is not None:
            move_modules(pair, target)
        return cls(
            engine=meta["engine"],
            config=meta["config"],
            params=dict(tensors["params"]),
            history=list(meta["history"]),
            objective=meta["objective"],
            converged=meta["converged"],
            n_iter=meta["n_iter"],
            state=dict(tensors["state"]),
            samples=dict(tensors["samples"]),
            info=meta.get("info", {}),
            model_spec=meta.get("model_spec"),
            pair=pair,
            args=args,
            kwargs=kwargs,
        )


_REQUIRED = ("engine", "config", "history", "objective", "converged", "n_iter", "data")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _split_args(args: tuple, kwargs: Mapping) -> tuple[dict[str, Any], dict[str, Any]]:
    """Data arguments as tensors (for tensors.pt) plus JSON for the rest."""
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {"args": [], "kwargs": {}}
    for i, a in enumerate(args):
        key = f"arg{i}"
        if isinstance(a, torch.Tensor):
            tensors[key] = a.detach().cpu()
            meta["args"].append({"tensor": key})
        else:
            meta["args"].append({"value": a})
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            tensors[f"kw_{k}"] = a.detach().cpu()
            meta["kwargs"][k] = {"tensor": f"kw_{k}"}
        else:
            meta["kwargs"][k] = {"value": a}
    return tensors, meta


def _join_args(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[tuple, dict]:
    def get(entry: Mapping[str, Any]) -> Any:
        return tensors[entry["tensor"]] if "tensor" in entry else entry["value"]

    return tuple(get(e) for e in meta["args"]), {k: get(e) for k, e in meta["kwargs"].items()}


def stored_draws(fit: Fit, num_samples: int | None, seed: int) -> dict[str, torch.Tensor]:
    """The stored ``(chain, draw, ...)`` samples: all of them when ``num_samples`` is
    ``None``, else thinned evenly to at most ``num_samples`` draws per chain
    (deterministic: ``seed`` is not needed)."""
    out = {}
    for name, v in fit.samples.items():
        n = v.shape[1]
        if num_samples is not None and n > num_samples:
            idx = torch.linspace(0, n - 1, num_samples).round().long()
            v = v[:, idx]
        out[name] = v
    return out


def point_draws(fit: Fit) -> dict[str, torch.Tensor]:
    """A point estimate as a one-draw 'posterior' ``(1, 1, *shape)`` of every latent site
    found by name in ``fit.params`` (no posterior spread: the converter marks it
    ``"point_estimate"``)."""
    from jointkl.sites import latent_site_names

    names = latent_site_names(fit.pair.model, fit.args, fit.kwargs)
    return {n: fit.params[n][None, None] for n in names if n in fit.params}
