"""Command-line entry points for the minimum-entropy text tools.

``add_commands(subparsers)`` registers four sub-commands on an argparse subparsers object;
each sets ``func`` to a handler that takes the parsed arguments and returns an exit code,
and raises :class:`~jointkl.errors.InputError` for bad input (the CLI maps it to status 2):

    words CORPUS --out lexicon.tsv            learn a lexicon (WordFinder, then EM)
    segment --lexicon lexicon.tsv TEXT|FILE   segment a text, or each line of a file
    templates CORPUS [--lexicon L] --out T    learn sentence templates
    parse --templates T [--lexicon L] SENTENCE
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jointkl.errors import InputError
from jointkl.text.lexicon import Lexicon
from jointkl.text.segmenter import Segmenter
from jointkl.text.templates import TemplateFinder, TemplateParser, Templates, clauses
from jointkl.text.wordfinder import WordFinder

__all__ = ["add_commands", "cmd_words", "cmd_segment", "cmd_templates", "cmd_parse"]


def _corpus_path(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"corpus file {path!r} does not exist or is not a file")
    return p


def _lexicon(path: str) -> Lexicon:
    if not Path(path).is_file():
        raise InputError(f"lexicon file {path!r} does not exist; make one with `jointkl words`")
    return Lexicon.load(path)


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def cmd_words(args: argparse.Namespace) -> int:
    """Learn a lexicon from a raw-text corpus file and write it as TSV."""
    corpus = _corpus_path(args.corpus)
    t0 = time.perf_counter()
    finder = WordFinder(
        min_proba=args.min_proba,
        min_pmi=args.min_pmi,
        max_len=args.max_len,
        redundancy=args.redundancy,
        progress=not args.quiet,
        code_lengths=args.code_lengths,
    )
    lexicon = finder.fit(corpus)
    _say(args, f"lexicon: {len(lexicon)} words in {time.perf_counter() - t0:.1f} s")
    for stage, bits in finder.code_length_.items():
        lex_bits = finder.lexicon_bits_[stage]
        _say(
            args,
            f"code length after {stage}: corpus {bits:.4f} + lexicon {lex_bits:.4f} "
            f"= {bits + lex_bits:.4f} bits/char",
        )
    if args.em_iters:
        seg = Segmenter(lexicon).fit_em(
            corpus, iters=args.em_iters, prune=args.prune, progress=not args.quiet
        )
        lexicon = seg.lexicon
        bits = " -> ".join(f"{b:.4f}" for b in seg.bits_per_char_)
        _say(args, f"EM: bits/char {bits}; {len(lexicon)} words")
    lexicon.save(args.out)
    print(args.out)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment TEXT, or every line of FILE when the argument names a file."""
    seg = Segmenter(_lexicon(args.lexicon))
    source = Path(args.text)
    lines = seg.segment_lines(source) if source.is_file() else [seg.segment(args.text)]
    out = "".join(" ".join(words) + "\n" for words in lines)
    if args.out:
        from jointkl.runs import atomic_write_text

        atomic_write_text(out, args.out)
        print(args.out)
    else:
        sys.stdout.write(out)
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    """Learn templates from a corpus: raw text segmented with --lexicon, or pre-segmented."""
    corpus = _corpus_path(args.corpus)
    if args.lexicon:
        sentences = Segmenter(_lexicon(args.lexicon)).segment_lines(corpus)
    else:
        from jointkl.text.corpus import Corpus

        sentences = [line.split() for line in Corpus(corpus)]
    finder = TemplateFinder(
        window=args.window, min_proba=args.min_proba, min_pmi=args.min_pmi, progress=not args.quiet
    )
    templates = finder.fit(c for s in sentences for c in clauses(s))
    if args.out:
        templates.save(args.out)
        _say(args, f"{len(templates)} templates -> {args.out}")
    for shown, count in templates.top(args.top):
        print(f"{count:g}\t{shown}")
    return 0


