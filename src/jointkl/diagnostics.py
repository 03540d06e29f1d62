"""Diagnostics of a run: the ArviZ summary table, LOO, and the standard plots as PNG.

Plots (matplotlib, Agg): ``objective.png`` (the objective per step), ``trace.png`` and
``posterior.png`` (ArviZ, small posterior variables only), ``ppc.png`` (posterior predictive
check of each observed variable). A model may add its own through a
``diagnostic_plots(fit, out_dir) -> list[Path]`` hook.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jointkl.runs import atomic_write_bytes  # noqa: E402
from jointkl.zoo import hook  # noqa: E402

__all__ = ["summary_table", "write_plots", "small_posterior_vars", "loo_report"]

MAX_SUMMARY_SIZE = 64  # posterior variables with more elements per draw are not tabulated
MAX_PPC_VARS = 6  # observed variables shown in the posterior predictive check


def small_posterior_vars(idata, limit: int = MAX_SUMMARY_SIZE) -> list[str]:
    if "posterior" not in idata.groups():
        return []
    post = idata.posterior
    return [v for v in post.data_vars if int(np.prod(post[v].shape[2:], dtype=int)) <= limit]


def summary_table(idata):
    """``az.summary`` of the small posterior variables (a pandas DataFrame) or ``None``."""
    import arviz as az

    names = small_posterior_vars(idata)
    if not names:
        return None
    import logging

    log = logging.getLogger("arviz")
    level = log.level
    log.setLevel(logging.ERROR)  # one chain of independent draws: R-hat is NaN, said below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return az.summary(idata, var_names=names, kind="all")
    finally:
        log.setLevel(level)


def loo_report(idata) -> Any:
    import arviz as az

    if "log_likelihood" not in idata.groups():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.loo(idata)


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def objective_plot(history: list[float], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    h = np.asarray(history, dtype=float)
    ax.plot(np.arange(1, len(h) + 1), h, lw=1)
    if len(h) > 0 and name == "loss" and np.all(h > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(f"{name} per step")
    return _save(fig, path)


def write_plots(fit, idata, out_dir: str | Path) -> list[Path]:
    """Write every applicable plot into ``out_dir``; returns the written paths."""
    import arviz as az

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if fit.history:
        written.append(objective_plot(fit.history, fit.objective, out / "objective.png"))
    names = small_posterior_vars(idata, limit=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if names:
            axes = az.plot_trace(idata, var_names=names, compact=True)
            written.append(_save(np.ravel(axes)[0].figure, out / "trace.png"))
            axes = az.plot_posterior(idata, var_names=names[:4])
            written.append(_save(np.ravel(axes)[0].figure, out / "posterior.png"))
        if "posterior_predictive" in idata.groups():
            # One panel per observed variable: a pyro.markov chain has one per time step, so
            # show the first few rather than hundreds of panels.
            pp_vars = list(idata.posterior_predictive.data_vars)[:MAX_PPC_VARS]
            try:
                axes = az.plot_ppc(
                    idata,
                    var_names=pp_vars,
                    num_pp_samples=min(50, idata.posterior_predictive.sizes["draw"]),
                )
                written.append(_save(np.ravel(axes)[0].figure, out / "ppc.png"))
            except (ValueError, TypeError, KeyError) as e:  # e.g. a discrete, high-dim site
                warnings.warn(f"posterior predictive plot skipped: {e}", stacklevel=2)
    plots = hook(fit.pair, "diagnostic_plots")
    if callable(plots):
        written.extend(Path(p) for p in plots(fit, out))
    return written
