"""Engine settings: one frozen dataclass per engine, every value checked in one place.

An engine declares its settings as a subclass of :class:`Settings` whose fields are made with
:func:`setting`, each naming the check its value must pass::

    @dataclass(frozen=True)
    class SVISettings(Settings):
        owner: ClassVar[str] = "SVI"
        steps: int = setting(1000, positive_int)
        lr: float = setting(0.01, positive_float)

Construction runs every field's check (which may also normalise the value, e.g. ``2.0`` ->
``2`` for an integer setting), then :meth:`Settings.validate` for rules that tie fields
together. A bad value raises :class:`~jointkl.errors.InputError` naming the owner, the setting,
what was expected and what was given — before any work starts.

The checks are plain functions ``check(value, where) -> value`` and are the one set of
validators the package uses (engines, models and networks alike).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = [
    "Settings",
    "setting",
    "Check",
    "is_number",
    "number",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "integer",
    "boolean",
    "one_of",
    "optional",
    "or_callable",
    "function",
    "path_or_none",
    "compute_device",
    "check_all",
]

Check = Callable[[Any, str], Any]


# ---------------------------------------------------------------------- the checks
def is_number(value: Any) -> bool:
    """A finite real number (Python or NumPy int or float; not a bool)."""
    return (
        isinstance(value, Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
    )


def _is_whole(value: Any) -> bool:
    # within int64: torch's seeds and counters are 64-bit, so 1e300 is no usable count
    return is_number(value) and float(value).is_integer() and abs(float(value)) < 2.0**63


def number(value: Any, where: str) -> float:
    """Any finite real number, as a float."""
    if not is_number(value):
        raise InputError(f"{where} must be a number, got {value!r}")
    return float(value)


def positive_int(value: Any, where: str) -> int:
    """A whole number > 0 (``2.0`` is accepted as ``2``; ``2.5`` and ``True`` are not)."""
    if not _is_whole(value) or value <= 0:
        raise InputError(f"{where} must be a positive int, got {value!r}")
    return int(value)


def nonnegative_int(value: Any, where: str) -> int:
    """A whole number >= 0."""
    if not _is_whole(value) or value < 0:
        raise InputError(f"{where} must be an int >= 0, got {value!r}")
    return int(value)


def integer(value: Any, where: str) -> int:
    """Any whole number (a seed, an offset)."""
    if not _is_whole(value):
        raise InputError(f"{where} must be an integer, got {value!r}")
    return int(value)


def positive_float(value: Any, where: str) -> float:
    """A finite real number > 0."""
    if not is_number(value) or value <= 0:
        raise InputError(f"{where} must be a positive float, got {value!r}")
    return float(value)


def nonnegative_float(value: Any, where: str) -> float:
    """A finite real number >= 0."""
    if not is_number(value) or value < 0:
        raise InputError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where} must be true or false, got {value!r}")
    return value


def one_of(*choices: Any) -> Check:
    """A check that the value is one of ``choices`` (compared with ``==``)."""

    def check(value: Any, where: str) -> Any:
        if value not in choices:
            raise InputError(f"{where} must be one of {choices}, got {value!r}")
        return value

    check.__name__ = f"one_of{choices}"
    return check


def _widened(error: InputError, alternative: str) -> InputError:
    # "X must be a positive int, got 0" -> "X must be a positive int or None, got 0": the
    # message keeps its "<name> must be <what>" fragment and names the alternative too.
    head, sep, tail = str(error).rpartition(", got ")
    return InputError(f"{head} {alternative}{sep}{tail}" if sep else f"{error} ({alternative})")


def optional(check: Check) -> Check:
    """``None``, or a value that passes ``check``."""

    def optional_check(value: Any, where: str) -> Any:
        if value is None:
            return None
        try:
            return check(value, where)
        except InputError as e:
            raise _widened(e, "or None") from None

    return optional_check


def or_callable(check: Check) -> Check:
    """A callable (kept as it is), or a value that passes ``check``."""

    def callable_check(value: Any, where: str) -> Any:
        if callable(value):
            return value
        try:
            return check(value, where)
        except InputError as e:
            raise _widened(e, "or a callable") from None

    return callable_check


def function(value: Any, where: str) -> Any:
    """A callable (a callback, a loss), kept as it is."""
    if not callable(value):
        raise InputError(f"{where} must be a callable, got {value!r}")
    return value


def path_or_none(value: Any, where: str) -> str | None:
    """A folder or file path (str or ``Path``), kept as a str, or ``None``."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        raise InputError(f"{where} must be a path or None, got {value!r}")
    return str(value)


def compute_device(value: Any, where: str) -> str | None:
    """A compute device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when
    ``torch.cuda.is_available()``, else the CPU) or ``None`` (the caller's default), kept as
    the normalised string (a ``torch.device`` is accepted as its string). ``"cuda"`` on a machine without CUDA, and
    ``"cuda:N"`` beyond the visible devices, are refused here, before any work starts."""
    expected = "'cpu', 'cuda', 'cuda:N', 'auto' or None"
    if value is None:
        return None
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"{where} must be {expected}, got {value!r}")
    text = value.strip().lower()
    kind, sep, index = text.partition(":")
    if not (text in ("cpu", "cuda", "auto") or (kind == "cuda" and sep and index.isdigit())):
        raise InputError(f"{where} must be {expected}, got {value!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{where} {text!r} requested but torch.cuda.is_available() is False")
        if sep and int(index) >= torch.cuda.device_count():
            raise InputError(
                f"{where} {text!r} requested but torch.cuda.device_count() is "
                f"{torch.cuda.device_count()} (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    return text


# ---------------------------------------------------------------------- the dataclass
def setting(default: Any, check: Check | None = None, *, json: bool = True) -> Any:
    """A settings field: its default and the check every value must pass.

    :param json: ``False`` for in-memory objects (callbacks) that are not recorded in a
        fit's config.
    """
    meta = {"check": check, "json": json}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every engine's settings: frozen, checked at construction, JSON on demand."""

    owner: ClassVar[str] = "settings"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                value = check(getattr(self, f.name), f"{self.owner}: {f.name}")
                object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Rules that tie settings together; raise :class:`InputError`. Default: none."""

    def fail(self, message: str) -> None:
        """Raise the InputError of a cross-field rule, prefixed with the owner."""
        raise InputError(f"{self.owner}: {message}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        """The settings a user may give (the constructor's keyword arguments)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def default(cls, name: str) -> Any:
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values, as a Fit records them: callables become
        ``"callable"``, dtypes their name, other objects their class name."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("json", True):
                continue
            out[f.name] = _json_value(getattr(self, f.name))
        return out


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if callable(value) and not isinstance(value, type):
        return "callable"
    return type(value).__name__


def check_all(values: Iterable[tuple[str, Any, Check]], owner: str) -> list[Any]:
    """Run ``check(value, "owner: name")`` for each ``(name, value, check)``; the checked
    values in order. For constructors that are not engines (models, networks)."""
    return [check(value, f"{owner}: {name}") for name, value, check in values]
