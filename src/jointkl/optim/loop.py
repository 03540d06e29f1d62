"""The stochastic-gradient step loop the iterative engines share.

The loop carries one :class:`~jointkl.checkpoint.LoopState`: after every step it appends the
objective to ``state.history`` and advances ``state.step``; the parameters in ``state.params``
are the live tensors the optimiser moves. A checkpoint is that state on disk, written every
``checkpoint_every`` steps, when the loop ends or is interrupted, and — when a step meets a
NaN/inf — nothing: the parameters that met it (the result of the previous update, which may
have overshot to ±inf, or to a finite point where the objective is not finite) are not a state
worth resuming, and a checkpoint already written of them is removed, so the newest remaining
checkpoint holds parameters whose objective was evaluated finite.

Under :func:`jointkl.signals.stop_on_signals` (the command line), SIGINT and SIGTERM end the
loop at the next step boundary, like an early stop, with the reason saying which signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from jointkl.checkpoint import LoopState, forget_checkpoint
from jointkl.errors import FitDivergedError
from jointkl.signals import ForcedStop, polling, signal_name, stop_requested

__all__ = ["StepLoop"]


@dataclass
class StepLoop:
    """Run ``step(i) -> objective`` for ``i = state.step, …, steps − 1``.

    :param steps: the step count the fit ends at.
    :param save: writes the state as a checkpoint (``None``: no checkpoints).
    :param checkpoint_every: also save after every this many steps.
    :param on_step: called as ``on_step(i, objective)`` after every step; raising
        ``KeyboardInterrupt`` there ends the fit early, keeping it.
    :param stop: ``stop(objective) -> bool`` after every step: True ends the loop as
        converged.
    :param progress: show a tqdm bar with the exponentially smoothed objective.
    :param desc: the bar's label.
    :param smoothing: the bar's smoothing weight w (s ← (1 − w)·s + w·objective).
    """

    steps: int
    save: Callable[[], object] | None = None
    checkpoint_every: int | None = None
    on_step: Callable[[int, float], None] | None = None
    stop: Callable[[float], bool] | None = None
    progress: bool = False
    desc: str = "fit"
    smoothing: float = 0.1

    def run(self, state: LoopState, step: Callable[[int], float]) -> tuple[bool, str]:
        """Advance ``state`` to :attr:`steps`; returns (converged, stop reason)."""
        with polling():
            return self._run(state, step)

    def _run(self, state: LoopState, step: Callable[[int], float]) -> tuple[bool, str]:
        converged, reason = False, "max steps"
        bar = tqdm(
            range(state.step, self.steps),
            disable=not self.progress,
            desc=self.desc,
            initial=state.step,
            total=self.steps,
            mininterval=1.0,
        )
        smooth = None
        try:
            for i in bar:
                value = step(i)
                state.history.append(value)
                state.step = i + 1  # steps whose update has been applied
                if self.progress:
                    w = self.smoothing
                    smooth = value if smooth is None else (1 - w) * smooth + w * value
                    if i % 10 == 0:
                        bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
                if self.save is not None and self.checkpoint_every:
                    if state.step % self.checkpoint_every == 0:
                        self.save()
                if self.on_step is not None:
                    self.on_step(i, value)
                if self.stop is not None and self.stop(value):
                    converged, reason = True, "early stopping"
                    break
                signum = stop_requested()
                if signum is not None:  # SIGINT/SIGTERM under the CLI: a step boundary
                    reason = f"interrupted by {signal_name(signum)} after step {state.step}"
                    break
        except ForcedStop:
            raise  # mid-step (a second signal): the state may be half-updated; save nothing
        except KeyboardInterrupt:
            reason = f"interrupted after step {state.step}"
        except FitDivergedError:
            # The parameters after state.step updates are the ones that met the NaN/inf:
            # never a checkpoint (a resume from them would diverge again at once, whatever
            # the lr). A checkpoint of an earlier step holds parameters whose objective was
            # evaluated finite, so the newest of those is the last good state.
            forget_checkpoint(state)
            raise
        finally:
            bar.close()
        if self.save is not None:
            self.save()
        return converged, reason
