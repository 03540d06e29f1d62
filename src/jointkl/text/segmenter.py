"""Unigram word segmentation, and EM for the unigram language model.

The model: a chunk is a sequence of words drawn independently with probabilities p(w) from
a lexicon. The best segmentation maximises Σ log p(w), the Viterbi path of the word lattice
(:mod:`jointkl.text.lattice`). The segmentation is a latent variable, so fitting p by
maximum likelihood of the raw text is EM (alternating minimisation of the joint KL, with the
exact posterior over segmentations in the E-step):

- E-step: expected word counts E[n_w] under p(segmentation | text) — the gradient of the
  lattice's log-partition;
- M-step: p(w) ← E[n_w] / Σ E[n].

The marginal likelihood Σ log Z never decreases, so the code length of the text in bits per
character, −Σ log₂ Z / N (N: units of pre-split text, a digit or Latin run counting as one),
never increases: minimum entropy and maximum likelihood are the same objective.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from jointkl.errors import InputError
from jointkl.text.bulk import paused_gc
from jointkl.text.corpus import Corpus
from jointkl.text.lattice import TIE_NATS, WordIndex, WordLattice, split_long
from jointkl.text.lexicon import Lexicon
from jointkl.text.presplit import coded_chunks, decode_words, split_line

__all__ = ["Segmenter"]


class Segmenter:
    """Maximum-probability segmentation with a unigram :class:`Lexicon`.

    :param lexicon: the words and their counts (probabilities are counts / total).
    :param max_len: longest word looked for; defaults to the lexicon's longest word.
    :param row_len: units per lattice row: the Python loop of the dynamic programme has
        ``row_len`` steps per block. Longer chunks are split where no word crosses
        (:class:`~jointkl.text.WordLattice`), so this changes speed, not results.
    :param block_units: units per lattice block (bounds the memory autograd keeps).
    :param dtype: float dtype of the dynamic programme (float64: EM's objective is a sum of
        millions of terms).

    After :meth:`fit_em`: ``bits_per_char_`` (objective before the first and after each
    iteration), ``n_iter_``, ``converged_``, ``pruned_`` (words removed by pruning), and
    ``lexicon`` holds the re-estimated counts. The lattices of the EM corpus are kept, so
    segmenting that corpus next reuses them (:meth:`clear_cache` frees them).
    """

    def __init__(
        self,
        lexicon: Lexicon,
        max_len: int | None = None,
        row_len: int = 64,
        block_units: int = 1 << 20,
        dtype: torch.dtype = torch.float64,
    ):
        if not isinstance(lexicon, Lexicon):
            raise InputError(
                f"lexicon must be a jointkl.text.Lexicon, got {type(lexicon).__name__}"
            )
        if max_len is not None and not (isinstance(max_len, int) and max_len >= 1):
            raise InputError(f"max_len must be an integer >= 1 or None, got {max_len!r}")
        if not (isinstance(row_len, int) and row_len >= 2):
            raise InputError(f"row_len must be an integer >= 2, got {row_len!r}")
        if not (isinstance(block_units, int) and block_units >= 1):
            raise InputError(f"block_units must be an integer >= 1, got {block_units!r}")
        self.max_len = max_len
        self.row_len = row_len
        self.block_units = block_units
        self.dtype = dtype
        self._set_lexicon(lexicon)

    def _set_lexicon(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon
        self.index = WordIndex(lexicon.words, self.max_len or lexicon.max_len)
        self.logp = lexicon.log_probs().to(self.dtype)
        # An unseen unit costs as much as a unit seen half a time.
        self.oov_logp = math.log(0.5 / lexicon.total)
        self._single = torch.tensor([len(w) == 1 for w in lexicon.words])
        self._cache: tuple[list[str], list[WordLattice]] | None = None
        self._table: dict[str, float] | None = None

    def clear_cache(self) -> None:
        """Forget the lattices kept from the last :meth:`fit_em` corpus (frees their memory)."""
        self._cache = None

    # -- segmentation ------------------------------------------------------------------------

    def _viterbi_logp(self) -> torch.Tensor:
        # A single unit must never be impossible (EM can give it zero mass): floor at OOV.
        return torch.where(self._single, self.logp.clamp(min=self.oov_logp), self.logp)

    def _lattices(self, chunks: Sequence[str]) -> list[tuple[slice, WordLattice]]:
        """Lattices over consecutive blocks of about ``block_units`` units each."""
        out = []
        start, size = 0, 0
        for i, c in enumerate(chunks):
            size += len(c) + 1
            if size >= self.block_units or i == len(chunks) - 1:
                block = slice(start, i + 1)
                out.append((block, WordLattice(chunks[block], self.index, self.row_len)))
                start, size = i + 1, 0
        return out

    def segment_chunks(self, chunks: Sequence[str]) -> list[list[str]]:
        """Viterbi segmentation of coded chunks, as lists of coded words."""
        logp = self._viterbi_logp()
        if self._cache is not None and self._cache[0] == chunks:
            lattices = self._cache[1]  # the EM corpus again: its lattices are already built
        else:
            lattices = [lat for _, lat in self._lattices(chunks)]
        out: list[list[str]] = []
        for lattice in lattices:
            out += lattice.best_words(logp, self.oov_logp)
        return out

    def segment_lines(self, lines: Iterable[str] | str | os.PathLike) -> list[list[str]]:
        """Segment every line of a corpus (iterable of str, or a file path); batched."""
        with paused_gc():
            splits = [split_line(line) for line in Corpus(lines)]
            chunks = [p for s in splits for p, c in zip(s.pieces, s.is_chunk, strict=False) if c]
        seg = iter(self.segment_chunks(chunks))
        with paused_gc():
            out = []
            for s in splits:
                words: list[str] = []
                for p, c in zip(s.pieces, s.is_chunk, strict=False):
                    if c:
                        words += next(seg)
                    else:
                        words.append(p)
                out.append(decode_words(words, s.runs))
        return out

    def segment(self, text: str) -> list[str]:
        """The maximum-probability segmentation of ``text`` (punctuation tokens included).

        One sentence at a time this is a plain-Python dynamic programme over a dict of
        log-probabilities, with no tensor work: for a short text the batched lattice's
        fixed costs dominate. It is the same computation as :meth:`segment_lines` on
        ``[text]`` — the same chunks, the same packing of chunks into rows of ``row_len``
        units (a row's Viterbi score runs on across its chunks, so the floating-point sums,
        and with them the choice among near-ties, are the same), the same long-chunk splits
        and the same rule for ties (the shortest last word) — so the result is identical.
        """
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        line = split_line(text)
        table = self._sentence_table()
        cap = self.row_len - 1
        used = self.row_len  # units used in the current row: the first chunk opens a row
        score = 0.0
        words: list[str] = []
        for piece, is_chunk in zip(line.pieces, line.is_chunk, strict=True):
            if not is_chunk:
                words.append(piece)
                continue
            parts = [piece] if len(piece) <= cap else split_long(piece, self.index, cap)[0]
            for part in parts:
                if used + len(part) + 1 > self.row_len:
                    used, score = 0, 0.0  # a new row: the Viterbi score starts again at 0
                used += len(part) + 1
                score = self._viterbi_part(part, score, table, words)
        return decode_words(words, line.runs)

    def _sentence_table(self) -> dict[str, float | None]:
        """``{word: log p}`` (the lattice's Viterbi weights) for the words the lattice looks
        for, and ``{prefix: None}`` for every proper prefix of such a word that is not a word
        itself: a substring is extended only while it can still become a word."""
        if self._table is None:
            K = self.index.max_len
            logp = self._viterbi_logp().tolist()
            words = {w: lp for w, lp in zip(self.index.words, logp, strict=True) if len(w) <= K}
            table: dict[str, float | None] = {
                w[:k]: None for w in words for k in range(2, len(w)) if w[:k] not in words
            }
            table.update(words)
            self._table = table
            self._alphabet = set(map(chr, self.index.alphabet.tolist()))
        return self._table

    def _viterbi_part(
        self, part: str, start: float, table: dict[str, float | None], out: list[str]
    ) -> float:
        """Append the Viterbi words of one coded chunk (piece) to ``out``; returns the row's
        score after it. ``start`` is the row's score before it (0 at a row's start).

        Forward relaxation from each start in turn (a substring is looked up only while it
        is a word's prefix); then back from the end, the last word into each end is the
        shortest within ``TIE_NATS`` of the best, as in the batched back-pointers.
        """
        K = self.index.max_len
        get = table.get
        oov, alphabet = self.oov_logp, self._alphabet
        neg = -math.inf
        m = len(part)
        alpha = [start] + [neg] * m
        for i in range(m):
            a = alpha[i]
            unit = part[i]
            lp = get(unit)
            if lp is None and unit not in alphabet:
                lp = oov  # a unit the lexicon has never seen
            if lp is not None and a + lp > alpha[i + 1]:
                alpha[i + 1] = a + lp
            for k in range(2, min(K, m - i) + 1):
                sub = part[i : i + k]
                if sub not in table:
                    break  # no word starts with sub
                lp = table[sub]
                if lp is not None and a + lp > alpha[i + k]:
                    alpha[i + k] = a + lp
        # Back from the end: the shortest last word within TIE_NATS of the best, as the
        # batched back-pointers (an unreachable end, -inf, takes one unit, as there).
        j, rev = m, []
        while j > 0:
            k = 1
            if alpha[j] > neg:
                floor = alpha[j] - TIE_NATS
                for k in range(1, min(K, j) + 1):
                    lp = get(part[j - k : j])
                    if lp is None and k == 1 and part[j - 1] not in alphabet:
                        lp = oov
                    if lp is not None and alpha[j - k] + lp >= floor:
                        break
            rev.append(part[j - k : j])
            j -= k
        out += reversed(rev)
        return alpha[m]

    # -- EM ----------------------------------------------------------------------------------

    def _e_step(
        self, lattices: list[WordLattice], logp: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        counts = torch.zeros_like(logp)
        logz = 0.0
        for lattice in lattices:
            c, z = lattice.expected_counts(logp, self.oov_logp)
            counts += c
            logz += float(z)
        return counts, logz

    def fit_em(
        self,
        lines: Iterable[str] | str | os.PathLike,
        iters: int = 5,
        prune: float | None = None,
        tol: float = 0.0,
        progress: bool = False,
    ) -> Segmenter:
        """EM for the unigram model on raw ``lines``; updates ``lexicon`` and returns ``self``.

        :param lines: the corpus (iterable of str, or a path to a UTF-8 file).
        :param iters: EM iterations.
        :param prune: after an M-step, drop multi-unit words with expected count below this.
            A pruning step that would raise bits/char is undone (and pruning stops), so the
            reported objective never increases.
        :param tol: stop when bits/char falls by less than this in one iteration.
        :param progress: tqdm bar over iterations, showing bits/char.
        """
        if not (isinstance(iters, int) and iters >= 0):
            raise InputError(f"iters must be an integer >= 0, got {iters!r}")
        if prune is not None and not (isinstance(prune, (int, float)) and prune >= 0):
            raise InputError(f"prune must be a count >= 0 or None, got {prune!r}")
        with paused_gc():
            chunks = [c for line in Corpus(lines) for c in coded_chunks(line)]
        n_units = sum(map(len, chunks))
        if n_units == 0:
            raise InputError(
                "corpus is empty: expected lines of raw text with at least one character "
                "other than punctuation and spaces"
            )
        lattices = [lat for _, lat in self._lattices(chunks)]
        to_bits = -1.0 / (n_units * math.log(2.0))
        logp = self.logp
        counts, logz = self._e_step(lattices, logp)
        history = [logz * to_bits]
        self.pruned_ = 0
        self.converged_ = False
        multi = ~self._single
        bar = tqdm(range(iters), desc="EM", disable=not progress, leave=False)
        for _ in bar:
            # M-step: p(w) = E[n_w] / Σ E[n]; a word never used gets log 0 = -inf.
            step = None
            if prune:
                drop = multi & (counts < prune) & (counts > 0)
                if bool(drop.any()):
                    pruned = counts.masked_fill(drop, 0.0)
                    trial = (pruned / pruned.sum()).log()
                    c, z = self._e_step(lattices, trial)
                    if z * to_bits <= history[-1]:
                        step = (trial, c, z)
                        self.pruned_ += int(drop.sum())
                    else:
                        prune = None  # pruning would lengthen the code: stop pruning
            if step is None:
                trial = (counts / counts.sum()).log()
                step = (trial, *self._e_step(lattices, trial))
            logp, counts, logz = step
            history.append(logz * to_bits)
            bar.set_postfix(bits_per_char=f"{history[-1]:.4f}")
            if history[-2] - history[-1] < tol:
                self.converged_ = True
                break
        bar.close()
        self.bits_per_char_ = history
        self.n_iter_ = len(history) - 1
        if self.n_iter_:
            # The lexicon keeps counts proportional to the final p; unused words leave it.
            # The index (and so the lattices) stay: a dropped word just has log p = -inf.
            # Counts on the scale of the expected number of words in the corpus.
            self.logp = logp
            final = (logp.exp() * counts.sum()).tolist()
            self.lexicon = Lexicon(dict(zip(self.index.words, final, strict=True)))
            self.oov_logp = math.log(0.5 / self.lexicon.total)
            self._table = None
        self._cache = (chunks, lattices)
        return self

    def bits_per_char(self, lines: Iterable[str] | str | os.PathLike) -> float:
        """Code length of ``lines`` under the current lexicon: −log₂ Z per unit."""
        chunks = [c for line in Corpus(lines) for c in coded_chunks(line)]
        n_units = sum(map(len, chunks))
        if n_units == 0:
            raise InputError("corpus is empty: nothing to measure")
        logz = sum(
            float(lat.log_partition(self.logp, self.oov_logp).sum())
            for _, lat in self._lattices(chunks)
        )
        return -logz / (n_units * math.log(2.0))
