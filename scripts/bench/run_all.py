"""Run every benchmark at the defaults a user gets and rewrite their tables in docs/benchmarks.md.

    python scripts/bench/run_all.py                 # all benchmarks (what `make bench` runs)
    python scripts/bench/run_all.py --only crf,em   # some of them
    python scripts/bench/run_all.py --dry-run       # print the commands, run nothing
    python scripts/bench/run_all.py --render        # rewrite the tables from the last rows

Each benchmark in ``BENCHMARKS`` is a script of ``scripts/bench/`` with the arguments of its
default run. The script prints one JSON object per case on stdout; this runner collects them
and writes one Markdown table per benchmark between the markers
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in docs/benchmarks.md (the section is
appended at the end of the page when the markers are missing). Each table is headed by the
command that produced it, the machine (CPU model, cores), the torch thread count and the
versions of the anchors it compares against, so a figure never appears without its context.

A benchmark that fails keeps its previous table and the failure is reported at the end (exit
status 1); the others are still written. Rows are the scripts' own: default settings first,
tuned settings are rows the script labels as such.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
ROWS = "bench-rows"  # beside the page: each benchmark's last JSON rows, for --render


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script and the packages it is measured against.

    :param name: the table's name (also its marker in docs/benchmarks.md).
    :param script: file name under scripts/bench/.
    :param args: arguments of its default run.
    :param anchors: distribution names whose versions head the table.
    :param title: one line saying what is measured against what.
    """

    name: str
    script: str
    args: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()
    title: str = ""
    columns: tuple[str, ...] = field(default=())


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "em",
        "em.py",
        ("--cases", "defaults,gmm,hmm,hard", "--repeat", "3", "--seeds", "0,1,2,3,4"),
        ("scikit-learn", "hmmlearn", "pomegranate"),
        "EM at the defaults (and from a shared start) against scikit-learn, hmmlearn, pomegranate",
    ),
    Benchmark(
        "em_bmm_seeds",
        "em.py",
        (
            "--cases",
            "defaults",
            "--rows",
            "bmm",
            "--quick",
            "--repeat",
            "3",
            "--summary-only",
            "--seeds",
            ",".join(str(s) for s in range(20)),
        ),  # fmt: skip
        ("scikit-learn",),
        "`BernoulliMixture()` EM at the defaults against the NumPy anchor, times and iterations"
        " summed over seeds 0-19 (each seed draws both sides' k-means starts)",
    ),
    Benchmark(
        "crf",
        "crf.py",
        ("--threads", "1", "--repeat", "21"),
        ("pytorch-crf",),
        "LinearChainCRF log-likelihood + backward and Viterbi against pytorch-crf",
    ),
    Benchmark(
        "text",
        "text.py",
        (),
        ("jieba", "nlp-zero"),
        "unsupervised segmentation: pipeline, per-sentence segmentation against jieba, parsing",
    ),
    Benchmark(
        "svi",
        "svi_overhead.py",
        ("--cases", "vae-fit,regression-fit", "--rounds", "5", "--fit-steps", "1000"),
        (),
        "SVI whole fit against a hand-written PyTorch loop (same optimiser)",
    ),
    Benchmark("optim", "optim_overhead.py", (), (), "jointkl.optim step against torch.optim"),
    Benchmark("nce", "nce.py", (), (), "NCE / negative sampling against a full softmax"),
    Benchmark("langevin", "langevin.py", (), ("pyro-ppl",), "Langevin against Pyro's NUTS"),
    Benchmark(
        "nuts",
        "nuts.py",
        (),
        ("pyro-ppl",),
        "NUTS (chains batched, compiled potential) against Pyro's MCMC(NUTS): ESS per second",
    ),
    Benchmark(
        "postfit", "postfit.py", (), ("arviz",), "post-fit work (to_arviz, netCDF, plots) vs fit"
    ),
    Benchmark(
        "em_laplace",
        "em_laplace.py",
        (),
        (),
        "EM's Laplace factor for the default `jointkl fit bmm --engine em`: matmul tables"
        " against the broadcast tables (the previous path)",
    ),
    Benchmark(
        "em_stream",
        "em_stream.py",
        ("--n", "40000000", "--subsample", "1000000"),
        (),
        "EM on a memory-mapped file at N = 4·10^7 (1.28 GB, make bench's size: EM reads files"
        " under 1 GiB whole; the script's own default is 10^8): the streamed fit against a"
        " subsample fit",
    ),
    Benchmark(
        "streaming",
        "streaming.py",
        (),
        (),
        "SVI reading each mini-batch from a memory-mapped file against the same data in memory",
    ),
    Benchmark(
        "scaling",
        "scaling.py",
        (),
        (),
        "data-parallel SVI and NCE at 1 and 2 gloo processes; ring all-reduce cost model",
    ),
    Benchmark(
        "devices",
        "devices.py",
        (),
        (),
        "the same fit with device=None (anchor), 'cpu' and, where available, 'cuda'",
    ),
)


