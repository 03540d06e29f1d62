"""Benchmark: jointkl's LinearChainCRF against pytorch-crf, same inputs, one run.

For each case (batch B, length T, tags C; lengths drawn uniformly in [T/2, T] with the first
sequence full) it times, on the same emissions, tags and parameters:

- ``loglik``: log-likelihood of the gold tags summed over the batch, plus its backward pass;
- ``decode``: Viterbi decoding of the whole batch.

Each figure is the median over ``--repeat`` timed calls after ``--warmup`` untimed ones, the
two libraries' calls interleaved; one CPU thread unless ``--threads`` says otherwise
(repeatable; ``0`` is torch's default thread count: every case is run at each).
One JSON object per case, thread count and task on stdout: both wall-clock timings (seconds)
and ``speedup`` = pytorch-crf time / jointkl time, and the same for this process's CPU time
(``*_cpu_s``, ``cpu_speedup``). ``--method`` times a given ``LinearChainCRF`` method instead
of the default ``"auto"``.

    python scripts/bench/crf.py                      # the default cases, 1 thread
    python scripts/bench/crf.py --threads 1 --threads 0 --repeat 21
    python scripts/bench/crf.py --case 64,100,4 --repeat 20 --method scan
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from jointkl.distributions import LinearChainCRF

# The cases of the target (issue 13): >= 3x pytorch-crf at each, both tasks.
DEFAULT_CASES = [(64, 100, 4), (32, 50, 9), (32, 50, 20), (16, 1000, 4)]


def _median_times(fns, warmup: int, repeat: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each fn, interleaving the calls so that a busy
    machine slows all contenders alike (the ratio is what we report). CPU time (this
    process's) is the steadier figure on a shared machine when one thread is used."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [([], []) for _ in fns]
    for _ in range(repeat):
        for fn, (wall, cpu) in zip(fns, times, strict=True):
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
    return [(statistics.median(w), statistics.median(c)) for w, c in times]


def run_case(
    B: int, T: int, C: int, warmup: int, repeat: int, seed: int, method: str = "auto"
) -> list[dict]:
    from torchcrf import CRF

    torch.manual_seed(seed)
    ref = CRF(C, batch_first=True)
    h = torch.randn(B, T, C, requires_grad=True)
    lengths = torch.randint(T // 2 if T > 1 else 1, T + 1, (B,))
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]
    tags = torch.randint(0, C, (B, T))

    def ours_loglik():
        crf = LinearChainCRF(
            h, ref.transitions, ref.start_transitions, ref.end_transitions, mask=mask, method=method
        )
        crf.log_prob(tags).sum().backward()

    def theirs_loglik():
        ref(h, tags, mask=mask, reduction="sum").backward()

    def ours_decode():
        with torch.no_grad():
            return LinearChainCRF(
                h,
                ref.transitions,
                ref.start_transitions,
                ref.end_transitions,
                mask=mask,
                method=method,
            ).mode

    def theirs_decode():
        with torch.no_grad():
            return ref.decode(h, mask=mask)

    # Same numbers before timing anything: a fast wrong answer is no answer.
    with torch.no_grad():
        crf = LinearChainCRF(
            h, ref.transitions, ref.start_transitions, ref.end_transitions, mask=mask, method=method
        )
        diff = (crf.log_prob(tags) - ref(h, tags, mask=mask, reduction="none")).abs().max()
        assert diff < 1e-3 * T, f"log-likelihoods differ by {diff}"
        mode = ours_decode()
        for b, y in enumerate(theirs_decode()):
            assert mode[b, : len(y)].tolist() == y, "decodes differ"

    out = []
    for task, ours, theirs in (
        ("loglik+backward", ours_loglik, theirs_loglik),
        ("decode", ours_decode, theirs_decode),
    ):
        (w_ours, c_ours), (w_theirs, c_theirs) = _median_times([ours, theirs], warmup, repeat)
        out.append(
            {
                "case": {"B": B, "T": T, "C": C},
                "task": task,
                "jointkl_s": round(w_ours, 6),
                "pytorch_crf_s": round(w_theirs, 6),
                "speedup": round(w_theirs / w_ours, 2),
                "jointkl_cpu_s": round(c_ours, 6),
                "pytorch_crf_cpu_s": round(c_theirs, 6),
                "cpu_speedup": round(c_theirs / c_ours, 2),
                "threads": torch.get_num_threads(),
                "method": method,
                "device": "cpu",
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", help="B,T,C (repeatable); default: the issue's")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        action="append",
        help="torch CPU threads, repeatable; 0: torch's default (default: 1)",
    )
    p.add_argument("--method", default="auto", help="LinearChainCRF method (default auto)")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    try:
        import torchcrf  # noqa: F401
    except ImportError:
        print("pytorch-crf is not installed: pip install 'jointkl[bench]'", file=sys.stderr)
        return 2
    cases = [tuple(int(v) for v in c.split(",")) for c in args.case] if args.case else DEFAULT_CASES
    for threads in args.threads or [1]:
        torch.set_num_threads(threads or default_threads)
        for B, T, C in cases:
            for row in run_case(B, T, C, args.warmup, args.repeat, args.seed, args.method):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
