"""Run directories and atomic file writes.

A run directory (``runs/<name>/``) holds ``config.json``, ``metrics.jsonl`` (objective per
step), ``checkpoints/``, the fit (``fit.json`` + ``tensors.pt``), ``inference_data.nc`` and
``plots/*.png``. Every file is written to a temporary file in the same directory and then
renamed, so a crash never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_save_tensors",
    "load_tensors",
    "latest_checkpoint",
    "RunDir",
]

CHECKPOINT_PATTERN = "step-*.pt"


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    return _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save_tensors(obj: Any, path: str | Path) -> Path:
    """``torch.save`` of tensors and plain containers only (loadable with weights_only=True)."""
    return _atomic(Path(path), lambda f: torch.save(obj, f))


def load_tensors(path: str | Path) -> Any:
    """Load a file written by :func:`atomic_save_tensors`, never unpickling arbitrary objects."""
    return torch.load(Path(path), weights_only=True, map_location="cpu")


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The checkpoint (``step-XXXXXXXX.pt``) with the highest step in ``folder``, or
    ``None`` when there is none."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(folder.glob(CHECKPOINT_PATTERN))
    return found[-1] if found else None


class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/``, plots, netCDF."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def inference_data(self) -> Path:
        return self.path / "inference_data.nc"

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return atomic_write_text(
            json.dumps(config, indent=2, default=str), self.path / "config.json"
        )

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> Path:
        text = "".join(json.dumps(dict(r)) + "\n" for r in rows)
        return atomic_write_text(text, self.path / "metrics.jsonl")

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)
