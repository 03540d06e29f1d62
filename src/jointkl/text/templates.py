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
        # Templates by their first word: a sentence only tries templates whose words it has.
        self._by_word: dict[str, list[int]] = defaultdict(list)
        for k, t in enumerate(templates.templates):
            first = next(tok for tok in t if tok is not X)
            self._by_word[first].append(k)

    def _alignments(self, words: Sequence[str]) -> dict[tuple[int, int], list]:
        """Candidate blocks by span: ``(a, b) -> [(log p, template, arg spans)]``."""
        n = len(words)
        at: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(words):
            at[w].append(i)
        cands: dict[tuple[int, int], list] = defaultdict(list)
        present = set(words)
        for w in present:
            for k in self._by_word.get(w, ()):
                t = self.templates.templates[k]
                lits = [tok for tok in t if tok is not X]
                if not set(lits) <= present:
                    continue
                lead, trail = t[0] is X, t[-1] is X
                # gap[r]: an X between literal r and r+1 (a trailing X is cut off the end).
                gap = [b is X for a, b in zip(t, t[1:], strict=False) if a is not X][
                    : len(lits) - 1
                ]
                for pos in _literal_positions(lits, gap, at):
                    inner = [(pos[r] + 1, pos[r + 1]) for r in range(len(pos) - 1) if gap[r]]
                    a_range = range(0, pos[0]) if lead else (pos[0],)
                    b_range = range(pos[-1] + 2, n + 1) if trail else (pos[-1] + 1,)
                    for a in a_range:
                        for b in b_range:
                            spans = ([(a, pos[0])] if lead else []) + inner
                            spans += [(pos[-1] + 1, b)] if trail else []
                            cands[(a, b)].append((self.templates.log_probs[k], t, spans))
        return cands

    def parse(self, words: Sequence[str]) -> Parse:
        """Parse one segmented sentence (a list of words)."""
        if isinstance(words, str):
            raise InputError("parse expects a list of words; segment the sentence first")
        words = list(words)
        n = len(words)
        cands = self._alignments(words)
        neg = float("-inf")
        block = {}  # (a, b) -> (score, template, spans)
        seq = {(i, i): (0.0, None) for i in range(n + 1)}  # (a, b) -> (score, split)

        def arg(a: int, b: int) -> float:
            return 0.0 if b - a == 1 else seq[(a, b)][0]

        for length in range(1, n + 1):
            for a in range(0, n - length + 1):
                b = a + length
                best = (neg, None, None)
                for lp, t, spans in cands.get((a, b), ()):
                    s = lp + sum(arg(x, y) for x, y in spans)
                    if s > best[0]:
                        best = (s, t, spans)
                if best[1] is not None:
                    block[(a, b)] = best
                # seq(a, b) = max_k seq(a, k) + item(k, b); an item is a block or a bare word.
                top = (neg, None)
                for k in range(a, b):
                    item = block[(k, b)][0] if (k, b) in block else neg
                    if b - k == 1:
                        item = max(item, self.null_score)
                    s = seq[(a, k)][0] + item
                    if s > top[0]:
                        top = (s, k)
                seq[(a, b)] = top

        def items(a: int, b: int) -> list[str | Block]:
            out: list[str | Block] = []
            while b > a:
                k = seq[(a, b)][1]
                if b - k > 1:  # a multi-word item is always a block
                    out.append(make_block(k, b))
                else:
                    out.append(words[k])
                b = k
            return out[::-1]

        def make_block(a: int, b: int) -> Block:
            s, t, spans = block[(a, b)]
            args = [[words[x]] if y - x == 1 else items(x, y) for x, y in spans]
            return Block(t, args, s)

        return Parse(items(0, n), seq[(0, n)][0])


def _literal_positions(
    lits: Sequence[str], gap: Sequence[bool], at: Mapping[str, list[int]]
) -> Iterator[list[int]]:
    """Positions p_1 < ... < p_m of the literals: adjacent where no X, ≥ 2 apart where X."""
    stack = [[p] for p in reversed(at[lits[0]])]
    while stack:
        pos = stack.pop()
        r = len(pos)
        if r == len(lits):
            yield pos
            continue
        prev = pos[-1]
        for p in reversed(at[lits[r]]):
            if (p == prev + 1) if not gap[r - 1] else (p >= prev + 2):
                stack.append(pos + [p])
