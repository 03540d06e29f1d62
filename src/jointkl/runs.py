"""Run directories and atomic file writes.

A run directory (``runs/<name>/``) holds ``config.json``, ``metrics.jsonl`` (objective per
step), ``checkpoints/``, the fit (``fit.json`` + ``tensors.pt``), ``inference_data.nc`` and
``plots/*.png``. Every file is written to a temporary file in the same directory and then
renamed, so a crash never leaves a half-written file where a good one was.

A run directory belongs to one run (:meth:`RunDir.claim`): a new run goes into a folder that
is absent or empty; replacing an existing run (``--overwrite``) builds the new one in a
sibling folder and swaps it in only when it succeeded, so a failed run never damages a good
one; continuing one (``--resume``) works in place and rewrites ``config.json`` only at the
end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from jointkl.errors import InputError

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_save_tensors",
    "load_tensors",
    "checkpoint_files",
    "latest_checkpoint",
    "unreadable_reason",
    "file_digest",
    "tensor_digest",
    "RunDir",
]

CHECKPOINT_PATTERN = "step-*.pt"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes its file 0600; a run's files get the mode any other new file would (0644
# under the usual umask), like inference_data.nc, which its library writes.
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
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


def checkpoint_files(folder: str | Path | None) -> list[Path]:
    """The checkpoints (``step-XXXXXXXX.pt``) in ``folder``, oldest step first."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(Path(folder).glob(CHECKPOINT_PATTERN))


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` is not an intact ``torch.save`` archive (truncated, corrupted, not a
    zip), or ``None`` when every member's checksum holds. Reads the file; unpickles nothing."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # zlib errors and the like from a corrupted member
        return f"{type(e).__name__}: {e}"
    return None if bad is None else f"member {bad} fails its checksum"


class CheckpointSkipped(UserWarning):
    """A newer checkpoint could not be read and an older one is used instead."""


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The newest checkpoint in ``folder`` that is intact, or ``None`` when there is none.

    A newer one that is truncated or corrupted (a disk filled up, a copy cut short) is
    skipped with a :class:`CheckpointSkipped` warning naming it and the one used instead."""
    skipped = []
    for path in reversed(checkpoint_files(folder)):
        why = unreadable_reason(path)
        if why is None:
            if skipped:
                warnings.warn(
                    f"checkpoint(s) {', '.join(skipped)} unreadable; using {path.name}",
                    CheckpointSkipped,
                    stacklevel=2,
                )
            return path
        skipped.append(f"{path.name} ({why})")
    if skipped:
        warnings.warn(
            f"no readable checkpoint: {', '.join(skipped)}", CheckpointSkipped, stacklevel=2
        )
    return None


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def tensor_digest(args: tuple, kwargs: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of bound data: every tensor's name, dtype, shape and bytes, a
    memory-mapped :class:`~jointkl.data.arrays.RowArray`'s fingerprint (size, mtime, first
    and last MiB of each file: it is never read whole for this), and the repr of other
    values, so a resume can tell whether it sees the same data."""
    h = hashlib.sha256()
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + sorted(kwargs.items())
    for name, a in items:
        h.update(name.encode())
        fingerprint = getattr(a, "fingerprint", None)
        if callable(fingerprint):  # rows of a memory-mapped file: its fingerprint, not all bytes
            h.update(fingerprint()["digest"].encode())
        elif isinstance(a, torch.Tensor):
            t = a.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
                t = t.float()
            h.update(t.numpy().tobytes())
        else:
            h.update(repr(a).encode())
    return f"sha256:{h.hexdigest()}"


class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/``, plots, netCDF.

    :param path: the folder the run is built in (for a run being replaced, a sibling of
        ``final``; the swap happens in :meth:`commit`).
    :param final: where the run ends up (default: ``path``).
    """

    def __init__(self, path: str | Path, final: str | Path | None = None):
        self.path = Path(path)
        self.final = Path(final) if final is not None else self.path
        self.created = False  # this process made the folder (so may remove it on failure)

    def create(self) -> RunDir:
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ ownership
    @staticmethod
    def holds_run(path: str | Path) -> bool:
        """Whether ``path`` is a run directory (it has a ``config.json`` or ``fit.json``)."""
        p = Path(path)
        return p.is_dir() and ((p / "config.json").is_file() or (p / "fit.json").is_file())

    @staticmethod
    def check_out(path: str | Path) -> Path:
        """Refuse an ``--out`` that names a file, or lies under one, before anything is
        written."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise InputError(f"--out {str(path)!r} is an existing file; expected a directory")
        for parent in p.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(
                        f"--out {str(path)!r}: {str(parent)!r} is a file, not a directory"
                    )
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise InputError(
                        f"--out {str(path)!r}: cannot write in {str(parent)!r} "
                        f"(permission denied); expected a writable directory"
                    )
                break
        return p

    @classmethod
    def claim(cls, path: str | Path, resume: bool, overwrite: bool) -> RunDir:
        """The run directory a new run (or a resumed one) writes to, by the one-run rule:

        * ``resume``: ``path`` must hold a run; it is continued in place;
        * absent or empty: the run is built there;
        * holding a run: refused, unless ``overwrite``, when the run is built in a hidden
          sibling and swapped in by :meth:`commit` (the old one stays until then);
        * anything else (a folder of other files): refused.

        Nothing is created here; :meth:`create` does that once every check has passed."""
        p = cls.check_out(path)
        if resume:
            if overwrite:
                raise InputError("--resume and --overwrite exclude each other; choose one")
            if not cls.holds_run(p):
                raise InputError(
                    f"--resume: {str(path)!r} holds no run (no config.json); expected the run "
                    f"directory of an earlier fit"
                )
            if not (p / "config.json").is_file():
                raise InputError(f"--resume: {str(path)!r} has no config.json to resume from")
            return cls(p)
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return cls(p)
        if not cls.holds_run(p):
            raise InputError(
                f"--out {str(path)!r} exists and is not a run directory (no config.json); "
                f"expected a new or empty directory"
            )
        if not overwrite:
            raise InputError(
                f"--out {str(path)!r} already holds a run; pass --resume to continue it or "
                f"--overwrite to replace it"
            )
        work = p.parent / f".{p.name}.new-{os.getpid()}"
        if work.exists():
            shutil.rmtree(work)
        return cls(work, final=p)

    @property
    def replacing(self) -> bool:
        return self.path != self.final

    def commit(self) -> RunDir:
        """Put a run built beside its destination in place of the old one (two renames; the
        old run is removed only after the new one is in place)."""
        if not self.replacing:
            return self
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        os.replace(self.final, old)
        os.replace(self.path, self.final)
        shutil.rmtree(old, ignore_errors=True)
        self.path = self.final
        return self

    def discard(self) -> None:
        """After a failed run: remove a replacement being built, or a folder this process
        created that holds no checkpoint yet (nothing worth resuming); else leave it."""
        if self.replacing:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.created and not checkpoint_files(self.checkpoints):
            shutil.rmtree(self.path, ignore_errors=True)

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
