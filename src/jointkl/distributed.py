"""Data parallelism on ``torch.distributed``: one process per rank, launched by torchrun.

The gradient engines (SVI, NCE) are data-parallel by construction: their loss is a sum over
the data points of a mini-batch plus global terms. Under a process group of P ranks:

* **Data.** Rank r holds the contiguous rows ``[lo_r, hi_r)`` of the N rows
  (:func:`shard_bounds`: the first ``N mod P`` ranks get one row more). The command line
  hands each rank its rows; in Python, each rank passes its own shard to ``engine.fit``.
* **Batches.** Every rank draws the *same global* batch order (the
  :class:`~jointkl.minibatch.BatchOrder` of a 1-process run with the same N, batch size and
  seed: a permutation of row ids, no data) and keeps the ids of each global batch that fall
  in its shard (:meth:`Shard.part`). The union over ranks of step b's parts is exactly the
  1-process run's batch b, whatever P is, so a run's batch sequence does not depend on P
  and a run resumed with another P continues the same sequence.
* **Loss and gradients.** Rank r evaluates its part (B_r of the B rows) with the data-plate
  factor N/B_r and weighs the result by w_r = B_r/B: (N/B) Σ_{i∈r} ℓ_i + w_r·G, where G are
  the global terms. Since Σ_r w_r = 1, the sum over ranks is the 1-process loss
  (N/B) Σ_i ℓ_i + G, and so is the gradient sum. :func:`all_reduce_step` sums the weighted
  gradients, the weighted loss and a touched-flag per parameter in **one** flat buffer per
  step (one ``all_reduce``); the optimiser then takes the same step on every rank.
* **Randomness.** Ranks start from rank 0's parameters and torch RNG state
  (:func:`broadcast_start`), so random draws of a fixed shape (global latents, shared or
  per-batch noise drawn for the whole global batch) are the same on every rank and equal to
  a 1-process run's. Draws whose shape follows the rank's rows (an amortised guide's local
  latents, per-context noise) are drawn per rank: an equally valid estimator, not the
  1-process numbers.
* **Files.** Rank 0 alone writes (the run directory, checkpoints, the progress bar); the
  checkpoint holds the global step, the parameters, the optimiser state and rank 0's RNG,
  nothing per rank, so a run resumes under any P.
* **Stopping.** SIGINT/SIGTERM (Ctrl-C, or torchrun forwarding its own) must stop every
  rank after the *same* step, or the ranks would wait on each other's ``all_reduce``.
  Under :func:`agreed_stop` a rank's signal is only noted; :func:`all_reduce_step` carries
  the note in its buffer, and the step after which any rank has one is where every rank
  stops (the loop then sees the request, and rank 0 writes the checkpoint). A repeat of
  the same signal within :data:`ECHO_SECONDS` is torchrun's echo of a Ctrl-C every rank
  already got; any other second signal stops the rank at once, as in one process.
* **Faults.** The process group has a timeout (:data:`TIMEOUT`); a rank that dies makes its
  peers' next ``all_reduce`` fail (:class:`RankFailedError`, one line), and torchrun stops
  the others. Checkpoints are written atomically, so the last good one stays intact.

With no process group (a plain process) every query answers as a single rank (0 of 1) and
nothing here communicates.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jointkl.data.arrays import RowArray, is_row_array
from jointkl.errors import InputError

__all__ = [
    "TIMEOUT",
    "RankFailedError",
    "Shard",
    "initialise",
    "active",
    "rank",
    "world_size",
    "is_main",
    "shard_bounds",
    "local_shard",
    "row_range",
    "all_reduce_step",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_start",
    "broadcast_object",
    "barrier",
    "launch",
    "agreed_stop",
    "comm_seconds",
]

# How long a collective waits for a peer before failing: long enough for a slow step on a
# loaded machine, short enough that a hung peer ends the run instead of holding it forever.
TIMEOUT = timedelta(minutes=5)
# The test hook that kills one rank mid-fit ("RANK:STEP"); read only in _fault_hook.
KILL_ENV = "JOINTKL_TEST_KILL_RANK_AT_STEP"

_comm = {"seconds": 0.0, "calls": 0}
# A second signal this soon after the first, and the same one, is the launcher's echo: a
# terminal's Ctrl-C reaches every rank and torchrun, which then forwards it again.
ECHO_SECONDS = 1.0
# this rank's noted signal (not yet agreed) and when it came
_pending: dict[str, Any] = {"signum": None, "at": 0.0}


class RankFailedError(RuntimeError):
    """A collective failed: another rank of the run stopped (died, or timed out)."""


def initialise(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), once.

    :param device: the device the engines run on: NCCL for CUDA, gloo otherwise.
    :returns: whether a process group of more than one rank is active.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    # Left to the interpreter's own shutdown, the group's C++ worker threads can outlive
    # the Python state they hold and abort the process ("terminate called without an
    # active exception", SIGABRT) after a run that succeeded: take it down while Python is
    # still whole.
    atexit.register(_leave)
    return dist.get_world_size() > 1


def _leave() -> None:
    """Destroy this process's process group, if it still has one (at exit)."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to take down cleanly
        pass


