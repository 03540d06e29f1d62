"""Minimum-entropy text: pre-splitting, lexicon, lattice, segmentation, EM, templates, CLI."""

from __future__ import annotations

import argparse
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jointkl.errors import InputError
from jointkl.semiring import LogSemiring, MaxSemiring
from jointkl.text import (
    Lexicon,
    Segmenter,
    TemplateFinder,
    TemplateParser,
    Templates,
    WordFinder,
    WordIndex,
    WordLattice,
    clauses,
    score_segmentation,
    semimarkov_forward,
    split_line,
)
from jointkl.text.commands import add_commands
from jointkl.text.presplit import coded_chunks, decode_words
from jointkl.text.wordfinder import remove_redundant

# -- pre-splitting ---------------------------------------------------------------------------


def test_presplit_cuts_at_punctuation_and_codes_runs():
    line = split_line("１２月３１日，ＡＰＥＣ会议在3.5%增长——好！")
    assert line.pieces == ["0月0日", "，", "A会议在0增长", "——", "好", "！"]
    assert line.is_chunk == [True, False, True, False, True, False]
    assert line.runs == ["１２", "３１", "ＡＰＥＣ", "3.5%"]
    assert coded_chunks("１２月３１日，ＡＰＥＣ会议在3.5%增长——好！") == [
        "0月0日",
        "A会议在0增长",
        "好",
    ]


def test_presplit_full_and_half_width_digit_and_latin_runs():
    assert split_line("ISO9002与ｉｓｏ９００１").pieces == ["A0与A0"]
    assert split_line("１．５万").runs == ["１．５"]
    assert split_line("a b").pieces == ["A", "A"]  # whitespace is a boundary


def test_decode_words_puts_runs_back_in_order():
    line = split_line("１２月３１日ＡＰＥＣ")
    assert decode_words(["0月", "0日", "A"], line.runs) == ["１２月", "３１日", "ＡＰＥＣ"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="的人民12３ａB，。 —\n-_", max_size=30))
def test_segmentation_covers_the_text_exactly(text):
    seg = Segmenter(Lexicon({"的": 5, "人民": 3, "人": 2, "民": 1, "0年": 1}))
    words = seg.segment(text)
    assert "".join(words) == "".join(text.split())
    assert all(words)


# -- lexicon: counting, PMI cut, redundancy ---------------------------------------------------


def _cjk(text: str) -> str:
    """Latin letters are coded as one Latin-run unit, so hand-made corpora use 甲乙丙丁戊."""
    return text.translate(str.maketrans("abcdefx", "甲乙丙丁戊己庚"))


def test_word_finder_counts_pmi_cut_and_fragments_by_hand():
    lines = [_cjk(s) for s in ["abcd", "abxcd", "ab", "cd", "xx"]]
    f = WordFinder(min_proba=0.0, min_pmi=1.0, max_len=4, redundancy=1.0)
    lex = f.fit(lines)
    # Units: a b c d x three times each, 15 in all; pairs: ab 3, cd 3, bc bx xc xx 1 each,
    # 10 in all. PMI(a, b) = log(0.3 / 0.2²) = 2.01 > 1: strong; every other pair has
    # PMI = log(0.1 / 0.2²) = 0.92 < 1: cut there.
    assert f.n_units_ == 15
    assert f.strong_pairs_ == {_cjk("ab"), _cjk("cd")}
    # abcd -> ab|cd, abxcd -> ab|x|cd, xx -> x|x.
    assert f.fragments_ == {_cjk("ab"): 3, _cjk("cd"): 3, _cjk("x"): 3}
    assert set(lex.words) == set(_cjk("ab cd a b c d x").split())
    # a never stands alone: floor 1. ab: log 3 - 2 log 1 + log 13 = 3.7 >= 1, kept.
    assert lex[_cjk("ab")] == 3 and lex[_cjk("x")] == 3 and lex[_cjk("a")] == 1


