"""The ``jointkl`` command line.

    jointkl fit MODEL --engine ENGINE [--data PATH] [--set key=value ...] [--seed N] [--out DIR]
                [--nproc P]   (data-parallel svi/nce on P processes under torchrun)
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


def _planned_steps(settings: Any) -> int:
    """How many steps a run with these (validated) engine settings takes, for the default
    checkpoint interval: ``steps``, or ``warmup + num_samples`` (``warmup + draws``) for a
    sampler, or ``max_iter``."""

    def value(key: str) -> int:
        v = getattr(settings, key, 0)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    sampled = value("num_samples") or value("draws")
    return max(1, value("steps") or value("warmup") + sampled or value("max_iter"))


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
    """``jointkl fit``: every check first (settings, model, data, the run directory), then
    the fit, then the run's files; see :mod:`jointkl.runs` for the one-run rule and
    :mod:`jointkl.resume` for what ``--resume`` reuses and refuses."""
    import torch

    from jointkl import distributed
    from jointkl import resume as resuming
    from jointkl.data.arrays import open_rows
    from jointkl.data.tables import PrecisionWarning, Table, bind_arguments, load_table
    from jointkl.engine import engine_class
    from jointkl.runs import RunDir, tensor_digest
    from jointkl.zoo import hook

    if args.draws is not None and args.draws < 1:
        raise InputError(f"--draws must be a whole number >= 1, got {args.draws}")
    engine_name = args.engine
    if engine_name is None and not args.resume:
        raise InputError("--engine is required (see `jointkl engines`)")
    out = args.out or f"runs/{Path(args.model.split(':')[0]).stem}-{engine_name or 'run'}"
    # Under torchrun every rank makes every check; rank 0 alone writes (jointkl.distributed).
    parallel = distributed.initialise(getattr(args, "device", None))
    main_rank = distributed.is_main()
    run = RunDir.claim(out, resume=args.resume, overwrite=args.overwrite)
    run.path, run.final = distributed.broadcast_object((run.path, run.final))  # one folder
    saved = resuming.saved_config(run) if args.resume else None
    if saved is not None:
        resuming.check_same("--engine", engine_name, saved["engine"])
        resuming.check_same("--seed", args.seed, saved["seed"])
        engine_name = saved["engine"]
    seed = args.seed if args.seed is not None else (saved["seed"] if saved else 0)

    settings = parse_settings(args.set or [])
    engine_cls = engine_class(engine_name)
    if parallel and not engine_cls.data_parallel:
        raise InputError(
            f"engine {engine_name!r} does not run data-parallel; --nproc > 1 (or torchrun) "
            f"is for svi, nce and em"
        )
    target, model_spec, model_cls = _resolve_model(args.model, None)
    if saved is not None:
        resuming.check_model(model_spec, saved)
    model_kw, engine_kw = route_settings(settings, model_cls, engine_cls)
    engine_params = _params_of(engine_cls)
    if saved is not None:
        model_kw = {**(saved["model_spec"].get("settings") or {}), **model_kw}
        engine_kw = {**resuming.engine_base(saved, engine_params), **engine_kw}
    else:
        # A zoo model may carry measured engine settings (e.g. batch size); --set overrides.
        defaults = hook(model_cls, "engine_defaults").get(engine_name, {})
        engine_kw = {**defaults, **engine_kw}
    if model_cls is not None:
        try:
            pair = model_cls(**model_kw)
        except TypeError as e:
            raise InputError(f"model {args.model!r}: {e}") from e
        model_spec["settings"] = pair.settings()
        if saved is not None:
            resuming.check_model_settings(model_spec["settings"], saved)
    else:
        pair = target
    if args.device is not None:  # --device over --set device=... and the run's own
        engine_kw["device"] = args.device
    if "seed" in engine_params:
        engine_kw.setdefault("seed", seed)
    if "checkpoint_dir" in engine_params:
        engine_kw["checkpoint_dir"] = str(run.checkpoints)
        engine_kw["resume"] = bool(args.resume)
    elif args.resume:
        from jointkl.engine import ENGINES

        able = sorted(n for n, c in ENGINES.items() if "checkpoint_dir" in _params_of(c))
        raise InputError(
            f"engine {engine_name!r} does not checkpoint; --resume is for {', '.join(able)}"
        )
    try:
        probe = engine_cls(**engine_kw)  # every engine setting checked before any work
    except TypeError as e:
        raise InputError(f"engine {engine_name!r}: {e}") from e
    if saved is not None:
        resuming.check_engine_config(probe.config, saved)
    planned = _planned_steps(probe.settings)
    usual = _planned_steps(engine_cls.Settings())
    if planned > 100 * usual and main_rank:
        print(
            f"jointkl: warning: {planned} steps is {planned / usual:.3g} times {engine_name}'s "
            f"default; the progress bar shows the time this implies, and Ctrl-C stops at a "
            f"step boundary keeping a checkpoint",
            file=sys.stderr,
        )

    data_path = args.data
    if data_path is None and saved is not None and Path(str(saved.get("data", ""))).exists():
        data_path = saved["data"]  # a resume reuses the run's data file unless told otherwise
    fingerprint = None
    if data_path:
        dtype = _data_dtype(args.dtype, probe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PrecisionWarning)
            if _is_row_file(data_path):
                # .npy or a folder of .npy shards: memory-mapped; streamed by an engine that
                # reads it a batch or a block at a time, else read into memory as before.
                # Data-parallel SVI/NCE get a mapped view of their rows (local_shard), so no
                # rank reads the whole file. The run records the whole file's fingerprint
                # whenever the engine streams, so a resume under another number of
                # processes sees the same data.
                rows = open_rows(data_path)
                if probe.streams_rows():
                    fingerprint = rows.astype(dtype).fingerprint()
                    data_args, data_kwargs = (rows.astype(dtype),), {}
                else:
                    table = Table({"x": rows[:]}, False, rows.source)
                    data_args, data_kwargs = bind_arguments(table, pair.model, dtype=dtype)
            else:
                table = load_table(data_path)
                data_args, data_kwargs = bind_arguments(table, pair.model, dtype=dtype)
        for w in caught if main_rank else ():
            print(f"jointkl: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
        data_source = str(Path(data_path).resolve())
    elif hook(pair, "default_data") is not None:
        data_args, data_kwargs = pair.default_data(seed=seed)
        data_source = f"default data of {args.model!r}"
    else:
        raise InputError(f"model {args.model!r} has no default dataset: pass --data PATH")
    rows = _data_rows(data_args, data_kwargs)
    if rows is not None and rows < 2:
        raise InputError(
            f"{data_source}: {rows} row(s); expected at least 2 (a fit and its "
            f"leave-one-out check need two data points)"
        )
    # streamed rows: a fingerprint of the files (size, mtime, head and tail), not all bytes
    digest = fingerprint["digest"] if fingerprint else tensor_digest(data_args, data_kwargs)
    if saved is not None and saved.get("data_digest") not in (None, digest):
        raise InputError(
            f"--resume: the data ({data_source}) differ from the run's ({saved.get('data')}); "
            f"resume with the same data, or start a new run"
        )

    if "checkpoint_dir" in engine_params:
        engine_kw.setdefault("checkpoint_every", max(1, planned // 10))
    engine = engine_cls(**engine_kw)
    config = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "model_spec": model_spec,
        "engine": engine_name,
        "engine_config": {**engine.config, "checkpoint_dir": str(run.final / "checkpoints")},
        "data": data_source,
        "data_digest": digest,
        **({"data_fingerprint": fingerprint} if fingerprint else {}),
        "seed": seed,
        "device": _device_of(engine, data_args, data_kwargs),
        "created": saved["created"] if saved else time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": "running",
    }
    if saved is not None:
        config["resumed"] = [*saved.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
    distributed.barrier()  # every rank has read the folder before rank 0 writes in it
    if not main_rank:  # the fit on this rank's rows; rank 0 writes the run
        return _fit_rank(engine, pair, data_args, data_kwargs)
    try:
        run.create()
    except OSError as e:
        raise InputError(f"cannot create the run directory {str(run.path)!r}: {e}") from e
    if saved is None:
        run.write_config(config)  # a run killed from here on can be resumed
    else:
        _say_resume_point(run)
    nproc = f" on {distributed.world_size()} processes" if parallel else ""
    print(f"fitting {args.model}{nproc} with {engine!r} on {data_source}", file=sys.stderr)
    torch.manual_seed(seed)
    return _fit_into(run, engine, pair, data_args, data_kwargs, config, model_spec, args, seed)


def _device_of(engine, data_args, data_kwargs) -> str:
    """The device the fit runs on (its ``device`` setting resolved: ``auto`` named)."""
    from jointkl.device import resolve_device

    name = getattr(engine.settings, "device", None)
    return str(resolve_device(name, data_args, data_kwargs))


def _load_device(args: argparse.Namespace) -> str:
    """``--device`` of a command that loads a fit, checked (one line, exit 2, when bad)."""
    from jointkl.settings import compute_device

    value = getattr(args, "device", None)
    try:
        return compute_device(value, "--device") or "cpu"
    except InputError as e:
        if "must be" not in str(e):  # cuda asked for where there is none: said as it is
            raise
        raise InputError(f"--device must be cpu, cuda, cuda:N or auto, got {value!r}") from None


def _fit_into(run, engine, pair, data_args, data_kwargs, config, model_spec, args, seed) -> int:
    """The fit and the run's files; on failure the run directory is left as the one-run
    rule says (:meth:`~jointkl.runs.RunDir.discard`), on SIGINT/SIGTERM the run is marked
    interrupted and the exit status is 128 + the signal."""
    from jointkl import distributed, signals
    from jointkl.checkpoint import retention
    from jointkl.runs import CheckpointSkipped
    from jointkl.zoo import user_file_error

    caught: list = []
    where = f"; the earlier run at {run.final} is unchanged" if run.replacing else ""
    # under a process group, the engine sees this rank's rows; the Fit gets all of them
    shard_args, shard_kwargs = _rank_data(engine, data_args, data_kwargs)
    try:
        with signals.stop_on_signals(), distributed.agreed_stop(), retention(args.keep_checkpoints):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore", CheckpointSkipped)  # said in one line already
                warnings.simplefilter("always", ConvergenceWarning)
                fit = engine.fit(pair, *shard_args, **shard_kwargs)
                if shard_args is not data_args:  # a rank's rows: the Fit holds all of them
                    fit.args, fit.kwargs = engine.bind_data(pair, data_args, data_kwargs)
    except KeyboardInterrupt:
        signum = signals.stop_requested() or signal_number("SIGINT")
        kept = not run.replacing and run.latest_checkpoint()
        return _interrupted(run, config, signum, where, kept and f"; checkpoint {kept} kept")
    except FitDivergedError as e:
        run.discard()
        kept = run.latest_checkpoint() if not run.replacing else None
        tail = f"; last good checkpoint {kept}: --resume with a smaller lr" if kept else where
        raise FitDivergedError(f"{str(e).splitlines()[0]}{tail}") from e
    except Exception as e:
        run.discard()
        err = user_file_error(e, model_spec) or _dtype_error(e, args, data_args, data_kwargs)
        if err is not None:
            raise err from e
        raise
    for w in caught:  # an unconverged fit: one line on stderr; other warnings as usual
        if issubclass(w.category, ConvergenceWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if fit.model_spec is None:
        fit.model_spec = model_spec
    if "checkpoint_dir" in fit.config:
        fit.config["checkpoint_dir"] = str(run.final / "checkpoints")
    signum = signals.stop_requested()
    _hold_sample(fit)
    try:
        if signum is None:
            _write_inference_data(fit, run, args.draws, seed)
        else:
            fit.info["interrupted"] = signals.signal_name(signum)
        run.write_metrics({"step": i + 1, fit.objective: v} for i, v in enumerate(fit.history))
        fit.save(run.path)  # fit.json last: its presence means the run's files are whole
    except Exception as e:
        run.discard()
        err = user_file_error(e, model_spec)
        if err is not None:
            raise err from e
        raise
    if signum is not None:
        kept = (
            not run.replacing
            and f" ({fit.info.get('stop_reason', '')}); the run is marked interrupted"
        )
        return _interrupted(run, config, signum, where, kept)
    run.write_config({**config, "status": "finished"})
    run.commit()
    print(f"{fit!r}")
    print(f"run directory: {run.path}")
    print(f"  inference data: {run.inference_data}")
    print(f"  plots:          {run.plots}/")
    return 0


def _rank_data(engine, data_args: tuple, data_kwargs: dict) -> tuple[tuple, dict]:
    """What the engine is given under a process group: this rank's rows, or the whole data
    for an engine that picks its own rows (``Engine.picks_own_rows``)."""
    from jointkl.distributed import local_shard

    if engine.picks_own_rows:
        return data_args, data_kwargs
    return local_shard(data_args, data_kwargs, _data_rows(data_args, data_kwargs))


def _fit_rank(engine, pair, data_args, data_kwargs) -> int:
    """A rank other than 0 of a data-parallel fit: the fit on its rows, no files, no output
    but errors (rank 0 reports the run)."""
    from jointkl import distributed, signals

    shard_args, shard_kwargs = _rank_data(engine, data_args, data_kwargs)
    with signals.stop_on_signals(), distributed.agreed_stop(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.fit(pair, *shard_args, **shard_kwargs)
    # After a stop every rank agreed on, rank 0 alone reports it (exit 128 + signal): this
    # rank ends cleanly, so torchrun does not stop rank 0 while it writes.
    return 0


def _interrupted(run, config, signum: int, where: str, kept: str | None) -> int:
    """A fit stopped by a signal: the run marked interrupted when something of it is kept
    (``kept`` says what, as it follows the signal's name), else discarded; one line on stderr; exit status 128 + signal."""
    from jointkl import signals

    name = signals.signal_name(signum)
    if kept:
        run.write_config({**config, "status": f"interrupted by {name}"})
        print(f"jointkl: interrupted by {name}{kept}; continue with --resume", file=sys.stderr)
    else:
        run.discard()
        print(f"jointkl: interrupted by {name}; nothing kept{where}", file=sys.stderr)
    return signals.exit_status(signum)


def _dtype_error(error: BaseException, args, data_args, data_kwargs) -> InputError | None:
    """One line for a model whose own tensors (a network's weights) are float32 fitted on
    data asked to be float64 (``--dtype float64``): torch refuses to mix the two inside the
    model, which would otherwise end in a traceback."""

    text = str(error)
    mixed = "dtype" in text or "scalar type" in text
    if args.dtype != "float64" or not isinstance(error, RuntimeError) or not mixed:
        return None
    # tensors, or rows streamed from a file (NumPy dtypes)
    dtypes = [str(getattr(a, "dtype", "")) for a in [*data_args, *data_kwargs.values()]]
    if not any(d in ("torch.float64", "float64") for d in dtypes):
        return None
    return InputError(
        f"model {args.model!r} takes float32 data (its networks' weights are float32), not "
        f"--dtype float64; omit --dtype or give --dtype float32"
    )


def signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name))


