"""report.html: one self-contained page per run, parsed back with html.parser."""

from __future__ import annotations

import base64
import contextlib
import io
from html.parser import HTMLParser

import numpy as np

from jointkl.cli import main


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.headings, self._h = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("alt"), attrs.get("src", "")))
        elif tag == "table":
            self.tables += 1
        self._h = tag in ("h2", "h3")

    def handle_data(self, data):
        if self._h and data.strip():
            self.headings.append(data.strip())
            self._h = False


def test_report_holds_every_plot_and_table(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-4, 0.5, (30, 2)), rng.normal(4, 0.5, (30, 2))])
    data = tmp_path / "points.csv"
    np.savetxt(data, x, delimiter=",", header="a,b", comments="")
    run = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "svi", "--data", str(data), "--out", str(run)]
    argv += ["--draws", "30", "--set", "n_components=2", "--set", "covariance=diag"]
    argv += ["--set", "steps=30", "--set", "guide=normal", "--set", "progress=false"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["diagnose", str(run)]) == 0
    plots_line = next(x for x in out.getvalue().splitlines() if x.startswith("plots: "))
    plots = {p.rsplit("/", 1)[-1] for p in plots_line.removeprefix("plots: ").split(", ")}
    assert {"objective.png", "trace.png", "posterior-1.png", "ppc.png"} <= plots

    page = Page()
    page.feed((run / "report.html").read_text(encoding="utf-8"))
    assert {alt for alt, _ in page.images} == plots  # every plot, once
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt  # inline: no file beside it
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n", alt
    for section in ("Fit", "Configuration", "Convergence", "Summary", "LOO", "Plots"):
        assert section in page.headings, section
    assert page.tables >= 3  # summary, LOO, Pareto k
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "very bad" in html and "elpd_loo" in html and "ess_bulk" in html
    assert "&quot;engine&quot;: &quot;svi&quot;" in html  # the run's config (escaped)
