"""The one exception type for bad input: the CLI turns it into exit status 2."""

from __future__ import annotations

__all__ = ["InputError", "FitDivergedError", "ConvergenceWarning"]


class InputError(ValueError):
    """Bad input from the user: a file, an argument, a site or a setting that is not usable.

    The message names what was wrong and what was expected, in one line.
    """


class FitDivergedError(RuntimeError):
    """A fit met a NaN/inf objective or gradient; the last good state was kept."""


class ConvergenceWarning(UserWarning):
    """A fit used its whole step budget and its own convergence test says it had not settled.

    The message is one line: what the test saw and the remedy (more steps, a larger lr).
    """
