"""Tables from disk, bound to a model's arguments.

Formats: CSV (UTF-8, with or without a byte-order mark, LF or CRLF; header optional: a first
row that is not all numbers is a header), ``.npy`` (one array) and ``.npz`` (named arrays).
When the header or the ``.npz`` keys name the model function's arguments, columns bind to
them by name (columns x, y → ``model(x=.., y=..)``); otherwise the whole table is the
model's first argument.

Precision: numbers are read as float64 and stay float64 unless the caller asks for another
floating dtype (``bind_arguments(..., dtype=torch.float32)``; the command line asks for the
engine's dtype). A cast that would overflow or flush a non-zero value to zero is refused,
naming the row and column; one that merges distinct values of a column is warned about
(:class:`PrecisionWarning`). Booleans become 0/1 floats; integers stay int64 (categories);
complex, text and object arrays are refused.
"""

from __future__ import annotations

import csv
import inspect
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = ["Table", "load_table", "bind_arguments", "model_arguments", "PrecisionWarning"]


class PrecisionWarning(UserWarning):
    """Casting the data to a narrower dtype merged values that differed."""


class Table:
    """Columns (or named arrays) read from a file: ``columns`` maps name -> array.

    :param header_lines: lines above the first data row of a CSV (0 or 1), so messages can
        name the line of a bad value; ``None`` for arrays.
    """

    def __init__(
        self,
        columns: dict[str, np.ndarray],
        named: bool,
        source: str,
        header_lines: int | None = None,
    ):
        self.columns = columns
        self.named = named  # True when names came from a header or .npz keys
        self.source = source
        self.header_lines = header_lines

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
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise InputError(f"{path}: binary content (NUL bytes); expected a CSV table of numbers")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first cell
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 (byte {e.start} is {raw[e.start : e.start + 1]!r}); expected "
            f"a UTF-8 CSV (re-save it as UTF-8)"
        ) from None
    try:
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from None
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
    return Table(
        {n: arr[:, j] for j, n in enumerate(names)},
        header is not None,
        str(path),
        header_lines=int(header is not None),
    )


def load_table(path: str | Path) -> Table:
    """Read a CSV, ``.npy`` or ``.npz`` file; errors name the file and what was expected."""
    p = Path(path)
    if p.is_dir():
        raise InputError(
            f"data file {str(path)!r} is a directory; expected a .csv, .npy or .npz file"
        )
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
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: cannot read as {suffix} ({first})") from e
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


def _where(table: Table, name: str, index: tuple[int, ...]) -> str:
    """``row 3 (line 4), column 'b'`` for a CSV; ``column 'x', index (2, 1)`` for arrays."""
    if table.header_lines is not None and index:
        row = index[0] + 1
        col = name if len(index) == 1 else list(table.columns)[index[1]]
        return f"row {row} (line {row + table.header_lines}), column {col!r}"
    return f"column {name!r}, index {tuple(int(i) for i in index)}"


def _tensor(a: np.ndarray, name: str, table: Table, dtype: torch.dtype | None) -> torch.Tensor:
    """One array as the tensor a model gets: see the module's note on precision."""
    source = table.source
    if a.ndim == 0:
        raise InputError(f"{source}: {name!r} is a single number; expected an array of rows")
    if a.shape[0] == 0:
        raise InputError(f"{source}: {name!r} has no rows; expected at least one")
    if a.dtype.kind in "iu":
        return torch.as_tensor(a.astype(np.int64, copy=False))
    if a.dtype.kind == "b":  # a bool table is 0/1 data (e.g. for a Bernoulli mixture)
        a = a.astype(np.float64)
    if a.dtype.kind != "f":
        raise InputError(
            f"{source}: {name!r} has dtype {a.dtype}; expected real numbers (float, int or bool)"
        )
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))
        raise InputError(
            f"{source}: {len(bad)} missing/NaN/inf value(s), the first at "
            f"{_where(table, name, tuple(bad[0]))} ({a[tuple(bad[0])]}); expected finite numbers"
        )
    target = dtype or (torch.float64 if a.dtype == np.float64 else torch.get_default_dtype())
    t = torch.as_tensor(a)
    if t.dtype == target:
        return t
    narrow = torch.finfo(target)
    wide = np.abs(a)
    for mask, what in (
        (wide > narrow.max, f"exceeds {target}'s range (±{narrow.max:.3g})"),
        (
            (wide > 0) & (wide < narrow.tiny),
            f"is below {target}'s smallest normal ({narrow.tiny:.3g})",
        ),
    ):
        if mask.any():
            i = tuple(np.argwhere(mask)[0])
            raise InputError(
                f"{source}: the value {a[i]:.6g} at {_where(table, name, i)} {what}; pass "
                f"--dtype float64 (or rescale the data)"
            )
    cast = t.to(target)
    if narrow.bits < torch.finfo(t.dtype).bits:
        flat = a.reshape(len(a), -1)
        narrowed = cast.numpy().reshape(len(a), -1)
        for j in range(flat.shape[1]):
            before, after = len(np.unique(flat[:, j])), len(np.unique(narrowed[:, j]))
            if after < before:
                col = (
                    list(table.columns)[j]
                    if table.header_lines is not None and flat.shape[1] > 1
                    else f"{name}[{j}]"
                )
                warnings.warn(
                    f"{source}: casting to {target} merges {before} distinct values of column "
                    f"{col!r} into {after}; pass --dtype float64 to keep them",
                    PrecisionWarning,
                    stacklevel=3,
                )
                break
    return cast


def bind_arguments(
    table: Table, model: Callable[..., Any], dtype: torch.dtype | None = None
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for ``model``: by name when every column names an argument, else
    the whole table (N, D) as the first argument.

    :param dtype: the floating dtype of the tensors; ``None`` keeps float64 data float64
        (and float32 arrays float32). Casts are checked (see the module's note)."""
    names = model_arguments(model)
    cols = table.columns
    if table.named and names and set(cols) <= set(names):
        return (), {k: _tensor(v, k, table, dtype) for k, v in cols.items()}
    if table.named and names and set(cols) & set(names):
        extra = sorted(set(cols) - set(names))
        raise InputError(
            f"{table.source}: columns {extra} name no argument of the model "
            f"(arguments: {names}); rename them or drop the header"
        )
    return (_tensor(table.matrix(), "table", table, dtype),), {}
