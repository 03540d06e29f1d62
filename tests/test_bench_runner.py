"""The `make bench` runner: its tables and the page rewrite (the benchmarks themselves are not
run here; they are long and measure time). Where ``main`` runs, its ``run`` is replaced by a
stand-in returning rows (or raising, as a failed benchmark does): a block is replaced in place
between its markers, a failed benchmark keeps its old table, a new block lands after the other
tables, and each heading names the command, machine, thread count, anchors, date and duration.
"""

from __future__ import annotations

import importlib.util
import json
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


PAGE = """# Benchmarks

Intro text that the runner must not touch.

## Latest `make bench` tables

Written by `make bench` (`scripts/bench/run_all.py`); edit the scripts, not these tables.

<!-- bench:optim -->
OLD OPTIM TABLE
<!-- /bench:optim -->

<!-- bench:nce -->
OLD NCE TABLE
<!-- /bench:nce -->

## A later section

Text after the tables.
"""


def fake_run(rows_by_name: dict[str, list[dict]]):
    def run(bench, threads):
        rows = rows_by_name[bench.name]
        if rows is None:
            raise RuntimeError(f"{bench.script} exited 1: boom")
        return rows, 12.3

    return run


def test_every_script_in_scripts_bench_has_a_benchmark(run_all):
    scripts = {p.name for p in (ROOT / "scripts/bench").glob("*.py")} - {"run_all.py"}
    assert scripts == {b.script for b in run_all.BENCHMARKS}


def test_markers_replaced_in_place_and_failure_keeps_old_table(run_all, tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE, encoding="utf-8")
    rows = {"optim": [{"case": "adam", "ratio": 0.91}], "nce": None}
    monkeypatch.setattr(run_all, "run", fake_run(rows))
    code = run_all.main(["--only", "optim,nce", "--page", str(page), "--note", "shared"])
    assert code == 1  # nce failed
    text = page.read_text(encoding="utf-8")
    assert "OLD OPTIM TABLE" not in text
    assert "OLD NCE TABLE" in text  # the failed benchmark keeps its table
    assert text.count("<!-- bench:optim -->") == 1 and text.count("<!-- /bench:optim -->") == 1
    # in place: the optim block is still before the nce block, and the text around is kept
    assert text.index("<!-- bench:optim -->") < text.index("<!-- bench:nce -->")
    assert text.startswith("# Benchmarks\n\nIntro text that the runner must not touch.\n")
    assert text.endswith("## A later section\n\nText after the tables.\n")
    block = text[text.index("<!-- bench:optim -->") : text.index("<!-- /bench:optim -->")]
    assert "| case | ratio |" in block and "| adam | 0.91 |" in block


def test_heading_names_command_machine_threads_anchors_date_duration(run_all, tmp_path):
    bench = next(b for b in run_all.BENCHMARKS if b.name == "langevin")
    body = run_all.section(bench, [{"case": "x", "s": 1.0}], 61.4, 1, "shared")
    assert "`OMP_NUM_THREADS=1 python scripts/bench/langevin.py`" in body
    assert f"- machine: {run_all.machine('shared')}; torch threads: 1;" in body
    assert "(shared)" in body
    assert f"pyro-ppl {run_all.version('pyro-ppl')}" in body
    assert "- measured: " in body and "61 s for the whole benchmark" in body
    assert body.endswith("| x | 1 |\n")


def test_new_block_lands_after_the_last_table(run_all, tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE, encoding="utf-8")
    monkeypatch.setattr(run_all, "run", fake_run({"scaling": [{"case": "svi", "p": 2}]}))
    assert run_all.main(["--only", "scaling", "--page", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    at = text.index("<!-- bench:scaling -->")
    assert text.index("<!-- /bench:nce -->") < at < text.index("## A later section")
    assert "OLD OPTIM TABLE" in text and "OLD NCE TABLE" in text


def test_page_without_the_section_gets_it_at_the_end(run_all, tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nNothing yet.\n", encoding="utf-8")
    monkeypatch.setattr(run_all, "run", fake_run({"optim": [{"case": "a"}]}))
    assert run_all.main(["--only", "optim", "--page", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.index("Nothing yet.") < text.index(run_all.HEADING)
    assert text.index(run_all.HEADING) < text.index("<!-- bench:optim -->")
    assert text.rstrip().endswith("<!-- /bench:optim -->")


def test_unknown_name_and_list(run_all, capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "nope"])
    assert e.value.code == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err
    assert run_all.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert all(b.name in listed for b in run_all.BENCHMARKS)


def test_rows_of_several_cases_get_one_table_each_with_their_own_columns(run_all):
    text = run_all.tables(
        [
            {"case": "defaults", "seconds": {"sklearn": 0.27245, "jointkl": 0.15709}, "n": ""},
            {"case": "hard", "sigma": 0.5, "assign": "soft"},
            {"case": "defaults", "seconds": {"sklearn": 1.0, "jointkl": 2.0}, "ok": True},
        ]
    )
    first, second = text.split("Case `hard`:")
    assert first.startswith("Case `defaults`:")
    assert "| seconds | ok |" in first  # no `case`, no empty `n`, no `sigma`
    assert "| sklearn 0.2725; jointkl 0.1571 |  |" in first
    assert "| sklearn 1; jointkl 2 | True |" in first
    assert "| sigma | assign |" in second and "| 0.5 | soft |" in second
    assert "seconds" not in second


def test_render_rewrites_the_tables_from_the_saved_rows(run_all, tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE, encoding="utf-8")
    monkeypatch.setattr(run_all, "run", fake_run({"optim": [{"case": "adam", "ratio": 0.91}]}))
    assert run_all.main(["--only", "optim", "--page", str(page)]) == 0
    saved = tmp_path / run_all.ROWS / "optim.json"
    assert json.loads(saved.read_text(encoding="utf-8"))["rows"] == [
        {"case": "adam", "ratio": 0.91}
    ]
    written = page.read_text(encoding="utf-8")
    page.write_text(PAGE, encoding="utf-8")  # the tables lost; the rows kept

    def no_run(bench, threads):
        raise AssertionError("--render must not run a benchmark")

    monkeypatch.setattr(run_all, "run", no_run)
    assert run_all.main(["--only", "optim,nce", "--page", str(page), "--render"]) == 0
    text = page.read_text(encoding="utf-8")
    assert text == written  # same block, same date, same wall time
    assert "OLD NCE TABLE" in text  # no saved rows: left as it was
