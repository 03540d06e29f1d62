"""Every ```python block of README.md and docs/**/*.md runs as written.

Each page's blocks run in order, in one fresh interpreter per page (a subprocess, so Pyro's
param store and the registries start empty), in a temporary working directory (a snippet
that saves a run writes there). Blocks that are not meant to run (output listings,
pseudo-code, shell) must be fenced as something other than ``python`` (``text``, ``sh``).

Small settings: the test rewrites the iteration counts written in the snippets
(``steps=``, ``max_iter=``, ``num_samples=``, ``warmup=``, ``n_init=``) to at most
:data:`QUICK_LIMITS`, so a snippet reads as a user would type it and the suite stays fast.
Set ``JOINTKL_DOCS_FULL=1`` to run them with the values as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
QUICK_LIMITS = {"steps": 30, "max_iter": 10, "num_samples": 40, "warmup": 50, "n_init": 1}
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of a Markdown page."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def quick(source: str) -> str:
    """``source`` with each literal iteration count capped at :data:`QUICK_LIMITS`."""
    for key, limit in QUICK_LIMITS.items():
        source = re.sub(
            rf"\b{key}=(\d+)\b", lambda m, k=key, c=limit: f"{k}={min(int(m.group(1)), c)}", source
        )
    return source


RUNNER = r"""
import sys, traceback
blocks = {blocks!r}
ns = {{"__name__": "__docs__"}}
for i, (line, src) in enumerate(blocks, 1):
    try:
        exec(compile(src, "{page}:" + str(line), "exec"), ns)
    except BaseException:
        print("FAILED: {page}, python block " + str(i) + " (line " + str(line) + ")",
              file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""

pages_with_code = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


def test_quick_caps_only_iteration_counts():
    assert quick("SVI(steps=1000, lr=0.05)") == "SVI(steps=30, lr=0.05)"
    assert quick("EM(max_iter=5, n_init=3)") == "EM(max_iter=5, n_init=1)"
    assert quick("x.steps=7") == "x.steps=7"


def test_every_page_with_code_is_collected():
    names = {p.relative_to(ROOT).as_posix() for p in pages_with_code}
    assert "README.md" in names


@pytest.mark.parametrize(
    "page", pages_with_code, ids=[p.relative_to(ROOT).as_posix() for p in pages_with_code]
)
def test_python_blocks_run(page: Path, tmp_path: Path):
    rel = page.relative_to(ROOT).as_posix()
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not os.environ.get("JOINTKL_DOCS_FULL"):
        blocks = [(line, quick(src)) for line, src in blocks]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocks=blocks, page=rel)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{rel}: a ```python block failed:\n{proc.stderr[-4000:]}"
