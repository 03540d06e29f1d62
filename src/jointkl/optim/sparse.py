"""Optimisers for parameters whose gradients arrive sparse (embedding rows looked up with
``sparse=True``): only the rows a step touched are read and written.

A model over a large vocabulary touches a few rows of its V × d embeddings per step; a dense
optimiser step would cost O(V·d) and undo what a sampled objective saves by never touching
the other rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from jointkl.errors import InputError
from jointkl.optim.names import optim_class, step_size_args

__all__ = ["LazyAdam", "SparseAwareOptimizer"]


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient touches: torch's ``SparseAdam`` update, with one
    coalesce per parameter and row gathers/scatters instead of sparse-dense arithmetic.

    For the touched rows r, with t the step count: m_r ← β₁ m_r + (1 − β₁) g_r,
    v_r ← β₂ v_r + (1 − β₂) g_r², θ_r ← θ_r − lr · (m_r / (1 − β₁ᵗ)) / (√(v_r / (1 − β₂ᵗ)) + ε).
    Rows a step does not touch keep their moments and values ("lazy" Adam).

    :param params: the parameters (gradients sparse or dense; a dense one is read row-wise).
    :param float lr: the step size.
    :param betas: (β₁, β₂), the moments' decay rates.
    :param float eps: ε, added to the root of the second moment.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
                rows, vals = g._indices()[0], g._values()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                m = st["exp_avg"].index_select(0, rows).lerp_(vals, 1 - b1)
                v = (
                    st["exp_avg_sq"]
                    .index_select(0, rows)
                    .mul_(b2)
                    .addcmul_(vals, vals, value=1 - b2)
                )
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                t = st["step"]
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - b1**t))


class SparseAwareOptimizer:
    """The optimiser(s) of a named kind for a list of parameters, built at the first step,
    once the gradients show which parameters are sparse.

    Parameters whose gradients arrive sparse are stepped row-wise: ``sgd`` and ``adagrad``
    take sparse gradients natively; ``adam``/``adamw`` hand them to :class:`LazyAdam` (Adam
    on the rows a batch touched) and the dense parameters to the named optimiser.

    :param str name: a key of :data:`~jointkl.optim.names.OPTIM_CLASSES` (no closure given).
    :param float lr: the step size (an integrator's ``step_size``).
    :param params: the parameters to step.
    :param str owner: who asks, for messages.
    """

    SPARSE_OK = ("sgd", "adagrad")

    def __init__(self, name: str, lr: float, params: list[torch.Tensor], owner: str = "optim"):
        self.name, self.lr, self.params, self.owner = name, lr, params, owner
        self.cls = optim_class(name, owner)
        self.optims: list[torch.optim.Optimizer] | None = None
        self.pending: dict[str, Any] | None = None  # state to load once the optims exist

    def _build(self) -> None:
        sparse = [p for p in self.params if p.grad is not None and p.grad.is_sparse]
        dense = [p for p in self.params if not (p.grad is not None and p.grad.is_sparse)]
        args = step_size_args(self.name, self.lr)
        if not sparse or self.name in self.SPARSE_OK:
            self.optims = [self.cls(self.params, **args)]
            return
        if self.name not in ("adam", "adamw"):
            raise InputError(
                f"{self.owner}: optim={self.name!r} cannot step the sparse gradients of this "
                "model's embeddings; use adam, sgd or adagrad"
            )
        self.optims = [LazyAdam(sparse, lr=self.lr)]
        if dense:
            self.optims.append(self.cls(dense, **args))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        if self.optims is None:
            self._build()
            if self.pending:  # a resumed fit: the optimisers exist only now
                for o, sd in zip(self.optims, self.pending["optims"], strict=True):
                    o.load_state_dict(sd)
            self.pending = None
        for o in self.optims:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' state dicts (empty before the first step)."""
        if self.optims is None:
            return dict(self.pending or {})
        return {"optims": [o.state_dict() for o in self.optims]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Pour in :meth:`state_dict`'s value; applied when the optimisers are built."""
        if self.optims is not None:
            raise RuntimeError("load_state_dict must come before the first step")
        self.pending = dict(state) if state else None
