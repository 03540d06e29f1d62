"""Diagnostics of a run: the ArviZ summary table, LOO with its Pareto-k table, and the plots.

:func:`diagnose` never raises on what a fit gives it: any InferenceData (no posterior, one
chain, constant variables, NaN, no log-likelihood) gets what exists, and for what does not a
one-line note saying why. ArviZ's warnings are collected, one line each, instead of being
printed (or hidden) along the way.

Plots (matplotlib, Agg), written into the run's ``plots/`` folder, each with a title and
labelled axes:

* ``objective.png`` — the objective per step, named as the fit recorded it (``fit.objective``);
* ``trace.png`` (``trace-2.png`` … when more than :data:`PAGE_PANELS` variables) — the trace
  of the small posterior variables, one row each: every entry's density (histogram, chains
  pooled) and its draws per chain;
* ``posterior-1.png``, ``posterior-2.png`` … — one panel per scalar entry of the small
  posterior variables, at most :data:`PAGE_PANELS` panels a page: the draws' histogram, the
  mean and the 94% highest-density interval. Entries that are constant in every draw (a
  Cholesky factor's zeros and unit diagonal) and variables too large to draw are left out and
  named in a note; an entry with the same draws as an earlier one (a symmetric matrix's
  mirror half) is drawn once, the pairs named in a note;
* ``ppc.png`` (``ppc-2.png`` …) — the posterior predictive check, one panel per observed
  feature (the last axis of an observed variable with 2 … 12 entries there), otherwise one
  panel per observed variable (its values pooled);
* whatever the model's ``diagnostic_plots(fit, folder)`` hook writes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jointkl.runs import atomic_write_bytes  # noqa: E402
from jointkl.zoo import hook  # noqa: E402

__all__ = [
    "Diagnosis",
    "LooReport",
    "diagnose",
    "summary_table",
    "loo_reports",
    "loo_report",
    "pareto_k_table",
    "write_plots",
    "draw_plots",
    "small_posterior_vars",
    "collected_warnings",
    "MIN_LOO_DRAWS",
]

MAX_SUMMARY_SIZE = 64  # posterior variables with more entries per draw are not tabulated
PAGE_PANELS = 12  # panels per page of the trace, posterior and PPC plots
MAX_PAGES = 6  # pages per family: the rest is named in a note, never dropped silently
MIN_LOO_DRAWS = 11  # Pareto-k's threshold min(1 − 1/log10 S, 0.7) is <= 0 for S <= 10
HDI_PROB = 0.94


@dataclass
class LooReport:
    """PSIS-LOO of one log-likelihood variable.

    :param var: the log-likelihood variable's name.
    :param elpd: ArviZ's ``ELPDData`` (``elpd_loo``, ``se``, ``p_loo``, ``pareto_k`` ...).
    :param pareto: the Pareto-k table (:func:`pareto_k_table`).
    """

    var: str
    elpd: Any
    pareto: Any


@dataclass
class Diagnosis:
    """What ``jointkl diagnose`` found in a run.

    :param facts: one-line facts about the fit (engine, objective, stop reason).
    :param summary: ``az.summary`` of the small posterior variables, or ``None``.
    :param loo: one :class:`LooReport` per log-likelihood variable.
    :param notes: one line for each thing that does not exist or was left out, and why.
    :param warnings: ArviZ's (and numpy's) warnings, one line each, deduplicated.
    :param plots: the plot files written, in drawing order.
    :param failures: one line for each part that failed unexpectedly (a bug to report).
    """

    facts: list[str] = field(default_factory=list)
    summary: Any = None
    loo: list[LooReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- warnings
class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def collected_warnings(sink: list[str]) -> Iterator[None]:
    """Collect Python warnings and ArviZ log records into ``sink`` (one line each, first
    occurrence only) instead of printing them."""
    log = logging.getLogger("arviz")
    handler = _Collect([])
    propagate, level, handlers = log.propagate, log.level, list(log.handlers)
    log.handlers = [handler]  # ArviZ's own stream handler would print them too
    log.propagate = False
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with np.errstate(all="ignore"):
                yield
    finally:
        log.handlers = handlers
        log.propagate, log.level = propagate, level
    # Deprecation notices are about the libraries, not about the run: left out.
    messages = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    for message in [*messages, *handler.sink]:
        line = _one_line(message)
        if line and "ArviZ is undergoing a major refactor" not in line and line not in sink:
            sink.append(line)


# ---------------------------------------------------------------------- posterior facts
def _has(idata, group: str) -> bool:
    return group in idata.groups() and len(getattr(idata, group).data_vars) > 0


def _entries(post, name: str) -> int:
    return int(np.prod(post[name].shape[2:], dtype=int))


def small_posterior_vars(idata, limit: int = MAX_SUMMARY_SIZE) -> list[str]:
    """Posterior variables with at most ``limit`` entries per draw (numeric ones only)."""
    if not _has(idata, "posterior"):
        return []
    post = idata.posterior
    return [
        v
        for v in post.data_vars
        if _entries(post, v) <= limit and np.issubdtype(post[v].dtype, np.number)
    ]


def _no_posterior_reason(fit) -> str:
    """Why a fit's InferenceData has no posterior group, from the fit itself (the engine's
    name is not tested: what the fit holds says it)."""
    if fit is None:
        return "the InferenceData has no posterior group"
    params = sorted(fit.params)
    shown = ", ".join(params[:6]) + (" ..." if len(params) > 6 else "")
    if not fit.samples:
        return (
            f"{fit.engine.upper()} fits of this model are point estimates: no posterior "
            f"(its parameters [{shown}] are pyro.param values and the model has no global "
            "latent sample site to draw)"
        )
    return "the InferenceData has no posterior group"


def _constant_mask(values: np.ndarray) -> np.ndarray:
    """``(chain, draw, *shape)`` -> ``shape`` booleans: the entry never changes (NaN-safe)."""
    flat = values.reshape(-1, *values.shape[2:])
    with np.errstate(all="ignore"):
        same = np.all(flat == flat[:1], axis=0) | np.all(np.isnan(flat), axis=0)
    return np.asarray(same)


def summary_table(idata, notes: list[str] | None = None):
    """``az.summary`` of the small posterior variables (a pandas DataFrame) or ``None``.

    Entries constant in every draw are dropped when others vary (structural constants such
    as a Cholesky factor's zeros say nothing); R-hat is dropped with one chain. What was left
    out is appended to ``notes``, one line each."""
    import arviz as az

    notes = [] if notes is None else notes
    if not _has(idata, "posterior"):
        return None
    post = idata.posterior
    names = small_posterior_vars(idata)
    big = [v for v in post.data_vars if v not in names]
    if big:
        notes.append(
            "summary: not tabulated (more than "
            f"{MAX_SUMMARY_SIZE} entries per draw, or not numeric): "
            + ", ".join(f"{v} {tuple(post[v].shape[2:])}" for v in big)
        )
    if not names:
        return None
    n_chain = int(post.sizes.get("chain", 1))
    table = az.summary(idata, var_names=names, kind="all", hdi_prob=HDI_PROB)
    if n_chain < 2 and "r_hat" in table:
        # ESS and MCSE of one chain are still meaningful; R-hat compares chains.
        table = table.drop(columns=["r_hat"])
        notes.append("R-hat: not computed: it compares chains and this fit has 1 chain")
    varying = table["sd"].fillna(0) > 0
    if varying.any() and not varying.all():
        dropped = list(table.index[~varying])
        notes.append(
            f"summary: {len(dropped)} entries constant in every draw omitted "
            f"(structural, e.g. a Cholesky factor's zeros and unit diagonal): "
            + _short_list(dropped)
        )
        table = table[varying]
    elif not varying.any():
        notes.append(
            "summary: the posterior draws have no spread (a point estimate repeated): "
            "sd, HDI, ESS and R-hat say nothing"
        )
    return table


def _short_list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------- LOO
def pareto_k_table(pareto_k: np.ndarray, good_k: float):
    """Counts of the Pareto-k values in ArviZ's four classes: good (k <= min(0.5, good_k)),
    ok (up to ``good_k`` = min(1 − 1/log10 S, 0.7)), bad (up to 1), very bad (> 1).

    A DataFrame indexed by class with columns ``range``, ``count``, ``percent``."""
    import pandas as pd

    k = np.asarray(pareto_k, dtype=float).ravel()
    k = np.where(np.isnan(k), np.inf, k)  # a NaN k is an importance ratio gone wrong
    low = min(0.5, good_k)
    edges = [-np.inf, low, good_k, 1.0, np.inf]
    counts = [
        int(np.sum((k > lo) & (k <= hi))) if i else int(np.sum(k <= hi))
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
    ]
    ranges = [f"(-inf, {low:.2f}]", f"({low:.2f}, {good_k:.2f}]", f"({good_k:.2f}, 1]", "(1, inf)"]
    total = max(1, len(k))
    return pd.DataFrame(
        {
            "range": ranges,
            "count": counts,
            "percent": [round(100.0 * c / total, 1) for c in counts],
        },
        index=["good", "ok", "bad", "very bad"],
    )


def loo_reports(idata, notes: list[str] | None = None) -> list[LooReport]:
    """PSIS-LOO of each log-likelihood variable that allows it; a note for each that does
    not (no log-likelihood group, too few draws, no posterior spread, non-finite values)."""
    import arviz as az

    notes = [] if notes is None else notes
    if not _has(idata, "log_likelihood"):
        notes.append(
            "LOO: not computed: no log-likelihood (the model observes no data, e.g. an "
            "objective-only model)"
        )
        return []
    ll_group = idata.log_likelihood
    out = []
    for var in ll_group.data_vars:
        ll = np.asarray(ll_group[var].values, dtype=float)
        samples = ll.shape[0] * ll.shape[1]
        if samples < MIN_LOO_DRAWS:
            notes.append(
                f"LOO ({var}): not computed: {samples} posterior draws; PSIS-LOO needs at "
                f"least {MIN_LOO_DRAWS} (fit or diagnose with more --draws)"
            )
            continue
        bad = int(np.sum(~np.isfinite(ll)))
        if bad:
            notes.append(
                f"LOO ({var}): not computed: {bad} of {ll.size} pointwise log-likelihood "
                "values are NaN or infinite"
            )
            continue
        flat = ll.reshape(samples, -1)
        if np.all(np.ptp(flat, axis=0) == 0):
            insample = float(flat[0].sum())
            notes.append(
                f"LOO ({var}): not computed: every draw is the same point estimate, so "
                "leave-one-out importance sampling has nothing to reweight; in-sample "
                f"log-likelihood sum_i log p(x_i | theta) = {insample:.6g}"
            )
            continue
        # Without a posterior group ArviZ cannot estimate the relative ESS: take 1.
        reff = None if _has(idata, "posterior") else 1.0
        elpd = az.loo(idata, var_name=var, pointwise=True, reff=reff)
        out.append(LooReport(var, elpd, pareto_k_table(elpd.pareto_k.values, elpd.good_k)))
    return out


def loo_report(idata) -> Any:
    """The ``ELPDData`` of the first log-likelihood variable that allows LOO, or ``None``
    (kept for callers of earlier versions; :func:`loo_reports` says why when there is none)."""
    reports = loo_reports(idata)
    return reports[0].elpd if reports else None


# ---------------------------------------------------------------------- plots
def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    # A figure with a layout engine is already laid out; "tight" would draw it twice.
    tight = None if fig.get_layout_engine() is not None else "tight"
    fig.savefig(buf, format="png", dpi=100, bbox_inches=tight)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


_LOWER_IS_BETTER = re.compile(r"loss|energy|divergence|kl", re.I)


def objective_plot(history: list[float], name: str, path: Path, engine: str = "") -> Path:
    """The objective per step, titled and labelled with the name the fit recorded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    h = np.asarray(history, dtype=float)
    ax.plot(np.arange(len(h)), h, lw=1, marker="." if len(h) <= 50 else None)
    finite = h[np.isfinite(h)]
    if len(finite) > 1 and _LOWER_IS_BETTER.search(name) and np.all(finite > 0):
        if finite.max() / finite.min() > 100:
            ax.set_yscale("log")
    direction = "lower is better" if _LOWER_IS_BETTER.search(name) else "higher is better"
    ax.set_xlabel("step (0 = first recorded value)")
    ax.set_ylabel(f"{name} (nats)")
    who = f"{engine.upper()}: " if engine else ""
    ax.set_title(f"{who}{name} per step ({direction})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _page_name(stem: str, page: int, numbered: bool) -> str:
    if numbered:
        return f"{stem}-{page}.png"
    return f"{stem}.png" if page == 1 else f"{stem}-{page}.png"


def _clear_pages(out: Path, stem: str) -> None:
    """Remove the pages an earlier diagnosis wrote (and ``posterior.png``, the one-page
    posterior plot of earlier versions), so the folder holds this diagnosis's only."""
    if stem == "posterior" and (out / "posterior.png").is_file():
        (out / "posterior.png").unlink()
    for p in out.glob(f"{stem}-*.png"):
        if re.fullmatch(rf"{re.escape(stem)}-\d+\.png", p.name):
            p.unlink()


def _trace_pages(idata, names: list[str], out: Path, notes: list[str]) -> list[Path]:
    """One row per variable: left, each entry's density (a histogram of its draws, all
    chains pooled, drawn as a step curve); right, each entry's draws in order, one line
    per entry and chain (colour: entry, line style: chain). Drawn as line collections on
    fixed margins: ArviZ's ``plot_trace`` draws a kernel density estimate and a line
    object per entry and chain and lays out every tick label, several seconds a page for a
    mixture's 48 precision entries."""
    from matplotlib.collections import LineCollection
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    written = []
    pages = [names[i : i + PAGE_PANELS] for i in range(0, len(names), PAGE_PANELS)]
    if len(pages) > MAX_PAGES:
        rest = [v for p in pages[MAX_PAGES:] for v in p]
        notes.append(
            f"trace plot: {len(rest)} variables not drawn (past {MAX_PAGES} pages): "
            + _short_list(rest)
        )
        pages = pages[:MAX_PAGES]
    post = idata.posterior
    n_chain = int(post.sizes.get("chain", 1))
    styles = ["solid", "dashed", "dotted", "dashdot"]
    for i, page in enumerate(pages, 1):
        nrows = len(page)
        fig, axes = plt.subplots(
            nrows,
            2,
            figsize=(12.0, 2.4 * nrows + 0.4),
            squeeze=False,
            gridspec_kw=_panel_grid(nrows, 2, 6.0, 2.4 + 0.4 / nrows),
            layout=PlaceHolderLayoutEngine(adjust_compatible=True, colorbar_gridspec=True),
        )
        for row, name in zip(axes, page, strict=True):
            values = np.asarray(post[name].values, dtype=float)
            chains, draws = values.shape[:2]
            flat = values.reshape(chains, draws, -1)  # (chain, draw, entry)
            n_entry = flat.shape[2]
            colours = [f"C{e % 10}" for e in range(n_entry)]
            dens, lines, line_colours, line_styles = [], [], [], []
            steps = np.arange(draws, dtype=float)
            for e in range(n_entry):
                x = flat[:, :, e]
                finite = x[np.isfinite(x)]
                if finite.size and np.ptp(finite) > 0:
                    h, edges = np.histogram(finite, bins=min(30, max(5, finite.size // 10)))
                    h = h / (h.sum() * np.diff(edges))
                    xs = np.repeat(edges, 2)[1:-1]
                    dens.append(np.column_stack([xs, np.repeat(h, 2)]))
                for c in range(chains):
                    lines.append(np.column_stack([steps, x[c]]))
                    line_colours.append(colours[e])
                    line_styles.append(styles[c % len(styles)])
            left, right = row
            if dens:
                left.add_collection(LineCollection(dens, colors=colours[: len(dens)], linewidths=1))
                left.autoscale_view()
            right.add_collection(
                LineCollection(
                    lines, colors=line_colours, linestyles=line_styles, linewidths=0.6, alpha=0.7
                )
            )
            right.autoscale_view()
            shape = tuple(values.shape[2:])
            what = f"{name} {shape}, {n_entry} entries" if shape else name
            for ax in row:
                ax.set_title(what, fontsize=9, y=1.0)
                ax.xaxis.set_major_locator(_FEW_TICKS())
                ax.yaxis.set_major_locator(_FEW_TICKS())
            left.set_xlabel("value")
            left.set_ylabel("density")
            right.set_xlabel("draw (line style: chain)")
            right.set_ylabel("value")
        part = f" (page {i} of {len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"Trace of the posterior draws, {n_chain} chain(s){part}")
        written.append(_save(fig, out / _page_name("trace", i, numbered=False)))
    return written


def _index_label(name: str, idx: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(str(i) for i in idx)}]" if idx else name


def _posterior_entries(idata, notes: list[str]) -> list[tuple[str, np.ndarray]]:
    """(label, draws flattened over chains) for every varying scalar entry of the small
    posterior variables; what is left out goes into ``notes``."""
    post = idata.posterior
    entries = []
    for name in post.data_vars:
        values = np.asarray(post[name].values)
        shape = values.shape[2:]
        size = int(np.prod(shape, dtype=int))
        if not np.issubdtype(values.dtype, np.number):
            notes.append(f"posterior plots: {name} left out: not numeric ({values.dtype})")
            continue
        if size > MAX_SUMMARY_SIZE:
            notes.append(
                f"posterior plots: {name} {tuple(shape)} left out: {size} entries per draw "
                f"(more than {MAX_SUMMARY_SIZE}; a per-datum latent or a large table)"
            )
            continue
        const = _constant_mask(values)
        idxs = list(np.ndindex(*shape)) if shape else [()]
        fixed = [_index_label(name, ix) for ix in idxs if const[ix]]
        if fixed and len(fixed) < len(idxs):
            notes.append(
                f"posterior plots: {len(fixed)} of {len(idxs)} entries of {name} left out: "
                "constant in every draw (structural, e.g. a Cholesky factor's zeros and unit "
                "diagonal): " + _short_list(fixed)
            )
        elif fixed:
            notes.append(
                f"posterior plots: {name} left out: constant in every draw (a point "
                "estimate, no posterior spread)"
            )
        first: dict[bytes, str] = {}  # an entry's draws -> the first entry with the same
        copies = []
        for ix in idxs:
            if not const[ix]:
                draws = values[(slice(None), slice(None), *ix)].reshape(-1).astype(float)
                label = _index_label(name, ix)
                key = draws.tobytes()
                if key in first:  # a symmetric matrix's mirror entry: the same panel again
                    copies.append(f"{label} = {first[key]}")
                    continue
                first[key] = label
                entries.append((label, draws))
        if copies:
            notes.append(
                f"posterior plots: {len(copies)} entries of {name} drawn once: identical "
                "draws to an earlier entry (e.g. a symmetric matrix's mirror half): "
                + _short_list(copies)
            )
    return entries


def _FEW_TICKS():  # noqa: N802 — a locator class's stand-in
    """At most five ticks an axis: every tick is a text to lay out and draw."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=4)


def _panel_grid(nrows: int, ncols: int, width: float, height: float) -> dict[str, float]:
    """Fixed margins (inches) for a grid of ``width`` x ``height`` inch panels with a
    suptitle, two-line panel titles and axis labels, as ``subplots`` gridspec fractions.
    Every panel of these pages has the same furniture, so the spacing a layout engine
    would find is known in advance: measuring every tick label of a page (constrained
    layout) took about a third of the plotting time of a mixture's posterior pages."""
    left, right, top, bottom = 0.75, 0.15, 0.85, 0.45  # top: suptitle + first row's titles
    gap_w, gap_h = 0.8, 0.95  # between panels: y tick labels; x label + next titles
    fig_w, fig_h = width * ncols, height * nrows
    ax_w = (fig_w - left - right - gap_w * (ncols - 1)) / ncols
    ax_h = (fig_h - top - bottom - gap_h * (nrows - 1)) / nrows
    return {
        "left": left / fig_w,
        "right": 1 - right / fig_w,
        "top": 1 - top / fig_h,
        "bottom": bottom / fig_h,
        "wspace": gap_w / ax_w,
        "hspace": gap_h / ax_h,
    }


def _posterior_pages(idata, out: Path, notes: list[str]) -> list[Path]:
    import arviz as az
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    entries = _posterior_entries(idata, notes)
    cap = PAGE_PANELS * MAX_PAGES
    if len(entries) > cap:
        notes.append(
            f"posterior plots: {len(entries) - cap} entries not drawn (past {MAX_PAGES} pages "
            f"of {PAGE_PANELS}): " + _short_list([e[0] for e in entries[cap:]])
        )
        entries = entries[:cap]
    written = []
    pages = [entries[i : i + PAGE_PANELS] for i in range(0, len(entries), PAGE_PANELS)]
    for p, page in enumerate(pages, 1):
        ncols = min(3, len(page))
        nrows = math.ceil(len(page) / ncols)
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(3.6 * ncols, 2.6 * nrows),
            squeeze=False,
            gridspec_kw=_panel_grid(nrows, ncols, 3.6, 2.6),
            # margins set above: a layout engine that does nothing (no "tight" pass either)
            layout=PlaceHolderLayoutEngine(adjust_compatible=True, colorbar_gridspec=True),
        )
        for ax, (label, draws) in zip(axes.ravel(), page, strict=False):
            finite = draws[np.isfinite(draws)]
            title = label
            if len(finite) == 0:
                ax.text(0.5, 0.5, "no finite draws", ha="center", va="center")
            else:
                # one stepfilled patch, not one per bar: pages of panels draw fast
                bins = min(30, max(5, len(finite) // 5))
                ax.hist(finite, bins=bins, density=True, histtype="stepfilled", alpha=0.6)
                mean = float(finite.mean())
                ax.axvline(mean, color="k", lw=1)
                title += f"\nmean {mean:.3g}"
                if np.ptp(finite) > 0:
                    lo, hi = az.hdi(finite, hdi_prob=HDI_PROB)
                    ax.axvspan(lo, hi, color="C1", alpha=0.15)
                    title += f", {HDI_PROB:.0%} HDI [{lo:.3g}, {hi:.3g}] (shaded)"
            # a fixed title height: matplotlib's automatic one measures the tick labels
            ax.set_title(title, fontsize=9, y=1.0)
            ax.xaxis.set_major_locator(_FEW_TICKS())
            ax.yaxis.set_major_locator(_FEW_TICKS())
            ax.set_xlabel("value (the parameter's own units)")
            ax.set_ylabel("density")
        for ax in axes.ravel()[len(page) :]:
            ax.set_visible(False)
        fig.suptitle(f"Posterior draws, page {p} of {len(pages)}")
        written.append(_save(fig, out / _page_name("posterior", p, numbered=True)))
    return written


def _is_discrete(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return values.dtype.kind in "iub" or (
        v.size > 0 and np.all(v == np.round(v)) and len(np.unique(v[:5000])) <= 30
    )


def _ppc_panels(idata, notes: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(title, observed values, predictive values (draw, n)) per observed feature."""
    panels = []
    for var in idata.posterior_predictive.data_vars:
        if "observed_data" not in idata.groups() or var not in idata.observed_data:
            notes.append(f"posterior predictive check: {var} left out: no observed values")
            continue
        obs = np.asarray(idata.observed_data[var].values)
        pp = np.asarray(idata.posterior_predictive[var].values)
        pp = pp.reshape(-1, *pp.shape[2:])  # (draws, *obs shape)
        if pp.shape[1:] != obs.shape:
            notes.append(
                f"posterior predictive check: {var} left out: predictive shape "
                f"{pp.shape[1:]} differs from the observed {obs.shape}"
            )
            continue
        if obs.ndim >= 2 and 2 <= obs.shape[-1] <= PAGE_PANELS:
            for j in range(obs.shape[-1]):
                panels.append(
                    (
                        f"{var}[..., {j}] (feature {j + 1} of {obs.shape[-1]})",
                        obs[..., j].reshape(-1),
                        pp[..., j].reshape(len(pp), -1),
                    )
                )
        else:
            pooled = f", {obs.size} values pooled" if obs.ndim >= 2 else ""
            panels.append((f"{var}{pooled}", obs.reshape(-1), pp.reshape(len(pp), -1)))
    return panels


def _ppc_pages(idata, out: Path, notes: list[str], max_draws: int = 40) -> list[Path]:
    panels = _ppc_panels(idata, notes)
    cap = PAGE_PANELS * MAX_PAGES
    if len(panels) > cap:
        notes.append(
            f"posterior predictive check: {len(panels) - cap} panels not drawn: "
            + _short_list([p[0] for p in panels[cap:]])
        )
        panels = panels[:cap]
    rng = np.random.default_rng(0)
    written = []
    pages = [panels[i : i + PAGE_PANELS] for i in range(0, len(panels), PAGE_PANELS)]
    for p, page in enumerate(pages, 1):
        ncols = min(2, len(page))
        nrows = math.ceil(len(page) / ncols)
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(5.0 * ncols, 3.0 * nrows), squeeze=False, layout="constrained"
        )
        for ax, (title, obs, pp) in zip(axes.ravel(), page, strict=False):
            rows = pp[rng.choice(len(pp), size=min(max_draws, len(pp)), replace=False)]
            obs = obs.astype(float)
            rows = rows.astype(float)
            if len(obs) > 20000:  # a histogram does not need every value of a large table
                keep = rng.choice(len(obs), 20000, replace=False)
                obs, rows = obs[keep], rows[:, keep]
            finite = np.concatenate([obs[np.isfinite(obs)], rows[np.isfinite(rows)]])
            if finite.size == 0:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center")
            elif _is_discrete(np.concatenate([obs, rows.ravel()])):
                values = np.unique(finite)[:50]
                freq = np.array([[np.mean(r == v) for v in values] for r in rows])
                ax.bar(
                    values,
                    [np.mean(obs == v) for v in values],
                    width=0.8,
                    alpha=0.5,
                    label="observed",
                )
                lo, mid, hi = np.percentile(freq, [5, 50, 95], axis=0)
                ax.errorbar(
                    values,
                    mid,
                    yerr=[mid - lo, hi - mid],
                    fmt="o",
                    color="C1",
                    ms=3,
                    label="predictive (median, 90%)",
                )
                ax.set_ylabel("frequency")
            else:
                lo, hi = np.percentile(finite, [0.5, 99.5])
                if hi <= lo:
                    lo, hi = lo - 0.5, hi + 0.5
                bins = np.linspace(lo, hi, 31)
                for k, r in enumerate(rows):
                    ax.hist(
                        r[np.isfinite(r)],
                        bins=bins,
                        density=True,
                        histtype="step",
                        color="C1",
                        alpha=0.25,
                        lw=0.8,
                        label="predictive draws" if k == 0 else None,
                    )
                ax.hist(
                    obs[np.isfinite(obs)],
                    bins=bins,
                    density=True,
                    histtype="step",
                    color="k",
                    lw=1.6,
                    label="observed",
                )
                ax.set_ylabel("density")
            ax.set_xlabel("value (the data's units)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7, loc="upper right")
        for ax in axes.ravel()[len(page) :]:
            ax.set_visible(False)
        part = f", page {p} of {len(pages)}" if len(pages) > 1 else ""
        fig.suptitle(f"Posterior predictive check: observed vs {len(rows)} predictive draws{part}")
        written.append(_save(fig, out / _page_name("ppc", p, numbered=False)))
    return written


def _attempt(what: str, failures: list[str], fn, *args) -> Any:
    """``fn(*args)``, or ``None`` with one line in ``failures`` when it raises: one broken
    part must not take the rest of a diagnosis with it."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 — reported, one line, never swallowed
        failures.append(f"{what}: failed ({type(e).__name__}: {_one_line(e)[:300]})")
        return None


def draw_plots(fit, idata, out_dir: str | Path, diagnosis: Diagnosis | None = None) -> Diagnosis:
    """Write every applicable plot into ``out_dir``; the written paths, the notes on what
    was left out and the failures go into ``diagnosis`` (a new one when ``None``)."""
    d = Diagnosis() if diagnosis is None else diagnosis
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem in ("trace", "posterior", "ppc"):
        _clear_pages(out, stem)
    history = list(getattr(fit, "history", []) or [])
    with collected_warnings(d.warnings):
        if history:
            p = _attempt(
                "objective plot",
                d.failures,
                objective_plot,
                history,
                fit.objective,
                out / "objective.png",
                fit.engine,
            )
            d.plots += [p] if p else []
        else:
            d.notes.append("objective plot: none (the fit recorded no objective history)")
        if _has(idata, "posterior"):
            names = small_posterior_vars(idata)
            varying = [
                v for v in names if not _constant_mask(np.asarray(idata.posterior[v].values)).all()
            ]
            if varying:
                d.plots += (
                    _attempt("trace plot", d.failures, _trace_pages, idata, varying, out, d.notes)
                    or []
                )
            else:
                d.notes.append("trace plot: none (no small posterior variable varies across draws)")
            d.plots += (
                _attempt("posterior plots", d.failures, _posterior_pages, idata, out, d.notes) or []
            )
        if _has(idata, "posterior_predictive"):
            d.plots += (
                _attempt("posterior predictive check", d.failures, _ppc_pages, idata, out, d.notes)
                or []
            )
        else:
            d.notes.append(
                "posterior predictive check: none (the model has no observed sites with "
                "values to re-sample, e.g. only pyro.factor terms)"
            )
        plots = hook(getattr(fit, "pair", None), "diagnostic_plots")
        if callable(plots):
            extra = _attempt("the model's own plots", d.failures, plots, fit, out)
            d.plots += [Path(p) for p in extra or []]
    return d


def write_plots(fit, idata, out_dir: str | Path) -> list[Path]:
    """Write every applicable plot into ``out_dir``; returns the written paths (what was
    left out and why: :func:`draw_plots`)."""
    return draw_plots(fit, idata, out_dir).plots


# ---------------------------------------------------------------------- the whole diagnosis
def diagnose(fit, idata, plots_dir: str | Path | None) -> Diagnosis:
    """Everything ``jointkl diagnose`` shows of a run: facts, summary, LOO, plots.

    :param fit: the :class:`~jointkl.fit.Fit` (its history, objective, info and pair).
    :param idata: its ``arviz.InferenceData`` (any groups; missing ones are noted).
    :param plots_dir: where to write the plots; ``None`` writes none.
    """
    d = Diagnosis()
    if fit is not None:
        d.facts.append(repr(fit))
        final = fit.final_objective
        d.facts.append(
            f"stop: {fit.info.get('stop_reason', '-')}; {fit.objective} final {final:.6g} "
            f"after {fit.n_iter} steps (converged: {fit.converged})"
        )
        interrupted = fit.info.get("interrupted")
        if interrupted:
            detail = (
                interrupted
                if isinstance(interrupted, (str, int)) and interrupted is not True
                else ""
            )
            d.facts.append(
                f"interrupted{': ' + str(detail) if detail else ''}: the results are those of "
                "the last saved state, not of a finished fit"
            )
        for note in fit.info.get("notes") or []:  # an engine's own one-line remarks
            d.facts.append(f"note: {note}")
    with collected_warnings(d.warnings):
        if _has(idata, "posterior"):
            d.summary = _attempt("summary", d.failures, summary_table, idata, d.notes)
        else:
            d.notes.append(f"summary: none: {_no_posterior_reason(fit)}")
        d.loo = _attempt("LOO", d.failures, loo_reports, idata, d.notes) or []
    if plots_dir is not None:
        draw_plots(fit, idata, plots_dir, d)
    return d
