"""The `make bench` runner: its tables and the page rewrite (the benchmarks themselves are not
run here; they are long and measure time)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "scripts/bench/run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_listed_benchmark_script_exists(run_all):
    for bench in run_all.BENCHMARKS:
        assert (ROOT / "scripts/bench" / bench.script).is_file(), bench.script


def test_table_is_the_union_of_the_rows_keys(run_all):
    text = run_all.table([{"case": "a", "speedup": 3.14159}, {"case": "b", "note": "x|y"}])
    lines = text.splitlines()
    assert lines[0] == "| case | speedup | note |"
    assert lines[2] == "| a | 3.142 |  |"
    assert lines[3] == "| b |  | x\\|y |"


def test_replace_section_appends_then_replaces_in_place(run_all):
    page = "# Benchmarks\n\nprose\n"
    once = run_all.replace_section(page, "crf", "table one\n")
    assert once.count("<!-- bench:crf -->") == 1 and "table one" in once
    twice = run_all.replace_section(once + "\ntail prose\n", "crf", "table two\n")
    assert "table one" not in twice and "table two" in twice
    assert twice.count("<!-- bench:crf -->") == 1 and twice.endswith("tail prose\n")
    assert twice.startswith("# Benchmarks\n\nprose\n")


def test_unknown_benchmark_name_exits_2(run_all, capsys):
    with pytest.raises(SystemExit) as stop:
        run_all.main(["--only", "nope", "--dry-run"])
    assert stop.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_dry_run_lists_every_command_and_writes_nothing(run_all, tmp_path, capsys):
    page = tmp_path / "b.md"
    assert run_all.main(["--dry-run", "--page", str(page)]) == 0
    err = capsys.readouterr().err
    assert all(b.script in err for b in run_all.BENCHMARKS)
    assert not page.exists()
