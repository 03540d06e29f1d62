"""The word lattice of a batch of chunks, and its one dynamic programme over a semiring.

A segmentation of a chunk c_1..c_T into words is a path through a semi-Markov chain: the
edge (j, k) is the word of length k+1 that ends at unit j, with weight log p(word). The
forward recursion

    α_0 = 1,   α_{j+1} = ⊕_k  α_{j-k} ⊗ w(j, k)

gives, in the log semiring, log Z = log Σ_paths Π p(word) (the chunk's marginal
likelihood under the unigram model), and in the max semiring the best path's score. The
expected number of times each word is used, E_{p(seg|text)}[n_w], is ∂ log Z / ∂ log p(w):
autograd of the log-partition does forward-backward (Eisner 2016), so there is one loop.

Chunks are packed end to end into rows of ``row_len`` units with a separator unit after each
chunk; the separator (and the padding at a row's end) has a single pass-through edge of
weight ``one`` and no word contains it, so a row's log Z is the sum of its chunks' log Z and
no word crosses a chunk boundary. The recursion loops over positions and is vectorised over
rows and word lengths; tensors are laid out ``(T, K, B)`` (position, length, row) so that
each step's reduction over lengths runs over contiguous rows.

Edges are found without a Python loop over positions: each unit gets a dense id, every
substring a polynomial key Σ id_i P^(k-1-i), looked up with ``searchsorted`` in the sorted
keys of the lexicon's word *prefixes*, so a substring is extended only while it is still
the prefix of some word. When ``max_len`` ids fit in 63 bits the key is their exact packing;
otherwise it is a 64-bit hash, where two different strings of one length share a key with
probability about 2^-64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from jointkl.semiring import LogSemiring, MaxSemiring, Semiring
from jointkl.text.bulk import paused_gc

__all__ = ["semimarkov_forward", "codepoints", "WordIndex", "WordLattice", "split_long", "TIE_NATS"]

SEP = "\n"
TIE_NATS = 1e-9
"""Two segmentation scores closer than this (in nats) are a tie: the shortest last word wins."""
_HASH_P = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2^64


def semimarkov_forward(
    scores: torch.Tensor, semiring: type[Semiring] = LogSemiring
) -> torch.Tensor:
    """Forward values of a batch of semi-Markov chains, for any semiring.

    :param scores: ``(T, K, B)``; ``scores[j, k, b]`` weighs the segment of length ``k+1``
        that ends at position ``j`` of row ``b`` (covering ``j-k .. j``).
    :param semiring: :class:`LogSemiring` (sum over paths) or :class:`MaxSemiring` (best path).
    :returns: ``(T+1, B)`` forward values, ``alpha[0] = one``; ``alpha[T]`` is each row's
        log-partition (log) or best path score (max). Segments that would start before
        position 0 meet the semiring zero, whatever their score.
    """
    T, K, B = scores.shape
    # window[k] holds alpha_{j-k}; positions before the start hold the semiring zero.
    window = torch.full((K, B), semiring.zero, dtype=scores.dtype, device=scores.device)
    window[0] = semiring.one
    alphas = [window[0]]
    # unbind once: indexing scores[j] inside the loop would make backward allocate a full
    # (T, K, B) gradient per step, T times.
    for col in scores.unbind(0):
        a = semiring.plus(semiring.times(window, col), dim=0)
        alphas.append(a)
        window = torch.cat([a.unsqueeze(0), window[:-1]], dim=0)
    return torch.stack(alphas, dim=0)


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a ``uint32`` array (one per unit of a coded
    chunk), read in one C-level pass through its UTF-32 encoding."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class WordIndex:
    """Maps coded words (up to ``max_len`` units) to ids ``0..V-1`` by sorted prefix keys.

    :param words: the vocabulary, in id order; non-empty, without separators.
    :param max_len: the longest word the lattice looks for (longer words get no edges).
    """

    def __init__(self, words: Sequence[str], max_len: int):
        self.words = list(words)
        self.max_len = int(max_len)
        self.alphabet = np.unique(codepoints("".join(self.words)))
        self._table = np.zeros(int(self.alphabet[-1]) + 1 if len(self.alphabet) else 1, np.int64)
        self._table[self.alphabet] = np.arange(1, len(self.alphabet) + 1)
        bits = max(1, int(len(self.alphabet) + 1).bit_length())
        self.exact = bits * self.max_len <= 63
        self._mult = np.uint64(1 << bits) if self.exact else _HASH_P
        mult = int(self._mult)
        mult = self._mult
        lens = np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))
        ids = np.flatnonzero((lens >= 1) & (lens <= self.max_len))
        units = self.dense("".join(self.words[i] for i in ids))
        offsets = np.cumsum(lens[ids]) - lens[ids]
        # Words of one unit: a direct table from dense unit id to word id (-1: none).
        self.single = np.full(len(self.alphabet) + 1, -1, dtype=np.int64)
        one = lens[ids] == 1
        self.single[units[offsets[one]].astype(np.int64)] = ids[one]
        # Longer words: per length k, the sorted keys of all k-prefixes of words, each with
        # the id of the word it equals (-1 if only a prefix) and whether a longer word
        # extends it, so that a substring is only extended while it can still become a word.
        parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [
            [] for _ in range(self.max_len + 1)
        ]
        for L in range(2, self.max_len + 1):
            sel = lens[ids] == L
            if not sel.any():
                continue
            u = units[offsets[sel][:, None] + np.arange(L)[None, :]]  # (n_L, L)
            h = u[:, 0].copy()
            for k in range(2, L + 1):
                h = h * mult + u[:, k - 1]  # uint64 arrays wrap mod 2^64: the hashed case
                word = ids[sel] if k == L else np.full(len(h), -1, dtype=np.int64)
                parts[k].append((h, word, np.full(len(h), k < L)))
        self._keys: list[np.ndarray] = []
        self._word: list[np.ndarray] = []
        self._extends: list[np.ndarray] = []
        for k in range(self.max_len + 1):
            if parts[k]:
                keys, inv = np.unique(np.concatenate([p[0] for p in parts[k]]), return_inverse=True)
                word = np.full(len(keys), -1, dtype=np.int64)
                np.maximum.at(word, inv, np.concatenate([p[1] for p in parts[k]]))
                ext = np.zeros(len(keys), dtype=bool)
                np.logical_or.at(ext, inv, np.concatenate([p[2] for p in parts[k]]))
            else:
                keys, word, ext = np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool)
            self._keys.append(keys)
            self._word.append(word)
            self._extends.append(ext)

    def __len__(self) -> int:
        return len(self.words)

    def dense(self, text: str | np.ndarray) -> np.ndarray:
        """Dense unit ids, 1-based; 0 for a unit outside the lexicon's alphabet (or a separator)."""
        cp = codepoints(text) if isinstance(text, str) else text
        # A direct table over codepoints (at most 0x110000 entries): one gather, no search.
        inside = cp < len(self._table)
        return np.where(inside, self._table[np.where(inside, cp, 0)], 0).astype(np.uint64)

    def end_ids(self, units: np.ndarray, none: int) -> np.ndarray:
        """``(T, B)`` dense units -> ``(T, max_len, B)`` word ids by end position.

        ``out[j, k, b]`` is the id of the word ``units[j-k .. j, b]``, ``none`` where there
        is no such word.
        """
        T, B = units.shape
        K = self.max_len
        out = np.full((T, K, B), none, dtype=np.int64)
        single = self.single[units.astype(np.int64)]
        out[:, 0, :] = np.where(single >= 0, single, none)
        flat = units.reshape(-1)
        # Live substrings, as flat start indices into (T, B): start position t = idx // B.
        idx = np.flatnonzero(flat != 0)
        h = flat[idx]
        for k in range(1, K):  # substrings of length k+1, ending at t+k
            keep = idx // B + k < T
            idx, h = idx[keep], h[keep]
            if not len(idx):
                break
            u = flat[idx + k * B]
            h = h * self._mult + u  # uint64 arrays wrap mod 2^64: the hashed case, by design
            keys = self._keys[k + 1]
            if not len(keys):
                break
            pos = np.searchsorted(keys, h).clip(max=len(keys) - 1)
            hit = (keys[pos] == h) & (u != 0)
            word = np.where(hit, self._word[k + 1][pos], -1)
            found = word >= 0
            s = idx[found]
            out[s // B + k, k, s % B] = word[found]
            live = hit & self._extends[k + 1][pos]
            idx, h = idx[live], h[live]
        return out


def split_long(chunk: str, index: WordIndex, cap: int) -> tuple[list[str], int]:
    """Split ``chunk`` into pieces of at most ``cap`` units at boundaries no word of
    ``index`` crosses (the lattice factorises there); a boundary is forced only where no
    such one lies within ``cap`` units. Returns the pieces and the number forced."""
    none = len(index) + 2
    edges = index.end_ids(index.dense(chunk).reshape(-1, 1), none)[:, :, 0]
    n = len(chunk)
    # crossed[p]: some word covers units p-1 and p (starts before p, ends at or after p).
    crossed = np.zeros(n + 1, dtype=bool)
    for k in range(1, edges.shape[1]):
        ends = np.flatnonzero(edges[:, k] != none)  # word of length k+1 ends here
        for d in range(k):  # it crosses the boundaries end-d, for d = 0 .. k-1
            crossed[ends - d] = True
    safe = np.flatnonzero(~crossed[1:n]) + 1  # boundaries 1 .. n-1 no word crosses
    pieces, start, forced = [], 0, 0
    while n - start > cap:
        ok = safe[(safe > start) & (safe <= start + cap)]
        cut = int(ok[-1]) if len(ok) else start + cap
        forced += not len(ok)
        pieces.append(chunk[start:cut])
        start = cut
    pieces.append(chunk[start:])
    return pieces, forced


class WordLattice:
    """The lattice of a batch of coded chunks under a :class:`WordIndex`.

    :param chunks: coded chunks (strings of units, no separators).
    :param index: the vocabulary to find edges with.
    :param row_len: units per packed row. A chunk longer than ``row_len - 1`` is split
        into pieces at positions that no lexicon word crosses: the lattice factorises
        there, so the split changes nothing. Only when no such position exists within
        ``row_len - 1`` units is a boundary forced (``n_forced`` counts them).
    :param exclude_whole: drop the edge that spans a whole chunk (used to re-segment a word
        without itself).

    Edge weights come from a vector ``logp`` over the vocabulary; a unit with no
    single-unit word gets ``oov_logp``, so every chunk has at least one path.
    """

    def __init__(
        self,
        chunks: Sequence[str],
        index: WordIndex,
        row_len: int = 64,
        exclude_whole: bool = False,
    ):
        if row_len < 2:
            raise ValueError(f"row_len must be at least 2, got {row_len}")
        self.index = index
        K = index.max_len
        V = len(index)
        self.OOV, self.PASS, self.NONE = V, V + 1, V + 2
        cap = row_len - 1
        lens = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        self.n_units = int(lens.sum())
        self.n_chunks = len(chunks)
        parts = list(chunks)
        self.n_parts: np.ndarray | None = None  # pieces per chunk when any chunk was cut
        self.n_forced = 0
        if len(lens) and (lens.max() > cap or lens.min() == 0):
            parts, n_parts = [], []
            for c in chunks:
                pieces = self._split_long(c, cap) if len(c) > cap else [c] if c else []
                parts += pieces
                n_parts.append(len(pieces))
            self.n_parts = np.array(n_parts, dtype=np.int64)
            lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        # Stream: every part followed by SEP. Greedy rows: a row takes parts while they fit.
        stream = codepoints(SEP.join(parts) + SEP) if parts else np.zeros(0, np.uint32)
        ends = np.cumsum(lens + 1)
        starts = ends - lens - 1
        # nxt[p]: the first part of the next row if a row starts at part p; then follow it.
        nxt = np.searchsorted(ends, starts + row_len, side="right").tolist()
        first: list[int] = []
        p = 0
        while p < len(parts):
            first.append(p)
            p = nxt[p]
        row_first = np.array(first, dtype=np.int64)
        B, T = len(row_first), row_len
        row_start = starts[row_first]
        row_end = np.append(row_start[1:], len(stream))
        src = row_start[:, None] + np.arange(T)[None, :]
        # Each row is its parts followed by SEP padding; (B, T) codepoints.
        inside = src < row_end[:, None]
        self.grid = np.full((B, T), ord(SEP), dtype=np.uint32)
        self.grid[inside] = stream[src[inside]]
        units = index.dense(self.grid.T.copy())  # (T, B)
        self.is_sep = torch.from_numpy(self.grid.T == ord(SEP))  # (T, B)
        edges = index.end_ids(units, self.NONE)
        single = edges[:, 0, :]
        single[(single == self.NONE) & (units == 0)] = self.OOV
        single[self.grid.T == ord(SEP)] = self.PASS
        if exclude_whole and len(parts):
            row_of = np.searchsorted(row_first, np.arange(len(parts)), side="right") - 1
            whole = lens <= K
            if self.n_parts is not None:
                whole &= np.repeat(self.n_parts == 1, self.n_parts)
            j = (starts - row_start[row_of] + lens - 1)[whole]
            edges[j, lens[whole] - 1, row_of[whole]] = self.NONE
        self.edges = torch.from_numpy(edges)

    def _split_long(self, chunk: str, cap: int) -> list[str]:
        """Split ``chunk`` into pieces of at most ``cap`` units where no word crosses."""
        pieces, forced = split_long(chunk, self.index, cap)
        self.n_forced += forced
        return pieces

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, K, B)``."""
        return tuple(self.edges.shape)

    def scores(self, logp: torch.Tensor, oov_logp: float = -30.0) -> torch.Tensor:
        """``(T, K, B)`` edge weights: ``logp[word]``, pass-through 0, no edge -inf."""
        extra = torch.tensor([oov_logp, 0.0, float("-inf")], dtype=logp.dtype, device=logp.device)
        return torch.cat([logp, extra])[self.edges.to(logp.device)]

    def log_partition(self, logp: torch.Tensor, oov_logp: float = -30.0) -> torch.Tensor:
        """``(B,)``: log Σ_segmentations Π p(word) of each row (natural log)."""
        return semimarkov_forward(self.scores(logp, oov_logp), LogSemiring)[-1]

    def expected_counts(
        self, logp: torch.Tensor, oov_logp: float = -30.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[n_w] per word, Σ log Z)``: the E-step, as the gradient of log Z in log p."""
        theta = logp.detach().requires_grad_(True)
        with torch.enable_grad():
            logz = self.log_partition(theta, oov_logp).sum()
            (grad,) = torch.autograd.grad(logz, theta, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(theta)
        return grad.detach(), logz.detach()

    def best_starts(self, logp: torch.Tensor, oov_logp: float = -30.0) -> torch.Tensor:
        """``(T, B)`` bool, True where a word of the best (Viterbi) segmentation starts.

        Back-pointers are recomputed from the max-semiring forward values (the recursion
        itself stays semiring-generic); ties, up to ``TIE_NATS``, go to the shortest last
        word, so the result is deterministic and the same for a chunk alone or packed
        after others.
        """
        with torch.no_grad():
            scores = self.scores(logp, oov_logp)
            alpha = semimarkov_forward(scores, MaxSemiring)
            T, K, B = scores.shape
            # Best last word into every position at once: argmax_k alpha[j-k] + w(j, k).
            shifted = torch.stack(
                [
                    torch.cat([alpha.new_full((k, B), float("-inf")), alpha[: T - k]])
                    for k in range(K)
                ],
                dim=1,
            )
            # The shortest last word within TIE_NATS of the best: a (near-)tie is decided the
            # same way whatever the rounding of the row's earlier scores, so a chunk's words do
            # not depend on which chunks share its row (argmax of a bool: the first True).
            vals = shifted + scores
            near = vals >= vals.max(dim=1, keepdim=True).values - TIE_NATS
            back = near.to(torch.uint8).argmax(dim=1).cpu().numpy()  # (T, B)
        # Follow the back-pointers from each row's end (numpy: small ops, no dispatch cost).
        starts = np.zeros((T, B), dtype=bool)
        rows = np.arange(B)
        pos = np.full(B, T, dtype=np.int64)
        while True:
            live = pos > 0
            if not live.any():
                break
            r, j = rows[live], pos[live] - 1
            s = j - back[j, r]
            starts[s, r] = True
            pos[live] = s
        return torch.from_numpy(starts)

    def best_words(self, logp: torch.Tensor, oov_logp: float = -30.0) -> list[list[str]]:
        """The Viterbi segmentation of each input chunk, as lists of coded words."""
        if not self.n_chunks:
            return []
        starts = self.best_starts(logp, oov_logp).T.numpy().reshape(-1)
        flat = self.grid.reshape(-1)
        sep = flat == ord(SEP)
        prev_sep = np.concatenate([[True], sep[:-1]])
        # A space before every word start that does not open a chunk; parts end in SEP.
        cut = np.flatnonzero(starts & ~prev_sep & ~sep)
        spaced = np.insert(flat, cut, np.uint32(ord(" ")))
        parts = [p for p in spaced.tobytes().decode("utf-32-le").split(SEP) if p]
        with paused_gc():
            if self.n_parts is None:
                return [p.split(" ") for p in parts]
            out: list[list[str]] = []
            i = 0
            for n in self.n_parts.tolist():
                words: list[str] = []
                for p in parts[i : i + n]:
                    words += p.split(" ")
                out.append(words)
                i += n
            return out
