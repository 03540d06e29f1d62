"""NCE against the full softmax on a large categorical: a neural bigram language model
p(word | previous word) over People's Daily with a vocabulary of V = 50,000.

Cases, in one process, each from the same initial parameters (``default``: what a user gets,
``NCE()`` with no settings but the loop's length on ``SkipGram(V, dim)``; the others are tuned
settings, labelled so in their ``settings`` field; ``default`` is a quality case only: its
full-batch steps take seconds, so its step time is read off its budget run). The tuned cases
start from the same initial parameters (SkipGram's initialisation,
seed 0), Adam at the same learning rate, mini-batches of B pairs:

* ``softmax``: the exact likelihood, −log softmax(h Uᵀ + b)[w] over all V words — a
  hand-written PyTorch loop (the anchor a user would write: jointkl's SVI first evaluates
  the ELBO on the whole corpus to create its params, which at N ≈ 10⁶, V = 5·10⁴ costs
  more than the budget itself);
* ``binary`` at ν = 20, 50, 100 and 500, ``ranking`` at ν = 20 and 100,
  ``negative-sampling`` at ν = 20: the NCE engine on ``SkipGram(normalised=False)``, unigram^0.75 noise, with its
  default shared noise (ν draws per mini-batch, scored by ``SkipGram.candidate_scores`` in one
  matrix product); a case ``variant:ν:per-datum`` draws ν noise words per datum instead
  (``shared_noise=False``, B(1 + ν) rows through the model: the engine before sharing).

Per-step time: the median interval between consecutive step ends over ``--timing-steps``
steps after 5 warm-up steps, the cases alternating over ``--rounds`` rounds (median of the
rounds; the speed-up is the median of the per-round ratios). Quality: every case of
``--quality-cases`` then trains for the same wall-clock ``--budget`` (seconds, set-up
included) and is scored by the held-out perplexity of the full softmax of its scores (exact
normalisation over V, whatever the training loss), on ``--held-out`` pairs from the last 10 %
of lines. One JSON object per case on stdout (timing-only cases have no perplexity).

    python scripts/bench/nce.py [--vocab 50000] [--dim 64] [--batch 512] [--budget 120]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import pyro
import torch
from jointkl.inference import NCE
from jointkl.models import SkipGram
from jointkl.models.skipgram import FullSoftmax, build_vocabulary, word_pairs

from jointkl.data.peoples_daily import peoples_daily_split


def corpus(vocab_size: int, held_out: int, seed: int):
    train, test = peoples_daily_split(0.1)
    vocab = build_vocabulary(train, vocab_size)
    tr = word_pairs(train, vocab, window=1, mode="lm")
    te = word_pairs(test, vocab, window=1, mode="lm")
    pick = torch.randperm(len(te.target), generator=torch.Generator().manual_seed(seed))
    pick = pick[:held_out]
    return (tr.target, tr.context[:, 0]), (te.target[pick], te.context[pick, 0])


def perplexity(params: dict[str, torch.Tensor], target, context) -> float:
    with torch.no_grad():
        h = params["context_embed"][context]
        full = FullSoftmax(h, params["target_embed"], params["target_bias"][:, 0], chunk=2048)
        return math.exp(-float(full.log_prob(target).mean()))


def self_normalisation(params, log_z: float, context) -> float:
    """Mean |log Σ_w e^{G(w,c)} − γ| over contexts: how far binary NCE's single γ is from
    each context's own log normaliser (0 = exactly self-normalised)."""
    with torch.no_grad():
        h = params["context_embed"][context[:2048]]
        logits = h @ params["target_embed"].T + params["target_bias"][:, 0]
        return float((logits.logsumexp(-1) - log_z).abs().mean())


