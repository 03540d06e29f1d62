"""The command line explains itself: every flag has help, `jointkl engines NAME` and
`jointkl models NAME` list every setting with its default and meaning, `--version`."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

import jointkl
from jointkl.cli import build_parser, main
from jointkl.engine import ENGINES
from jointkl.setting_docs import engine_settings, model_settings, param_docs
from jointkl.zoo import MODELS


def _parsers(parser: argparse.ArgumentParser, path: str = "jointkl"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_and_argument_has_help():
    missing = [
        f"{path} {a.option_strings or a.dest}"
        for path, parser in _parsers(build_parser())
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        and not (a.help or "").strip()
    ]
    assert not missing, missing


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jointkl {version('jointkl')}"
    assert jointkl.__version__ == version("jointkl")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_settings_are_documented_and_listed(name, capsys):
    rows = engine_settings(ENGINES[name])
    undocumented = [r.name for r in rows if not r.meaning]
    assert not undocumented, f"{name}: add a ':param' line for {undocumented}"
    assert main(["engines", name]) == 0
    out = capsys.readouterr().out
    for r in rows:
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{r.name} "))
        assert "default" in line and "(undocumented)" not in line, line
    assert "steps" in out or "max_iter" in out or "num_samples" in out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_settings_are_documented_and_listed(name, capsys):
    rows = model_settings(MODELS[name])
    undocumented = [r.name for r in rows if not r.meaning]
    assert not undocumented, f"{name}: add a ':param' line for {undocumented}"
    assert main(["models", name]) == 0
    out = capsys.readouterr().out
    assert len([x for x in out.splitlines() if x.startswith("  ")]) == len(rows)


def test_svi_defaults_and_meanings_are_the_real_ones(capsys):
    assert main(["engines", "svi"]) == 0
    out = capsys.readouterr().out
    steps = next(x for x in out.splitlines() if x.strip().startswith("steps "))
    assert "default 1000" in steps and "gradient steps" in steps
    lr = next(x for x in out.splitlines() if x.strip().startswith("lr "))
    assert "default 0.01" in lr


def test_param_docs_parsing():
    class Documented:
        """Something.

        :param int steps: how many
            steps, continued.
        :param a, b: two names share a line.
        :param optim: a name or a
            :mod:`jointkl.optim` integrator (a role opening a continuation).
        :param str undocumented_next:
        :returns: nothing to see.
        """

        def __init__(self, steps=1, a=2, b=3, optim="adam", other=0):
            pass

    docs = param_docs(Documented)
    assert docs["steps"] == "how many steps, continued."
    assert docs["a"] == docs["b"] == "two names share a line."
    assert docs["optim"].endswith("integrator (a role opening a continuation).")
    rows = {r.name: r for r in model_settings(Documented)}
    assert rows["other"].meaning is None  # no ':param other:' -> the test above would fail
    assert rows["steps"].default == 1


@pytest.mark.parametrize("command", ["engines", "models"])
def test_unknown_name_exits_2_with_one_line(command, capsys):
    assert main([command, "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuch" in err
