"""Word segmentation: BMES round trips, vocabulary, packing, and the CRF tagger trained briefly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jointkl.inference import SVI
from jointkl.models import CRFTagger

from jointkl.data.cws import (
    PAD,
    UNK,
    CharVocab,
    bigram_ids,
    bigram_keys,
    bmes_tags,
    cws_dataset,
    encode_rows,
    pack_rows,
    words_from_tags,
)
from jointkl.errors import InputError
from jointkl.fit import Fit
from jointkl.zoo import model_class

words_st = st.lists(st.text("中国人民日报新年好", min_size=1, max_size=5), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(words_st)
def test_bmes_tags_round_trip_to_the_same_words(words):
    tags = bmes_tags(words)
    text = "".join(words)
    assert len(tags) == len(text)
    assert words_from_tags(text, tags) == words


def test_bmes_tags_of_a_sentence():
    assert bmes_tags(["中国", "人", "民日报"]) == [0, 2, 3, 0, 1, 2]
    # Ill-formed tags still cover every character once.
    assert words_from_tags("abcd", [1, 1, 0, 0]) == ["ab", "c", "d"]
    with pytest.raises(InputError, match="cover"):
        words_from_tags("abc", [3])


def test_vocab_maps_rare_characters_to_unknown():
    vocab = CharVocab.build([["aab", "c"], ["ab"]], min_count=2)
    assert vocab.chars == "ab"  # a: 3, b: 2, c: 1
    assert vocab.encode("abcz") == [2, 3, UNK, UNK]
    assert len(vocab) == 4


@settings(max_examples=40, deadline=None)
@given(st.lists(words_st, min_size=1, max_size=4), st.integers(1, 8))
def test_pack_rows_cuts_only_between_words(sentences, max_len):
    rows = pack_rows(sentences, max_len)
    assert [w for r in rows for w in r] == [w for s in sentences for w in s]
    for r in rows:
        assert len("".join(r)) <= max_len or len(r) == 1


def test_encode_rows_pads_with_pad_and_tag_zero():
    vocab = CharVocab("中国人")
    chars, lengths, tags = encode_rows([["中国", "人"], ["人"]], vocab)
    assert chars.tolist() == [[2, 3, 4], [4, PAD, PAD]]
    assert lengths.tolist() == [3, 1] and tags.tolist() == [[0, 2, 3], [3, 0, 0]]


def test_bigram_ids_look_up_adjacent_pairs():
    vocab = CharVocab("abcd")  # ids a=2, b=3, c=4, d=5
    keys = bigram_keys([["ab", "c"], ["abc"], ["dd"]], vocab, min_count=2)
    v = len(vocab)
    assert keys == [2 * v + 3, 3 * v + 4]  # "ab" and "bc" twice; "dd" once
    chars = torch.tensor([[2, 3, 4, 5], [3, 4, PAD, PAD]])
    ids = bigram_ids(chars, torch.tensor(keys), v)
    # ab -> 2, bc -> 3, cd unknown, last position meets padding; bc -> 3, then padding.
    assert ids.tolist() == [[2, 3, UNK, UNK], [3, UNK, UNK, UNK]]


@pytest.mark.parametrize("encoder", ["conv", "bilstm"])
def test_emissions_do_not_depend_on_padding(encoder):
    torch.manual_seed(0)
    tagger = CRFTagger(
        vocab="abcdef",
        encoder=encoder,
        embedding_dim=8,
        hidden_dim=8,
        bigram_dim=4,
        bigram_keys=[2 * 8 + 3, 3 * 8 + 4, 4 * 8 + 5],
    )
    chars = torch.tensor([[2, 3, 4, 5, 6, 7]])
    lengths = torch.tensor([3])
    tagger.net.eval()
    padded = tagger.net(chars, lengths)[0, :3]
    alone = tagger.net(chars[:, :3], lengths)[0]
    assert torch.allclose(padded, alone, atol=1e-6)


def test_tagger_settings_are_validated():
    with pytest.raises(InputError, match="encoder"):
        CRFTagger(vocab="ab", encoder="gru")
    with pytest.raises(InputError, match="num_tags=4"):
        CRFTagger(vocab="ab", num_tags=5)
    with pytest.raises(InputError, match="vocab_size"):
        CRFTagger(vocab="ab", vocab_size=7)
    with pytest.raises(InputError, match="needs bigram_keys"):
        CRFTagger(vocab="ab", bigram_dim=8)
    with pytest.raises(InputError, match="strictly increasing"):
        CRFTagger(vocab="ab", bigram_dim=8, bigram_keys=[9, 5])
    generic = CRFTagger(vocab_size=10, num_tags=6, tag_scheme=None)
    with pytest.raises(InputError, match="segment needs a vocab"):
        generic.segment("ab")
    assert model_class("crf-seg") is CRFTagger


@pytest.fixture(scope="module")
def small_fit(tmp_path_factory):
    data = cws_dataset(limit=60, max_len=40)
    tagger = CRFTagger.for_dataset(
        data, embedding_dim=16, hidden_dim=16, num_layers=2, bigram_dim=8, bigram_min_count=2
    )
    args = (data.train_chars, data.train_lengths, data.train_tags)
    fit = SVI(steps=30, batch_size=16, lr=0.03, progress=False, seed=1).fit(tagger, *args)
    path = tmp_path_factory.mktemp("crf") / "run"
    fit.save(path)
    return data, tagger, fit, path


def test_training_a_few_steps_lowers_the_loss(small_fit):
    data, _, fit, _ = small_fit
    h = fit.history
    # Per-step losses are noisy mini-batch estimates of the full NLL: compare averages.
    assert sum(h[-6:]) / 6 < 0.7 * sum(h[:6]) / 6
    per_char = sum(h[-6:]) / 6 / float(data.train_lengths.sum())
    assert per_char < 1.0  # nats/char; a uniform guess over 4 tags is log 4 = 1.39


def test_segmentation_covers_the_text_with_well_formed_words(small_fit):
    data, tagger, fit, path = small_fit
    texts = ["".join(s) for s in data.test_sentences[:5]] + ["", "新"]
    words = tagger.segment(texts)
    for text, ws in zip(texts, words, strict=True):
        assert "".join(ws) == text
        assert all(ws)
    # A saved fit rebuilds the tagger (vocab included) and segments identically.
    loaded = Fit.load(path)
    assert isinstance(loaded.pair, CRFTagger)
    assert loaded.pair.segment(texts, fit=loaded) == words


def _bmes_violations(tags: list[int]) -> int:
    """Written out: a tag sequence's breaches of BMES (B=0, M=1, E=2, S=3) word structure."""
    names = "".join("BMES"[t] for t in tags)
    follow = {"B": "ME", "M": "ME", "E": "BS", "S": "BS"}
    bad = names[0] in "ME"  # a word must open with B or S
    bad += sum(b not in follow[a] for a, b in zip(names, names[1:], strict=False))
    return bad + (names[-1] in "BM")  # ... and close with E or S


