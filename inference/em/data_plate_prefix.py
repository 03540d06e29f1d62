"""The part of a model before its data: a run stopped at the first site inside the data plate.

EM's shortcuts for models whose structure is known (a declared mixture or chain, an HMM
compiled on its first time steps) need the model's globals (their initial values, drawn as
the generic initial trace draws them, and their constraints) without running the model over
its data. :func:`trace_to_data_plate` runs the model until its first sample site inside the
``"data"`` plate and returns what it saw. :func:`compiled_or_restored` runs such a shortcut
and, when it does not apply, puts torch's random state back so that the generic compilation
draws what it would have drawn without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger

from jointkl.sites import DATA_PLATE

if TYPE_CHECKING:
    from jointkl.inference.em.factor_model import FactorModel

__all__ = ["compiled_or_restored", "trace_to_data_plate"]


class _Stop(Exception):
    """Raised at the first sample site inside the data plate: the globals are all known."""


class _StopAtData(Messenger):
    """Stops the model at its first sample site inside the ``"data"`` plate, keeping that
    plate's frame (its size and batch dim)."""

    frame: Any = None

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        for f in msg.get("cond_indep_stack", ()):
            if f.name == DATA_PLATE:
                self.frame = f
                raise _Stop


def trace_to_data_plate(fm: FactorModel, validate: bool) -> tuple[Any, dict[str, Any], Any]:
    """The model run as the generic initial trace runs it (initial values by
    :func:`~jointkl.inference.em.compile._initial_value`, an empty param store, no
    gradients), stopped at its first sample site inside the ``"data"`` plate.

    :param fm: the model on its data.
    :param validate: ``True`` keeps Pyro's validation setting as it is; ``False`` turns it off
        for the run.
    :returns: the trace of the sites before the data (subsample sites kept), the param
        store's constraints, and the data plate's frame (``None``: no site in that plate).
    """
    from jointkl.inference.em.compile import _initial_value

    store = pyro.get_param_store()
    saved = store.get_state()
    store.clear()
    stop = _StopAtData()
    tracer = poutine.trace(InitMessenger(_initial_value)(stop(fm.model)))
    quiet = contextlib.nullcontext() if validate else pyro.validation_enabled(False)
    try:
        with torch.no_grad(), quiet:
            tracer.get_trace(*fm.args, **fm.kwargs)
    except _Stop:
        pass
    finally:
        found = dict(store.get_state()["constraints"])
        store.set_state(saved)
    return tracer.trace, found, stop.frame


def compiled_or_restored(
    compile_declared: Callable[[FactorModel, Mapping[str, Any]], bool],
    fm: FactorModel,
    declared: Mapping[str, Any],
) -> bool:
    """``compile_declared(fm, declared)``, treating any error as "does not apply"; when it
    does not apply, torch's random state is put back (the generic run draws again)."""
    rng = torch.get_rng_state()
    try:
        done = compile_declared(fm, declared)
    except Exception:  # noqa: BLE001 (the generic compilation decides, and says why)
        done = False
    if not done:
        torch.set_rng_state(rng)
    return done