def test_word_finder_min_proba_cuts_pairs_and_drops_rare_fragments():
    lines = [_cjk(s) for s in ["abcd"] * 3 + ["ef"] * 2 + ["x"] * 30]
    f = WordFinder(min_proba=0.07, min_pmi=0.0, max_len=4, redundancy=1.0)
    lex = f.fit(lines)
    # Pairs: ab bc cd 3 each, ef 2 (11 in all): p = 0.27 and 0.18 > 0.07, all strong.
    assert f.strong_pairs_ == set(_cjk("ab bc cd ef").split())
    # Fragments: abcd 3, ef 2, x 30 (35 in all): p(ef) = 0.057 < 0.07 is dropped.
    assert _cjk("abcd") in lex and _cjk("ef") not in lex and _cjk("e") in lex
    f2 = WordFinder(min_proba=0.2, min_pmi=0.0, max_len=4)
    f2.fit(lines)
    assert f2.strong_pairs_ == set(_cjk("ab bc cd").split())  # p(ef) = 0.18 < 0.2


def test_redundancy_rule_by_hand():
    counts = {"a": 10, "b": 10, "c": 5, "ab": 8, "abc": 1, "bc": 2}
    new, removed = remove_redundant(counts)
    # abc: best pieces ab|c; log(1/36) - log(8/36) - log(5/36) = log(36/40) < 2: deleted,
    # ab -> 9, c -> 6, total 37. ab: log 9 - log 10 - log 10 + log 37 = 1.20 >= 1: kept.
    # bc: log 2 - log 10 - log 6 + log 37 = 0.21 < 1: deleted, b -> 12, c -> 8.
    assert new == {"a": 10, "b": 12, "c": 8, "ab": 9}
    assert removed == 2


def test_redundancy_scale_makes_the_rule_stricter():
    counts = {"a": 10, "b": 10, "c": 5, "ab": 8, "abc": 1, "bc": 2}
    # Threshold 2 (len - 1): ab's gain 1.20 no longer pays; its 9 go to a and b.
    assert remove_redundant(counts, 2.0) == ({"a": 19, "b": 21, "c": 8}, 3)
    assert remove_redundant(counts, 0.0) == (
        {"a": 10, "b": 10, "c": 6, "ab": 9, "bc": 2},
        1,
    )  # only abc (gain < 0) goes


def test_redundancy_keeps_a_word_that_saves_enough_code():
    counts = {"a": 1, "b": 1, "ab": 50}
    assert remove_redundant(counts) == (counts, 0)


def test_word_finder_streams_files_and_one_shot_iterators(tmp_path):
    lines = ["中国人民", "人民日报", "中国经济发展", "经济发展很快", "人民很好"] * 20
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    finder = WordFinder(min_proba=1e-3, min_pmi=0.5, block_chars=16)  # many small blocks
    a = finder.fit(lines).as_dict()
    assert WordFinder(min_proba=1e-3, min_pmi=0.5).fit(path).as_dict() == a
    assert WordFinder(min_proba=1e-3, min_pmi=0.5).fit(iter(lines)).as_dict() == a
    assert "中国人民" in a and a["中国人民"] == 20


def test_lexicon_save_load_roundtrip_and_coded_words(tmp_path):
    lex = Lexicon({"0年": 4.0, "中国": 2.5, "A股": 1.0, "的": 7.0})
    lex.save(tmp_path / "lex.tsv")
    text = (tmp_path / "lex.tsv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "的\t7"
    back = Lexicon.load(tmp_path / "lex.tsv")
    assert back.as_dict() == lex.as_dict()
    # A hand-written entry with a real run is coded on load.
    (tmp_path / "hand.tsv").write_text("ＡＰＥＣ会议\t3\n１９９８年\t2\n", encoding="utf-8")
    assert Lexicon.load(tmp_path / "hand.tsv").as_dict() == {"A会议": 3.0, "0年": 2.0}


# -- the lattice: one recursion, brute force ---------------------------------------------------


def _segmentations(s, words):
    if not s:
        yield []
        return
    for k in range(1, len(s) + 1):
        if s[:k] in words:
            for rest in _segmentations(s[k:], words):
                yield [s[:k], *rest]


def _random_lexicon(rng, alphabet="abc", n=10, max_len=3):
    words = set(alphabet)
    while len(words) < n:
        words.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, max_len))))
    words = sorted(words)
    logp = torch.log(torch.tensor([rng.random() + 0.05 for _ in words], dtype=torch.float64))
    return words, logp - torch.logsumexp(logp, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_viterbi_and_log_partition_equal_brute_force(seed):
    rng = random.Random(seed)
    words, logp = _random_lexicon(rng)
    chunks = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 8))) for _ in range(5)]
    for row_len in (9, 20):  # one chunk per row, and several packed into a row
        lat = WordLattice(chunks, WordIndex(words, 3), row_len=row_len)
        logz = lat.log_partition(logp).sum()
        best = lat.best_words(logp)
        brute_z = 0.0
        for chunk, got in zip(chunks, best, strict=True):
            segs = list(_segmentations(chunk, set(words)))
            scores = [sum(float(logp[words.index(w)]) for w in s) for s in segs]
            brute_z += math.log(sum(math.exp(x) for x in scores))
            assert sum(float(logp[words.index(w)]) for w in got) == pytest.approx(max(scores))
            assert "".join(got) == chunk
        assert float(logz) == pytest.approx(brute_z)


