"""Zoo models and user models: the declared protocol, and finding a model by name or file.

Zoo classes (in ``jointkl.models``) subclass :class:`ZooModel` and register themselves with
:func:`register_model`. :class:`ZooModel` declares every hook an engine or the CLI may use,
with its default, so a user writing a model sees what they may provide; a plain
:class:`~jointkl.pair.Pair` or any object with ``model``/``guide`` works too, and
:func:`hook` reads a hook from either kind of object with the same defaults.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from jointkl.errors import InputError
from jointkl.pair import as_pair
from jointkl.registry import MODELS, model_class, register_model

__all__ = [
    "ZooModel",
    "hook",
    "MODELS",
    "register_model",
    "model_class",
    "load_user_object",
    "build_pair",
    "user_file_error",
]


class ZooModel:
    """The protocol of a model/guide pair, with every optional hook and its default.

    Required: ``model(*args, **kwargs)``, a Pyro model whose per-datum sites sit inside
    ``pyro.plate("data", N)``, and, for a zoo model that a saved fit can rebuild,
    ``settings()``. Everything else is optional; a hook left at ``None`` means "not
    provided" and the engine does without it (engines read hooks with :func:`hook`, so a
    plain :class:`~jointkl.pair.Pair` gets the same defaults).

    A zoo model is a subclass that sets ``name`` and ``description``, takes its settings as
    constructor keyword arguments (validated there with the checks of
    :mod:`jointkl.settings`), returns them from ``settings()`` as JSON values, and is
    decorated with :func:`register_model`::

        @register_model
        class Coin(ZooModel):
            name = "coin"
            description = "a biased coin"

            def __init__(self, alpha: float = 1.0):
                self.alpha = positive_float(alpha, "Coin: alpha")

            def settings(self):
                return {"alpha": self.alpha}

            def model(self, flips):
                p = pyro.sample("p", dist.Beta(self.alpha, self.alpha))
                with pyro.plate("data", len(flips)):
                    pyro.sample("flip", dist.Bernoulli(p), obs=flips)

    Class-level hooks:

    :cvar name: the short name the CLI and saved fits use (``jointkl fit <name>``).
    :cvar description: one line for ``jointkl models``.
    :cvar engine_defaults: measured engine settings per engine name, applied by the CLI
        before ``--set`` (e.g. ``{"svi": {"batch_size": 1024}}``).
    :cvar default_guide: the autoguide SVI builds when ``guide`` is ``None`` (``"delta"``,
        ``"normal"``, ``"lowrank"``); ``None``: SVI's own default.

    Optional callables (absent or ``None``: not provided; read them with :func:`hook`):

    :ivar guide: a Pyro guide ``guide(*args, **kwargs)``; ``None``: the engine's default
        (an autoguide for SVI; EM's E-step is exact and needs none).
    :ivar init_values: ``init_values(*args, seed=int, **kwargs) -> {site: value}``, initial
        values for the latent/global sites (SVI's autoguides start there).
    :ivar default_loss: ``loss(model, guide, *args, **kwargs) -> tensor``, an objective that
        is not an ELBO (SVI uses it when ``loss=None``).
    :ivar candidate_scores: ``candidate_scores(candidates, *context) -> (B, K) tensor``, the
        unnormalised log-density of every candidate in every context at once (NCE scores
        shared noise with it).
    :ivar em_time_steps: ``em_time_steps(*args, **kwargs) -> dict``, a declaration that the
        model is a chain of identical time steps, so EM compiles its first few and stamps
        them out (:mod:`jointkl.inference.em.time_steps` says what the dict holds).
    :ivar em_mixture: ``em_mixture(*args, **kwargs) -> dict``, a declaration of the model's
        mixture structure, so EM builds its factor groups without probing the model
        (:mod:`jointkl.inference.em.declared_mixture` says what the dict holds).
    :ivar em_chain: ``em_chain(*args, **kwargs) -> dict``, the same for a hidden Markov chain
        (:mod:`jointkl.inference.em.declared_chain`).

    Methods with a default: :meth:`spec` (rebuild recipe from :meth:`settings`),
    :meth:`default_data` (none: the CLI asks for ``--data``), :meth:`diagnostic_plots`
    (none).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    engine_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_guide: ClassVar[str | None] = None
    guide: Callable[..., Any] | None = None
    init_values: Callable[..., Mapping[str, Any]] | None = None
    default_loss: Callable[..., Any] | None = None
    candidate_scores: Callable[..., Any] | None = None
    em_time_steps: Callable[..., Mapping[str, Any]] | None = None
    em_mixture: Callable[..., Mapping[str, Any]] | None = None
    em_chain: Callable[..., Mapping[str, Any]] | None = None

    def model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define model()")

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as JSON values, so a saved fit can rebuild the model
        (``type(self)(**self.settings())``)."""
        raise NotImplementedError(f"{type(self).__name__} must define settings()")

    def spec(self) -> dict[str, Any] | None:
        """How a saved fit rebuilds this model: ``{"zoo": name, "settings": settings()}``.

        ``None`` when the class is not the one registered under its ``name`` or does not
        define :meth:`settings` (a subclass written for its hooks alone), since the model
        registry could not rebuild it; a model holding code that JSON cannot record (a user's
        network) overrides this to return ``None`` too. Such a fit is loaded with
        ``Fit.load(dir, pair=...)``."""
        if MODELS.get(self.name) is not type(self) or type(self).settings is ZooModel.settings:
            return None
        return {"zoo": self.name, "settings": self.settings()}

    def default_data(self, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
        """An embedded dataset as ``(args, kwargs)``, so ``jointkl fit <name>`` runs with no
        ``--data``. Default: none."""
        raise InputError(f"model {self.name!r} has no default dataset: pass --data PATH")

    def diagnostic_plots(self, fit: Any, folder: Path) -> list[Path]:
        """Model-specific plots written into ``folder`` after a fit; their paths. Default:
        none."""
        return []


_OPTIONAL = (
    "guide",
    "init_values",
    "default_loss",
    "candidate_scores",
    "em_time_steps",
    "em_mixture",
    "em_chain",
)
_CLASS_HOOKS = ("name", "description", "engine_defaults", "default_guide")
_METHODS = ("model", "settings", "spec", "default_data", "diagnostic_plots")


def hook(pair: Any, name: str) -> Any:
    """The hook ``name`` of any pair-like object, with :class:`ZooModel`'s default when the
    object does not provide it.

    Optional callables (``guide``, ``init_values``, ``default_loss``, ``candidate_scores``,
    ``em_time_steps``, ``em_mixture``, ``em_chain``) default to ``None``; class-level hooks to ZooModel's value
    (``engine_defaults``: ``{}``, ``description``: ``""``, ``default_guide``: ``None``); methods (``settings``, ``spec``,
    ``default_data``, ``diagnostic_plots``) to ``None`` on an object that is not a ZooModel,
    so a caller tests ``hook(pair, "default_data") is None`` to learn that there is none.

    :param pair: a ZooModel, a :class:`~jointkl.pair.Pair`, any object with ``model``, or a
        zoo class (for class-level hooks).
    :param name: one of the hooks above; anything else is a :class:`KeyError`.
    """
    if name in _OPTIONAL or name in _METHODS:
        return getattr(pair, name, None)
    if name in _CLASS_HOOKS:
        return getattr(pair, name, getattr(ZooModel, name))
    raise KeyError(f"{name!r} is not a hook of the model protocol")


def load_user_object(spec: str, digest: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``path/to/file.py:name`` (or ``file.py``, taking ``pair``, ``model`` in that order) ->
    the object and the spec to rebuild it: ``{"file": path, "name": attr, "sha256": ...}``.

    This imports (runs) the file: call it only for a file the user named, never for a path
    read from a run directory unless the caller trusts it (:func:`build_pair`).

    :param digest: when given (``"sha256:<hex>"``), the file's content must hash to it (a
        saved fit names the exact file it was fitted with), else :class:`InputError`.
    :returns: the object (a class is instantiated with no arguments) and its spec. Every
        failure (missing file, syntax error, an import that raises, no such name, an object
        that is neither a pair nor a model function) is an :class:`InputError` of one line.
    """
    from jointkl.runs import file_digest

    path_s, _, attr = spec.partition(":")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"model file {path_s!r} not found")
    if path.suffix != ".py":
        raise InputError(f"model file {path_s!r} must be a .py file")
    actual = file_digest(path)
    if digest is not None and actual != digest:
        raise InputError(
            f"model file {path_s!r} changed since the fit was saved (content hash {actual[:19]}"
            f"..., the fit recorded {digest[:19]}...); pass the model itself to load it"
        )
    mod_name = f"jointkl_user_{actual.removeprefix('sha256:')[:16]}_{abs(hash(str(path)))}"
    module = sys.modules.get(mod_name)
    if module is None:
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        try:
            s.loader.exec_module(module)
        except BaseException as e:
            del sys.modules[mod_name]
            if not isinstance(e, Exception):
                raise
            where = _user_line(e, path)
            first = str(e).splitlines()[0] if str(e) else ""
            raise InputError(
                f"model file {path_s!r} failed to import{where}: {type(e).__name__}: {first}"
            ) from e
    candidates = [attr] if attr else ["pair", "model"]
    for name in candidates:
        if hasattr(module, name):
            obj = getattr(module, name)
            if isinstance(obj, type):  # a class: instantiate with defaults
                try:
                    obj = obj()
                except Exception as e:
                    raise InputError(
                        f"model file {path_s!r}: {name}() failed{_user_line(e, path)}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    ) from e
            model = getattr(obj, "model", obj)
            if not callable(model):
                raise InputError(
                    f"model file {path_s!r}: {name} is a {type(obj).__name__}; expected a "
                    f"model function, a pair (an object with .model), or a class of one"
                )
            return obj, {"file": str(path), "name": name, "sha256": actual}
    want = attr or "'pair' or 'model'"
    raise InputError(f"model file {path_s!r} defines no {want}")


def _user_line(error: BaseException, path: Path) -> str:
    """`` (line N)`` for the innermost traceback frame in ``path``, or a syntax error's line."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    line = None
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


def user_file_error(error: BaseException, spec: dict[str, Any] | None) -> InputError | None:
    """An :class:`InputError` of one line when ``error`` was raised inside the user's model
    file named by ``spec`` (a model that raises on the data), else ``None`` (a fault of ours,
    which keeps its traceback)."""
    if not spec or "file" not in spec or isinstance(error, InputError):
        return None
    path = Path(spec["file"])
    tb, inside = error.__traceback__, False
    while tb is not None:
        inside = inside or Path(tb.tb_frame.f_code.co_filename) == path
        tb = tb.tb_next
    if not inside:
        return None
    first = str(error).splitlines()[0] if str(error) else ""
    return InputError(
        f"the model in {path.name}{_user_line(error, path)} raised {type(error).__name__}: "
        f"{first}; expected a model that runs on this data"
    )


def build_pair(spec: dict[str, Any], trust: bool = False) -> Any:
    """Rebuild a pair from the ``model_spec`` recorded in a Fit.

    A zoo model is rebuilt from the registry (no code from the run is run). A model from a
    user's file is imported only with ``trust=True`` and only when the file still has the
    content hash the fit recorded; otherwise :class:`InputError` asks for the pair."""
    if "zoo" in spec:
        try:
            return model_class(spec["zoo"])(**spec.get("settings", {}))
        except TypeError as e:
            raise InputError(f"cannot rebuild zoo model {spec['zoo']!r}: {e}") from e
    if "file" in spec:
        if not trust:
            raise InputError(
                f"this fit's model comes from the file {spec['file']!r}; loading a run never "
                f"runs code from it: pass the model (Fit.load(dir, pair=...)) or trust the "
                f"file (trust=True, --trust-model-file)"
            )
        digest = spec.get("sha256")
        if digest is None:
            raise InputError(
                f"this fit names the model file {spec['file']!r} without its content hash; "
                f"pass the model itself (Fit.load(dir, pair=...))"
            )
        obj, _ = load_user_object(f"{spec['file']}:{spec.get('name', '')}", digest=digest)
        return as_pair(obj)
    raise InputError(f"cannot rebuild a model from spec {spec!r}")