def machine(note: str = "") -> str:
    """CPU model and core count, as the table header shows them, and ``note`` (e.g. "shared")."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    shown = f"{model}, {os.cpu_count()} cores, {platform.system()}"
    return f"{shown} ({note})" if note else shown


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def command(bench: Benchmark) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "bench" / bench.script), *bench.args]


def run(bench: Benchmark, threads: int) -> tuple[list[dict], float]:
    """The JSON rows a benchmark prints, and its wall time. Raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command(bench), env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{bench.script} exited {done.returncode}: {tail[0]}")
    rows = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        raise RuntimeError(f"{bench.script} printed no JSON rows")
    return rows, seconds


def cell(value) -> str:
    """One table cell: floats to 4 significant digits, a mapping as ``key value`` pairs (the
    contenders of one measurement side by side), a list in brackets."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def table(rows: list[dict]) -> str:
    """A Markdown table over the rows' keys, in first-seen order, leaving out a column that
    no row fills."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and row[k] not in (None, "")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def tables(rows: list[dict]) -> str:
    """The rows as few tables as their columns allow: rows are grouped by ``case`` (or else
    ``kind``) when every row names one, and groups whose rows fill the same columns share one
    table (with that column); a table of one group is headed by it and drops the column."""
    by = next((k for k in ("case", "kind") if all(isinstance(r.get(k), str) for r in rows)), None)
    if by is None:
        return table(rows)
    cases: dict[str, list[dict]] = {}
    for row in rows:
        cases.setdefault(row[by], []).append(row)
    shapes: dict[frozenset, list[str]] = {}
    for name, group in cases.items():
        filled = frozenset(k for r in group for k, v in r.items() if v not in (None, ""))
        shapes.setdefault(filled, []).append(name)
    if len(shapes) == 1:
        return table(rows)
    parts = []
    for names in shapes.values():
        group = [r for r in rows if r[by] in names]
        if len(names) == 1:
            group = [{k: v for k, v in r.items() if k != by} for r in group]
            parts.append(f"{by.capitalize()} `{names[0]}`:\n\n" + table(group))
        else:
            parts.append(table(group))
    return "\n\n".join(parts)


def section(
    bench: Benchmark,
    rows: list[dict],
    seconds: float,
    threads: int,
    note: str = "",
    date: str | None = None,
) -> str:
    """The tables of ``rows`` under their heading: command, machine, threads, anchors, the
    date measured (default today) and the benchmark's wall time."""
    shown = " ".join(["python", f"scripts/bench/{bench.script}", *bench.args])
    anchors = ", ".join(f"{a} {version(a)}" for a in bench.anchors) or "—"
    head = [
        f"### `{bench.name}`: {bench.title}",
        "",
        f"- command: `OMP_NUM_THREADS={threads} {shown}` (via `make bench`)",
        f"- machine: {machine(note)}; torch threads: {threads}; torch {version('torch')}",
        f"- anchors: {anchors}",
        f"- measured: {date or time.strftime('%Y-%m-%d')}, {seconds:.0f} s for the whole benchmark",
        "",
    ]
    return "\n".join(head) + "\n" + tables(rows) + "\n"  # a blank line ends the list


