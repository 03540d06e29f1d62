"""The engine skeleton: every engine's ``fit`` is the same template.

An engine is configured in its constructor, is stateless between fits, and exposes
``fit(pair, *args, **kwargs) -> Fit``. :meth:`Engine.fit` is a template method (the habit of
scikit-learn's ``BaseMixture.fit``) whose steps are the same for every engine:

1. wrap the pair (:func:`~jointkl.pair.as_pair`) and check it (:meth:`Engine.check_pair`);
2. check and bind the data (:meth:`Engine.bind_data`: NaN/inf refused, data and the pair's
   networks moved once to the ``device`` setting, dtypes cast);
3. seed (:meth:`Engine.seed`: one seed for everything random);
4. run the engine's loop (:meth:`Engine.run`, the one method an engine must write), which
   returns a :class:`Result`;
5. build the :class:`~jointkl.fit.Fit` (:meth:`Engine.build_fit`).

Settings are a frozen dataclass per engine (``Engine.Settings``, a subclass of
:class:`~jointkl.settings.Settings`), checked at construction. After a fit, the posterior
hooks (:meth:`Engine.activate`, :meth:`Engine.posterior_draws`,
:meth:`Engine.log_density_offset`) tell the ArviZ converter what the fit means, so the
converter never tests an engine's name.
"""

from __future__ import annotations

import inspect
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyro
import torch

from jointkl.device import data_device, move_modules, moved, resolve_device
from jointkl.errors import InputError
from jointkl.fit import Fit, point_draws, stored_draws
from jointkl.minibatch import check_finite_data
from jointkl.pair import as_pair
from jointkl.registry import ENGINES, engine_class, register_engine
from jointkl.settings import Settings
from jointkl.zoo import hook

__all__ = ["Engine", "Result", "ENGINES", "register_engine", "engine_class", "recreate_params"]


@dataclass
class Result:
    """What an engine's loop returns; :meth:`Engine.build_fit` adds what every fit has (the
    engine's name and settings, the model's spec, the pair and the data).

    ``params`` … ``info`` mean what the :class:`~jointkl.fit.Fit` fields of the same names
    mean. ``config`` holds settings resolved during the fit (e.g. the loss SVI chose), merged
    into the recorded config; ``guide`` is the fitted guide, in memory (a callable cannot be
    saved).
    """

    params: dict[str, torch.Tensor]
    history: list[float]
    objective: str = "loss"
    converged: bool = False
    n_iter: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    guide: Any = None


