"""What each setting of an engine or a zoo model means: its default and one line of text.

``jointkl engines NAME`` and ``jointkl models NAME`` print these rows. The meaning of a
setting is read, in this order, from

1. the ``"doc"`` entry of its :class:`~jointkl.settings.Settings` field's metadata (engines);
2. the ``:param name:`` line of the class docstring (Sphinx style, also ``:param type name:``,
   several names sharing one line as ``:param a, b:``, and text continued on the following,
   more indented lines), engine class first, then its ``Settings`` class.

A setting with neither has the meaning ``None``; the tests require that no registered engine
or model has one.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["SettingDoc", "param_docs", "engine_settings", "model_settings", "plain_text"]

# ":param name:", ":param int name:", ":param a, b:", ":param Optional[int] name:"
_PARAM = re.compile(r"^\s*:param\s+(?P<head>[^:]+):\s*(?P<text>.*)$")


@dataclass(frozen=True)
class SettingDoc:
    """One setting: its name, its default (as the user would type it) and its meaning."""

    name: str
    default: Any
    meaning: str | None
    cli: bool = True  # False: Python only (a callable), not settable with --set


def _names(head: str) -> list[str]:
    """The parameter names of a ``:param ...:`` head: the last word of each comma-separated
    part (``"int steps"`` -> ``steps``; ``"args, kwargs"`` -> ``args``, ``kwargs``)."""
    names = []
    for part in head.split(","):
        words = part.strip().split()
        if words and words[-1].isidentifier():
            names.append(words[-1])
    return names


def param_docs(obj: Any) -> dict[str, str]:
    """``{name: text}`` of the ``:param name: text`` fields in ``obj``'s docstring, each
    field's continuation lines joined into one line (whitespace collapsed)."""
    doc = inspect.getdoc(obj) or ""
    out: dict[str, str] = {}
    current: list[str] | None = None
    names: list[str] = []
    indent = 0

    def flush() -> None:
        if current is not None:
            text = " ".join(" ".join(current).split())
            for n in names:
                out.setdefault(n, text)

    for line in doc.splitlines():
        m = _PARAM.match(line)
        if m:
            flush()
            names = _names(m.group("head"))
            current = [m.group("text")]
            indent = len(line) - len(line.lstrip())
            continue
        if current is None:
            continue
        stripped = line.strip()
        more_indented = len(line) - len(line.lstrip()) > indent
        # a continuation is more indented than its ":param" (it may itself begin with a
        # role such as ":mod:`x`"); a blank or a less indented line ends the field
        if not stripped or not more_indented:
            flush()
            current, names = None, []
            continue
        current.append(stripped)
    flush()
    return out


def plain_text(text: str) -> str:
    """A docstring fragment as terminal text: Sphinx roles (``:data:`~a.b```) become their
    target (``a.b``) and double back-quotes single ones."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


def _meaning(name: str, metadata: Any, docs: dict[str, str]) -> str | None:
    doc = (metadata or {}).get("doc") if metadata is not None else None
    return doc or docs.get(name)


def engine_settings(engine_cls: type) -> list[SettingDoc]:
    """Every field of ``engine_cls.Settings``, with its default and meaning."""
    settings_cls = engine_cls.Settings
    docs = {**param_docs(settings_cls), **param_docs(engine_cls)}
    rows = []
    for f in dataclasses.fields(settings_cls):
        default = settings_cls.default(f.name)
        python_only = f.name == "on_step" or (not f.metadata.get("json", True) and default is None)
        rows.append(
            SettingDoc(
                f.name,
                _shown(default),
                _meaning(f.name, f.metadata, docs),
                cli=not python_only,
            )
        )
    return rows


def model_settings(model_cls: type) -> list[SettingDoc]:
    """Every constructor parameter of a zoo model class, with its default and meaning."""
    docs = param_docs(model_cls)
    rows = []
    for name, p in inspect.signature(model_cls).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = "(required)" if p.default is p.empty else _shown(p.default)
        rows.append(SettingDoc(name, default, docs.get(name)))
    return rows


def _shown(value: Any) -> Any:
    """A default as ``--set`` would take it: JSON-like (tuples as lists, dtypes by name)."""
    import torch

    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return [_shown(v) for v in value]
    return value