def test_hashed_and_exact_keys_find_exactly_the_lexicon_words():
    rng = random.Random(3)
    alphabet = "abcdefghijklmnop"
    words = {"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12))) for _ in range(300)}
    words = sorted(words | set(alphabet) | {"abc", "ab", "bca"})
    chunks = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 30))) for _ in range(20)]
    chunks += [w + w[:3] for w in words[:60]]
    exact, hashed = WordIndex(words, 4), WordIndex(words, 13)  # 5 bits x 13 > 63: hashed
    assert exact.exact and not hashed.exact
    for idx in (exact, hashed):
        for chunk in chunks:
            lat = WordLattice([chunk], idx, row_len=len(chunk) + 1)
            for j in range(len(chunk)):
                for k in range(min(idx.max_len, j + 1)):
                    sub = chunk[j - k : j + 1]
                    got = int(lat.edges[j, k, 0])
                    assert (words[got] if got < len(words) else None) == (
                        sub if sub in words else None
                    )


def test_semimarkov_forward_is_one_recursion_for_both_semirings():
    torch.manual_seed(0)
    T, K, B = 6, 3, 2
    scores = torch.randn(T, K, B, dtype=torch.float64)

    def paths(t):  # every segmentation of 0..t-1 into parts of length <= K, as (end, k)
        if t == 0:
            yield []
            return
        for k in range(min(K, t)):
            for p in paths(t - k - 1):
                yield [*p, (t - 1, k)]

    for b in range(B):
        totals = torch.stack([sum(scores[j, k, b] for j, k in p) for p in paths(T)])
        alpha_log = semimarkov_forward(scores, LogSemiring)
        alpha_max = semimarkov_forward(scores, MaxSemiring)
        assert float(alpha_log[-1, b]) == pytest.approx(float(torch.logsumexp(totals, 0)))
        assert float(alpha_max[-1, b]) == pytest.approx(float(totals.max()))


def test_long_chunks_split_where_no_word_crosses_change_nothing():
    words = ["a", "b", "ab"]
    logp = torch.log(torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64))
    chunks = ["a", "b", "abababab"]
    short = WordLattice(chunks, WordIndex(words, 2), row_len=4)  # rows hold 3 units
    whole = WordLattice(chunks, WordIndex(words, 2), row_len=16)
    assert short.n_forced == 0
    assert short.best_words(logp) == whole.best_words(logp) == [["a"], ["b"], ["ab"] * 4]
    assert float(short.log_partition(logp).sum()) == pytest.approx(
        float(whole.log_partition(logp).sum())
    )
    # With "ab" and "ba" every boundary is crossed: a boundary must be forced every 3 units.
    words2 = ["a", "b", "ab", "ba"]
    logp2 = torch.log(torch.tensor([0.1, 0.1, 0.5, 0.3], dtype=torch.float64))
    forced = WordLattice(["abababab"], WordIndex(words2, 2), row_len=4)
    assert forced.n_forced == 2
    assert "".join(forced.best_words(logp2)[0]) == "abababab"


# -- EM ---------------------------------------------------------------------------------------


def test_expected_counts_equal_brute_force_posterior_expectations():
    rng = random.Random(7)
    words, logp = _random_lexicon(rng, n=9)
    chunks = ["abcab", "cabba", "aab"]
    counts, logz = WordLattice(chunks, WordIndex(words, 3)).expected_counts(logp)
    want = torch.zeros(len(words), dtype=torch.float64)
    for chunk in chunks:
        segs = list(_segmentations(chunk, set(words)))
        weights = torch.tensor([sum(float(logp[words.index(w)]) for w in s) for s in segs])
        post = torch.softmax(weights.double(), 0)
        for s, p in zip(segs, post, strict=True):
            for w in s:
                want[words.index(w)] += p
    assert torch.allclose(counts, want, atol=1e-10)