class Engine:
    """Base class of the fitting engines.

    Subclasses set ``name``, ``description`` and ``Settings`` (a frozen dataclass whose fields
    are the constructor's keyword arguments) and implement :meth:`run`. The settings are
    ``self.settings``; ``self.config`` is their JSON form, as a :class:`Fit` records it.
    """

    name: ClassVar[str] = "engine"
    description: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]] = Settings
    # Whether ``fit`` under a process group takes each rank's shard of the rows and combines
    # the ranks' work itself (jointkl.distributed); the command line refuses --nproc > 1 else.
    data_parallel: ClassVar[bool] = False
    # Whether such an engine is handed the whole data and picks its rank's rows itself (EM
    # streams from a row source, so it reads only its rows); else the caller passes the shard.
    picks_own_rows: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Settings" in cls.__dict__:
            # help(EngineClass) and the CLI see the settings as the constructor's arguments.
            sig = inspect.signature(cls.Settings)
            cls.__signature__ = sig.replace(return_annotation=inspect.Signature.empty)

    def __init__(self, **settings: Any):
        known = self.Settings.names()
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError(
                f"{type(self).__name__}: unknown setting(s) {unknown}; settings: {', '.join(known)}"
            )
        self.settings = self.Settings(**settings)

    @property
    def config(self) -> dict[str, Any]:
        """The settings as JSON values (what a Fit and a run directory record)."""
        return self.settings.to_json()

    # ------------------------------------------------------------------ the template
    def fit(self, pair: Any, *args: Any, **kwargs: Any) -> Fit:
        """Fit ``pair`` to the data ``model(*args, **kwargs)``."""
        pair = as_pair(pair)
        self.check_pair(pair)
        args, kwargs = self.bind_data(pair, args, kwargs)
        self.seed()
        t0 = time.perf_counter()
        result = self.run(pair, args, kwargs)
        result.info.setdefault("seconds", time.perf_counter() - t0)
        result.info.setdefault("device", str(data_device(args, kwargs)))
        return self.build_fit(pair, args, kwargs, result)

    def check_pair(self, pair: Any) -> None:
        """Refuse a pair this engine cannot fit, naming the missing requirement. Default:
        any pair (engines that need a model structure check it when they trace it)."""

    def bind_data(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Check the data (NaN/inf refused) and return them as the loop will use them: on
        the device of the ``device`` setting (:func:`jointkl.device.resolve_device`; ``None``
        leaves them where they are), with the ``nn.Module`` networks the pair holds moved
        there too. This is the one move of a fit: the loop and the model's parameters then
        live on that device."""
        check_finite_data(args, kwargs)
        device = resolve_device(getattr(self.settings, "device", None), args, kwargs)
        move_modules(pair, device)
        return moved(tuple(args), device), moved(dict(kwargs), device)

    def streams_rows(self) -> bool:
        """Whether this engine, with its settings, reads data given as a
        :class:`~jointkl.data.arrays.RowArray` (a memory-mapped file) a block or a batch at a
        time; the command line passes such a file as one then, and reads it into memory
        otherwise. Default: no."""
        return False

    def seed(self) -> None:
        """Seed torch's and Pyro's global RNG from the one ``seed`` setting (as
        ``pyro.set_rng_seed``: torch's, Python's and NumPy's generators)."""
        seed = getattr(self.settings, "seed", 0)
        if torch.accelerator.is_available():
            pyro.set_rng_seed(seed)
            return
        # No accelerator: the CPU generator is torch's only one, and seeding it alone gives
        # the same draws; torch.manual_seed would also queue lazy seeding of CUDA, XPU and
        # MTIA, each recording a stack trace (0.4 ms, a tenth of a small fit's fixed cost).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def run(self, pair: Any, args: tuple, kwargs: dict[str, Any]) -> Result:
        """The engine's own loop: fit ``pair`` to the bound data."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def build_fit(self, pair: Any, args: tuple, kwargs: dict[str, Any], result: Result) -> Fit:
        spec = hook(pair, "spec")
        return Fit(
            engine=self.name,
            config={**self.config, **result.config},
            params=result.params,
            history=result.history,
            objective=result.objective,
            converged=result.converged,
            n_iter=result.n_iter,
            state=result.state,
            samples=result.samples,
            info=result.info,
            model_spec=spec() if callable(spec) else None,
            pair=pair,
            args=args,
            kwargs=kwargs,
            guide=result.guide,
        )

    # ------------------------------------------------------------------ posterior hooks
    @classmethod
    def activate(cls, fit: Fit) -> None:
        """Put ``fit``'s learned parameters where the model reads them (e.g. Pyro's param
        store) before the model is re-run for predictions. Default: nothing to do."""

    @classmethod
    def posterior_draws(
        cls, fit: Fit, num_samples: int | None, seed: int, num_chains: int = 4
    ) -> dict[str, torch.Tensor]:
        """Draws of every latent/global site, each of shape ``(chain, draw, *site_shape)``.

        ``num_samples`` is draws per chain (``None``: the engine's default, every stored
        draw for a sampler); ``num_chains`` is the chain count of independent draws (a
        sampler's chains are its own). The default uses draws the engine stored in
        ``fit.samples`` (MCMC-like engines), and otherwise the point estimate in
        ``fit.params`` as one draw of the model's latent sites.
        """
        if fit.samples:
            return stored_draws(fit, num_samples, seed)
        return point_draws(fit)

    @classmethod
    def draws_kind(cls, fit: Fit) -> tuple[str, str]:
        """(what the draws of :meth:`posterior_draws` are, the method's name): one of
        ``"markov_chain"`` (a sampler's chains), ``"independent"`` (independent draws from
        an approximation, split into chains) or ``"point_estimate"``. Default: a sampler's
        chains when the fit stored samples, else a point estimate."""
        return ("markov_chain", "") if fit.samples else ("point_estimate", "")

    @classmethod
    def importance_guide(cls, fit: Fit) -> Any:
        """The fitted guide q(z | x), when the engine has one, as the proposal of the IWAE
        log-likelihood of a model with per-datum latents. Default: none."""
        return None

    @classmethod
    def sample_stats(cls, fit: Fit, num_samples: int | None, seed: int) -> dict[str, torch.Tensor]:
        """Per-draw sampler statistics under ArviZ's names (``diverging``, ``tree_depth``,
        ...), each ``(chain, draw)`` and thinned like :meth:`posterior_draws`, for the
        ``sample_stats`` group. Default: none."""
        return {}

    @classmethod
    def log_density_offset(cls, fit: Fit) -> float:
        """A constant added to every pointwise log-likelihood (e.g. −log Z for a model whose
        density the engine knows only up to a normaliser it estimated). Default: 0."""
        return 0.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def recreate_params(*fns: Any, args: tuple = (), kwargs: dict | None = None) -> None:
    """Empty Pyro's param store, then run each of ``fns`` once on the data so that every
    ``pyro.param``/``pyro.module`` exists again (values are then poured in by the engine).

    Runs without gradients or side effects, and leaves torch's RNG state as it found it.
    """
    import pyro.poutine as poutine

    pyro.clear_param_store()
    rng = torch.get_rng_state()
    with torch.no_grad(), poutine.block():
        for fn in fns:
            poutine.trace(fn).get_trace(*args, **(kwargs or {}))
    torch.set_rng_state(rng)