def _say_resume_point(run) -> None:
    """One line on which checkpoint a resume starts from (and any newer unreadable one)."""
    from jointkl.runs import CheckpointSkipped

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointSkipped)
        latest = run.latest_checkpoint()
    skipped = "; ".join(str(w.message) for w in caught)
    start = f"resuming from {latest}" if latest else "no readable checkpoint: starting at step 0"
    print(f"jointkl: {start}{f' ({skipped})' if skipped else ''}", file=sys.stderr)


def _data_dtype(choice: str | None, engine: Any):
    """The floating dtype of data read from a file: ``--dtype``, else the engine's own
    ``dtype`` setting (EM: float64), else torch's default (float32: the networks' dtype)."""
    import torch

    if choice:
        return {"float32": torch.float32, "float64": torch.float64}[choice]
    own = getattr(engine.settings, "dtype", None)
    return own if isinstance(own, torch.dtype) else torch.get_default_dtype()


def _data_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    import torch

    from jointkl.data.arrays import is_row_array

    for a in [*args, *kwargs.values()]:
        if is_row_array(a) or (isinstance(a, torch.Tensor) and a.dim() > 0):
            return int(a.shape[0])
    return None


def _is_row_file(path: str) -> bool:
    """A ``.npy`` file or a folder: data :func:`jointkl.data.arrays.open_rows` maps."""
    p = Path(path)
    if p.is_dir():  # a folder without .npy files gets the table loader's message
        return any(q.suffix.lower() == ".npy" for q in p.iterdir())
    return p.is_file() and p.suffix.lower() == ".npy"