@pytest.fixture(scope="module")
def daily_slice():
    from jointkl.data.peoples_daily import peoples_daily

    gold = peoples_daily()[:1500]
    return gold, ["".join(s) for s in gold]


def test_em_bits_per_char_never_increase(daily_slice):
    _, lines = daily_slice
    lex = WordFinder().fit(lines[:600])
    for prune in (None, 1.0):
        seg = Segmenter(lex).fit_em(lines[:600], iters=4, prune=prune)
        bits = seg.bits_per_char_
        assert len(bits) == 5
        assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(bits, bits[1:], strict=False)), bits
        assert bits[-1] < bits[0]
        # The reported figure is the code length under the lexicon fit_em leaves behind.
        assert seg.bits_per_char(lines[:600]) == pytest.approx(bits[-1], abs=1e-6)
        if prune:
            assert seg.pruned_ > 0 and len(seg.lexicon) < len(lex)
    # A fresh segmenter on the saved lexicon segments exactly as the fitted one.
    fresh = Segmenter(seg.lexicon)
    assert fresh.segment_lines(lines[:50]) == seg.segment_lines(lines[:50])


def test_peoples_daily_slice_end_to_end_f1(daily_slice):
    gold, lines = daily_slice
    # 140 k characters: min_proba 1e-5 keeps fragments seen twice or more, as the default
    # 1e-6 does on the whole corpus (1.8 M characters).
    lex = WordFinder(min_proba=1e-5).fit(lines)
    seg = Segmenter(lex).fit_em(lines, iters=2)
    score = score_segmentation(gold, seg.segment_lines(lines))
    # Measured 0.750 on these 1,500 lines (P 0.729, R 0.772); the floor leaves a margin.
    assert score.f1 > 0.70, score


# -- templates --------------------------------------------------------------------------------


def _template_corpus(n=400, seed=0):
    rng = random.Random(seed)
    nouns = ["鸡蛋", "苹果", "米饭", "面包", "牛奶", "蛋糕"]
    verbs = ["吃", "买", "卖", "做", "煮"]
    names = ["小明", "小红", "老王", "阿姨"]
    filler = ["今天", "真的", "很", "也", "都", "还", "那", "这"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            out.append([rng.choice(nouns), "可以", rng.choice(verbs), "吗"])
        elif r < 0.7:
            out.append([rng.choice(names), "喜欢", rng.choice(verbs), rng.choice(nouns)])
        else:
            out.append([rng.choice(filler) for _ in range(rng.randint(2, 6))])
    return out


def test_template_finder_finds_the_planted_templates():
    t = TemplateFinder(window=5, min_proba=1e-3, min_pmi=1.5).fit(_template_corpus())
    assert t.top(1)[0][0] == "X可以X吗"
    assert (None, "可以", None, "吗") in t
    assert all(sum(tok is not None for tok in tpl) >= 2 for tpl in t)  # no trivial X w X
    # Filler words are drawn independently: templates of fillers only are chance links,
    # far rarer than the planted ones.
    filler = {"今天", "真的", "很", "也", "都", "还", "那", "这"}
    chance = [t.count(tpl) for tpl in t if {tok for tok in tpl if tok} <= filler]
    assert max(chance) < t.count((None, "可以", None, "吗")) / 10


def test_template_parser_builds_the_expected_tree():
    templates = Templates(
        {(None, "可以", None, "吗"): 50, (None, "的", "鸡蛋"): 30, ("小明", "喜欢", None): 10}
    )
    parser = TemplateParser(templates, null_score=-20.0)
    assert str(parser.parse(["鸡蛋", "可以", "吃", "吗"])) == "(鸡蛋)可以(吃)吗"
    nested = parser.parse(["新鲜", "的", "鸡蛋", "可以", "吃", "吗"])
    assert str(nested) == "((新鲜)的鸡蛋)可以(吃)吗"
    lp = templates.log_probs
    assert nested.score == pytest.approx(lp[0] + lp[1])
    # A word no template covers pays the null score.
    loose = parser.parse(["今天", "鸡蛋", "可以", "吃", "吗"])
    assert str(loose) in ("今天 (鸡蛋)可以(吃)吗", "(今天 鸡蛋)可以(吃)吗")
    assert loose.score == pytest.approx(lp[0] - 20.0)
    assert parser.parse([]).items == []
    assert str(parser.parse(["什么"])) == "什么" and parser.parse(["什么"]).score == -20.0


def test_templates_parse_a_corpus_learned_from_scratch(tmp_path):
    templates = TemplateFinder(window=5, min_proba=1e-3, min_pmi=1.5).fit(_template_corpus())
    templates.save(tmp_path / "t.tsv")
    back = Templates.load(tmp_path / "t.tsv")
    assert back.top(5) == templates.top(5)
    parser = TemplateParser(back)
    assert str(parser.parse(["鸡蛋", "可以", "吃", "吗"])) == "(鸡蛋)可以(吃)吗"
    likes = parser.parse(["小明", "喜欢", "吃", "鸡蛋"])
    assert any("喜欢" in b.template for b in likes.blocks)
    assert likes.score > 2 * -20.0  # at most one word left bare


def test_clauses_split_at_punctuation():
    assert clauses(["我", "来", "，", "你", "走", "。"]) == [["我", "来"], ["你", "走"]]


# -- bad input ---------------------------------------------------------------------------------


def test_empty_corpus_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="corpus is empty"):
        WordFinder().fit([])
    with pytest.raises(InputError, match="corpus is empty"):
        WordFinder().fit(["，。", "  "])
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="corpus is empty"):
        WordFinder().fit(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="corpus is empty"):
        Segmenter(Lexicon({"a": 1})).fit_em([])


