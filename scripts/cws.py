"""Chinese word segmentation end to end: train a CRF tagger on People's Daily, score the test split.

Trains :class:`jointkl.models.CRFTagger` (embedding 128 plus a 64-d bigram embedding, three
width-3 convolutions of 128 channels, dropout 0.1, CRF with BMES constraints) by
maximum likelihood with the SVI engine (Adam, mini-batches of 64 packed 100-character rows,
cosine learning-rate decay, 6 epochs) on the first 90 % of lines, then segments the last 10 % line by line and prints word precision / recall /
F1 and OOV recall (SIGHAN span scoring) as one JSON object. The fit is saved to ``--out`` so
``CRFTagger.segment(texts, fit=Fit.load(out))`` (and ``jointkl segment --model OUT``) reuse it.

``--loss softmax`` trains the same network with a per-character softmax instead of the CRF
(argmax decoding); ``--loss both`` trains one after the other on the same split, seed and
budget (fits in ``OUT/crf`` and ``OUT/softmax``) and prints both reports and a comparison
line. Every report also gives how many test sentences were decoded as ill-formed BMES
sequences (:func:`jointkl.distributions.constraint_violations`): B or M followed by B or S,
M or E not preceded by B or M, a sentence ending in B or M.

    python scripts/cws.py                         # the default run (6 epochs)
    python scripts/cws.py --epochs 1 --limit 2000 # a quick look
    python scripts/cws.py --loss both --epochs 2 --limit 5000   # CRF vs per-character softmax
    python scripts/cws.py --resume                # continue an interrupted run from --out

Interrupting (Ctrl-C) saves a checkpoint; ``--resume`` continues from it with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from jointkl.inference import SVI
from jointkl.models import CRFTagger
from tqdm.auto import tqdm

from jointkl.data.cws import cws_dataset, words_from_tags
from jointkl.distributions import bmes_constraints, constraint_violations
from jointkl.text.scoring import score_segmentation


def illegal_counts(tags: list[list[int]]) -> tuple[int, int]:
    """(sentences decoded as ill-formed BMES, constraint violations in all) over the lists."""
    allowed = bmes_constraints()
    sentences = violations = 0
    for t in tags:
        if t:
            n = int(constraint_violations(torch.tensor(t), allowed))
            sentences += n > 0
            violations += n
    return sentences, violations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", choices=["conv", "bilstm"], default="conv")
    p.add_argument("--epochs", type=float, default=6.0, help="passes over the training rows")
    p.add_argument("--batch-size", type=int, default=64, help="rows per step")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--max-len", type=int, default=100, help="characters per training row")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bigram-dim", type=int, default=64, help="bigram embedding size (0: none)")
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--limit", type=int, help="use only the first N training lines")
    p.add_argument("--test-limit", type=int, help="score only the first N test lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--loss",
        choices=["crf", "softmax", "both"],
        default="crf",
        help="CRF, per-character softmax, or both one after the other (same seed and budget)",
    )
    p.add_argument("--out", default="runs/cws", help="where the fit and metrics go")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loss != "both":
        run(args, args.loss, Path(args.out))
        return 0
    reports = [run(args, loss, Path(args.out) / loss) for loss in ("crf", "softmax")]
    keys = ("f1", "oov_recall", "illegal_sentence_rate", "train_seconds")
    print(json.dumps({"comparison": {r["loss"]: {k: r[k] for k in keys} for r in reports}}))
    return 0


def run(args: argparse.Namespace, loss: str, out: Path) -> dict:
    """Train one tagger with ``loss``, score it on the test split; print and return the report."""
    t0, c0 = time.perf_counter(), time.process_time()
    data = cws_dataset(max_len=args.max_len, limit=args.limit)
    n_rows = data.train_chars.shape[0]
    steps = max(1, math.ceil(args.epochs * n_rows / args.batch_size))
    print(
        f"train: {len(data.train_sentences)} lines -> {n_rows} rows of <= {args.max_len} chars, "
        f"{int(data.train_lengths.sum())} chars; vocab {len(data.vocab)} ids; {steps} steps",
        file=sys.stderr,
    )
    tagger = CRFTagger.for_dataset(
        data,
        encoder=args.encoder,
        dropout=args.dropout,
        hidden_dim=args.hidden_dim,
        bigram_dim=args.bigram_dim,
        loss=loss,
    )
    engine = SVI(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule="cosine",
        seed=args.seed,
        checkpoint_every=max(1, steps // 20),
        checkpoint_dir=out / "checkpoints",
        resume=args.resume,
        progress=True,
    )
    t_fit, c_fit = time.perf_counter(), time.process_time()
    fit = engine.fit(tagger, data.train_chars, data.train_lengths, data.train_tags)
    train_s, train_cpu = time.perf_counter() - t_fit, time.process_time() - c_fit
    fit.save(out)

    gold = data.test_sentences[: args.test_limit] if args.test_limit else data.test_sentences
    texts = ["".join(words) for words in gold]
    t_eval = time.perf_counter()
    tags = []
    for k in tqdm(range(0, len(texts), 256), desc="segment test", unit="x256 lines"):
        tags.extend(tagger.tag_texts(texts[k : k + 256]))
    pred = [words_from_tags(text, t) for text, t in zip(texts, tags, strict=True)]
    eval_s = time.perf_counter() - t_eval
    score = score_segmentation(gold, pred, data.train_vocab)
    n_illegal, n_violations = illegal_counts(tags)
    report = {
        "loss": loss,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in score.as_dict().items()},
        "illegal_sentences": n_illegal,
        "illegal_sentence_rate": round(n_illegal / max(1, len(gold)), 4),
        "bmes_violations": n_violations,
        "test_lines": len(gold),
        "train_rows": n_rows,
        "steps": fit.n_iter,
        "final_loss_per_char": round(
            fit.history[-1] / float(data.train_lengths.sum()) if fit.history else float("nan"), 5
        ),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "total_cpu_seconds": round(time.process_time() - c0, 1),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "resume", "loss")},
        "stop_reason": fit.info.get("stop_reason"),
    }
    (out / "cws_metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, ensure_ascii=False), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
