"""The ``jointkl`` command line.

    jointkl fit MODEL --engine ENGINE [--data PATH] [--set key=value ...] [--seed N] [--out DIR]
    jointkl diagnose DIR
    jointkl compare RUN RUN ... [--out DIR]
    jointkl models [NAME] | jointkl engines [NAME]
    jointkl --version
    jointkl words CORPUS --out lexicon.tsv | segment --lexicon L|--model RUN TEXT
    jointkl templates CORPUS | parse --templates T SENTENCE

Bad input (a missing file, NaN in the data, an unknown model/engine/setting, a malformed
``--set``) exits with status 2 and one line naming the problem; nothing written before is lost.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jointkl.errors import ConvergenceWarning, FitDivergedError, InputError

__all__ = ["main", "build_parser", "parse_settings"]


# ---------------------------------------------------------------------- settings
def parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true/false/null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").replace("-", "").isalnum():
            raise InputError(f"malformed --set {item!r}: expected key=value, e.g. --set steps=500")
        out[key.replace("-", "_")] = parse_value(value.strip())
    return out


def _params_of(obj: Any) -> set[str]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return set()
    return {n for n, p in sig.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD}


def _planned_steps(engine_cls: type, engine_kw: dict[str, Any]) -> int:
    """How many steps a run of ``engine_cls`` with ``engine_kw`` takes (for the default
    checkpoint interval): ``steps``, or ``warmup + num_samples`` for a sampler."""
    params = inspect.signature(engine_cls).parameters

    def value(key: str) -> int:
        return int(engine_kw.get(key, params[key].default if key in params else 0) or 0)

    return max(1, value("steps") or value("warmup") + value("num_samples"))


def route_settings(
    settings: dict[str, Any], model_cls: type | None, engine_cls: type
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``--set`` keys: the model constructor's parameters first, then the engine's."""
    model_keys = _params_of(model_cls) if model_cls is not None else set()
    engine_keys = _params_of(engine_cls) - {"on_step"}
    m, e = {}, {}
    for k, v in settings.items():
        if k in model_keys:
            m[k] = v
        elif k in engine_keys:
            e[k] = v
        else:
            allowed = sorted(model_keys | engine_keys)
            raise InputError(f"unknown setting {k!r}; settings here: {', '.join(allowed)}")
    return m, e