def active() -> bool:
    """Whether this process is one rank of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or no process group)."""
    return rank() == 0


def shard_bounds(n: int, r: int, p: int) -> tuple[int, int]:
    """Rank ``r``'s contiguous rows ``[lo, hi)`` of ``n`` rows split over ``p`` ranks: sizes
    differ by at most one, the first ``n mod p`` ranks taking the extra row."""
    base, extra = divmod(n, p)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


@dataclass(frozen=True)
class Shard:
    """This rank's rows ``[lo, hi)`` of ``n`` rows in all.

    :param n: rows over all ranks (the 1-process data size N).
    :param lo: the first row this rank holds.
    :param hi: one past the last row this rank holds.
    """

    n: int
    lo: int
    hi: int

    @classmethod
    def of_local(cls, n_local: int) -> Shard:
        """The shard of a rank holding ``n_local`` rows, the ranks' rows in rank order: N
        and the offset come from an all-gather of the ranks' row counts. Refuses a rank
        with no rows (it could not trace the model)."""
        if not active():
            return cls(n_local, 0, n_local)
        counts = torch.zeros(world_size(), dtype=torch.int64)
        counts[rank()] = n_local
        _all_reduce(counts)
        if int(counts.min()) == 0:
            raise InputError(
                f"data-parallel fit: rank {int(counts.argmin())} has no rows; use fewer "
                f"processes than data rows ({int(counts.sum())})"
            )
        lo = int(counts[: rank()].sum())
        return cls(int(counts.sum()), lo, lo + n_local)

    def part(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the global batch ``idx`` (global row ids): (its positions in
        ``idx``, the local row ids)."""
        mine = (idx >= self.lo) & (idx < self.hi)
        pos = mine.nonzero().squeeze(-1)
        return pos, idx[pos] - self.lo


def local_shard(args: tuple, kwargs: dict[str, Any], n: int) -> tuple[tuple, dict]:
    """This rank's contiguous rows (:func:`shard_bounds`) of every per-data-point argument
    (a tensor whose first dimension is ``n``, or a memory-mapped
    :class:`~jointkl.data.arrays.RowArray` of ``n`` rows: cut by :func:`row_range` without
    reading); other arguments unchanged. Without a process group, the arguments themselves."""
    if not active():
        return args, kwargs
    lo, hi = shard_bounds(n, rank(), world_size())
    if hi <= lo:
        raise InputError(
            f"data-parallel fit: {n} rows cannot give each of {world_size()} processes a row; "
            f"use fewer processes"
        )

    def cut(a):
        if is_row_array(a) and len(a) == n:
            return row_range(a, lo, hi)
        per_point = isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n
        return a[lo:hi] if per_point else a

    return tuple(cut(a) for a in args), {k: cut(a) for k, a in kwargs.items()}


def row_range(rows: RowArray, lo: int, hi: int) -> RowArray:
    """Rows ``[lo, hi)`` of a memory-mapped :class:`~jointkl.data.arrays.RowArray` as a
    RowArray of their own (row 0 is ``rows[lo]``), reading nothing: each file it touches is
    mapped again from the byte where its first wanted row starts, so a rank maps, and an
    engine streaming it reads, its rows alone. The read dtype, device and value range
    (the checks :meth:`~jointkl.data.arrays.RowArray.astype` makes) are the parent's.

    :param rows: the whole data.
    :param lo: the first row kept.
    :param hi: one past the last row kept (``lo < hi <= len(rows)``).
    """
    if not 0 <= lo < hi <= len(rows):
        raise ValueError(f"rows [{lo}, {hi}) are not within the {len(rows)} rows")
    shards, paths = [], []
    for k, (shard, path) in enumerate(zip(rows.shards, rows.paths, strict=True)):
        start, stop = int(rows.offsets[k]), int(rows.offsets[k + 1])
        a, b = max(lo, start) - start, min(hi, stop) - start  # rows of this file kept
        if a >= b:
            continue
        shards.append(
            np.memmap(
                path,
                dtype=shard.dtype,
                mode="r",
                offset=int(shard.offset) + a * rows.row_bytes,
                shape=(b - a, *shard.shape[1:]),
            )  # C order: open_rows refuses Fortran-order files
        )
        paths.append(path)
    view = RowArray(shards, paths, rows.source)
    view.dtype, view.device, view.range = rows.dtype, rows.device, rows.range
    return view


def _on_wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend can send it: NCCL moves only CUDA tensors (a CPU one goes via
    the current GPU); gloo sends CPU tensors as they are."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _broadcast(t: torch.Tensor) -> None:
    """Rank 0's ``t`` into ``t`` on every rank."""
    wire = _on_wire(t)
    dist.broadcast(wire, src=0)
    if wire is not t:
        t.copy_(wire)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (``t`` itself without a process group)."""
    if active():
        _all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elementwise maximum over the ranks, in place."""
    if active():
        _all_reduce(t, dist.ReduceOp.MAX)
    return t


def _all_reduce(t: torch.Tensor, op: Any = None) -> None:
    """Sum ``t`` over the ranks in place, timed; a failed peer becomes a one-line error."""
    t0 = time.perf_counter()
    try:
        wire = _on_wire(t)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM if op is None else op)
        if wire is not t:
            t.copy_(wire)
    except RuntimeError as e:
        # gloo's text starts with its source location; its first sentence says what happened
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
        first = text.split(". ")[0].splitlines()[0][:160] if text else type(e).__name__
        raise RankFailedError(
            f"rank {rank()}: another process of the run stopped ({first}); the run ends"
        ) from e
    finally:
        _comm["seconds"] += time.perf_counter() - t0
        _comm["calls"] += 1


