"""An unsupervised lexicon: ``WordFinder(...).fit(lines) -> Lexicon``.

The cost of learning is the average code length −log p; a lexicon is good when coding the
text word by word is short. Merging two adjacent units a, b into one word lowers the
average code length per character roughly when PMI(a, b) = log p_ab / (p_a p_b) > 1
(natural log). :class:`WordFinder` builds on that ("cut decisively"):

1. count units and adjacent unit pairs (one pass);
2. keep the *strong* pairs, ``p_ab > min_proba`` and ``PMI(a, b) > min_pmi``, and cut the
   text at every other boundary; count the fragments (a second pass);
3. keep fragments with ``p > min_proba`` (every single unit is kept, so any text segments);
4. remove redundant words, longest first: re-segment w without itself (Viterbi on the
   lattice); when ``log p(w) − Σ log p(piece) < redundancy × (len(w) − 1)``, w saves too
   little code to pay for its entry: delete it and give its count to the pieces. The plain
   rule has ``redundancy = 1``; on People's Daily a stricter 3.5 (fewer, surer
   words) gives the best segmentation (docs/text.md has the sweep).

Counting is vectorised over blocks of about ``block_chars`` units with numpy; only the counts
are kept between blocks, so memory is bounded by the counts, not the corpus.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from jointkl.errors import InputError
from jointkl.text.corpus import Corpus
from jointkl.text.lattice import WordIndex, WordLattice, codepoints
from jointkl.text.lexicon import Lexicon
from jointkl.text.presplit import coded_chunks
from jointkl.text.segmenter import Segmenter

__all__ = ["WordFinder", "code_length", "lexicon_bits", "remove_redundant"]

_SEP = "\n"  # ends every chunk in the counting blocks; never part of a word


class WordFinder:
    """Learn a :class:`Lexicon` from raw text by the minimum-entropy "cut decisively" rules.

    :param min_proba: smallest probability of a strong pair and of a kept fragment.
    :param min_pmi: smallest PMI (natural log) of a strong pair; ≈1 is where merging
        starts to shorten the code.
    :param max_len: longest word, in units; longer fragments are not counted.
    :param redundancy: scale of the redundancy rule's threshold, in nats per extra unit.
    :param block_chars: units counted per vectorised block (memory vs. speed).
    :param progress: show a tqdm bar over the lines of each pass.
    :param code_lengths: also measure the objective after each stage: the code length of the
        corpus under the lexicon of that stage, in bits per unit (−log₂ Z / N with
        p = count / total, the quantity ``Segmenter.fit_em`` lowers next). One lattice pass
        over the corpus per stage.

    After :meth:`fit`: ``n_units_`` (units read), ``strong_pairs_`` (the kept pairs, as
    two-unit strings), ``fragments_`` (fragment counts, a Counter) and ``n_redundant_``
    (words removed by the redundancy rule); with ``code_lengths``, ``code_length_`` maps each
    stage to bits per unit: ``units`` (every unit its own word), ``cut`` (every fragment of
    the cut, up to ``max_len`` units, is a word), ``min_proba`` (only fragments with
    p > min_proba) and ``redundancy`` (after the redundancy rule: the lexicon returned), and
    ``lexicon_bits_`` the bits per corpus unit of writing that stage's lexicon down
    (:func:`lexicon_bits` / N).
    """

    def __init__(
        self,
        min_proba: float = 1e-6,
        min_pmi: float = 1.0,
        max_len: int = 4,
        redundancy: float = 3.5,
        block_chars: int = 1 << 20,
        progress: bool = False,
        code_lengths: bool = False,
    ):
        if not (isinstance(min_proba, (int, float)) and 0 <= min_proba < 1):
            raise InputError(f"min_proba must be in [0, 1), got {min_proba!r}")
        if not (isinstance(min_pmi, (int, float)) and math.isfinite(min_pmi)):
            raise InputError(f"min_pmi must be a finite number, got {min_pmi!r}")
        if not (isinstance(max_len, int) and max_len >= 1):
            raise InputError(f"max_len must be an integer >= 1, got {max_len!r}")
        if not (isinstance(redundancy, (int, float)) and math.isfinite(redundancy)):
            raise InputError(f"redundancy must be a finite number, got {redundancy!r}")
        if not (isinstance(block_chars, int) and block_chars >= 1):
            raise InputError(f"block_chars must be an integer >= 1, got {block_chars!r}")
        self.min_proba = float(min_proba)
        self.min_pmi = float(min_pmi)
        self.max_len = max_len
        self.redundancy = float(redundancy)
        self.block_chars = block_chars
        self.progress = progress
        self.code_lengths = bool(code_lengths)

    @property
    def strong_pairs_(self) -> set[str]:
        """The strong pairs of the last fit, as two-unit strings."""
        k = self._strong
        cp = np.stack([k >> np.uint64(32), k & np.uint64(0xFFFFFFFF)], 1).astype(np.uint32)
        text = cp.tobytes().decode("utf-32-le")
        return {text[i : i + 2] for i in range(0, len(text), 2)}

    # -- passes over the corpus -------------------------------------------------------------

    def _blocks(self, corpus: Corpus, desc: str) -> Iterator[np.ndarray]:
        """Codepoints of the coded chunks, ``_SEP`` after each chunk, in blocks."""
        buf: list[str] = []
        size = 0
        for line in tqdm(corpus, desc=desc, unit=" lines", disable=not self.progress, leave=False):
            for chunk in coded_chunks(line):
                buf.append(chunk)
                size += len(chunk) + 1
            if size >= self.block_chars:
                yield codepoints(_SEP.join(buf) + _SEP)
                buf, size = [], 0
        if buf:
            yield codepoints(_SEP.join(buf) + _SEP)

    def _count_pairs(self, corpus: Corpus) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        units = _Counts()
        pairs = _Counts()
        sep = np.uint32(ord(_SEP))
        for cp in self._blocks(corpus, "counting pairs"):
            units.add(cp[cp != sep].astype(np.uint64))
            ok = (cp[:-1] != sep) & (cp[1:] != sep)
            pairs.add(_pair_keys(cp)[ok])
        return units.keys, units.counts, pairs.keys, pairs.counts

    def _count_fragments(self, corpus: Corpus, strong: np.ndarray) -> Counter:
        fragments: Counter = Counter()
        for cp in self._blocks(corpus, "counting fragments"):
            keys = _pair_keys(cp)
            pos = np.searchsorted(strong, keys).clip(max=max(len(strong) - 1, 0))
            keep = strong[pos] == keys if len(strong) else np.zeros(len(keys), dtype=bool)
            # Cut after unit i unless (i, i+1) is strong; a pair with _SEP is never strong.
            cuts = np.flatnonzero(~keep) + 1
            text = np.insert(cp, cuts, np.uint32(ord(_SEP))).tobytes().decode("utf-32-le")
            fragments.update(text.split(_SEP))  # C-level counting; long ones dropped below
        for f in [f for f in fragments if not 0 < len(f) <= self.max_len]:
            del fragments[f]
        return fragments

    # -- the fit -----------------------------------------------------------------------------

    def fit(self, lines: Iterable[str] | str | os.PathLike) -> Lexicon:
        """Learn a lexicon from ``lines`` (an iterable of str, or a path to a UTF-8 file)."""
        corpus = Corpus(lines)
        ukeys, ucounts, pkeys, pcounts = self._count_pairs(corpus)
        n_units = int(ucounts.sum())
        if n_units == 0:
            raise InputError(
                "corpus is empty: expected lines of raw text with at least one character "
                "other than punctuation and spaces"
            )
        self.n_units_ = n_units
        n_pairs = max(int(pcounts.sum()), 1)
        # PMI(a, b) = log p_ab / (p_a p_b), p_ab per adjacent pair, p_a per unit.
        unit_p = ucounts / n_units
        pa = unit_p[np.searchsorted(ukeys, pkeys >> np.uint64(32))]
        pb = unit_p[np.searchsorted(ukeys, pkeys & np.uint64(0xFFFFFFFF))]
        p_ab = pcounts / n_pairs
        pmi = np.log(p_ab) - np.log(pa * pb)
        strong = np.sort(pkeys[(p_ab > self.min_proba) & (pmi > self.min_pmi)])
        self._strong = strong

        fragments = self._count_fragments(corpus, strong)
        self.fragments_ = fragments
        total = sum(fragments.values())
        units = {u: max(float(fragments.get(u, 0)), 1.0) for u in map(chr, ukeys.tolist())}
        counts = {
            w: float(c) for w, c in fragments.items() if len(w) > 1 and c / total > self.min_proba
        }
        # Every unit stays a word (count at least 1), so every text has a segmentation.
        counts.update(units)
        self.code_length_: dict[str, float] = {}
        self.lexicon_bits_: dict[str, float] = {}
        unit_counts = dict(zip(map(chr, ukeys.tolist()), ucounts.tolist(), strict=True))
        spell = {u: -math.log2(c / n_units) for u, c in unit_counts.items()}
        stages = [("units", unit_counts), ("cut", {**fragments, **units}), ("min_proba", counts)]
        counts, self.n_redundant_ = remove_redundant(counts, self.redundancy)
        stages.append(("redundancy", counts))
        if self.code_lengths:
            for stage, c in stages:
                self.code_length_[stage] = code_length(c, corpus)
                self.lexicon_bits_[stage] = lexicon_bits(c, spell, self.max_len) / n_units
        return Lexicon(counts)


def code_length(counts: Mapping[str, float], lines: Iterable[str] | str | os.PathLike) -> float:
    """Code length of ``lines`` under the unigram lexicon ``counts`` (p = count / total), in
    bits per unit: −Σ_chunks log₂ Z / N, Z summing over every segmentation of a chunk."""
    return Segmenter(Lexicon(dict(counts))).bits_per_char(lines)


def lexicon_bits(
    counts: Mapping[str, float], unit_bits: Mapping[str, float], max_len: int
) -> float:
    """Bits to write the lexicon itself down: each word spelled unit by unit with the unit
    code ``unit_bits`` (−log₂ of a unit's frequency), plus log₂ ``max_len`` bits for its
    length. With :func:`code_length` × N it is a two-part code: lexicon, then corpus."""
    length = math.log2(max(max_len, 2))
    return sum(length + sum(unit_bits[u] for u in w) for w in counts)


def remove_redundant(
    counts: Mapping[str, float], redundancy: float = 1.0
) -> tuple[dict[str, float], int]:
    """Longest first: delete w when log p(w) − Σ log p(pieces) < redundancy × (len(w) − 1).

    The pieces are the best segmentation of w without w itself (Viterbi on the lattice,
    p = count / total). A deleted word's count goes to each of its pieces. Words of one
    length are decided together (their pieces are shorter: one batched lattice); counts and
    total are updated before the next, shorter length.

    :returns: the new counts (single units are never removed) and the number removed.
    """
    counts = dict(counts)
    removed = 0
    for L in range(max(map(len, counts), default=0), 1, -1):
        batch = [w for w in counts if len(w) == L]
        if not batch:
            continue
        words = list(counts)
        logp = torch.tensor([counts[w] for w in words], dtype=torch.float64)
        logp = (logp / logp.sum()).log()
        # A unit with no single-unit entry can not be a piece: the lattice's OOV edge
        # (-inf) makes such a word irreplaceable, and it is kept.
        lattice = WordLattice(batch, WordIndex(words, L), row_len=L + 1, exclude_whole=True)
        pieces = lattice.best_words(logp, oov_logp=float("-inf"))
        log_total = math.log(sum(counts.values()))
        for w, ps in zip(batch, pieces, strict=True):
            if any(p not in counts for p in ps):
                continue
            gain = math.log(counts[w]) - sum(math.log(counts[p]) for p in ps)
            gain += (len(ps) - 1) * log_total  # log p = log n - log total, per term
            if gain < redundancy * (L - 1):
                c = counts.pop(w)
                for p in ps:
                    counts[p] += c
                removed += 1
    return counts, removed


class _Counts:
    """Running (sorted unique keys, counts) of uint64 keys, merged block by block."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, keys: np.ndarray) -> None:
        k, c = np.unique(keys, return_counts=True)
        allk = np.concatenate([self.keys, k])
        allc = np.concatenate([self.counts, c])
        self.keys, inv = np.unique(allk, return_inverse=True)
        self.counts = np.bincount(inv, weights=allc, minlength=len(self.keys)).astype(np.int64)


def _pair_keys(cp: np.ndarray) -> np.ndarray:
    """Key of each adjacent pair: (first codepoint << 32) | second codepoint."""
    return (cp[:-1].astype(np.uint64) << np.uint64(32)) | cp[1:].astype(np.uint64)