def test_undecodable_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("中国\n人民".encode() + b"\xff\xfe\n")
    with pytest.raises(InputError, match=r"bad.txt: line 2 is not valid UTF-8"):
        WordFinder().fit(path)
    with pytest.raises(InputError, match="line 1: expected str, got bytes"):
        WordFinder().fit([b"abc"])
    with pytest.raises(InputError, match="does not exist"):
        WordFinder().fit(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "content, match",
    [
        ("中国\n", "line 1: expected 'word<TAB>count'"),
        ("中国\t2\n人民\tmany\n", "line 2: .* got count 'many'"),
        ("中国\t-1\n", "got count '-1'"),
        ("中国\tnan\n", "got count 'nan'"),
        ("中，国\t3\n", "got word '中，国'"),
        ("中国\t1\t2\n", "line 1: expected"),
        ("\n\n", "no entries"),
    ],
)
def test_bad_lexicon_files_raise_input_errors(tmp_path, content, match):
    path = tmp_path / "lex.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        Lexicon.load(path)


def test_bad_templates_files_and_arguments(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("3\tX 可以\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1: .*trivial"):
        Templates.load(path)
    path.write_text("x\tX 可以 X 吗\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1"):
        Templates.load(path)
    with pytest.raises(InputError, match="window"):
        TemplateFinder(window=0)
    with pytest.raises(InputError, match="no sentences"):
        TemplateFinder().fit([])
    with pytest.raises(InputError, match="list of words"):
        TemplateParser(Templates({("a", "b"): 1})).parse("ab")


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="min_proba"):
        WordFinder(min_proba=2)
    with pytest.raises(InputError, match="max_len"):
        WordFinder(max_len=0)
    with pytest.raises(InputError, match="iters"):
        Segmenter(Lexicon({"a": 1})).fit_em(["a"], iters=-1)
    with pytest.raises(InputError, match="lexicon must be"):
        Segmenter({"a": 1})


# -- command line ------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="jointkl")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _word_corpus(n=300, seed=0):
    """Raw lines made of random words from a small vocabulary, and their gold words."""
    rng = random.Random(seed)
    vocab = ["中国", "人民", "经济", "发展", "很", "好", "快", "日报", "说", "的", "我们", "改革"]
    gold = [[rng.choice(vocab) for _ in range(rng.randint(3, 8))] + ["。"] for _ in range(n)]
    return ["".join(g) for g in gold], gold