# Rows of streamed data a run keeps in memory after the fit: its InferenceData (pointwise
# log-likelihood, posterior predictive), plots and saved data are made on them.
HELD_ROWS = 10_000


def _hold_sample(fit) -> None:
    """Replace data the fit streamed from a file by :data:`HELD_ROWS` evenly spaced rows in
    memory (all of a smaller file), noted in ``fit.info["data_held"]`` and one line on
    stderr: what follows the fit (ArviZ, plots, ``tensors.pt``) needs the data as tensors,
    and the whole file is not one."""
    from jointkl.data.arrays import is_row_array
    from jointkl.minibatch import spread_indices

    streamed = [a for a in [*fit.args, *fit.kwargs.values()] if is_row_array(a)]
    if not streamed:
        return
    n = len(streamed[0])
    idx = spread_indices(n, HELD_ROWS)

    def held(a):
        return a.tensor(idx) if is_row_array(a) else a

    fit.args = tuple(held(a) for a in fit.args)
    fit.kwargs = {k: held(a) for k, a in fit.kwargs.items()}
    fit.info["data_held"] = {"rows": len(idx), "of": n, "how": "evenly spaced"}
    if len(idx) < n:
        print(
            f"jointkl: the fit read all {n} rows; its InferenceData, plots and saved data use "
            f"{len(idx)} evenly spaced rows of them",
            file=sys.stderr,
        )