def comm_seconds(reset: bool = False) -> tuple[float, int]:
    """(seconds spent in all-reduce calls, number of calls) in this process so far."""
    out = (_comm["seconds"], _comm["calls"])
    if reset:
        _comm.update(seconds=0.0, calls=0)
    return out


def _fault_hook(step: int) -> None:
    """Testing only: ``JOINTKL_TEST_KILL_RANK_AT_STEP=R:S`` kills rank R (SIGKILL: no
    clean-up, as a crashed node) when it reaches step S."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        r, s = (int(v) for v in spec.split(":"))
        if r == rank() and s == step:
            os.kill(os.getpid(), signal.SIGKILL)


def all_reduce_step(
    params: Sequence[torch.Tensor], weight: float, value: float, step: int
) -> float:
    """One data-parallel step's communication: sum over ranks of ``weight``·grad for every
    parameter, and of ``weight``·``value`` (the loss), in one flat buffer and one
    ``all_reduce``. Gradients are written back in place; a parameter no rank touched keeps
    ``grad = None`` (an optimiser skips it, as in a 1-process run). Sparse gradients are
    summed densely.

    :param params: every parameter, in the same order on every rank.
    :param weight: w_r = B_r/B, this rank's share of the global batch (0 for an empty part).
    :param value: this rank's loss at its part, evaluated with the data-plate factor N/B_r.
    :param step: the step (for the test fault hook).
    :returns: the global loss Σ_r w_r·value_r (non-finite when any rank's is).
    """
    _fault_hook(step)
    if not active():
        return value
    sizes = [p.numel() for p in params]
    total, k_all = sum(sizes), len(params)
    ref = params[0] if params else torch.zeros(())
    # [gradients | touched flag per param | sparse flag per param | ranks stopping | their
    # signal numbers | loss], in the parameters' dtype when all are float32 (half the bytes
    # of float64: the sum of P float32 gradients rounds once per add, as the 1-process
    # backward's own float32 sums over the batch do); float64 otherwise, so a float64
    # model's sum adds no rounding of its own.
    wire = torch.float32 if all(p.dtype == torch.float32 for p in params) else torch.float64
    buf = torch.zeros(total + 2 * k_all + 3, dtype=wire, device=ref.device)
    noted = _pending["signum"]
    if noted is not None:
        buf[-3], buf[-2] = 1.0, float(noted)
    at = 0
    for k, (p, size) in enumerate(zip(params, sizes, strict=True)):
        if p.grad is not None:
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            buf[at : at + size] = g.reshape(-1) * weight
            buf[total + k] = 1.0
            buf[total + k_all + k] = float(p.grad.is_sparse)
        at += size
    buf[-1] = value * weight if weight else 0.0
    _all_reduce(buf)
    at = 0
    for k, (p, size) in enumerate(zip(params, sizes, strict=True)):
        p.grad = None
        if buf[total + k] > 0:
            g = buf[at : at + size].reshape(p.shape).to(p.dtype)
            # an embedding's row-sparse gradient stays row-sparse (the rows any rank touched)
            p.grad = g.to_sparse(1) if buf[total + k_all + k] > 0 else g
        at += size
    stopping = int(buf[-3])
    if stopping:  # every rank ends after this step, under the signal a rank got
        _agree(noted if noted is not None else _common_signal(int(buf[-2]), stopping))
    return float(buf[-1])


def _common_signal(total: int, ranks: int) -> int:
    """The signal of the ranks that got one, from the sum of their numbers: theirs when
    they all got the same, else SIGTERM (the one that asks a run to end)."""
    return total // ranks if total % ranks == 0 and total // ranks in _SIGNALS else signal.SIGTERM


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _agree(signum: int) -> None:
    """Make ``signum`` this rank's stop request as the step loops see it
    (:func:`jointkl.signals.stop_requested`)."""
    from jointkl import signals

    # signals keeps the one request a loop polls; a distributed stop is made at the same
    # step on every rank, so it is set here rather than by the handler
    signals._received = int(signum)


def _noting_handler(signum: int, frame) -> None:
    """Note the signal for the next :func:`all_reduce_step` (see the module's Stopping)."""
    from jointkl import signals

    now = time.monotonic()
    first = _pending["signum"]
    if first is None:
        _pending.update(signum=signum, at=now)
        if signals._polling == 0:  # no loop polls (setup, or EM): stop now, as one process
            raise signals.ForcedStop(signum)
        return
    if signum == first and now - _pending["at"] < ECHO_SECONDS:
        return  # torchrun's forward of the Ctrl-C this rank already has
    raise signals.ForcedStop(signum)


@contextmanager
def agreed_stop() -> Iterator[None]:
    """Inside :func:`jointkl.signals.stop_on_signals`, under a process group: SIGINT and
    SIGTERM are noted and agreed on at the next :func:`all_reduce_step` (every rank stops
    after the same step) instead of stopping this rank alone. Nothing without a group or
    off the main thread."""
    from jointkl import signals

    if not active():
        yield
        return
    _pending.update(signum=None, at=0.0)
    with signals.handlers(_noting_handler):
        yield


def broadcast_start(params: Sequence[torch.Tensor]) -> None:
    """Give every rank rank 0's parameter values and torch RNG state (the ranks then start
    as one run, whatever each one's data-dependent initialisation gave)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            _broadcast(p.data)
    rng = torch.get_rng_state()
    _broadcast(rng)
    torch.set_rng_state(rng)
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # draws made on the GPU
        cuda_rng = torch.cuda.get_rng_state()
        _broadcast(cuda_rng)
        torch.cuda.set_rng_state(cuda_rng)


def barrier() -> None:
    """Wait until every rank arrives here (nothing without a process group)."""
    if active():
        try:
            dist.barrier()
        except RuntimeError as e:
            raise RankFailedError(f"rank {rank()}: another process of the run stopped") from e


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a path, a decision); ``obj`` itself without a group."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``jointkl <argv>`` as ``nproc`` processes under torchrun (single node,
    standalone rendezvous) and return the exit status: 0, or the first failed rank's.

    A rank that dies ends the whole run (torchrun stops the others); one line on stderr
    says which rank and how, and where the last good checkpoint is.
    """
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise InputError(f"--nproc must be a whole number >= 1, got {nproc}")
    cores = os.cpu_count() or 1
    if nproc > cores:
        print(
            f"jointkl: warning: --nproc {nproc} exceeds this machine's {cores} core(s); the "
            f"processes will share cores",
            file=sys.stderr,
        )
    # torchrun's agent logs every start and stop; its failure summary is replaced by one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its notice
    try:
        run(
            parse_args(
                [
                    "--standalone",
                    "--nnodes=1",
                    f"--nproc-per-node={nproc}",
                    "--max-restarts=0",
                    "-m",
                    "jointkl",
                    *argv,
                ]
            )
        )
    except SignalException as e:  # torchrun itself got SIGINT/SIGTERM and passed it on
        return 128 + int(e.sigval)  # rank 0 said where the run stopped
    except ChildFailedError as e:
        r, failure = e.get_first_failure()
        if r == 0 and failure.exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            return failure.exitcode  # an agreed stop: rank 0 marked the run and said so
        how = (
            f"killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exit status {failure.exitcode}"
        )
        print(
            f"jointkl: rank {r} of {nproc} stopped ({how}); the whole run was stopped"
            f"{_checkpoint_note(argv)}",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _checkpoint_note(argv: Sequence[str]) -> str:
    """The clause naming the last good checkpoint of the run directory ``--out`` names."""
    from pathlib import Path

    from jointkl.runs import latest_checkpoint

    out = None
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    if out is None:
        return ""
    latest = latest_checkpoint(Path(out) / "checkpoints")
    if latest is None:
        return "; no checkpoint was written"
    return f"; last good checkpoint {latest}: continue with --resume (any --nproc)"
