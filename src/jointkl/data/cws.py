"""Chinese word segmentation as tagging: BMES tags, a character vocabulary, padded batches.

Each character gets one tag: ``B`` begins a word of two or more characters, ``M`` continues
it, ``E`` ends it, ``S`` is a word on its own. Tag ids follow :data:`TAGS`
(``B=0, M=1, E=2, S=3``). Characters seen fewer than ``min_count`` times in the training
split map to the unknown token, so the model learns an embedding for rare and unseen
characters from real rare ones. Token ids: ``0`` padding, ``1`` unknown, ``2..`` characters.

:func:`cws_dataset` builds everything from :func:`jointkl.data.peoples_daily_split` (first
90 % of lines train, last 10 % test, by line order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from jointkl.errors import InputError

__all__ = [
    "TAGS",
    "PAD",
    "UNK",
    "bmes_tags",
    "words_from_tags",
    "CharVocab",
    "bigram_keys",
    "bigram_ids",
    "pack_rows",
    "encode_rows",
    "encode_texts",
    "CWSDataset",
    "cws_dataset",
]

TAGS = "BMES"
B, M, E, S = range(4)
PAD, UNK = 0, 1


def bmes_tags(words: Iterable[str]) -> list[int]:
    """Tag ids of the characters of a segmented sentence: ``["中国", "人"] -> [B, E, S]``."""
    tags: list[int] = []
    for w in words:
        if not w:
            continue
        tags.extend([S] if len(w) == 1 else [B, *([M] * (len(w) - 2)), E])
    return tags


def words_from_tags(text: str, tags: Sequence[int]) -> list[str]:
    """Inverse of :func:`bmes_tags`: cut ``text`` into words where its tags say.

    A word ends after ``E`` or ``S``; ``B`` and ``S`` also start one (so an ill-formed tag
    sequence, which a constrained CRF never produces, still yields every character once).
    """
    if len(tags) < len(text):
        raise InputError(f"tags ({len(tags)}) must cover the text ({len(text)} characters)")
    words, cur = [], ""
    for ch, t in zip(text, tags, strict=False):
        t = int(t)
        if t in (B, S) and cur:
            words.append(cur)
            cur = ""
        cur += ch
        if t in (E, S):
            words.append(cur)
            cur = ""
    if cur:
        words.append(cur)
    return words


@dataclass(frozen=True)
class CharVocab:
    """Characters in id order (id = position + 2); everything else is :data:`UNK`."""

    chars: str
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise InputError("CharVocab: chars must not repeat")
        object.__setattr__(self, "index", {c: i + 2 for i, c in enumerate(self.chars)})

    @classmethod
    def build(cls, sentences: Iterable[Iterable[str]], min_count: int = 2) -> CharVocab:
        """Characters seen at least ``min_count`` times, most frequent first (ties by code)."""
        if min_count < 1:
            raise InputError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(ch for words in sentences for w in words for ch in w)
        kept = sorted(
            (c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c)
        )
        return cls("".join(kept))

    def __len__(self) -> int:
        """The number of token ids, padding and unknown included (an embedding's size)."""
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.index.get(ch, UNK) for ch in text]


def bigram_keys(
    sentences: Iterable[Sequence[str]], vocab: CharVocab, min_count: int = 3
) -> list[int]:
    """Sorted keys ``a * len(vocab) + b`` of the adjacent token-id pairs ``(a, b)`` seen at
    least ``min_count`` times (within a sentence) — the vocabulary of :func:`bigram_ids`.

    Character bigrams carry most of a word boundary's evidence (is "ab" a frequent pair?);
    keying them on token ids lets the model look them up with tensor operations alone.
    """
    if min_count < 1:
        raise InputError(f"min_count must be >= 1, got {min_count}")
    v = len(vocab)
    counts: Counter[int] = Counter()
    for words in sentences:
        ids = vocab.encode("".join(words))
        counts.update(a * v + b for a, b in zip(ids, ids[1:], strict=False))
    return sorted(k for k, n in counts.items() if n >= min_count)