# ---------------------------------------------------------------------- commands
def _resolve_model(spec: str, model_settings_fn):
    """(pair, model_spec, model class or None) for a zoo name or ``file.py:name``."""
    from jointkl.pair import as_pair
    from jointkl.zoo import load_user_object, model_class

    if spec.endswith(".py") or ".py:" in spec:
        obj, file_spec = load_user_object(spec)
        return as_pair(obj), file_spec, None
    cls = model_class(spec)
    return cls, {"zoo": spec}, cls


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    from jointkl.data.tables import bind_arguments, load_table
    from jointkl.engine import engine_class
    from jointkl.runs import RunDir
    from jointkl.zoo import hook

    settings = parse_settings(args.set or [])
    engine_cls = engine_class(args.engine)
    target, model_spec, model_cls = _resolve_model(args.model, None)
    model_kw, engine_kw = route_settings(settings, model_cls, engine_cls)
    # A zoo model may carry measured engine settings (e.g. batch size); --set overrides them.
    defaults = hook(model_cls, "engine_defaults").get(args.engine, {})
    engine_kw = {**defaults, **engine_kw}
    if model_cls is not None:
        try:
            pair = model_cls(**model_kw)
        except TypeError as e:
            raise InputError(f"model {args.model!r}: {e}") from e
        model_spec["settings"] = pair.settings()
    else:
        pair = target
    engine_params = _params_of(engine_cls)
    if args.data:
        table = load_table(args.data)
        data_args, data_kwargs = bind_arguments(table, pair.model)
        data_source = str(Path(args.data).resolve())
    elif hook(pair, "default_data") is not None:
        data_args, data_kwargs = pair.default_data(seed=args.seed)
        data_source = f"default data of {args.model!r}"
    else:
        raise InputError(f"model {args.model!r} has no default dataset: pass --data PATH")

    out = Path(args.out or f"runs/{Path(args.model.split(':')[0]).stem}-{args.engine}")
    run = RunDir(out).create()
    if "seed" in engine_params:
        engine_kw.setdefault("seed", args.seed)
    if "checkpoint_dir" in engine_params:
        engine_kw.setdefault("checkpoint_dir", str(run.checkpoints))
        engine_kw.setdefault(
            "checkpoint_every", max(1, _planned_steps(engine_cls, engine_kw) // 10)
        )
        engine_kw.setdefault("resume", bool(args.resume))
    elif args.resume:
        raise InputError(f"engine {args.engine!r} does not checkpoint; --resume is for svi")
    try:
        engine = engine_cls(**engine_kw)
    except TypeError as e:
        raise InputError(f"engine {args.engine!r}: {e}") from e
    torch.manual_seed(args.seed)
    run.write_config(
        {
            "command": " ".join(sys.argv),
            "model": args.model,
            "model_spec": model_spec,
            "engine": args.engine,
            "engine_config": engine.config,
            "data": data_source,
            "seed": args.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    print(f"fitting {args.model} with {engine!r} on {data_source}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = engine.fit(pair, *data_args, **data_kwargs)
    for w in caught:  # an unconverged fit: one line on stderr; other warnings as usual
        if issubclass(w.category, ConvergenceWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if fit.model_spec is None:
        fit.model_spec = model_spec
    fit.save(run.path)
    run.write_metrics({"step": i + 1, fit.objective: v} for i, v in enumerate(fit.history))
    _write_inference_data(fit, run, args.draws, args.seed)
    print(f"{fit!r}")
    print(f"run directory: {run.path}")
    print(f"  inference data: {run.inference_data}")
    print(f"  plots:          {run.plots}/")
    return 0


def _write_inference_data(fit, run, draws: int, seed: int):
    from jointkl.diagnostics import write_plots

    idata = fit.to_arviz(num_samples=draws, seed=seed)
    # netCDF is written by its library to a path: write beside, then rename (atomic).
    tmp = run.inference_data.with_name(f".{run.inference_data.name}.{os.getpid()}.tmp")
    idata.to_netcdf(str(tmp))
    os.replace(tmp, run.inference_data)
    write_plots(fit, idata, run.plots)
    return idata


def _load_run(path: str):
    """(RunDir, Fit) of a run directory; an InputError (exit 2) when it is not one."""
    from jointkl.fit import Fit
    from jointkl.runs import RunDir

    run = RunDir(path)
    if not run.path.is_dir():
        raise InputError(f"run directory {path!r} not found")
    if not (run.path / "fit.json").is_file():
        raise InputError(
            f"{path!r} is not a run directory: no fit.json (written by `jointkl fit` when a "
            "fit ends)"
        )
    try:
        return run, Fit.load(run.path)
    except InputError:
        raise
    except Exception as e:  # a damaged file: say which run, in one line
        raise InputError(f"{path!r}: cannot read the fit ({type(e).__name__}: {e})") from e


def _run_inference_data(fit, run, draws: int):
    """The run's InferenceData: ``inference_data.nc``, or made again (and saved) when it is
    missing or unreadable."""
    import arviz as az

    if run.inference_data.is_file():
        try:
            return az.from_netcdf(str(run.inference_data))
        except Exception as e:  # unreadable: made again below
            print(f"note: {run.inference_data} unreadable ({e}); made again", file=sys.stderr)
    return _write_inference_data(fit, run, draws, 0)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from jointkl.diagnostics import diagnose
    from jointkl.report import write_report

    run, fit = _load_run(args.dir)
    idata = _run_inference_data(fit, run, args.draws)
    d = diagnose(fit, idata, run.plots)
    for line in d.facts:
        print(line)
    if d.summary is not None:
        import pandas as pd

        with pd.option_context(
            "display.max_rows", 200, "display.max_columns", 20, "display.width", 200
        ):
            print(d.summary)
    for r in d.loo:
        e = r.elpd
        print(
            f"LOO ({r.var}): elpd_loo {e.elpd_loo:.3f} (se {e.se:.3f}), p_loo {e.p_loo:.3f}, "
            f"{int(e.n_samples)} draws, {int(e.n_data_points)} data points"
        )
        print(f"Pareto k ({r.var}):")
        print(r.pareto.to_string())
    for line in d.notes:
        print(f"not shown: {line}")
    for line in d.warnings:
        print(f"warning: {line}")
    for line in d.failures:
        print(f"failed: {line}")
    config = None
    if (run.path / "config.json").is_file():
        try:
            config = run.read_config()
        except ValueError as e:
            print(f"not shown: config.json unreadable ({e})")
    report = write_report(run.path / "report.html", f"jointkl run {run.path.name}", config, d)
    print("plots: " + ", ".join(str(p) for p in d.plots))
    print(f"report: {report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from jointkl.comparison import COMPARE_COLUMNS, compare, compare_plot

    notes: list[str] = []
    table = compare(args.runs, draws=args.draws, warnings_out=notes)
    with pd.option_context("display.max_columns", 20, "display.width", 200):
        print(
            table[[c for c in COMPARE_COLUMNS if c in table]].to_string(
                float_format="{:.3f}".format
            )
        )
    for line in notes:
        print(f"warning: {line}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"plot: {compare_plot(table, out / 'compare.png')}")
    return 0


def _print_settings(title: str, rows) -> None:
    from jointkl.setting_docs import plain_text

    print(title)
    width = max(len(r.name) for r in rows) if rows else 0
    for r in rows:
        default = json.dumps(r.default) if _is_json(r.default) else repr(r.default)
        meaning = plain_text(r.meaning or "(undocumented)")
        tag = " [Python only]" if not r.cli else ""
        print(f"  {r.name:{width}s}  default {default}{tag}: {meaning}")


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def cmd_models(args: argparse.Namespace) -> int:
    from jointkl.setting_docs import model_settings
    from jointkl.zoo import MODELS, model_class

    if args.name:
        cls = model_class(args.name)
        _print_settings(
            f"{cls.name}: {cls.description}\nsettings (jointkl fit {cls.name} --set KEY=VALUE):",
            model_settings(cls),
        )
        return 0
    for name in sorted(MODELS):
        print(f"{name:12s} {MODELS[name].description}")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from jointkl.engine import ENGINES, engine_class
    from jointkl.setting_docs import engine_settings

    if args.name:
        cls = engine_class(args.name)
        _print_settings(
            f"{cls.name}: {cls.description}\nsettings (jointkl fit MODEL --engine {cls.name} "
            "--set KEY=VALUE):",
            engine_settings(cls),
        )
        return 0
    for name in sorted(ENGINES):
        print(f"{name:12s} {ENGINES[name].description}")
    return 0


def cmd_segment_model(args: argparse.Namespace) -> int:
    """``jointkl segment --model RUN TEXT|FILE``: a supervised segmenter's run directory."""
    from jointkl.fit import Fit
    from jointkl.runs import atomic_write_text

    run = Path(args.model)
    if not (run / "fit.json").is_file():
        raise InputError(f"--model {args.model!r}: no fit.json there; expected a run directory")
    fit = Fit.load(run)
    if not callable(getattr(fit.pair, "segment", None)):
        raise InputError(f"--model {args.model!r}: its model ({fit.model_spec}) cannot segment")
    path = Path(args.text)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [args.text]
    words = fit.pair.segment(lines, fit=fit)
    text = "".join(" ".join(w) + "\n" for w in words)
    if args.out:
        atomic_write_text(text, args.out)
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _add_threads(parser: argparse.ArgumentParser) -> None:
    # Small models on a busy machine run faster on one thread than on torch's default (all
    # cores): the kernels are too short to amortise the threads' synchronisation.
    parser.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="torch intra-op threads (default: torch's own choice; 1 is often fastest for "
        "small models)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jointkl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _draws(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jointkl", description="Fit Pyro models by minimising a joint KL.")
    p.add_argument(
        "--version", action="version", version=f"jointkl {_version()}", help="print the version"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="fit a model with an engine and write a run directory")
    f.add_argument("model", help="a zoo name (see `jointkl models`) or path/to/file.py[:name]")
    f.add_argument("--engine", required=True, help="engine name (see `jointkl engines`)")
    f.add_argument("--data", help="CSV (header optional), .npy or .npz")
    f.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a model or engine setting (repeatable), e.g. --set steps=500; "
        "`jointkl models NAME` and `jointkl engines NAME` list them",
    )
    f.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the one seed: the engine's seed setting, the default data and the ArviZ "
        "draws (default 0)",
    )
    f.add_argument("--out", help="run directory (default runs/<model>-<engine>)")
    f.add_argument(
        "--draws",
        type=_draws,
        default=None,
        help="posterior draws per chain for ArviZ (default: every draw of a sampler, 100 of "
        "an approximation)",
    )
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _add_threads(f)
    f.set_defaults(func=cmd_fit)

    d = sub.add_parser(
        "diagnose",
        help="summary with R-hat/ESS, LOO with Pareto k, plots and report.html of a run",
    )
    d.add_argument("dir", help="a run directory written by `jointkl fit`")
    d.add_argument(
        "--draws",
        type=_draws,
        default=200,
        help="posterior draws per chain when the run has no inference_data.nc (default 200)",
    )
    _add_threads(d)
    d.set_defaults(func=cmd_diagnose)

    c = sub.add_parser(
        "compare", help="rank runs of the same data by PSIS-LOO (az.compare); writes compare.png"
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="two or more run directories")
    c.add_argument(
        "--out", default=".", help="folder for compare.png (default: the current directory)"
    )
    c.add_argument(
        "--draws",
        type=_draws,
        default=200,
        help="posterior draws per chain for a run without inference_data.nc (default 200)",
    )
    _add_threads(c)
    c.set_defaults(func=cmd_compare)

    from jointkl.text.commands import add_commands

    add_commands(sub, segment_model=cmd_segment_model)  # words, segment, templates, parse

    m = sub.add_parser("models", help="list the zoo models, or one model's settings")
    m.add_argument("name", nargs="?", help="a model: list its settings, defaults and meanings")
    m.set_defaults(func=cmd_models)
    e = sub.add_parser("engines", help="list the engines, or one engine's settings")
    e.add_argument("name", nargs="?", help="an engine: list its settings, defaults and meanings")
    e.set_defaults(func=cmd_engines)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"jointkl: error: {e}", file=sys.stderr)
        return 2
    except FitDivergedError as e:
        print(f"jointkl: fit stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jointkl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
