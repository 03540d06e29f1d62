"""Sentence templates ("the elephant crosses the river") and parsing with them.

A template is a word sequence with placeholders X, such as ``X可以X吗``: its words are
linked although they are not adjacent. :class:`TemplateFinder` learns them:

1. count word pairs (a, b) with b at most ``window`` words after a;
2. keep the *strong* pairs, ``p_ab > min_proba`` and ``PMI(a, b) > min_pmi``;
3. in each sentence, draw the DAG with an edge i→j for each strong pair (w_i, w_j); every
   path of two or more words is a template: its words in order, one X for each run of
   skipped words, and one X before the first / after the last word when words are there;
4. count templates and keep those with ``p > min_proba``; a template with one word
   (``X w X``) is trivial and never made.

:class:`TemplateParser` parses a sentence into nested, non-crossing blocks: a block is one
template whose placeholders are filled with non-empty spans, and a span of more than one
word inside a placeholder is itself a sequence of blocks and bare words. The parse
maximises Σ log p(template) + ``null_score`` × (number of bare words), where a bare word is
one that is neither a template's word nor the whole content of a placeholder.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jointkl.errors import InputError
from jointkl.runs import atomic_write_text
from jointkl.text.bulk import paused_gc
from jointkl.text.corpus import Corpus

__all__ = [
    "X",
    "Template",
    "Templates",
    "TemplateFinder",
    "Block",
    "Parse",
    "TemplateParser",
    "clauses",
]

X = None
"""The placeholder inside a template tuple (printed as ``X``)."""

Template = tuple  # tuple[str | None, ...]: words, with X (None) for placeholders

_PUNCT_RE = re.compile(r"[^\w\s]+")


def clauses(words: Sequence[str]) -> list[list[str]]:
    """Split a segmented sentence at its punctuation tokens into clauses (no punctuation)."""
    out: list[list[str]] = [[]]
    for w in words:
        if _PUNCT_RE.fullmatch(w):
            if out[-1]:
                out.append([])
        else:
            out[-1].append(w)
    return [c for c in out if c]


def show(template: Template) -> str:
    """``(None, '可以', None, '吗')`` -> ``'X可以X吗'``."""
    return "".join("X" if t is X else t for t in template)


def _encode_token(t: str | None) -> str:
    if t is X:
        return "X"
    return "\\" + t if t == "X" or t.startswith("\\") else t


def _decode_token(s: str) -> str | None:
    if s == "X":
        return X
    return s[1:] if s.startswith("\\") else s


class Templates:
    """Templates with counts; ``p(t) = n_t / Σ n``. Most frequent first.

    ``save``/``load`` use a UTF-8 TSV file, ``count<TAB>tokens`` per line, tokens separated
    by single spaces and ``X`` for a placeholder (a literal word ``X`` is written ``\\X``).
    """

    def __init__(self, counts: Mapping[Template, float]):
        items = []
        for t, c in counts.items():
            t = tuple(t)
            if not (math.isfinite(c) and c > 0):
                raise InputError(f"template {show(t)!r}: expected a positive count, got {c!r}")
            if sum(tok is not X for tok in t) < 2:
                raise InputError(
                    f"template {show(t)!r}: expected at least two words (X w X is trivial)"
                )
            if any(a is X and b is X for a, b in zip(t, t[1:], strict=False)):
                raise InputError(f"template {show(t)!r}: two adjacent placeholders, expected one")
            items.append((t, float(c)))
        if not items:
            raise InputError("no templates: expected at least one template with a positive count")
        items.sort(key=lambda tc: (-tc[1], show(tc[0])))
        self.templates = [t for t, _ in items]
        self.counts = [c for _, c in items]
        self._count = dict(items)
        total = sum(self.counts)
        self.log_probs = [math.log(c / total) for c in self.counts]

    def __len__(self) -> int:
        return len(self.templates)

    def __iter__(self) -> Iterator[Template]:
        return iter(self.templates)

    def __contains__(self, t: object) -> bool:
        return t in self._count

    def count(self, t: Template) -> float:
        return self._count.get(tuple(t), 0.0)

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` most frequent templates as ``(printed, count)``."""
        return [(show(t), c) for t, c in zip(self.templates[:n], self.counts[:n], strict=True)]

    def save(self, path: str | os.PathLike) -> Path:
        lines = [
            f"{c:.6g}\t{' '.join(map(_encode_token, t))}\n"
            for t, c in zip(self.templates, self.counts, strict=True)
        ]
        return atomic_write_text("".join(lines), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Templates:
        """Read a file written by :meth:`save`; bad lines raise :class:`InputError`."""
        expected = "expected 'count<TAB>tokens' (tokens separated by spaces, X for a placeholder)"
        counts: dict[Template, float] = {}
        for n, line in enumerate(Corpus(path), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[1].strip():
                raise InputError(f"{path}: line {n}: {expected}, got {line[:40]!r}")
            try:
                c = float(fields[0])
            except ValueError:
                c = float("nan")
            if not (math.isfinite(c) and c > 0):
                raise InputError(
                    f"{path}: line {n}: {expected} with a positive count, got {fields[0]!r}"
                )
            t = tuple(_decode_token(s) for s in fields[1].split(" "))
            if any(s == "" for s in t):
                raise InputError(f"{path}: line {n}: {expected}; found an empty token")
            try:
                cls({t: c})
            except InputError as e:
                raise InputError(f"{path}: line {n}: {e}") from None
            counts[t] = counts.get(t, 0.0) + c
        if not counts:
            raise InputError(f"{path}: no templates; {expected} on each line")
        return cls(counts)


class TemplateFinder:
    """Learn :class:`Templates` from segmented sentences (lists of words).

    :param window: largest distance, in words, between the two words of a counted pair.
    :param min_proba: smallest probability of a strong pair and of a kept template.
    :param min_pmi: smallest PMI (natural log) of a strong pair (≈2: clearly linked words).
    :param max_words: longest template path, in words (bounds the paths of a dense DAG).
    :param progress: tqdm bar over sentences while collecting paths.
    """

    def __init__(
        self,
        window: int = 5,
        min_proba: float = 1e-5,
        min_pmi: float = 2.0,
        max_words: int = 4,
        progress: bool = False,
    ):
        if not (isinstance(window, int) and window >= 1):
            raise InputError(f"window must be an integer >= 1, got {window!r}")
        if not (isinstance(min_proba, (int, float)) and 0 <= min_proba < 1):
            raise InputError(f"min_proba must be in [0, 1), got {min_proba!r}")
        if not (isinstance(min_pmi, (int, float)) and math.isfinite(min_pmi)):
            raise InputError(f"min_pmi must be a finite number, got {min_pmi!r}")
        if not (isinstance(max_words, int) and max_words >= 2):
            raise InputError(f"max_words must be an integer >= 2, got {max_words!r}")
        self.window = window
        self.min_proba = float(min_proba)
        self.min_pmi = float(min_pmi)
        self.max_words = max_words
        self.progress = progress

    def fit(self, sentences: Iterable[Sequence[str]]) -> Templates:
        """Learn templates from ``sentences``, each a list of words (already segmented)."""
        with paused_gc():
            sentences = list(sentences)
            for n, s in enumerate(sentences):
                if isinstance(s, str):
                    raise InputError(f"sentence {n + 1}: expected a list of words, got a str")
            flat = list(itertools.chain.from_iterable(sentences))
            if not flat:
                raise InputError("no sentences: expected at least one non-empty list of words")
            # Word ids in first-seen order, with C-level dict and map calls.
            vocab = {w: i for i, w in enumerate(dict.fromkeys(flat))}
            ids = list(map(vocab.__getitem__, flat))
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in sentences])]).tolist()
        words = np.array(ids, dtype=np.int64)
        sent = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        V = len(vocab)
        # Pair counts, vectorised per distance d: (w_i, w_{i+d}) inside one sentence.
        word_p = np.bincount(words, minlength=V) / len(words)
        keys_d = []
        for d in range(1, self.window + 1):
            same = sent[d:] == sent[:-d]
            keys_d.append(words[:-d][same] * V + words[d:][same])
        all_keys = np.concatenate(keys_d) if keys_d else np.zeros(0, np.int64)
        if not len(all_keys):
            raise InputError("no word pairs: expected sentences with at least two words")
        keys, n_ab = np.unique(all_keys, return_counts=True)
        p_ab = n_ab / len(all_keys)
        pmi = np.log(p_ab) - np.log(word_p[keys // V] * word_p[keys % V])
        strong = keys[(p_ab > self.min_proba) & (pmi > self.min_pmi)]
        self.n_strong_pairs_ = len(strong)

        # Edges i -> i+d of every sentence at once, for strong pairs (sorted by i, then d).
        src, dst = [], []
        for d in range(1, self.window + 1):
            i = np.flatnonzero(sent[d:] == sent[:-d])
            pk = words[i] * V + words[i + d]
            pos = np.searchsorted(strong, pk).clip(max=max(len(strong) - 1, 0))
            hit = strong[pos] == pk if len(strong) else np.zeros(len(pk), dtype=bool)
            src.append(i[hit])
            dst.append(i[hit] + d)
        src = np.concatenate(src)
        dst = np.concatenate(dst)
        order = np.lexsort((dst, src))
        src, dst = src[order].tolist(), dst[order].tolist()
        names = list(vocab)
        bound = bounds  # sentence k covers words bound[k] .. bound[k+1]-1
        sent_of = sent.tolist()
        counts: Counter = Counter()
        e = 0
        it = tqdm(total=len(src), desc="templates", disable=not self.progress, leave=False)
        with paused_gc():
            while e < len(src):
                k = sent_of[src[e]]
                succ: dict[int, list[int]] = defaultdict(list)
                while e < len(src) and sent_of[src[e]] == k:
                    succ[src[e] - bound[k]].append(dst[e] - bound[k])
                    e += 1
                it.update(sum(map(len, succ.values())))
                sw = [names[x] for x in ids[bound[k] : bound[k + 1]]]
                for path in _paths(succ, self.max_words):
                    counts[_template(sw, path)] += 1
        it.close()
        self.n_paths_ = sum(counts.values())
        total = max(self.n_paths_, 1)
        kept = {t: c for t, c in counts.items() if c / total > self.min_proba}
        if not kept:
            raise InputError(
                "no templates passed the filters: expected more text, or a lower min_proba/min_pmi"
            )
        return Templates(kept)


def _paths(succ: Mapping[int, list[int]], max_words: int) -> Iterator[list[int]]:
    """Every path of 2..max_words nodes in the DAG ``succ`` (node -> later nodes)."""
    stack = [[i] for i in sorted(succ, reverse=True)]
    while stack:
        path = stack.pop()
        if len(path) >= 2:
            yield path
        if len(path) < max_words:
            for j in reversed(succ.get(path[-1], ())):
                stack.append(path + [j])


def _template(words: Sequence[str], path: Sequence[int]) -> Template:
    """The template of a path: its words, one X per gap, and X at open ends."""
    out: list[str | None] = [X] if path[0] > 0 else []
    for r, i in enumerate(path):
        if r and i > path[r - 1] + 1:
            out.append(X)
        out.append(words[i])
    if path[-1] < len(words) - 1:
        out.append(X)
    return tuple(out)


# -- parsing ---------------------------------------------------------------------------------


def _show_items(items: Sequence[str | Block]) -> str:
    # Items of one sequence are spaced, so that two blocks side by side stay two blocks.
    return " ".join(map(str, items))


@dataclass
class Block:
    """One template instance: ``args[r]`` fills the template's r-th placeholder."""

    template: Template
    args: list[list[str | Block]] = field(default_factory=list)
    log_prob: float = 0.0

    def __str__(self) -> str:
        args = iter(self.args)
        return "".join("(" + _show_items(next(args)) + ")" if t is X else t for t in self.template)


@dataclass
class Parse:
    """A parsed sentence: a sequence of blocks and bare words, and its score.

    Printed as its items separated by spaces, each block as its template with every
    placeholder's content in parentheses: ``(鸡蛋)可以(吃)吗``, ``今天 (鸡蛋)可以(吃)吗``.
    """

    items: list[str | Block]
    score: float

    def __str__(self) -> str:
        return _show_items(self.items)

    @property
    def blocks(self) -> list[Block]:
        """Every block of the tree, outermost first."""
        out: list[Block] = []
        todo = [i for i in self.items if isinstance(i, Block)]
        while todo:
            b = todo.pop(0)
            out.append(b)
            todo += [i for arg in b.args for i in arg if isinstance(i, Block)]
        return out


class TemplateParser:
    """Nested, non-crossing parse with :class:`Templates`, maximising Σ log p(template).

    :param templates: the templates and their probabilities.
    :param null_score: score of each bare word (one no template covers), ≈ −20.
    """

    def __init__(self, templates: Templates, null_score: float = -20.0):
        if not isinstance(templates, Templates):
            raise InputError(
                f"templates must be jointkl.text.Templates, got {type(templates).__name__}"
            )
        if not (isinstance(null_score, (int, float)) and math.isfinite(null_score)):
            raise InputError(f"null_score must be a finite number, got {null_score!r}")
        self.templates = templates
        self.null_score = float(null_score)
        # Templates by their rarest word (the one in fewest templates): a sentence only
        # tries templates whose words it has, and looks at few that it has not.
        in_templates = Counter(w for t in templates.templates for w in set(t) if w is not X)
        self._by_word: dict[str, list[int]] = defaultdict(list)
        for k, t in enumerate(templates.templates):
            rarest = min((tok for tok in t if tok is not X), key=in_templates.__getitem__)
            self._by_word[rarest].append(k)
        # Per template: (its literal words as a set, the literals in order, gap[r] = an X
        # between literal r and r+1, kind: 0 closed, 1 leading X, 2 trailing X, 3 both).
        self._literals: list[tuple[frozenset, list[str], list[bool], int]] = []
        for t in templates.templates:
            lits = [tok for tok in t if tok is not X]
            inner = t[1:] if t[0] is X else t
            inner = inner[:-1] if inner[-1] is X else inner
            gaps = []
            for a, b in zip(inner, inner[1:], strict=False):
                if a is not X:
                    gaps.append(b is X)
            kind = (t[0] is X) + 2 * (t[-1] is X)
            self._literals.append((frozenset(lits), lits, gaps, kind))

    def _relevant(self, words: Sequence[str]) -> list[int]:
        """Indices of the templates whose literal words all occur in ``words``, in order."""
        present = set(words)
        out = []
        for w in present:
            for k in self._by_word.get(w, ()):
                if self._literals[k][0] <= present:
                    out.append(k)
        return sorted(out)

    def parse(self, words: Sequence[str]) -> Parse:
        """Parse one segmented sentence (a list of words).

        An interval dynamic programme over spans ``[a, b)`` of increasing length ``L``,
        O(n³) array work for n words plus the literal placements of the templates present.
        A block is taken apart into its *core* (first literal at ``p``, last at ``q``, the
        inner placeholders filled) and its open ends: a leading X fills ``[a, p)`` and a
        trailing X fills ``[q+1, b)``. Per span,

            core_t(p, q) = log p(t) + max over the inner literals of Σ arg(inner fills),
            block(a, b)  = max of  core(a, b-1)                          (no open end)
                                   max_p arg(a, p) + core(p, b-1)        (leading X)
                                   max_q core(a, q) + arg(q+1, b)        (trailing X)
                                   max_q D(a, q) + arg(q+1, b)           (both; D(a, q) =
                                                      max_p arg(a, p) + core(p, q))
            seq(a, b)    = max_k seq(a, k) + item(k, b),   item = block, or null_score
                                                           for one bare word,
            arg(x, y)    = 0 for one word (the template covers it), seq(x, y) otherwise,

        where each core is maximised over the templates of its kind (which ends are open).
        Every term on the right is a shorter span, so one pass by length is exact; each
        step is vectorised over the start ``a``. Ties keep the first: the shorter prefix
        in ``seq``, then no open end, leading, trailing, both, then the more frequent template
        and the leftmost literal positions.
        """
        if isinstance(words, str):
            raise InputError("parse expects a list of words; segment the sentence first")
        words = list(words)
        n = len(words)
        if n == 0:
            return Parse([], 0.0)
        neg = -np.inf
        N = n + 1
        at: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(words):
            at[w].append(i)

        # Every table is laid out (start, length): span [a, a+L) is [a, L]. Then each term of
        # the recursions, for all starts a at once, is a slice or an anti-diagonal view of a
        # table (no gather).
        A = np.full((N, N), neg)  # arg(x, y)
        S = np.full((N, N), neg)  # seq(a, b)
        S[:, 0] = 0.0
        A[:n, 1] = 0.0
        S[:n, 1] = self.null_score
        seq_c = np.zeros((N, N), dtype=np.int64)  # seq's last item starts at a + seq_c
        seq_c[:n, 1] = 0
        core = np.full((4, N, N), neg)  # best core per kind: 0 closed, 1 lead X, 2 trail X, 3 both
        core_of: dict[tuple[int, int, int], int] = {}  # (kind, p, q) -> template index
        lead_D = np.full((N, N), neg)  # D(a, q): leading fill [a, p) + both-open core (p, q)
        lead_p = np.zeros((N, N), dtype=np.int64)  # its p - a
        block = np.full((N, N), neg)
        how = np.zeros((N, N), dtype=np.int64)  # the block's kind
        cut = np.zeros((N, N), dtype=np.int64)  # p - a (lead) or q - a (trail, both)

        # Literal placements of each template present, bucketed by the length of
        # [first literal, this literal]: entry (k, r, p, j) puts literal r of template k at
        # j with literal 0 at p; its best score needs only shorter spans.
        relevant = self._relevant(words)
        kinds = {self._literals[k][3] for k in relevant}  # the kinds of block that can occur
        buckets: list[list[tuple[int, int, int, int]]] = [[] for _ in range(N)]
        F: dict[tuple[int, int, int, int], tuple[float, int]] = {}
        for k in relevant:
            lits = self._literals[k][1]
            firsts = at[lits[0]]
            for p in firsts:
                F[(k, 0, p, p)] = (0.0, -1)
            for r in range(1, len(lits)):
                for j in at[lits[r]]:
                    for p in firsts:
                        if p + r > j:
                            break
                        buckets[j - p + 1].append((k, r, p, j))

        for L in range(2, N):
            # Cores of length L: F[(k, r, p, j)] = (best Σ inner args, literal r-1's position).
            for k, r, p, j in buckets[L]:
                lits, gaps = self._literals[k][1], self._literals[k][2]
                best, prev = neg, -1
                if gaps[r - 1]:  # a placeholder between literal r-1 and r: fills [i+1, j)
                    for i in at[lits[r - 1]]:
                        if i > j - 2:
                            break
                        got = F.get((k, r - 1, p, i))
                        if got is not None and got[0] + A[i + 1, j - i - 1] > best:
                            best, prev = got[0] + A[i + 1, j - i - 1], i
                else:
                    got = F.get((k, r - 1, p, j - 1))
                    if got is not None:
                        best, prev = got[0], j - 1
                if prev < 0:
                    continue
                F[(k, r, p, j)] = (best, prev)
                if r == len(lits) - 1:
                    kind = self._literals[k][3]
                    score = self.templates.log_probs[k] + best
                    if score > core[kind, p, L]:
                        core[kind, p, L] = score
                        core_of[(kind, p, j)] = k
            M = N - L  # spans of length L start at a = 0 .. M-1
            rows = np.arange(M)
            # Blocks of length L, four kinds: closed core; leading fill [a, a+d) + core
            # (d = 1 .. L-2); core or D (a, a+e) + trailing fill (e = 1 or 2 .. L-2).
            cands = np.full((4, M), neg)
            where = np.zeros((4, M), dtype=np.int64)
            cands[0] = core[0, :M, L]
            if L >= 3 and kinds & {1, 3}:
                fills = A[:M, 1 : L - 1]
                closed = fills + _antidiagonal(core[1], 1, L - 1, M, L - 2)
                both = fills + _antidiagonal(core[3], 1, L - 1, M, L - 2)
                cands[1] = closed.max(axis=1)
                where[1] = 1 + closed.argmax(axis=1)
                lead_D[:M, L] = both.max(axis=1)
                lead_p[:M, L] = 1 + both.argmax(axis=1)
            for kind, table, e0 in ((2, core[2], 1), (3, lead_D, 2)):
                if L - 1 > e0 and kind in kinds:
                    t = table[:M, e0 + 1 : L] + _antidiagonal(A, e0 + 1, L - e0 - 1, M, L - 1 - e0)
                    cands[kind] = t.max(axis=1)
                    where[kind] = e0 + t.argmax(axis=1)
            kind = cands.argmax(axis=0)
            block[:M, L] = cands[kind, rows]
            how[:M, L] = kind
            cut[:M, L] = where[kind, rows]
            # seq(a, a+L) = max_c seq(a, a+c) + item(a+c, a+L); an item of one word is bare
            # (a block has at least two words).
            t = S[:M, :L] + _antidiagonal(block, 0, L, M, L)
            t[:, L - 1] = S[:M, L - 1] + self.null_score
            S[:M, L] = t.max(axis=1)
            seq_c[:M, L] = t.argmax(axis=1)
            A[:M, L] = S[:M, L]

        def items(a: int, b: int) -> list[str | Block]:
            out: list[str | Block] = []
            while b > a:
                k = a + int(seq_c[a, b - a])
                out.append(make_block(k, b) if b - k > 1 else words[k])
                b = k
            return out[::-1]

        def fill(x: int, y: int) -> list[str | Block]:
            return [words[x]] if y - x == 1 else items(x, y)

        def make_block(a: int, b: int) -> Block:
            kind, c = int(how[a, b - a]), int(cut[a, b - a])
            p, q = a, b - 1
            if kind == 1:
                p = a + c
            elif kind == 2:
                q = a + c
            elif kind == 3:
                q = a + c
                p = a + int(lead_p[a, q - a + 1])
            k = core_of[(kind, p, q)]
            lits, gaps = self._literals[k][1], self._literals[k][2]
            pos = [q]
            for r in range(len(lits) - 1, 0, -1):
                pos.append(F[(k, r, p, pos[-1])][1])
            pos.reverse()
            args = [fill(a, p)] if kind in (1, 3) else []
            args += [fill(pos[r] + 1, pos[r + 1]) for r in range(len(pos) - 1) if gaps[r]]
            if kind in (2, 3):
                args.append(fill(q + 1, b))
            return Block(self.templates.templates[k], args, float(block[a, b - a]))

        return Parse(items(0, n), float(S[0, n]))


def _antidiagonal(table: np.ndarray, r0: int, c0: int, rows: int, cols: int) -> np.ndarray:
    """The view ``V[i, j] = table[r0 + i + j, c0 - j]`` of a C-contiguous 2-D table (read only)."""
    s0, s1 = table.strides
    return np.ndarray(
        (rows, cols), table.dtype, table, offset=r0 * s0 + c0 * s1, strides=(s0, s0 - s1)
    )