class Clock:
    """Step-end stamps; raises KeyboardInterrupt (the engines' stop-and-keep path) once
    ``budget`` seconds have passed or ``max_steps`` steps are done."""

    def __init__(self, budget: float = math.inf, max_steps: int | None = None):
        self.start = time.perf_counter()
        self.budget, self.max_steps, self.stamps = budget, max_steps, []

    def __call__(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        self.stamps.append(now)
        if now - self.start > self.budget or (
            self.max_steps is not None and len(self.stamps) >= self.max_steps
        ):
            raise KeyboardInterrupt

    def step_seconds(self, warmup: int) -> float:
        gaps = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        return statistics.median(gaps[warmup:])


def softmax_run(data, vocab: int, dim: int, batch: int, lr: float, clock: Clock, seed: int):
    """Full-softmax maximum likelihood, a plain PyTorch loop with SkipGram's initialisation."""
    target, context = data
    pyro.set_rng_seed(seed)
    ctx = ((torch.rand(vocab, dim) - 0.5) / dim).requires_grad_()
    out = torch.zeros(vocab, dim, requires_grad=True)
    bias = torch.zeros(vocab, 1, requires_grad=True)
    # Context rows: sparse lookups and lazy Adam, as the NCE engine does; the output layer's
    # gradient is dense by nature (every word's logit enters the softmax).
    sparse_opt = torch.optim.SparseAdam([ctx], lr=lr)
    dense_opt = torch.optim.Adam([out, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    n, perm, pos, steps = len(target), None, 0, 0
    try:
        while True:
            if perm is None or pos + batch > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx, pos = perm[pos : pos + batch], pos + batch
            h = torch.nn.functional.embedding(context[idx], ctx, sparse=True)
            logits = h @ out.T + bias[:, 0]
            loss = torch.nn.functional.cross_entropy(logits, target[idx])
            for p in (ctx, out, bias):
                p.grad = None
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            steps += 1
            clock(steps, float(loss.detach()))
    except KeyboardInterrupt:
        pass
    params = {"context_embed": ctx.detach(), "target_embed": out.detach(), "target_bias": bias}
    return {k: v.detach() for k, v in params.items()}, steps


def default_run(data, vocab, dim, clock, seed):
    """What a user gets: ``NCE()`` with no settings (binary, ν = 10, the engine's noise,
    optimiser, learning rate and batch) on ``SkipGram(vocab, dim)``; only the loop's length
    and the seed are set, as in every case."""
    engine = NCE(steps=10**9, seed=seed, progress=False, on_step=clock)
    fit = engine.fit(SkipGram(vocab_size=vocab, dim=dim), *data)
    return fit.params, fit.n_iter


def nce_run(data, vocab, dim, batch, lr, clock, seed, variant, nu, shared=None):
    engine = NCE(
        noise="unigram^0.75",
        nu=nu,
        variant=variant,
        shared_noise=shared,
        lr=lr,
        steps=10**9,
        batch_size=batch,
        seed=seed,
        progress=False,
        on_step=clock,
    )
    fit = engine.fit(SkipGram(vocab_size=vocab, dim=dim), *data)
    return fit.params, fit.n_iter


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--timing-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--held-out", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cases",
        default="softmax,binary:20,binary:50,binary:100,binary:500,ranking:20,ranking:100,"
        "negative-sampling:20,binary:20:per-datum,binary:100:per-datum",
        help="cases timed per step",
    )
    ap.add_argument(
        "--quality-cases",
        default="default,softmax,binary:20,binary:100,binary:500,ranking:100,negative-sampling:20,"
        "binary:20:per-datum",
        help="cases that also train for --budget seconds and are scored on held-out pairs",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test = corpus(a.vocab, a.held_out, a.seed)
    common = {
        "vocab": a.vocab,
        "dim": a.dim,
        "batch": a.batch,
        "lr": a.lr,
        "train_pairs": len(train[0]),
        "held_out_pairs": len(test[0]),
        "threads": a.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    cases = a.cases.split(",")

    def parse(case: str) -> tuple[str, int | None, bool | None]:
        variant, nu, noise = [*case.split(":"), None, None][:3]
        if noise not in (None, "per-datum"):
            raise SystemExit(f"case {case!r}: the third field may only be 'per-datum'")
        return variant, int(nu) if nu else None, False if noise else None

    def run(case: str, clock: Clock):
        variant, nu, shared = parse(case)
        if variant == "default":
            return default_run(train, a.vocab, a.dim, clock, a.seed)
        if variant == "softmax":
            return softmax_run(train, a.vocab, a.dim, a.batch, a.lr, clock, a.seed)
        return nce_run(
            train, a.vocab, a.dim, a.batch, a.lr, clock, a.seed, variant, nu, shared=shared
        )

    # Step times: the cases alternate over --rounds rounds, so load drift on a shared machine
    # hits them alike; a case's figure is the median of its per-round medians.
    per_round: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(a.rounds):
        for case in cases:
            timing = Clock(max_steps=a.timing_steps + 6)
            run(case, timing)
            per_round[case].append(timing.step_seconds(warmup=5))
    ratios = {
        c: [s / t for s, t in zip(per_round.get("softmax", []), per_round[c], strict=False)]
        for c in cases
    }
    # Reference: the context-free unigram model (add-one smoothed training counts).
    counts = torch.bincount(train[0], minlength=a.vocab).double() + 1.0
    log_unigram = (counts / counts.sum()).log()
    row = {"case": "unigram", "held_out_perplexity": math.exp(-float(log_unigram[test[0]].mean()))}
    print(json.dumps({**row, **common}), flush=True)
    quality = a.quality_cases.split(",") if a.quality_cases else []
    order = [*cases, *(c for c in quality if c not in cases)]
    order.sort(key=lambda c: c != "default")  # the defaults' row first, tuned rows after
    for case in order:
        variant, nu, shared = parse(case)
        row = {
            "case": case,
            "variant": variant,
            "nu": nu,
            "noise_draws": None
            if variant == "softmax"
            else ("per-datum" if shared is False else "shared"),
            "settings": {"default": "NCE() defaults", "softmax": "anchor (batch, lr above)"}.get(
                variant, "tuned (batch, lr above)"
            ),
            "step_ms": 1000 * statistics.median(per_round[case]) if case in per_round else None,
            "step_ms_rounds": [round(1000 * t, 1) for t in per_round.get(case, [])],
            "speedup_per_step": statistics.median(ratios[case]) if ratios.get(case) else None,
            **common,
        }
        if case not in quality:
            print(json.dumps(row), flush=True)
            continue
        budget = Clock(budget=a.budget)
        params, steps = run(case, budget)
        row |= {
            "budget_s": a.budget,
            "seconds": time.perf_counter() - budget.start,
            "steps": steps,
            "seconds_per_step": (time.perf_counter() - budget.start) / max(steps, 1),
            "epochs": steps * a.batch / len(train[0]),
            "held_out_perplexity": perplexity(params, *test),
        }
        if "log_Z" in params:
            row["log_Z"] = float(params["log_Z"])
            row["mean_abs_log_normaliser_minus_log_Z"] = self_normalisation(
                params, row["log_Z"], test[1]
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
