"""One training-loop state, and the one checkpoint reader/writer.

The iterative engines (SVI, NCE, Langevin) carry their whole progress as one value, a
:class:`LoopState`: the parameters, the optimiser's state, the random-number state, the step
and the objective history (NumPyro's ``SVIState`` habit). A checkpoint *is* that value on
disk, so resuming from it continues exactly as a run that never stopped; the mini-batch order
needs no state, being a function of (seed, step) (:class:`~jointkl.minibatch.BatchOrder`).

Checkpoints are ``<folder>/step-XXXXXXXX.pt``, written atomically with ``torch.save`` of
tensors and plain containers and read with ``torch.load(weights_only=True)``: loading one
never unpickles an arbitrary object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jointkl.errors import FitDivergedError, InputError
from jointkl.runs import atomic_save_tensors, checkpoint_files, latest_checkpoint, load_tensors

__all__ = [
    "LoopState",
    "checkpoint_path",
    "latest_checkpoint",
    "load_params",
    "check_checkpointing",
    "retention",
    "forget_checkpoint",
    "with_step_size",
]

# How many checkpoints a folder keeps (the newest); None keeps all. The command line sets it
# for its run directories (a Langevin checkpoint holds every draw so far, so ten of them can
# take gigabytes); the Python API keeps all unless asked.
_keep: int | None = None


@contextmanager
def retention(keep: int | None) -> Iterator[None]:
    """Inside the block, :meth:`LoopState.save` keeps only the newest ``keep`` checkpoints of
    its folder (``None`` or 0: all)."""
    global _keep
    previous, _keep = _keep, keep or None
    try:
        yield
    finally:
        _keep = previous


@dataclass
class LoopState:
    """Everything an iterative fit needs to continue exactly: one value, one checkpoint.

    :param step: updates applied so far.
    :param params: the parameters being learned, by name (unconstrained values for Pyro's
        param store; an engine's own tensors, e.g. NCE's γ or Langevin's chain positions).
    :param optim: the optimiser's state (``state_dict`` values: tensors and plain containers).
    :param rng: random-number states by name: ``"torch"`` (torch's global generator, which
        Pyro samples from) and any generator the engine owns.
    :param history: the objective per step so far.
    :param extra: engine-specific tensors (e.g. a tuned step size or preconditioner).
    """

    step: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    saved: Path | None = field(default=None, repr=False, compare=False)  # last written here

    def finite(self) -> bool:
        """Whether every floating parameter is finite (a state worth keeping)."""
        return all(
            bool(torch.isfinite(v).all())
            for v in self.params.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )

    def save(self, folder: str | Path) -> Path:
        """Write this state as ``folder/step-XXXXXXXX.pt`` (atomically); returns the path.

        A state whose parameters are not finite is never written (it would replace the last
        good one as the checkpoint a resume starts from): :class:`FitDivergedError`. Under
        :func:`retention`, older checkpoints beyond the newest ``keep`` are then removed."""
        if not self.finite():
            bad = sorted(
                k
                for k, v in self.params.items()
                if isinstance(v, torch.Tensor)
                and v.is_floating_point()
                and not bool(torch.isfinite(v).all())
            )
            raise FitDivergedError(
                f"parameters {bad[:5]} are not finite after step {self.step}; that state was "
                f"not checkpointed (the last good checkpoint stays the newest)"
            )
        path = atomic_save_tensors(
            {
                "step": int(self.step),
                "params": {k: v.detach().clone() for k, v in self.params.items()},
                "optim": self.optim,
                "rng": dict(self.rng),
                "history": torch.tensor(self.history, dtype=torch.float64),
                "extra": self.extra,
            },
            checkpoint_path(folder, self.step),
        )
        self.saved = path
        if _keep is not None:
            for old in checkpoint_files(folder)[:-_keep]:
                if old != path:
                    old.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoopState:
        """Read a checkpoint written by :meth:`save` (no code is run or unpickled)."""
        path = Path(path)
        try:
            d = load_tensors(path)
        except Exception as e:  # a truncated or foreign file: say which, not a pickle trace
            raise InputError(f"checkpoint {path} could not be read: {e}") from e
        missing = {"step", "params", "optim", "rng", "history"} - set(d)
        if missing:
            raise InputError(f"checkpoint {path} lacks {sorted(missing)}: not a jointkl checkpoint")
        rng = d["rng"]
        if isinstance(rng, torch.Tensor):  # checkpoints written before rng became a dict
            rng = {"torch": rng}
        return cls(
            step=int(d["step"]),
            params=dict(d["params"]),
            optim=d["optim"],
            rng=dict(rng),
            history=d["history"].tolist(),
            extra=dict(d.get("extra", {})),
        )

    # ------------------------------------------------------------------ torch's RNG
    @staticmethod
    def torch_rng() -> dict[str, torch.Tensor]:
        """The ``rng`` entry for torch's global generator, now."""
        return {"torch": torch.get_rng_state()}

    def restore_torch_rng(self) -> None:
        """Put torch's global generator back where this state recorded it."""
        if "torch" in self.rng:
            torch.set_rng_state(self.rng["torch"])


def forget_checkpoint(state: LoopState) -> None:
    """After ``state``'s parameters met a NaN/inf: remove the checkpoint written of them (if
    the last save was at this very step), so that the newest checkpoint left is a good one."""
    if state.saved is not None and state.saved.name == checkpoint_path(".", state.step).name:
        state.saved.unlink(missing_ok=True)
        state.saved = None


def with_step_size(optim_state: Any, lr: float) -> Any:
    """A copy of a saved optimiser state whose param groups take the step size ``lr`` (their
    ``lr``, ``initial_lr`` and ``step_size`` entries): a resume with another ``lr`` (after a
    divergence) must step with it, not with the one the checkpoint recorded. The moments and
    everything else are kept."""
    if isinstance(optim_state, Mapping):
        out = {}
        for k, v in optim_state.items():
            if k == "param_groups" and isinstance(v, list):
                out[k] = [
                    {
                        **g,
                        **{key: lr for key in ("lr", "initial_lr", "step_size") if key in g},
                    }
                    if isinstance(g, Mapping)
                    else g
                    for g in v
                ]
            else:
                out[k] = with_step_size(v, lr)
        return out
    if isinstance(optim_state, list):
        return [with_step_size(v, lr) for v in optim_state]
    return optim_state


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{int(step):08d}.pt"


def load_params(store, params: Mapping[str, torch.Tensor]) -> None:
    """Pour saved unconstrained values into Pyro's param store, in place (so ``nn.Module``
    parameters registered with ``pyro.module`` stay linked to their modules)."""
    current = store.get_state()["params"]
    missing = sorted(set(params) - set(current))
    if missing:
        raise InputError(f"checkpoint has params the model/guide did not create: {missing}")
    with torch.no_grad():
        for k, v in params.items():
            current[k].copy_(v.to(current[k]))


def check_checkpointing(owner: str, every: Any, folder: Any, resume: bool) -> None:
    """The checkpoint settings every iterative engine shares: a positive whole
    ``checkpoint_every``, and a ``checkpoint_dir`` whenever checkpoints are written or read."""
    if every is not None:
        if (
            not isinstance(every, (int, float))
            or isinstance(every, bool)
            or not float(every).is_integer()
            or every <= 0
        ):
            raise InputError(f"{owner}: checkpoint_every must be a positive int, got {every!r}")
        if folder is None:
            raise InputError(f"{owner}: checkpoint_every needs checkpoint_dir")
    if resume and folder is None:
        raise InputError(f"{owner}: resume=True needs checkpoint_dir")
