"""A unigram lexicon: coded words and their counts, ``p(w) = n_w / Σ n``.

:class:`Lexicon` is what :class:`jointkl.text.WordFinder` (in :mod:`jointkl.text.wordfinder`)
learns from raw text and what :class:`jointkl.text.Segmenter` segments with; it is saved and
loaded as a UTF-8 TSV file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from jointkl.errors import InputError
from jointkl.runs import atomic_write_text
from jointkl.text.corpus import Corpus
from jointkl.text.presplit import code

__all__ = ["Lexicon"]

_SEP = "\n"
_WORD_RE = re.compile(r"\w+")  # a coded word: units only, no punctuation or space


class Lexicon:
    """Coded words (see :mod:`jointkl.text.presplit`) and their counts; ``p(w) = n_w / Σ n``.

    Words are kept most frequent first. ``save``/``load`` use a UTF-8 TSV file,
    ``word<TAB>count`` per line, in which a digit run is written ``0`` and a Latin run ``A``
    (``0年``, ``A股``); a loaded word is coded, so ``ＡＰＥＣ会议`` reads as ``A会议``.
    """

    def __init__(self, counts: Mapping[str, float]):
        items = [(w, float(c)) for w, c in counts.items() if c > 0]
        for w, c in items:
            if not w or not math.isfinite(c):
                raise InputError(
                    f"lexicon entry {w!r}: expected a non-empty word and a finite count, got {c!r}"
                )
        items.sort(key=lambda wc: (-wc[1], wc[0]))
        self.words = [w for w, _ in items]
        self.counts = torch.tensor([c for _, c in items], dtype=torch.float64)
        self._id = {w: i for i, w in enumerate(self.words)}
        if not self.words:
            raise InputError("lexicon is empty: expected at least one word with a positive count")

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._id

    def __getitem__(self, word: str) -> float:
        return float(self.counts[self._id[word]])

    def id(self, word: str) -> int | None:
        return self._id.get(word)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    @property
    def max_len(self) -> int:
        return max(len(w) for w in self.words)

    def log_probs(self) -> torch.Tensor:
        """log p(w) (natural log), float64, in ``words`` order."""
        return (self.counts / self.counts.sum()).log()

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.words, self.counts.tolist(), strict=True))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``word<TAB>count`` lines, most frequent first (atomically)."""
        lines = [f"{w}\t{c:.6g}\n" for w, c in zip(self.words, self.counts.tolist(), strict=True)]
        return atomic_write_text("".join(lines), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Lexicon:
        """Read a file written by :meth:`save` (or by hand); bad lines raise :class:`InputError`."""
        counts: dict[str, float] = {}
        expected = "expected 'word<TAB>count' with a word of letters only and a positive count"
        for n, line in enumerate(Corpus(path), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(f"{path}: line {n}: {expected}, got {line[:40]!r}")
            word, count = fields[0].strip(), fields[1].strip()
            coded = code(word)
            try:
                c = float(count)
            except ValueError:
                c = float("nan")
            if not _WORD_RE.fullmatch(coded):
                raise InputError(f"{path}: line {n}: {expected}, got word {word!r}")
            if not (math.isfinite(c) and c > 0):
                raise InputError(f"{path}: line {n}: {expected}, got count {count!r}")
            counts[coded] = counts.get(coded, 0.0) + c
        if not counts:
            raise InputError(f"{path}: no entries; {expected} on each line")
        return cls(counts)
