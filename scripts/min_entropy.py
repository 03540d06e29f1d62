"""Minimum-entropy text on People's Daily, January 1998: lexicon, EM, segmentation, templates.

    python scripts/min_entropy.py                  # the whole pipeline, figures on stdout
    python scripts/min_entropy.py --json           # one JSON object per stage instead
    python scripts/min_entropy.py --out runs/text  # also write lexicon.tsv, templates.tsv

The corpus is ``jointkl.data.peoples_daily()`` with the gold spaces and POS tags removed:
every stage sees raw text only; the gold words are used for scoring and nothing else.
Stages and what each prints:

1. ``lexicon``  WordFinder on the raw lines: lexicon size, time;
2. ``em``       EM for the unigram model: bits per character before and after each iteration;
3. ``segment``  Viterbi segmentation of the whole corpus: word P/R/F1 against the gold words;
4. ``templates`` TemplateFinder on the segmented clauses: the top templates, and parses.

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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
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
    )
    lexicon = finder.fit(lines)
    stage(
        "lexicon",
        t0,
        words=len(lexicon),
        strong_pairs=len(finder.strong_pairs_),
        fragments=len(finder.fragments_),
        redundant=finder.n_redundant_,
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


if __name__ == "__main__":
    sys.exit(main())
