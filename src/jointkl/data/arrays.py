"""Data larger than memory: a memory-mapped ``.npy`` file, or a folder of ``.npy`` shards, read
as one array of rows.

:func:`open_rows` maps each file with ``np.load(path, mmap_mode="r")`` (nothing is read but
the header) and returns a :class:`RowArray`: ``.shape``, ``.dtype``, ``len()``, ``x[a:b]``
(rows, across shard boundaries) and ``x[index_array]`` (a gather of any rows, as a
mini-batch takes them), each returning an ordinary NumPy array. The engines that stream take
it in place of a tensor: SVI and NCE gather each mini-batch's rows, EM reads full passes in
blocks (``x[a:b]``).

Shards: every ``*.npy`` file directly inside the folder, in sorted file-name order (names
sort as strings: zero-pad numbers, ``part-00002.npy`` before ``part-00010.npy``), each
non-empty, C-ordered, with the same dtype and the same shape past the first dimension; row i
of the whole is row i − offset_k of shard k.

Memory: a page of a mapped file that the process has read counts in its resident set until
the process lets it go, so every read copies its rows out and then tells the kernel the
pages are no longer needed (``madvise(MADV_DONTNEED)``); they stay in the page cache, free
for the kernel to keep or drop, and the process's resident memory stays that of the copied
rows, not of the file.

Validation, at :func:`open_rows`: the files, their dtype (real, integer or bool), shapes and
order are checked from the headers; a float array is then read once, in blocks of
:data:`BLOCK_BYTES`, for NaN/inf (every value, no sampling) and for the range a narrower
dtype would need (:meth:`RowArray.astype`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointkl.errors import InputError

__all__ = ["BLOCK_BYTES", "RowArray", "is_row_array", "open_rows"]

BLOCK_BYTES = 8 << 20  # bytes per streamed block: big enough to read fast, small beside memory
_FINGERPRINT_BYTES = 1 << 20  # the head and tail hashed by RowArray.fingerprint


def is_row_array(value: Any) -> bool:
    """Whether ``value`` is a :class:`RowArray` (data the engines stream, not a tensor)."""
    return isinstance(value, RowArray)


def _release(array: np.ndarray) -> None:
    """Drop the process's mapping of a memory-mapped array's pages (they stay in the page
    cache): the resident set then holds what was copied out, not the file."""
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            raw.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, or a platform without it: harmless
            pass


def _open_shard(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{path}: cannot read as .npy ({first}); expected a NumPy array file"
        ) from e
    if not isinstance(array, np.memmap):  # np.load maps every non-empty, non-object array
        raise InputError(f"{path}: cannot be memory-mapped; expected a plain .npy array")
    if array.ndim == 0:
        raise InputError(f"{path}: holds a single number; expected an array of rows")
    if len(array) == 0:
        raise InputError(f"{path}: has no rows; expected at least one (remove empty shards)")
    if array.dtype.kind not in "fiub":
        raise InputError(f"{path}: has dtype {array.dtype}; expected real numbers, int or bool")
    if array.ndim > 1 and not array.flags.c_contiguous:
        raise InputError(
            f"{path}: stored in Fortran order, so a row is spread over the whole file; expected "
            f"C order (save it with np.save(path, np.ascontiguousarray(x)))"
        )
    return array


def open_rows(path: str | Path) -> RowArray:
    """Map a ``.npy`` file, or every ``*.npy`` file of a folder (the shards), as one
    :class:`RowArray`; checks what the module's note says, each failure one
    :class:`InputError` naming the file and what was expected.

    :param path: a ``.npy`` file or a folder of ``.npy`` shards.
    """
    p = Path(path)
    if p.is_dir():
        paths = sorted(q for q in p.iterdir() if q.suffix.lower() == ".npy" and q.is_file())
        if not paths:
            raise InputError(f"{p}: the folder holds no .npy files; expected .npy shards")
    elif p.is_file():
        if p.suffix.lower() != ".npy":
            raise InputError(f"{p}: not a .npy file; expected a .npy file or a folder of them")
        paths = [p]
    else:
        raise InputError(f"data {str(path)!r} not found")
    shards = [_open_shard(q) for q in paths]
    first, ref = shards[0], paths[0]
    for q, a in zip(paths[1:], shards[1:], strict=True):
        if a.dtype != first.dtype or a.shape[1:] != first.shape[1:]:
            raise InputError(
                f"{q}: dtype {a.dtype} and row shape {a.shape[1:]}; expected {first.dtype} and "
                f"{first.shape[1:]} as in {ref.name} (every shard alike)"
            )
    rows = RowArray(shards, paths, str(p))
    rows._scan()
    return rows


class RowArray:
    """Rows of one or more memory-mapped ``.npy`` files, read as one array (see the module).

    Reads return NumPy arrays in :attr:`dtype` (the stored dtype, or the one chosen with
    :meth:`astype`); :meth:`tensor` returns the rows as a tensor on :attr:`device`.

    :param shards: the mapped arrays, in order.
    :param paths: their files.
    :param source: the path the user gave (a file or a folder).
    """

    def __init__(self, shards: list[np.ndarray], paths: list[Path], source: str):
        self.shards, self.paths, self.source = shards, paths, source
        self.stored_dtype = shards[0].dtype
        # bool rows are 0/1 data (a Bernoulli mixture): floats, as the table loader makes them
        native = self.stored_dtype.newbyteorder("=")  # torch takes native byte order only
        self.dtype = np.dtype(np.float64) if native.kind == "b" else native
        if self.dtype.kind in "iu":
            self.dtype = np.dtype(np.int64)  # category ids, as the table loader keeps them
        self.device: torch.device | None = None
        sizes = [len(a) for a in shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape: tuple[int, ...] = (int(self.offsets[-1]), *shards[0].shape[1:])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.stored_dtype.itemsize
        self.range: tuple[float, float] | None = None  # (largest |x|, smallest non-zero |x|)
        # bytes of pages mapped in since the last release, shared by every view of these files
        self._mapped = {"bytes": 0}

    # ------------------------------------------------------------------ array protocol
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (all shards)."""
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        files = f"{len(self.paths)} shards" if len(self.paths) > 1 else "memory-mapped"
        return f"RowArray({self.source!r}, shape={self.shape}, dtype={self.dtype}, {files})"

    def __getitem__(self, key: Any) -> np.ndarray:
        """``x[i]`` (one row), ``x[a:b]`` (rows, across shards), ``x[index_array]`` (a gather,
        any order and repeats), each with an optional index into the row after it."""
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = (
                self._range(start, stop)
                if step == 1
                else self._gather(np.arange(start, stop, step, dtype=np.int64))
            )
        elif isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {int(key)} is out of range for {len(self)} rows")
            out = self._range(i, i + 1)[0]
        else:
            if isinstance(key, torch.Tensor):
                key = key.detach().cpu().numpy()
            idx = np.asarray(key)
            if idx.dtype.kind not in "iu" or idx.ndim != 1:
                raise IndexError(f"rows are indexed by a 1-D integer array, got {idx.dtype}")
            out = self._gather(idx.astype(np.int64, copy=False))
        return out[(slice(None), *rest)] if rest else out

    def tensor(self, key: Any) -> torch.Tensor:
        """The rows ``x[key]`` as a tensor on :attr:`device` (the CPU when ``None``)."""
        t = torch.from_numpy(np.ascontiguousarray(self[key]))
        return t if self.device is None else t.to(self.device)

    # ------------------------------------------------------------------ views
    def _view(self) -> RowArray:
        view = RowArray.__new__(RowArray)
        view.__dict__.update(self.__dict__)
        return view

    def to(self, device: torch.device | str | None) -> RowArray:
        """The same rows, read as tensors on ``device`` by :meth:`tensor`."""
        view = self._view()
        view.device = None if device is None else torch.device(device)
        return view

    def astype(self, dtype: np.dtype | torch.dtype | type) -> RowArray:
        """The same rows read as floating ``dtype`` (integer rows stay int64). A cast that
        would overflow or flush a non-zero value to zero is refused (checked against the
        range read at :func:`open_rows`); one that merges distinct values is warned about,
        judged on the first block of rows (a whole-file count of distinct values would not
        stream)."""
        if isinstance(dtype, torch.dtype):
            dtype = torch.empty((), dtype=dtype).numpy().dtype
        target = np.dtype(dtype)
        if self.dtype.kind in "iu" or target == self.dtype:
            return self
        view = self._view()
        view.dtype = target
        if self.range is not None and target.itemsize < self.dtype.itemsize:
            info = np.finfo(target)
            big, small = self.range
            if big > float(info.max):
                raise InputError(
                    f"{self.source}: a value of magnitude {big:.6g} exceeds {target}'s range "
                    f"(±{info.max:.3g}); pass --dtype float64 (or rescale the data)"
                )
            if 0 < small < float(info.tiny):
                raise InputError(
                    f"{self.source}: a value of magnitude {small:.6g} is below {target}'s "
                    f"smallest normal ({info.tiny:.3g}); pass --dtype float64 (or rescale)"
                )
            head = self._range(0, min(len(self), self._block_rows()))
            flat = head.reshape(len(head), -1)
            narrowed = flat.astype(target).astype(self.dtype)
            for j in range(flat.shape[1]):
                before, after = len(np.unique(flat[:, j])), len(np.unique(narrowed[:, j]))
                if after < before:
                    warnings.warn(
                        f"{self.source}: casting to {target} merges {before} distinct values of "
                        f"column {j} into {after} (in the first {len(head)} rows); pass --dtype "
                        f"float64 to keep them",
                        _precision_warning(),
                        stacklevel=2,
                    )
                    break
        return view

    # ------------------------------------------------------------------ reading
    def _block_rows(self) -> int:
        return max(1, BLOCK_BYTES // max(1, self.row_bytes))

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, x[start:start + rows])`` over the whole array, in order; ``rows``
        defaults to :data:`BLOCK_BYTES` worth."""
        step = rows or self._block_rows()
        for start in range(0, len(self), step):
            yield start, self._range(start, min(len(self), start + step))

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        if stop <= start:
            return out
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        k = first
        while k < len(self.shards) and self.offsets[k] < stop:
            lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            shard = self.shards[k]
            out[lo - start : hi - start] = shard[lo - self.offsets[k] : hi - self.offsets[k]]
            k += 1
        self._mapped_in((stop - start) * self.row_bytes)
        return out

    def _mapped_in(self, nbytes: int) -> None:
        """Count pages read through the maps; past :data:`BLOCK_BYTES`, let them all go.
        Releasing after every read would fault the same pages in again on the next one
        (ten times slower for small gathers); releasing per block bounds the resident
        share of the files by one block."""
        self._mapped["bytes"] += nbytes
        if self._mapped["bytes"] >= BLOCK_BYTES:
            for shard in self.shards:
                _release(shard)
            self._mapped["bytes"] = 0

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"a row index is out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        # Read in file order (sorted), so each shard is opened once and read front to back;
        # the rows are put back in the order asked for, so a batch is the same tensor as an
        # in-memory one. Scattered rows are read with pread, not through the map: a page
        # fault on a mapped file maps its neighbours too (64 KiB of them), so a few thousand
        # scattered rows would put most of a file in the resident set.
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        shard_of = np.searchsorted(self.offsets, ordered, side="right") - 1
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        # rows land in their asked-for place at once when no cast is needed (one copy)
        direct = self.dtype == self.stored_dtype
        stored = out if direct else np.empty(out.shape, dtype=self.stored_dtype)
        place = order.tolist() if direct else range(len(idx))
        view = memoryview(stored.reshape(-1).view(np.uint8))
        rb = self.row_bytes
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for k in np.unique(shard_of):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            base = int(self.shards[k].offset)
            local = (ordered[lo:hi] - self.offsets[k]).tolist()
            with open(self.paths[k], "rb", buffering=0) as f:
                fd = f.fileno()
                for j, r in enumerate(local, start=lo):
                    at = place[j]
                    got = os.preadv(fd, [view[at * rb : (at + 1) * rb]], base + r * rb)
                    if got != rb:
                        raise InputError(f"{self.paths[k]}: row {r} is cut short (file truncated?)")
        if not direct:
            out[order] = stored
        return out

    def _scan(self) -> None:
        """Read every value once, in blocks: refuse NaN/inf (naming the file and row) and
        note the range a narrower dtype must hold."""
        if self.stored_dtype.kind != "f":
            return
        big, small = 0.0, np.inf
        step = max(1, self._block_rows() // 4)  # a quarter block: the scan's copies are small
        scratch = np.empty((step, *self.shape[1:]), dtype=self.stored_dtype)  # one buffer
        for k, (path, shard) in enumerate(zip(self.paths, self.shards, strict=True)):
            for lo in range(0, len(shard), step):
                block = shard[lo : lo + step]
                finite = np.isfinite(block)
                if not finite.all():
                    bad = np.argwhere(~finite)
                    first = (lo + int(bad[0][0]), *(int(i) for i in bad[0][1:]))
                    _release(shard)
                    raise InputError(
                        f"{path}: {len(bad)} NaN/inf value(s) in rows {lo}-{lo + len(block) - 1}, "
                        f"the first at index {first} (row {first[0] + int(self.offsets[k])} of "
                        f"the whole); expected finite numbers"
                    )
                mag = np.abs(block, out=scratch[: len(block)])
                big = max(big, float(mag.max()))
                small = min(small, float(np.min(mag, where=mag > 0, initial=np.inf)))
                _release(shard)
        self.range = (big, small if np.isfinite(small) else 0.0)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """What a run records of its data without reading them all: the source, shape and
        dtype, and per file its size, modification time and the SHA-256 of its first and
        last :data:`_FINGERPRINT_BYTES` (a changed header, start or end, a resized or
        rewritten file is caught; a change in the middle that keeps size and mtime is
        not). ``digest`` hashes all of it."""
        files = []
        for path in self.paths:
            stat = path.stat()
            h = hashlib.sha256()
            with open(path, "rb") as f:
                h.update(f.read(_FINGERPRINT_BYTES))
                f.seek(max(0, stat.st_size - _FINGERPRINT_BYTES))
                h.update(f.read(_FINGERPRINT_BYTES))
            files.append(
                {
                    "name": path.name,
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "head_tail_sha256": h.hexdigest(),
                }
            )
        out = {
            "path": str(Path(self.source).resolve()),
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "stored_dtype": str(self.stored_dtype),
            "files": files,
        }
        digest = hashlib.sha256(repr(sorted(out.items())).encode()).hexdigest()
        return {**out, "digest": f"sha256:{digest}"}

    def spread(self, count: int) -> np.ndarray:
        """``count`` rows evenly spaced over the array (all of them when it is shorter), in
        order: a bounded, deterministic sample for what needs the data in memory."""
        if count >= len(self):
            return self[:]
        return self[np.linspace(0, len(self) - 1, count).round().astype(np.int64)]


def _precision_warning() -> type[Warning]:
    from jointkl.data.tables import PrecisionWarning

    return PrecisionWarning
