"""Per-sentence segmentation (`Segmenter.segment`, plain Python) equals the batched lattice.

`segment(text)` does not build a lattice: it runs a dictionary dynamic programme one chunk at
a time. These tests pin it to `segment_lines`, the batched path, word for word, on real
sentences, on texts with digits, Latin runs, punctuation and characters the lexicon has never
seen, and on rows short enough that chunks are packed several to a row and long ones split.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jointkl.text import Lexicon, Segmenter, WordFinder


@pytest.fixture(scope="module")
def daily_lines():
    from jointkl.data.peoples_daily import peoples_daily

    return ["".join(words) for words in peoples_daily()[:1500]]


def _assert_same(seg: Segmenter, texts: list[str]) -> None:
    batched = seg.segment_lines(texts)
    for text, want in zip(texts, batched, strict=True):
        assert seg.segment(text) == want, text


def test_segment_equals_segment_lines_on_peoples_daily(daily_lines):
    # Word counts straight from the word finder are integers, so exact and near ties
    # between segmentations occur; after EM the probabilities are real numbers.
    lex = WordFinder(min_proba=1e-5).fit(daily_lines)
    seg = Segmenter(lex)
    _assert_same(seg, daily_lines)
    seg.fit_em(daily_lines[:500], iters=2)
    _assert_same(seg, daily_lines[:800])  # the cached table follows the refitted lexicon
    _assert_same(Segmenter(seg.lexicon), daily_lines[:800])
    # Short rows: several chunks per row, long chunks split (and some splits forced).
    _assert_same(Segmenter(lex, row_len=8), daily_lines[:300])


def test_segment_handles_runs_punctuation_and_unseen_characters(daily_lines):
    seg = Segmenter(WordFinder(min_proba=1e-5).fit(daily_lines[:300]))
    texts = [
        "",
        "，。",
        "１２月３１日，ＡＰＥＣ会议在北京举行。",
        "WTO和3.5%的增长——鑫犇龘",
        "他说：“这个问题可以解决！”" * 3,
        "中国经济发展很快" * 20,  # one chunk longer than a row
        "a b  c",
    ]
    _assert_same(seg, texts)
    assert seg.segment("") == []
    assert "".join(seg.segment("鑫犇龘")) == "鑫犇龘"


def test_segment_with_a_unit_that_is_no_word_on_its_own():
    # 甲 is in the alphabet but only inside 甲乙: a lone 甲 has no path at all, and both
    # paths must fall back the same way.
    seg = Segmenter(Lexicon({"甲乙": 5.0, "乙": 1.0, "丙": 2.0}))
    texts = ["甲乙", "甲乙丙", "丙甲乙", "甲甲乙", "乙甲", "甲", "乙丙甲", "甲丁乙"]
    _assert_same(seg, texts)
    assert seg.segment("甲乙丙") == ["甲乙", "丙"]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_segment_equals_segment_lines_on_random_lexicons(seed):
    rng = random.Random(seed)
    alphabet = "甲乙丙丁"  # CJK: Latin letters would be one run (one unit) each
    counts = {u: float(rng.randint(1, 4)) for u in alphabet}  # small integers: many ties
    while len(counts) < 14:
        w = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4)))
        counts[w] = float(rng.randint(1, 4))
    texts = [
        "".join(rng.choice(alphabet + "戊，") for _ in range(rng.randint(0, 40))) for _ in range(6)
    ]
    for row_len in (5, 16, 64):
        _assert_same(Segmenter(Lexicon(counts), row_len=row_len), texts)
