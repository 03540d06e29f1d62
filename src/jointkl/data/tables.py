"""Tables from disk, bound to a model's arguments.

Formats: CSV (header optional: a first row that is not all numbers is a header), ``.npy``
(one array) and ``.npz`` (named arrays). When the header or the ``.npz`` keys name the
model function's arguments, columns bind to them by name (columns x, y → ``model(x=..,
y=..)``); otherwise the whole table is the model's first argument.
"""

from __future__ import annotations

import csv
import inspect
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = ["Table", "load_table", "bind_arguments", "model_arguments"]


class Table:
    """Columns (or named arrays) read from a file: ``columns`` maps name -> array."""

    def __init__(self, columns: dict[str, np.ndarray], named: bool, source: str):
        self.columns = columns
        self.named = named  # True when names came from a header or .npz keys
        self.source = source

    def matrix(self) -> np.ndarray:
        arrays = list(self.columns.values())
        if len(arrays) == 1:
            return arrays[0]
        if any(a.ndim != 1 for a in arrays):
            raise InputError(f"{self.source}: arrays of different ranks cannot form one table")
        return np.stack(arrays, axis=1)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> Table:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: the file is empty; expected a CSV table of numbers")
    header = None
    if not all(_is_number(c) for c in rows[0]):
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
        if len(set(header)) != len(header):
            raise InputError(f"{path}: duplicate column names in the header {header}")
    if not rows:
        raise InputError(f"{path}: the header has no data rows below it")
    width = len(header) if header else len(rows[0])
    data = []
    for i, r in enumerate(rows):
        line = i + 1 + (header is not None)
        if len(r) != width:
            raise InputError(f"{path}: line {line} has {len(r)} columns, expected {width}")
        try:
            data.append([float(c) if c.strip() else np.nan for c in r])
        except ValueError as e:
            raise InputError(f"{path}: line {line} has a non-numeric value ({e})") from e
    arr = np.asarray(data, dtype=np.float64)
    names = header or [f"x{j}" for j in range(width)]
    return Table({n: arr[:, j] for j, n in enumerate(names)}, header is not None, str(path))


def load_table(path: str | Path) -> Table:
    """Read a CSV, ``.npy`` or ``.npz`` file; errors name the file and what was expected."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {str(path)!r} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            return _read_csv(p)
        if suffix == ".npy":
            return Table({"x": np.load(p, allow_pickle=False)}, False, str(p))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
            if not cols:
                raise InputError(f"{p}: the .npz archive holds no arrays")
            return Table(cols, True, str(p))
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{p}: cannot read as {suffix} ({e})") from e
    raise InputError(
        f"data file {str(path)!r}: unknown format {suffix!r}; expected .csv, .npy, .npz"
    )


def model_arguments(model: Callable[..., Any]) -> list[str]:
    """The names of the model function's positional-or-keyword parameters."""
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in sig.parameters.items() if p.kind in kinds]


def _tensor(a: np.ndarray, name: str, source: str) -> torch.Tensor:
    if a.dtype.kind in "iub":
        return torch.as_tensor(a)
    if a.dtype.kind != "f":
        raise InputError(f"{source}: column {name!r} has dtype {a.dtype}, expected numbers")
    t = torch.as_tensor(a, dtype=torch.get_default_dtype())
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{source}: column {name!r} has {bad} missing/NaN/inf value(s)")
    return t


def bind_arguments(table: Table, model: Callable[..., Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for ``model``: by name when every column names an argument, else
    the whole table (N, D) as the first argument."""
    names = model_arguments(model)
    cols = table.columns
    if table.named and names and set(cols) <= set(names):
        return (), {k: _tensor(v, k, table.source) for k, v in cols.items()}
    if table.named and names and set(cols) & set(names):
        extra = sorted(set(cols) - set(names))
        raise InputError(
            f"{table.source}: columns {extra} name no argument of the model "
            f"(arguments: {names}); rename them or drop the header"
        )
    return (_tensor(table.matrix(), "table", table.source),), {}
