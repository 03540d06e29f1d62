"""Reading a Pyro model's sites: the trace helpers every engine and the ArviZ converter share.

A model is traced once on its data (no gradients, no enumeration) and its sites are sorted
into latent, observed and enumerated ones; the ``"data"`` plate is the one data plate of every
model (its size is N, its sites are per data point). This module imports nothing of jointkl
but its errors, so any module may use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

__all__ = [
    "DATA_PLATE",
    "trace_model",
    "is_enumerated",
    "in_data_plate",
    "latent_site_names",
    "observed_site_names",
    "max_plate_nesting",
    "data_plate_size",
]

DATA_PLATE = "data"


def trace_model(model, args: tuple, kwargs: Mapping[str, Any], data: Mapping | None = None):
    """One trace of ``model`` (optionally conditioned on ``data``), with no side effects on
    the param store's gradients and no enumeration."""
    m = poutine.condition(model, data=dict(data)) if data else model
    with torch.no_grad():
        return poutine.trace(m).get_trace(*args, **kwargs)


def is_enumerated(site: Mapping[str, Any]) -> bool:
    """A discrete site marked for parallel enumeration (or already enumerated)."""
    return site["infer"].get("enumerate") == "parallel" or (
        site["infer"].get("_enumerate_dim") is not None
    )


def in_data_plate(site: Mapping[str, Any]) -> bool:
    """Does the site sit inside the ``"data"`` plate (is it per data point)?"""
    return any(f.name == DATA_PLATE for f in site["cond_indep_stack"])


def latent_site_names(model, args: tuple, kwargs: Mapping[str, Any]) -> list[str]:
    """Unobserved sample sites that are not enumerated (the ones a posterior describes)."""
    tr = trace_model(model, args, kwargs)
    return [
        name
        for name, s in tr.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not is_enumerated(s)
        and not name.startswith("_")
    ]


def observed_site_names(model, args: tuple, kwargs: Mapping[str, Any]) -> list[str]:
    tr = trace_model(model, args, kwargs)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and s["is_observed"]]


def max_plate_nesting(trace) -> int:
    """How many batch dimensions the trace's vectorised plates use (Pyro's
    ``max_plate_nesting``, which enumeration allocates its dimensions to the left of)."""
    dims = [
        -f.dim
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


class _PlateFound(Exception):
    pass


class _DataPlateSize(Messenger):
    """Stops the model at the creation of its ``"data"`` plate, keeping the plate's size."""

    size: int | None = None

    def _process_message(self, msg):
        if msg["name"] == DATA_PLATE and isinstance(msg["fn"], _Subsample):
            self.size = msg["fn"].size
            raise _PlateFound


def data_plate_size(model, args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """N of the model's ``pyro.plate("data", N)``, or ``None`` if it has none.

    The model runs only up to the plate's creation, so nothing inside the plate (where a
    model's per-point work is) is computed on the full data.
    """
    finder = _DataPlateSize()
    try:
        with torch.no_grad(), poutine.block(), finder:
            model(*args, **kwargs)
    except _PlateFound:
        pass
    return finder.size
