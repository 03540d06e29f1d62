"""Benchmark: minimum-entropy text on People's Daily, January 1998 (1.84 M characters).

    python scripts/bench/text.py [--repeat 3] [--cases pipeline,viterbi,sentence,parse]

Prints one JSON object per case on stdout:

- ``pipeline``: WordFinder + EM + Viterbi segmentation of the whole raw corpus, each
  stage's wall-clock and CPU seconds (best of ``--repeat``), the 1-minute load average
  (the machine is shared), the process's peak memory, word P/R/F1.
- ``viterbi``: segmenting the corpus with a fixed lexicon, jointkl's batched lattice against
  the hand-written anchor a user would otherwise write — a Python dynamic programme per
  sentence over a dict of log-probabilities (as in the blog code the method comes from) —
  on the same pre-split chunks, with the fraction of chunks segmented identically.
- ``sentence``: one sentence per call, as an interactive user would: ``Segmenter.segment(s)``
  with the lexicon learned above, against jieba's ``lcut(s, HMM=False)`` (its dictionary DAG +
  Viterbi, pure Python, with jieba's own 349 k-word dictionary), over every 4th line of the
  corpus; milliseconds per sentence (best of ``--repeat``) and the fraction of sentences
  where ``segment`` equals the batched ``segment_lines``.
- ``parse``: ``TemplateParser.parse`` on sentences of 50, 100, 200 and 400 words (the
  segmented corpus's clauses run together, punctuation dropped), with templates learned
  from the segmented corpus (``TemplateFinder()`` defaults): seconds per sentence (best of
  ``--repeat``) and the growth exponent log(t_2n / t_n) / log 2 between sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

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
from jointkl.text.presplit import coded_chunks


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def python_viterbi(chunk: str, logp: dict[str, float], max_len: int, oov: float) -> list[str]:
    """The anchor: best[j] = max_k best[j-k] + log p(chunk[j-k:j]), one chunk at a time."""
    n = len(chunk)
    best = [0.0] + [-math.inf] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        for k in range(1, min(max_len, j) + 1):
            w = chunk[j - k : j]
            s = logp.get(w)
            if s is None:
                if k > 1:
                    continue
                s = oov
            if best[j - k] + s > best[j]:
                best[j], back[j] = best[j - k] + s, k
    out, j = [], n
    while j > 0:
        out.append(chunk[j - back[j] : j])
        j -= back[j]
    return out[::-1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--em-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cases", default="pipeline,viterbi,sentence,parse", help="comma-separated cases"
    )
    args = p.parse_args()
    cases = set(args.cases.split(","))
    torch.set_num_threads(args.threads)
    gold = peoples_daily()
    lines = ["".join(words) for words in gold]

    # Wall-clock and CPU seconds of this process: on a shared machine the wall clock also
    # counts time spent waiting for a core, the CPU time does not.
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    # The other cases need the fitted segmenter: one untimed run when pipeline is not asked.
    for _ in range(args.repeat if "pipeline" in cases else 1):
        t, c = {}, {}
        w0, c0 = time.perf_counter(), time.process_time()
        lexicon = WordFinder().fit(lines)
        w1, c1 = time.perf_counter(), time.process_time()
        seg = Segmenter(lexicon).fit_em(lines, iters=args.em_iters)
        w2, c2 = time.perf_counter(), time.process_time()
        pred = seg.segment_lines(lines)
        w3, c3 = time.perf_counter(), time.process_time()
        t = {"lexicon": w1 - w0, "em": w2 - w1, "segment": w3 - w2, "total": w3 - w0}
        c = {"lexicon": c1 - c0, "em": c2 - c1, "segment": c3 - c2, "total": c3 - c0}
        for k in t:
            best[k] = min(best.get(k, math.inf), t[k])
            best_cpu[k] = min(best_cpu.get(k, math.inf), c[k])
    score = score_segmentation(gold, pred)
    if "pipeline" in cases:
        print(
            json.dumps(
                {
                    "case": "pipeline",
                    "characters": sum(map(len, lines)),
                    "seconds": {k: round(v, 3) for k, v in best.items()},
                    "cpu_seconds": {k: round(v, 3) for k, v in best_cpu.items()},
                    "load_average": round(os.getloadavg()[0], 2),
                    "peak_mb": round(peak_mb(), 1),
                    "f1": round(score.f1, 4),
                    "precision": round(score.precision, 4),
                    "recall": round(score.recall, 4),
                    "lexicon_words": len(seg.lexicon),
                    "bits_per_char": [round(b, 5) for b in seg.bits_per_char_],
                    "repeat": args.repeat,
                    "threads": args.threads,
                }
            ),
            flush=True,
        )

    if "viterbi" in cases:
        viterbi_case(seg, lines, args.repeat)
    if "sentence" in cases:
        sentence_case(seg, lines, args.repeat)
    if "parse" in cases:
        parse_case(seg, pred, args.repeat)


def sentence_case(seg: Segmenter, lines: list[str], repeat: int) -> None:
    import jieba

    jieba.setLogLevel(60)
    jieba.initialize()  # load its dictionary before timing
    sample = lines[::4]
    fresh = Segmenter(seg.lexicon)
    batched = fresh.segment_lines(sample)
    fresh.segment(sample[0])  # build the word table before timing
    ours = theirs = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = [fresh.segment(s) for s in sample]
        ours = min(ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in sample:
            jieba.lcut(s, HMM=False)
        theirs = min(theirs, time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(got, batched, strict=True)) / len(sample)
    print(
        json.dumps(
            {
                "case": "sentence",
                "sentences": len(sample),
                "mean_characters": round(sum(map(len, sample)) / len(sample), 1),
                "jointkl_ms_per_sentence": round(1e3 * ours / len(sample), 4),
                "jieba_ms_per_sentence": round(1e3 * theirs / len(sample), 4),
                "ratio_jointkl_over_jieba": round(ours / theirs, 3),
                "identical_to_segment_lines": round(same, 6),
                "jointkl_lexicon_words": len(fresh.lexicon),
                "jieba_dictionary_words": sum(1 for c in jieba.dt.FREQ.values() if c > 0),
                "jieba_version": jieba.__version__,
                "load_average": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )


def viterbi_case(seg: Segmenter, lines: list[str], repeat: int) -> None:
    # Viterbi with a fixed lexicon: fresh segmenter (no cached lattices), same chunks.
    chunks = [c for line in lines for c in coded_chunks(line)]
    fresh = Segmenter(seg.lexicon)
    logp = dict(zip(fresh.lexicon.words, fresh.logp.tolist(), strict=True))
    ours = anchor = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = fresh.segment_chunks(chunks)
        ours = min(ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = [python_viterbi(c, logp, fresh.index.max_len, fresh.oov_logp) for c in chunks]
        anchor = min(anchor, time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(got, ref, strict=True)) / len(chunks)
    print(
        json.dumps(
            {
                "case": "viterbi",
                "chunks": len(chunks),
                "jointkl_seconds": round(ours, 3),
                "python_loop_seconds": round(anchor, 3),
                "speedup": round(anchor / ours, 2),
                "load_average": round(os.getloadavg()[0], 2),
                "identical_fraction": round(same, 6),
            }
        ),
        flush=True,
    )


def parse_case(seg: Segmenter, pred: list[list[str]], repeat: int) -> None:
    sentences = [c for words in pred for c in clauses(words)]
    parser = TemplateParser(TemplateFinder().fit(sentences))
    words = [w for c in sentences for w in c]
    rows = []
    for n in (50, 100, 200, 400):
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            tree = parser.parse(words[:n])
            best = min(best, time.perf_counter() - t0)
        rows.append({"words": n, "seconds": round(best, 4), "blocks": len(tree.blocks)})
    for a, b in zip(rows, rows[1:], strict=False):
        b["growth_exponent"] = round(math.log(b["seconds"] / a["seconds"]) / math.log(2), 2)
    print(
        json.dumps(
            {
                "case": "parse",
                "templates": len(parser.templates),
                "sentences": rows,
                "load_average": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