@pytest.fixture(scope="module")
def softmax_fit():
    data = cws_dataset(limit=60, max_len=40)
    tagger = CRFTagger.for_dataset(
        data,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=2,
        bigram_dim=8,
        bigram_min_count=2,
        loss="softmax",
    )
    args = (data.train_chars, data.train_lengths, data.train_tags)
    fit = SVI(steps=30, batch_size=16, lr=0.03, progress=False, seed=1).fit(tagger, *args)
    return data, tagger, fit


def test_softmax_loss_trains_and_decodes_by_per_character_argmax(softmax_fit, tmp_path):
    data, tagger, fit = softmax_fit
    h = fit.history
    assert sum(h[-6:]) / 6 < 0.7 * sum(h[:6]) / 6
    # The loss is the per-character cross-entropy: the site's log-likelihood is the sum of
    # log softmax at each character of each row, padding excluded.
    chars, lengths, tags = data.train_chars[:5], data.train_lengths[:5], data.train_tags[:5]
    tagger.net.eval()
    with torch.no_grad():
        em = tagger.net(chars, lengths)
        lp = tagger.tag_distribution(em, lengths).log_prob(tags)
        want = torch.log_softmax(em, -1).gather(-1, tags.unsqueeze(-1)).squeeze(-1)
        valid = torch.arange(chars.shape[1]) < lengths[:, None]
        assert torch.allclose(lp, (want * valid).sum(-1), atol=1e-4)
    decoded = tagger.decode(chars, lengths)
    assert torch.equal(decoded[valid], em.argmax(-1)[valid])
    assert (decoded[~valid] == 0).all()
    texts = ["".join(s) for s in data.test_sentences[:5]] + ["", "新"]
    for text, ws in zip(texts, tagger.segment(texts), strict=True):
        assert "".join(ws) == text and all(ws)
    # The loss is part of the settings: a saved fit rebuilds a softmax tagger.
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")
    assert loaded.pair.loss == "softmax"
    assert loaded.pair.segment(texts, fit=loaded) == tagger.segment(texts)


def test_illegal_sequence_counts_of_softmax_and_crf_decodes(softmax_fit, small_fit):
    """constraint_violations (what scripts/cws.py reports) agrees with the rule written out
    on every decoded test sentence; the constrained CRF never decodes an illegal one."""
    from jointkl.distributions import bmes_constraints, constraint_violations

    data, softmax, _ = softmax_fit
    _, crf, _, _ = small_fit
    texts = ["".join(s) for s in data.test_sentences[:40]]
    allowed = bmes_constraints()
    for tagger in (softmax, crf):
        for t in tagger.tag_texts(texts):
            got = int(constraint_violations(torch.tensor(t), allowed))
            assert got == _bmes_violations(t), t
            if tagger is crf:
                assert got == 0
    assert _bmes_violations([0, 0, 3, 1, 2, 0]) == 4  # B>B, B>S, S>M, ends in B


def test_loss_setting_is_validated():
    with pytest.raises(InputError, match="loss must be one of"):
        CRFTagger(vocab="ab", loss="hinge")
    assert CRFTagger(vocab="ab").settings()["loss"] == "crf"