def cmd_parse(args: argparse.Namespace) -> int:
    """Parse one sentence: words separated by spaces, or raw text with --lexicon."""
    if not Path(args.templates).is_file():
        raise InputError(
            f"templates file {args.templates!r} does not exist; make one with `jointkl templates`"
        )
    parser = TemplateParser(Templates.load(args.templates), null_score=args.null_score)
    text = args.sentence.strip()
    if not text:
        raise InputError(
            "sentence is empty: expected words separated by spaces, or raw text with --lexicon"
        )
    if args.lexicon:
        words = Segmenter(_lexicon(args.lexicon)).segment(text)
    elif " " in text:
        words = text.split()
    else:
        raise InputError(
            "sentence has no spaces: separate its words with spaces, or pass --lexicon to segment it"
        )
    for c in clauses(words) or [words]:
        print(parser.parse(c))
    return 0


def add_commands(
    subparsers: argparse._SubParsersAction,
    segment_model: Callable[[argparse.Namespace], int] | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """Register ``words``, ``segment``, ``templates`` and ``parse`` on ``subparsers``.

    :param segment_model: optional handler for ``segment --model RUN`` (a supervised
        segmenter's run directory); when given, ``--model`` joins ``--lexicon`` in a
        mutually exclusive group and ``segment`` dispatches to it.
    :returns: the four sub-parsers, by name.
    """
    w = subparsers.add_parser("words", help="learn a lexicon from raw text (minimum entropy)")
    w.add_argument("corpus", help="UTF-8 text file, one sentence or paragraph per line")
    w.add_argument("--out", required=True, help="lexicon TSV to write (word<TAB>count)")
    w.add_argument(
        "--min-proba", type=float, default=1e-6, help="pair and fragment probability cut"
    )
    w.add_argument("--min-pmi", type=float, default=1.0, help="pair PMI cut (natural log)")
    w.add_argument("--max-len", type=int, default=4, help="longest word, in characters")
    w.add_argument("--redundancy", type=float, default=3.5, help="redundancy rule scale")
    w.add_argument("--em-iters", type=int, default=0, help="EM iterations after the word finder")
    w.add_argument(
        "--code-lengths",
        action="store_true",
        help="report the code length (bits/char) after each stage (one corpus pass each)",
    )
    w.add_argument(
        "--prune", type=float, default=None, help="EM: drop words below this expected count"
    )
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_words)

    s = subparsers.add_parser("segment", help="segment text with a lexicon")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--lexicon", help="lexicon TSV from `words`")
    if segment_model is not None:
        source.add_argument("--model", help="run directory of a supervised segmenter")
        s.add_argument(
            "--trust-model-file",
            action="store_true",
            help="with --model: import the model file the run names (checked against its "
            "recorded hash); without it, loading a run never runs code from it",
        )
    s.add_argument("text", help="text to segment, or a UTF-8 file to segment line by line")
    s.add_argument("--out", help="write the segmented lines here instead of stdout")

    def segment(args: argparse.Namespace) -> int:
        if getattr(args, "model", None):
            return segment_model(args)
        return cmd_segment(args)

    s.set_defaults(func=segment)

    t = subparsers.add_parser("templates", help="learn sentence templates from a corpus")
    t.add_argument(
        "corpus", help="UTF-8 text file: raw (with --lexicon) or words separated by spaces"
    )
    t.add_argument("--lexicon", help="segment the raw corpus with this lexicon first")
    t.add_argument("--out", help="templates TSV to write")
    t.add_argument(
        "--window", type=int, default=5, help="largest distance, in words, of a counted pair"
    )
    t.add_argument(
        "--min-proba", type=float, default=1e-5, help="smallest probability of a kept pair/template"
    )
    t.add_argument(
        "--min-pmi", type=float, default=2.0, help="smallest PMI (natural log) of a strong pair"
    )
    t.add_argument("--top", type=int, default=20, help="print the most frequent templates")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_templates)

    p = subparsers.add_parser("parse", help="parse a sentence into nested template blocks")
    p.add_argument("--templates", required=True, help="templates TSV from `templates --out`")
    p.add_argument("--lexicon", help="segment the sentence with this lexicon first")
    p.add_argument(
        "--null-score", type=float, default=-20.0, help="score of a word no template covers"
    )
    p.add_argument("sentence", help="words separated by spaces, or raw text with --lexicon")
    p.set_defaults(func=cmd_parse)
    return {"words": w, "segment": s, "templates": t, "parse": p}
