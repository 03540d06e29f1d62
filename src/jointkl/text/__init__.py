"""jointkl.text: minimum-entropy text — an unsupervised lexicon, EM word segmentation,
sentence templates and parsing, with word-segmentation scoring. A lexicon is good when it
makes the average code length per character, −Σ p_w log p_w / Σ p_w len(w), short.

    lexicon = WordFinder(min_proba=1e-5, min_pmi=2.0, max_len=4).fit(lines)
    segmenter = Segmenter(lexicon).fit_em(lines, iters=3)
    segmenter.segment("迈向充满希望的新世纪")
    templates = TemplateFinder(window=5).fit(sentences)
    print(TemplateParser(templates).parse(["鸡蛋", "可以", "吃", "吗"]))   # (鸡蛋)可以(吃)吗
"""

from jointkl.text.corpus import Corpus
from jointkl.text.lattice import WordIndex, WordLattice, semimarkov_forward
from jointkl.text.lexicon import Lexicon
from jointkl.text.presplit import split_line
from jointkl.text.scoring import SegmentationScore, score_segmentation
from jointkl.text.segmenter import Segmenter
from jointkl.text.templates import (
    Block,
    Parse,
    TemplateFinder,
    TemplateParser,
    Templates,
    clauses,
)
from jointkl.text.wordfinder import WordFinder

__all__ = [
    "Corpus",
    "WordFinder",
    "Lexicon",
    "Segmenter",
    "WordIndex",
    "WordLattice",
    "semimarkov_forward",
    "split_line",
    "TemplateFinder",
    "Templates",
    "TemplateParser",
    "Parse",
    "Block",
    "clauses",
    "score_segmentation",
    "SegmentationScore",
]