def _write_inference_data(fit, run, draws: int, seed: int):
    from jointkl.diagnostics import write_plots

    idata = fit.to_arviz(num_samples=draws, seed=seed)
    # netCDF is written by its library to a path: write beside, then rename (atomic).
    tmp = run.inference_data.with_name(f".{run.inference_data.name}.{os.getpid()}.tmp")
    idata.to_netcdf(str(tmp))
    os.replace(tmp, run.inference_data)
    write_plots(fit, idata, run.plots)
    return idata


def _load_run(path: str, trust: bool = False, device: str = "cpu"):
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
        return run, Fit.load(run.path, trust=trust, device=device)
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

    run, fit = _load_run(args.dir, trust=args.trust_model_file, device=_load_device(args))
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
    table = compare(args.runs, draws=args.draws, warnings_out=notes, device=_load_device(args))
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
    fit = Fit.load(run, trust=args.trust_model_file, device=_load_device(args))
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


def _keep(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
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


def _add_device(parser: argparse.ArgumentParser, loads: bool) -> None:
    if loads:
        text = (
            "where the loaded fit's parameters and data live: cpu (default), cuda, cuda:N "
            "or auto (cuda when available, else cpu)"
        )
    else:
        text = (
            "where the fit computes: cpu, cuda, cuda:N or auto (cuda when available, else "
            "cpu); default: the engine's device setting (the data's device: cpu)"
        )
    parser.add_argument("--device", default=None, metavar="DEVICE", help=text)


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
    f.add_argument(
        "--engine", help="see `jointkl engines` (required, except with --resume: the run's)"
    )
    f.add_argument(
        "--data",
        help="CSV (header optional), .npz, .npy or a folder of .npy shards (memory-mapped; "
        "streamed by SVI/NCE with a batch_size, see docs/large-data.md)",
    )
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
        default=None,
        help="the one seed: the engine's seed setting, the default data and the ArviZ "
        "draws (default 0; with --resume, the run's)",
    )
    f.add_argument("--out", help="run directory (default runs/<model>-<engine>)")
    f.add_argument(
        "--draws",
        type=_draws,
        default=None,
        help="posterior draws per chain for ArviZ (default: every draw of a sampler, 100 of "
        "an approximation)",
    )
    f.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint, with its saved "
        "settings (only steps, lr, clip_norm, lr_schedule, early_stopping, checkpoint_every "
        "and --device may change)",
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (built beside it, swapped in only on success)",
    )
    f.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="floating dtype of --data (default: the engine's, e.g. EM float64; else float32)",
    )
    f.add_argument(
        "--keep-checkpoints",
        type=_keep,
        default=3,
        help="keep the newest N checkpoints (default 3; 0 keeps all)",
    )
    f.add_argument(
        "--nproc",
        type=_threads,
        default=None,
        help="data-parallel fit on this many processes (svi, nce, em): relaunches itself under "
        "torchrun, each process taking its share of the rows (default 1)",
    )
    _add_device(f, loads=False)
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
    d.add_argument(
        "--trust-model-file",
        action="store_true",
        help="import the model file the run names (checked against its recorded hash); "
        "without it, loading a run never runs code from it",
    )
    _add_device(d, loads=True)
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
    _add_device(c, loads=True)
    _add_threads(c)
    c.set_defaults(func=cmd_compare)

    from jointkl.text.commands import add_commands

    add_commands(sub, segment_model=cmd_segment_model)  # words, segment, templates, parse
    _add_device(sub.choices["segment"], loads=True)

    m = sub.add_parser("models", help="list the zoo models, or one model's settings")
    m.add_argument("name", nargs="?", help="a model: list its settings, defaults and meanings")
    m.set_defaults(func=cmd_models)
    e = sub.add_parser("engines", help="list the engines, or one engine's settings")
    e.add_argument("name", nargs="?", help="an engine: list its settings, defaults and meanings")
    e.set_defaults(func=cmd_engines)
    return p


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``jointkl fit … --nproc P``: the same command on P processes under torchrun, after
    refusing an engine that does not run data-parallel (one line, before any start)."""
    from jointkl.distributed import launch
    from jointkl.engine import engine_class

    if args.engine is not None and not engine_class(args.engine).data_parallel:
        raise InputError(
            f"engine {args.engine!r} does not run data-parallel; --nproc > 1 is for svi, nce and em"
        )
    return launch(_without_nproc(argv), args.nproc)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line with ``--nproc P`` (or ``--nproc=P``) taken out: what each
    process of the relaunched run executes."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if (getattr(args, "nproc", None) or 1) > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(args, sys.argv[1:] if argv is None else list(argv))
        return int(args.func(args) or 0)
    except InputError as e:
        # One line: Pyro appends its trace's shapes to errors raised inside a model.
        print(f"jointkl: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except FitDivergedError as e:
        print(f"jointkl: fit stopped: {_first_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from jointkl.distributed import RankFailedError

        if not isinstance(e, RankFailedError):
            raise
        print(f"jointkl: {_first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jointkl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