def test_word_finder_and_em_recover_a_planted_vocabulary():
    lines, gold = _word_corpus()
    lex = WordFinder(min_proba=1e-3, min_pmi=1.0).fit(lines)
    seg = Segmenter(lex).fit_em(lines, iters=3)
    assert score_segmentation(gold, seg.segment_lines(lines)).f1 > 0.9


def test_cli_words_passes_redundancy_and_reports_code_lengths(tmp_path, capsys):
    from jointkl.data.peoples_daily import peoples_daily

    corpus = tmp_path / "corpus.txt"
    lines = ["".join(words) for words in peoples_daily()[:300]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sizes = {}
    for r in ("1", "6"):
        out = tmp_path / f"lex{r}.tsv"
        argv = ["words", str(corpus), "--out", str(out), "--min-proba", "1e-4"]
        assert _cli([*argv, "--redundancy", r, "--code-lengths"]) == 0
        want = WordFinder(min_proba=1e-4, redundancy=float(r)).fit(lines)
        got = Lexicon.load(out).as_dict()
        assert got.keys() == want.as_dict().keys()
        sizes[r] = len(got)
    assert sizes["6"] < sizes["1"]  # the flag reaches the word finder
    err = capsys.readouterr().err
    for stage in ("units", "cut", "min_proba", "redundancy"):
        assert f"code length after {stage}: corpus" in err


def test_word_finder_code_lengths_per_stage():
    lines, _ = _word_corpus()
    finder = WordFinder(min_proba=1e-3, code_lengths=True)
    lex = finder.fit(lines)
    bits = finder.code_length_
    assert list(bits) == ["units", "cut", "min_proba", "redundancy"]
    # Each figure is the code length of the corpus under that stage's lexicon: the last one
    # is where EM starts, and merging units into the planted words shortens the code.
    seg = Segmenter(lex).fit_em(lines, iters=1)
    assert seg.bits_per_char_[0] == pytest.approx(bits["redundancy"], abs=1e-9)
    assert bits["cut"] < bits["units"] - 1.0
    assert bits["redundancy"] < bits["units"]
    assert set(finder.lexicon_bits_) == set(bits)
    assert finder.lexicon_bits_["units"] < finder.lexicon_bits_["cut"]


def test_cli_words_segment_templates_parse(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    lines, _ = _word_corpus()
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lex = tmp_path / "lex.tsv"
    assert (
        _cli(
            [
                "words",
                str(corpus),
                "--out",
                str(lex),
                "--min-proba",
                "1e-3",
                "--min-pmi",
                "1",
                "--em-iters",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert "人民" in Lexicon.load(lex)
    capsys.readouterr()

    assert _cli(["segment", "--lexicon", str(lex), "中国经济发展很好。"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.replace(" ", "") == "中国经济发展很好。" and "经济" in out.split()
    assert _cli(["segment", "--lexicon", str(lex), str(corpus)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(lines)

    templates = tmp_path / "t.tsv"
    assert (
        _cli(
            [
                "templates",
                str(corpus),
                "--lexicon",
                str(lex),
                "--out",
                str(templates),
                "--min-proba",
                "1e-4",
                "--min-pmi",
                "0.1",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert (
        _cli(["parse", "--templates", str(templates), "--lexicon", str(lex), "中国经济发展很好"])
        == 0
    )
    assert "(" in capsys.readouterr().out


def test_cli_bad_input_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _cli(["words", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "l.tsv")])
    with pytest.raises(InputError, match="lexicon file"):
        _cli(["segment", "--lexicon", str(tmp_path / "nope.tsv"), "中国"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("中国 3\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1"):
        _cli(["segment", "--lexicon", str(bad), "中国"])
    t = tmp_path / "t.tsv"
    Templates({(None, "可以", None, "吗"): 3}).save(t)
    with pytest.raises(InputError, match="no spaces"):
        _cli(["parse", "--templates", str(t), "鸡蛋可以吃吗"])


def test_segment_model_option_dispatches_to_a_supplied_handler():
    parser = argparse.ArgumentParser()
    seen = []
    add_commands(
        parser.add_subparsers(dest="command"), segment_model=lambda a: seen.append(a.model) or 0
    )
    args = parser.parse_args(["segment", "--model", "runs/crf", "中国"])
    assert args.func(args) == 0 and seen == ["runs/crf"]
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "--model", "r", "--lexicon", "l", "中国"])
