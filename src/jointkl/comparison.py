"""Model comparison by PSIS-LOO: :func:`compare` over fits of the same data.

``az.compare`` ranks models by their expected log pointwise predictive density estimated by
Pareto-smoothed importance-sampling leave-one-out (elpd_loo = sum_i log p(x_i | x_-i));
``weight`` is the stacking weight and ``dse`` the standard error of each ``elpd_diff``
against the best model. It only means something for the same data points, so the observed
data of every run are checked to be the same first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jointkl.diagnostics import LooReport, collected_warnings, loo_reports
from jointkl.errors import InputError

__all__ = ["compare", "compare_plot", "COMPARE_COLUMNS"]

# The columns ``jointkl compare`` prints (az.compare returns these and a few more).
COMPARE_COLUMNS = ["rank", "elpd_loo", "p_loo", "elpd_diff", "weight", "se", "dse", "warning"]


def _inference_data(item: Any, draws: int, seed: int, device: str = "cpu") -> tuple[Any, Any]:
    """(InferenceData, Fit or None) of a run directory, a Fit or an InferenceData."""
    import arviz as az

    from jointkl.fit import Fit

    if isinstance(item, az.InferenceData):
        return item, None
    if isinstance(item, Fit):
        return item.to_arviz(num_samples=draws, seed=seed), item
    if isinstance(item, (str, Path)):
        from jointkl.runs import RunDir

        run = RunDir(item)
        if not run.path.is_dir():
            raise InputError(f"run directory {str(item)!r} not found")
        if not (run.path / "fit.json").is_file():
            raise InputError(f"{str(item)!r} is not a run directory: it has no fit.json")
        fit = Fit.load(run.path, device=device)
        if run.inference_data.is_file():
            return az.from_netcdf(str(run.inference_data)), fit
        return fit.to_arviz(num_samples=draws, seed=seed), fit
    raise InputError(
        f"compare takes run directories, Fits or InferenceData, got {type(item).__name__}"
    )


def _observed(idata) -> dict[str, np.ndarray]:
    if "observed_data" not in idata.groups():
        return {}
    return {k: np.asarray(v.values) for k, v in idata.observed_data.data_vars.items()}


def _fit_data(fit) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for i, a in enumerate(fit.args):
        if isinstance(a, torch.Tensor):
            out[f"argument {i}"] = a.detach().cpu().numpy()
    for k, a in fit.kwargs.items():
        if isinstance(a, torch.Tensor):
            out[k] = a.detach().cpu().numpy()
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
    """Why two data dictionaries differ, or ``None`` when they hold the same values (up to
    float32 round-off: one engine may cast the data to float64, another keep float32)."""
    if sorted(a) != sorted(b):
        return f"observed variables {sorted(a)} vs {sorted(b)}"
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return f"{k!r} has shape {x.shape} vs {y.shape}"
        if not np.allclose(x.astype(float), y.astype(float), rtol=1e-5, atol=1e-6, equal_nan=True):
            return f"{k!r} holds different values"
    return None


def _names(items: list[Any], given: list[str] | None) -> list[str]:
    if given is not None:
        return given
    names = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            names.append(Path(item).name or str(item))
        else:
            engine = getattr(item, "engine", None)
            names.append(f"{engine}-{i}" if engine else f"model-{i}")
    if len(set(names)) < len(names):  # two runs called the same: use the full paths
        names = [
            str(item) if isinstance(item, (str, Path)) else n
            for item, n in zip(items, names, strict=True)
        ]
    if len(set(names)) < len(names):
        names = [f"{n} #{i}" for i, n in enumerate(names)]
    return names


def _one_loo(name: str, idata) -> LooReport:
    notes: list[str] = []
    reports = loo_reports(idata, notes)
    if not reports:
        reason = notes[0] if notes else "no log-likelihood"
        raise InputError(f"{name}: {reason}")
    if len(reports) > 1:
        raise InputError(
            f"{name}: {len(reports)} log-likelihood variables "
            f"({', '.join(r.var for r in reports)}); compare needs one per run"
        )
    return reports[0]


def compare(
    runs: Iterable[Any] | Mapping[str, Any],
    *,
    draws: int = 200,
    seed: int = 0,
    warnings_out: list[str] | None = None,
    device: str = "cpu",
):
    """``az.compare`` by PSIS-LOO over runs of the same data.

    :param runs: run directories (paths), :class:`~jointkl.fit.Fit` objects or
        ``arviz.InferenceData``, at least two; or a mapping ``{name: run}``. Run directories
        are named by their folder name, fits by their engine.
    :param draws: posterior draws per chain when a Fit (or a run without
        ``inference_data.nc``) must be converted.
    :param seed: the seed of that conversion.
    :param warnings_out: a list that receives ArviZ's warnings, one line each (else they are
        dropped: the ``warning`` column says whether a model's LOO is unreliable).
    :param device: where run directories' fits are loaded (``Fit.load(dir, device=...)``).
    :returns: a pandas DataFrame indexed by name, best first, with the columns ``rank``,
        ``elpd_loo``, ``p_loo``, ``elpd_diff``, ``weight``, ``se``, ``dse``, ``warning``,
        ``scale``.
    :raises InputError: fewer than two runs, runs of different data, a run without a
        log-likelihood or with too few draws for LOO.
    """
    import arviz as az

    if isinstance(runs, Mapping):
        names, items = list(runs.keys()), list(runs.values())
        names = [str(n) for n in names]
    else:
        items = list(runs)
        names = None
    if len(items) < 2:
        raise InputError(f"compare needs at least two runs, got {len(items)}")
    names = _names(items, names)
    loaded = [_inference_data(item, draws, seed, device) for item in items]
    observed = [_observed(idata) for idata, _ in loaded]
    if all(observed):
        data = observed
    elif all(fit is not None for _, fit in loaded):
        data = [_fit_data(fit) for _, fit in loaded]
    else:
        missing = next(n for n, o in zip(names, observed, strict=True) if not o)
        raise InputError(
            f"{missing}: no observed data in its InferenceData, so compare cannot check the "
            "runs saw the same data; pass run directories or Fits"
        )
    for name, d in zip(names[1:], data[1:], strict=True):
        why = _same(data[0], d)
        if why:
            raise InputError(
                f"{names[0]} and {name} were fitted to different data ({why}): LOO compares "
                "models of the same data points"
            )
    sink: list[str] = [] if warnings_out is None else warnings_out
    with collected_warnings(sink):
        elpds = {n: _one_loo(n, idata).elpd for n, (idata, _) in zip(names, loaded, strict=True)}
        table = az.compare(elpds, ic="loo")
    return table


def compare_plot(table, path: str | Path) -> Path:
    """``az.plot_compare`` of a :func:`compare` table, titled and labelled, as a PNG."""
    import io

    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jointkl.runs import atomic_write_bytes

    with collected_warnings([]):
        ax = az.plot_compare(table, insample_dev=False, figsize=(7, 1.2 + 0.6 * len(table)))
    ax = np.ravel(ax)[0]
    ax.set_title("Model comparison by PSIS-LOO (higher elpd_loo is better)")
    ax.set_xlabel("elpd_loo (log score, nats)")
    ax.set_ylabel("run")
    fig = ax.figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), Path(path))
