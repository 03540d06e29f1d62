"""Word-segmentation scoring as in the SIGHAN bakeoffs: words compared as character spans.

A predicted word counts as correct when the same (start, end) span is a gold word; precision,
recall and F1 are micro-averaged over all words of all sentences. OOV recall is the recall of
gold words absent from the training vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jointkl.errors import InputError

__all__ = ["SegmentationScore", "word_spans", "score_segmentation"]


@dataclass(frozen=True)
class SegmentationScore:
    precision: float
    recall: float
    f1: float
    oov_recall: float | None
    n_gold: int
    n_pred: int

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def word_spans(words: Sequence[str]) -> set[tuple[int, int]]:
    """``["ab", "c"]`` -> ``{(0, 2), (2, 3)}``."""
    spans, start = set(), 0
    for w in words:
        spans.add((start, start + len(w)))
        start += len(w)
    return spans


def score_segmentation(
    gold: Iterable[Sequence[str]],
    pred: Iterable[Sequence[str]],
    train_vocab: set[str] | None = None,
) -> SegmentationScore:
    """Micro-averaged word P/R/F1 (and OOV recall when ``train_vocab`` is given).

    Each gold/predicted pair must segment the same characters; a mismatch is an error, since
    span scoring would silently mis-count otherwise.
    """
    n_gold = n_pred = n_match = n_oov = n_oov_match = 0
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if "".join(g) != "".join(p):
            raise InputError(
                f"sentence {i}: gold and predicted segmentations cover different text "
                f"({''.join(g)[:20]!r}... vs {''.join(p)[:20]!r}...)"
            )
        gs, ps = word_spans(g), word_spans(p)
        n_gold += len(gs)
        n_pred += len(ps)
        n_match += len(gs & ps)
        if train_vocab is not None:
            start = 0
            for w in g:
                span = (start, start + len(w))
                start += len(w)
                if w not in train_vocab:
                    n_oov += 1
                    n_oov_match += span in ps
    precision = n_match / n_pred if n_pred else 0.0
    recall = n_match / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    oov = (n_oov_match / n_oov if n_oov else 0.0) if train_vocab is not None else None
    return SegmentationScore(precision, recall, f1, oov, n_gold, n_pred)
