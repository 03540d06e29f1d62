"""``report.html``: one self-contained page per run.

The page holds the run's configuration, the facts of the fit, the convergence curve, the
summary table, LOO with its Pareto-k table, what does not exist and why, ArviZ's warnings,
and every plot of the run. Images are inline (``data:image/png;base64``), so the file can be
mailed or opened anywhere without the run directory beside it. Written atomically.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from jointkl.diagnostics import Diagnosis
from jointkl.runs import atomic_write_text

__all__ = ["report_html", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; } li.failure { color: #a00; } li.warning { color: #850; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = _esc(Path(path).name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
        f"<figcaption>{name}</figcaption></figure>"
    )


def _items(lines: list[str], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return "<ul>" + "".join(f"<li{cls}>{_esc(x)}</li>" for x in lines) + "</ul>"


def _table(frame, float_format: str = "{:.4g}") -> str:
    return frame.to_html(
        float_format=lambda v: float_format.format(v), border=0, classes="data", na_rep="-"
    )


def report_html(title: str, config: dict[str, Any] | None, d: Diagnosis) -> str:
    """The page as a string (see the module docstring)."""
    import pandas as pd

    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<h2>Fit</h2>",
        _items(d.facts) if d.facts else "<p>no fit facts</p>",
        "<h2>Configuration</h2>",
        f"<pre>{_esc(json.dumps(config, indent=2, default=str))}</pre>"
        if config is not None
        else "<p>no config.json in the run directory</p>",
        "<h2>Convergence</h2>",
    ]
    objective = [p for p in d.plots if Path(p).name == "objective.png"]
    parts.append(
        "".join(_image(p) for p in objective) or "<p>no objective history was recorded</p>"
    )
    parts.append("<h2>Summary</h2>")
    if d.summary is not None and len(d.summary):
        parts.append(_table(d.summary))
    else:
        parts.append("<p>no summary table (see the notes below)</p>")
    parts.append("<h2>LOO</h2>")
    if not d.loo:
        parts.append("<p>LOO was not computed (see the notes below)</p>")
    for r in d.loo:
        e = r.elpd
        frame = pd.DataFrame(
            {
                "elpd_loo": [float(e["elpd_loo"])],
                "se": [float(e["se"])],
                "p_loo": [float(e["p_loo"])],
                "draws": [int(e["n_samples"])],
                "data points": [int(e["n_data_points"])],
            },
            index=[r.var],
        )
        parts.append(f"<h3>{_esc(r.var)}</h3>")
        parts.append(_table(frame))
        parts.append("<p>Pareto k</p>")
        parts.append(_table(r.pareto, "{:.1f}"))
    parts.append("<h2>Notes: what is not here, and why</h2>")
    parts.append(_items(d.notes) if d.notes else "<p>nothing left out</p>")
    if d.warnings:
        parts.append("<h2>Warnings</h2>")
        parts.append(_items(d.warnings, "warning"))
    if d.failures:
        parts.append("<h2>Failures</h2>")
        parts.append(_items(d.failures, "failure"))
    parts.append("<h2>Plots</h2>")
    others = [p for p in d.plots if Path(p).name != "objective.png"]
    parts.append("".join(_image(p) for p in others) or "<p>no plots</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, config: dict[str, Any] | None, d: Diagnosis) -> Path:
    """Write :func:`report_html` to ``path`` atomically; returns the path."""
    return atomic_write_text(report_html(title, config, d), path)
