"""Rule-based pre-splitting of raw text, before any statistics are learned.

Three rules, none of which looks at a gold segmentation:

1. **Punctuation and whitespace are hard boundaries.** A run of one repeated punctuation mark
   (``——``, ``……``) is one token; whitespace is dropped. No word crosses either.
2. **A run of digits is one unit**, full- or half-width, with its internal decimal point,
   slash or ratio colon and a trailing per-cent/per-mille sign (``１２．５％``, ``3/4``).
3. **A run of Latin letters is one unit** (``ＡＰＥＣ``, ``WTO``), full- or half-width.

Between boundaries the text is a *chunk*, coded as a string with one character per unit:
each Chinese character stands for itself, each digit run becomes ``NUM`` ("0") and each Latin
run ``LAT`` ("A"). Digits and Latin letters never survive coding, so the two codes cannot be
confused with real text, and a lexicon learns open classes such as ``0年`` ("a number, then
年") instead of one entry per year. :func:`decode_words` puts the runs back.

Everything here is a handful of C-level ``re`` calls per line: pre-splitting the 1.8 M
characters of People's Daily takes a fraction of a second.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["NUM", "LAT", "Line", "code", "split_line", "coded_chunks", "decode_words"]

NUM = "0"
LAT = "A"

_DIGIT = "0-9０-９"
_LATIN = "A-Za-zＡ-Ｚａ-ｚ"
_NUM_RE = re.compile(rf"[{_DIGIT}]+(?:[.．/／:∶][{_DIGIT}]+)*[%％‰]?")
_LAT_RE = re.compile(rf"[{_LATIN}]+")
# The two run patterns share no characters, so one left-to-right scan finds the same runs,
# in the same order, as the two substitutions in ``code``.
_RUN_RE = re.compile(f"{_NUM_RE.pattern}|{_LAT_RE.pattern}")
# \w is a letter, digit or underscore in any script; any other non-space character is
# punctuation or a symbol. Splitting with a group alternates chunk, separator, chunk, ...
_SPLIT_RE = re.compile(r"(\W+)")
# Inside a separator, ([^\w\s])\1* keeps a repeated mark such as —— whole; spaces vanish.
_PUNCT_RE = re.compile(r"(?:([^\w\s])\1*)")
_NON_WORD_RE = re.compile(r"\W+")


class Line(NamedTuple):
    """A pre-split line: ``pieces`` in order, each a coded chunk (``is_chunk``) or a fixed
    punctuation token; ``runs`` the original digit/Latin runs, in order, that the ``NUM``
    and ``LAT`` codes of all its chunks stand for."""

    pieces: list[str]
    is_chunk: list[bool]
    runs: list[str]


def code(text: str) -> str:
    """Replace every digit run by ``NUM`` and every Latin run by ``LAT``."""
    return _LAT_RE.sub(LAT, _NUM_RE.sub(NUM, text))


def split_line(text: str) -> Line:
    """Split ``text`` into coded chunks and punctuation tokens.

    >>> split_line("１２月３１日，ＡＰＥＣ会议")
    Line(pieces=['0月0日', '，', 'A会议'], is_chunk=[True, False, True], runs=['１２', '３１', 'ＡＰＥＣ'])
    """
    coded = code(text)
    parts = _SPLIT_RE.split(coded)
    pieces: list[str] = []
    is_chunk: list[bool] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                pieces.append(part)
                is_chunk.append(True)
        elif len(part) == 1 and not part.isspace():  # the common case: one mark, e.g. "，"
            pieces.append(part)
            is_chunk.append(False)
        else:
            marks = [m.group() for m in _PUNCT_RE.finditer(part)]
            pieces += marks
            is_chunk += [False] * len(marks)
    runs = _RUN_RE.findall(text) if NUM in coded or LAT in coded else []
    return Line(pieces, is_chunk, runs)


def coded_chunks(text: str) -> list[str]:
    """The coded chunks of ``text`` only: the fast path for counting.

    Equal to the chunk pieces of :func:`split_line`, with one ``re.split``.
    """
    return [c for c in _NON_WORD_RE.split(code(text)) if c]


def decode_words(coded_words: list[str], runs: list[str]) -> list[str]:
    """Put the original runs back into the coded words of one line (consumed in order)."""
    if not runs:
        return coded_words
    it = iter(runs)
    out = []
    for w in coded_words:
        if NUM in w or LAT in w:
            w = "".join(next(it) if u == NUM or u == LAT else u for u in w)
        out.append(w)
    return out
