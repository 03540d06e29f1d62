"""A corpus of raw text lines that can be read more than once, from a file or an iterable.

Lexicon building reads its corpus twice (pair counts, then fragments), so the input must be
re-iterable. A file path is re-opened for each pass and read line by line; a list (or any
iterable that is not its own iterator) is iterated again; a one-shot iterator (a generator,
an open file) is spooled to a temporary file on the first pass, so memory stays bounded by
what is being counted, never by the corpus.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from jointkl.errors import InputError

__all__ = ["Corpus"]

LinesLike = Iterable[str] | str | os.PathLike


class Corpus:
    """Re-iterable raw text lines (without line ends) from a path or an iterable of str.

    :param source: a path to a UTF-8 text file (one sentence or paragraph per line), or an
        iterable of ``str`` lines. Undecodable bytes raise :class:`InputError` naming the file
        and line; a non-``str`` item raises :class:`InputError` naming its position.
    """

    def __init__(self, source: LinesLike | Corpus):
        self._spool: Path | None = None
        if isinstance(source, Corpus):
            self.path, self._lines = source.path, source._lines
        elif isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            self._lines = None
            if not self.path.is_file():
                raise InputError(
                    f"corpus file {str(self.path)[:60]!r} does not exist or is not a file "
                    "(a str is read as a path: pass raw text as a list of lines)"
                )
        elif isinstance(source, (bytes, bytearray)):
            raise InputError("corpus must be a path or an iterable of str lines, got bytes")
        elif isinstance(source, Iterable):
            self.path = None
            self._lines = source
        else:
            raise InputError(
                f"corpus must be a path or an iterable of str lines, got {type(source).__name__}"
            )

    def __iter__(self) -> Iterator[str]:
        if self.path is not None:
            return self._read_file(self.path)
        if self._spool is not None:
            return self._read_file(self._spool)
        if iter(self._lines) is self._lines:  # one-shot: spool while reading
            return self._spool_and_yield()
        return self._checked(self._lines)

    @staticmethod
    def _checked(lines: Iterable) -> Iterator[str]:
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise InputError(
                    f"corpus line {i + 1}: expected str, got {type(line).__name__}"
                    + (
                        " (decode bytes as UTF-8 first, or pass a file path)"
                        if isinstance(line, bytes)
                        else ""
                    )
                )
            yield line.rstrip("\r\n")

    @staticmethod
    def _read_file(path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(
                        f"{path}: line {n} is not valid UTF-8 (byte {e.start}: "
                        f"{raw[e.start : e.start + 4]!r}); expected a UTF-8 text file"
                    ) from None
                yield line.rstrip("\r\n").lstrip("\ufeff") if n == 1 else line.rstrip("\r\n")

    def _spool_and_yield(self) -> Iterator[str]:
        fd, name = tempfile.mkstemp(prefix="jointkl-corpus-", suffix=".txt")
        complete = False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for line in self._checked(self._lines):
                    # A line end inside an item would split it in the spool: keep it one line.
                    f.write(line.replace("\n", " ").replace("\r", " ") + "\n")
                    yield line
            complete = True
        finally:
            if complete:
                self._spool = Path(name)
            else:
                os.unlink(name)

    def __del__(self) -> None:
        if getattr(self, "_spool", None) is not None:
            try:
                os.unlink(self._spool)
            except OSError:
                pass