def bigram_ids(chars: torch.Tensor, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bigram token ids ``(N, T)`` for char ids ``(N, T)``: position ``t`` gets the pair
    ``(chars[t], chars[t+1])``, as ``2 + its index in keys``, or :data:`UNK` when the pair is
    not in ``keys`` (or ``t`` is the last position: the pair then meets padding)."""
    nxt = torch.nn.functional.pad(chars[:, 1:], (0, 1), value=PAD)
    q = chars * vocab_size + nxt
    if keys.numel() == 0:
        return torch.full_like(chars, UNK)
    idx = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
    return torch.where(keys[idx] == q, idx + 2, torch.full_like(idx, UNK))


def pack_rows(sentences: Iterable[Sequence[str]], max_len: int) -> list[list[str]]:
    """Pack consecutive words into rows of at most ``max_len`` characters, cutting only
    between words (a word longer than ``max_len`` gets a row of its own).

    Rows are training sequences: a cut between words is a legal BMES boundary (the row ends
    in E/S and the next starts with B/S), so packing loses nothing and wastes almost no padding.
    """
    if max_len < 1:
        raise InputError(f"max_len must be >= 1, got {max_len}")
    rows, cur, n = [], [], 0
    for words in sentences:
        for w in words:
            if not w:
                continue
            if cur and n + len(w) > max_len:
                rows.append(cur)
                cur, n = [], 0
            cur.append(w)
            n += len(w)
    if cur:
        rows.append(cur)
    return rows


def encode_rows(
    rows: Sequence[Sequence[str]], vocab: CharVocab
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segmented rows -> ``(chars (N, T) int64, lengths (N,) int64, tags (N, T) int64)``,
    padded with :data:`PAD` / tag 0 to the longest row."""
    if not rows:
        raise InputError("encode_rows: no rows")
    texts = ["".join(r) for r in rows]
    if any(not t for t in texts):
        raise InputError("encode_rows: every row needs at least one character")
    T = max(len(t) for t in texts)
    chars = torch.full((len(rows), T), PAD, dtype=torch.long)
    tags = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (t, r) in enumerate(zip(texts, rows, strict=True)):
        chars[i, : len(t)] = torch.tensor(vocab.encode(t))
        tags[i, : len(t)] = torch.tensor(bmes_tags(r))
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    return chars, lengths, tags


def encode_texts(texts: Sequence[str], vocab: CharVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw texts -> ``(chars (N, T), lengths (N,))`` for decoding."""
    if not texts or any(not t for t in texts):
        raise InputError("texts must be a non-empty list of non-empty strings")
    T = max(len(t) for t in texts)
    chars = torch.full((len(texts), T), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        chars[i, : len(t)] = torch.tensor(vocab.encode(t))
    return chars, torch.tensor([len(t) for t in texts], dtype=torch.long)


@dataclass
class CWSDataset:
    """The segmentation task: vocabulary, packed training tensors, gold test sentences."""

    vocab: CharVocab
    train_chars: torch.Tensor
    train_lengths: torch.Tensor
    train_tags: torch.Tensor
    train_sentences: list[list[str]]
    test_sentences: list[list[str]]

    @property
    def train_vocab(self) -> set[str]:
        """Training words, for OOV recall."""
        return {w for s in self.train_sentences for w in s}


def cws_dataset(
    test_fraction: float = 0.1, min_count: int = 2, max_len: int = 100, limit: int | None = None
) -> CWSDataset:
    """People's Daily (January 1998) as a word-segmentation task.

    Args:
        test_fraction: share of lines, taken from the end, held out for testing.
        min_count: characters rarer than this in the training split become :data:`UNK`.
        max_len: longest training row, in characters (see :func:`pack_rows`).
        limit: keep only the first ``limit`` training lines (quick runs, tests).
    """
    from jointkl.data.peoples_daily import peoples_daily_split

    train, test = peoples_daily_split(test_fraction)
    if limit is not None:
        train = train[:limit]
    vocab = CharVocab.build(train, min_count)
    chars, lengths, tags = encode_rows(pack_rows(train, max_len), vocab)
    return CWSDataset(vocab, chars, lengths, tags, train, test)
