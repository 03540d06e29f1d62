"""Stop requests by signal: SIGINT and SIGTERM end a fit at a step boundary.

The command line installs :func:`stop_on_signals` around a fit. While it is installed, the
first SIGINT or SIGTERM only records a request; a loop that polls (``with polling():`` and
:func:`stop_requested` after every step, as :class:`~jointkl.optim.loop.StepLoop` does) then
ends at the next step boundary, with its state whole and checkpointed. When no loop polls
(an engine with a loop of its own), or on a second signal, the handler raises
:class:`ForcedStop` at once, a :class:`KeyboardInterrupt`, which engines already treat as
Ctrl-C. The exit status of a process stopped by signal ``s`` is ``128 + s`` (130 for SIGINT,
143 for SIGTERM), the shell's convention.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "ForcedStop",
    "stop_on_signals",
    "polling",
    "stop_requested",
    "signal_name",
    "exit_status",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal since stop_on_signals was entered
_polling = 0  # how many running loops check stop_requested() at their step boundaries


class ForcedStop(KeyboardInterrupt):
    """Raised by the handler when no loop polls, or on a second signal: stop now."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def _handler(signum: int, frame) -> None:
    global _received
    first = _received is None
    if first:
        _received = signum
    if not first or _polling == 0:
        raise ForcedStop(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the step-boundary handler for SIGINT and SIGTERM (main thread only; elsewhere
    this does nothing), restoring the previous handlers on exit."""
    global _received
    _received = None
    with handlers(_handler):
        yield


@contextmanager
def handlers(handler) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM while inside (main thread only; elsewhere this does
    nothing), the previous handlers restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def polling() -> Iterator[None]:
    """Declare that the code inside checks :func:`stop_requested` at every step boundary."""
    global _polling
    _polling += 1
    try:
        yield
    finally:
        _polling -= 1


def stop_requested() -> int | None:
    """The signal number received since :func:`stop_on_signals` was entered, or ``None``."""
    return _received


def signal_name(signum: int) -> str:
    """``"SIGINT"``, ``"SIGTERM"``, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """The shell's status for a process stopped by ``signum``: 128 + signum."""
    return 128 + int(signum)