HEADING = "## Latest `make bench` tables"


def replace_section(page: str, name: str, body: str) -> str:
    """``page`` with the block of benchmark ``name`` replaced by ``body``, in place.

    A benchmark without markers yet gets its block after the last benchmark block of the
    section (the section's text after the tables stays after them), or after the section's
    first paragraph when it has none; a page without the section gets it at its end.
    """
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body}{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(page):
        return pattern.sub(lambda _: block, page, count=1)
    if HEADING not in page:
        page = page.rstrip("\n") + f"\n\n{HEADING}\n\nWritten by `make bench` "
        page += "(`scripts/bench/run_all.py`); edit the scripts, not these tables.\n"
        return page + f"\n{block}\n"
    start = page.index(HEADING)
    ends = [m.end() for m in re.finditer(r"<!-- /bench:[^ ]+ -->", page[start:])]
    if ends:
        at = start + ends[-1]
    else:  # after the heading's first paragraph
        para = page.find("\n\n", start + len(HEADING) + 2)
        at = len(page.rstrip("\n")) if para < 0 else para
    return page[:at] + f"\n\n{block}" + page[at:]


def write_section(path: Path, name: str, body: str) -> None:
    """Rewrite benchmark ``name``'s block of the page at ``path`` under an exclusive lock,
    so that runners started side by side do not overwrite each other's tables."""
    with open(path, "a", encoding="utf-8") as lock:  # the page itself is the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        page = path.read_text(encoding="utf-8") or "# Benchmarks\n"
        path.write_text(replace_section(page, name, body), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--note", default="", help='added to the machine line, e.g. "shared"')
    ap.add_argument("--page", type=Path, default=PAGE, help="the Markdown page to rewrite")
    ap.add_argument(
        "--render",
        action="store_true",
        help=f"rewrite the tables from the rows of the last runs ({ROWS}/ beside the page), "
        "running nothing",
    )
    args = ap.parse_args(argv)
    if args.list:
        for bench in BENCHMARKS:
            print(f"{bench.name:12} {bench.script:20} {' '.join(bench.args)}")
        return 0
    names = {b.name for b in BENCHMARKS}
    chosen = BENCHMARKS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - names)
        if unknown:
            ap.exit(2, f"run_all: unknown benchmark(s) {unknown}; known: {sorted(names)}\n")
        chosen = tuple(b for b in BENCHMARKS if b.name in wanted)
    failed = []
    for bench in chosen:
        print(f"== {bench.name}: {' '.join(command(bench))}", file=sys.stderr, flush=True)
        if args.dry_run:
            continue
        if args.render:
            saved = args.page.parent / ROWS / f"{bench.name}.json"
            if not saved.exists():
                print(f"   no saved rows ({saved}): left as it is", file=sys.stderr)
                continue
            last = json.loads(saved.read_text(encoding="utf-8"))
            body = section(
                bench, last["rows"], last["seconds"], last["threads"], last["note"], last["date"]
            )
            write_section(args.page, bench.name, body)
            continue
        try:
            rows, seconds = run(bench, args.threads)
        except RuntimeError as e:
            failed.append(str(e))
            print(f"   failed: {e}", file=sys.stderr)
            continue
        kept = args.page.parent / ROWS
        kept.mkdir(parents=True, exist_ok=True)
        last = {
            "rows": rows,
            "seconds": seconds,
            "threads": args.threads,
            "note": args.note,
            "date": time.strftime("%Y-%m-%d"),
        }
        (kept / f"{bench.name}.json").write_text(
            json.dumps(last, indent=1) + "\n", encoding="utf-8"
        )
        body = section(bench, rows, seconds, args.threads, args.note)
        write_section(args.page, bench.name, body)  # after each, so a later failure keeps it
        print(f"   {len(rows)} rows in {seconds:.0f} s", file=sys.stderr)
    for line in failed:
        print(f"run_all: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
