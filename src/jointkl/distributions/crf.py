"""Linear-chain conditional random field as a Pyro distribution over tag sequences.

For emissions ``h (..., T, C)``, transitions ``g (C, C)`` and optional start/end scores,
a tag sequence ``y`` of length ``L`` has score

    s(y) = start[y_0] + h_0[y_0] + Σ_{t<L-1} ( g[y_t, y_{t+1}] + h_{t+1}[y_{t+1}] ) + end[y_{L-1}]

and probability ``exp(s(y)) / Z`` (Lafferty et al. 2001). ``g[i, j]`` scores tag
``i`` followed by tag ``j``, as in pytorch-crf. All inference runs through the one chain
recursion in :mod:`jointkl.chain`: the log semiring gives ``log Z`` (and the marginals, by
autograd of ``log Z``), the max semiring Viterbi, forward filtering backward sampling draws
exact samples. Disallowed transitions (``allowed``) are true ``-inf`` scores; impossible
paths get probability exactly 0 and every gradient stays finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from jointkl import factored_chain
from jointkl.chain import (
    Method,
    auto_method,
    broadcast_shapes,
    chain_contract,
    chain_kbest,
    chain_sample,
    chain_viterbi,
)
from jointkl.errors import InputError
from jointkl.semiring import LogSemiring, MaxSemiring, Semiring

__all__ = [
    "CRFMethod",
    "FACTORED_MAX_T",
    "FACTORED_SCAN_WORK",
    "LinearChainCRF",
    "TagConstraints",
    "bmes_constraints",
    "constraint_violations",
]

# "factored": the CRF-specific recursions of jointkl.factored_chain (log Z in scaled
# probability space with a hand-written backward, Viterbi over a (B, C, C) tensor per step);
# "sequential" / "scan": the generic semiring recursion of jointkl.chain; "auto" picks.
CRFMethod = Literal["auto", "factored", "sequential", "scan"]
METHODS = ("auto", "factored", "sequential", "scan")
# "auto" on CPU. The factored loop pays T steps of two or three operations each; the generic
# log-depth scan log T steps of larger ones, with C times the arithmetic. Measured with
# scripts/bench/crf.py (docs/benchmarks.md, "CRF"): for log Z (with its gradient) the scan
# wins only for few, long chains, batch * C^3 <= FACTORED_SCAN_WORK and T > FACTORED_MAX_T
# (16 x 1000 x 4 tags: scan 12.5x pytorch-crf, factored 10.8x; 64 x 256 x 4: scan 3.5x,
# factored 6.3x); for Viterbi the scan wins wherever the generic recursion picks it (16 x 256
# x 4: scan 4.9x, factored 2.2x), i.e. batch * C^3 <= jointkl.chain.CPU_SCAN_WORK_MAX.
FACTORED_MAX_T = 256
FACTORED_SCAN_WORK = 2**10


class TagConstraints(NamedTuple):
    """Which tag sequences are possible: ``transitions[i, j]`` (``C x C`` bool) says tag ``j``
    may follow tag ``i``; ``start`` / ``end`` (``C`` bool) which tags may open / close a
    sequence (``None``: any)."""

    transitions: torch.Tensor
    start: torch.Tensor | None = None
    end: torch.Tensor | None = None


def bmes_constraints(tags: Sequence[str] = ("B", "M", "E", "S")) -> TagConstraints:
    """BMES word-segmentation constraints for the given tag order (case-insensitive).

    B begins a multi-character word, M continues it, E ends it, S is a one-character word:
    a word opens with B or S and closes with E or S, so B -> {M, E}, M -> {M, E},
    E -> {B, S}, S -> {B, S}; a sentence starts with B or S and ends with E or S.
    """
    names = [str(t).upper() for t in tags]
    if sorted(names) != ["B", "E", "M", "S"]:
        raise InputError(f"tags must name B, M, E and S once each (any order), got {list(tags)}")
    ix = {name: i for i, name in enumerate(names)}
    follow = {"B": "ME", "M": "ME", "E": "BS", "S": "BS"}
    trans = torch.zeros(4, 4, dtype=torch.bool)
    for a, nexts in follow.items():
        for b in nexts:
            trans[ix[a], ix[b]] = True
    start = torch.zeros(4, dtype=torch.bool)
    end = torch.zeros(4, dtype=torch.bool)
    start[[ix["B"], ix["S"]]] = True
    end[[ix["E"], ix["S"]]] = True
    return TagConstraints(trans, start, end)


def constraint_violations(
    tags: torch.Tensor, allowed: TagConstraints, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """How many of its constraints each tag sequence breaks: an opening tag ``allowed.start``
    forbids, each transition ``allowed.transitions`` forbids, a closing tag ``allowed.end``
    forbids (positions past ``lengths`` ignored).

    With :func:`bmes_constraints` this counts, per sequence, a B or M followed by B or S, an
    M or E not preceded by B or M (at the start too), and a last tag B or M: ``> 0`` marks a
    sequence that is not a well-formed segmentation. Such sequences come from a decoder that
    ignores the constraints (a per-position argmax); a constrained CRF never decodes one.

    Args:
        tags: ``(..., T)`` integer tags in ``0..C-1`` (any value past each length).
        allowed: the constraints (a bare ``(C, C)`` bool tensor is taken as transitions only).
        lengths: optional ``(...)`` lengths in ``1..T`` (default: all ``T``).

    Returns:
        ``(...)`` int64 counts.
    """
    if isinstance(allowed, torch.Tensor):
        allowed = TagConstraints(allowed)
    trans, start, end = allowed
    if not isinstance(tags, torch.Tensor) or tags.dim() < 1 or tags.dtype.is_floating_point:
        raise InputError("tags must be an integer tensor of shape (..., T)")
    T = tags.shape[-1]
    tags = tags.long()
    pos = torch.arange(T, device=tags.device)
    if lengths is None:
        valid = torch.ones(tags.shape, dtype=torch.bool, device=tags.device)
        last = tags[..., -1]
    else:
        lengths = torch.as_tensor(lengths, device=tags.device).long()
        if ((lengths < 1) | (lengths > T)).any():
            raise InputError(f"lengths must lie in 1..{T}")
        valid = pos < lengths.unsqueeze(-1)
        last = tags.gather(-1, (lengths - 1).expand(tags.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    y = tags.masked_fill(~valid, 0)
    C = trans.shape[0]
    if ((y < 0) | (y >= C)).any():
        raise InputError(f"tags must lie in 0..{C - 1} at non-padding positions")
    trans = trans.to(tags.device)
    bad = (~trans[y[..., :-1], y[..., 1:]] & valid[..., 1:]).sum(-1)
    if start is not None:
        bad = bad + (~start.to(tags.device)[y[..., 0]]).long()
    if end is not None:
        bad = bad + (~end.to(tags.device)[last]).long()
    return bad


def _check_finite(name: str, x: torch.Tensor, allow_neg_inf: bool) -> None:
    if x.numel() == 0:
        return
    # One reduction and one sync on the good path: max() is nan if any entry is nan, +inf if
    # any is +inf (min() likewise for -inf).
    top = float(x.detach().max())
    if top != top:
        raise InputError(f"{name} contains NaN")
    if top == float("inf") or (not allow_neg_inf and float(x.detach().min()) == float("-inf")):
        what = "+inf" if allow_neg_inf else "inf"
        raise InputError(f"{name} contains {what}; scores must be finite (or -inf for 'never')")


def _safe_dot(weights: torch.Tensor, values: torch.Tensor, dims: int) -> torch.Tensor:
    """Σ weights * values over the last ``dims`` dims, with 0 * -inf = 0 (impossible entries
    carry no mass). Values are masked *before* the product so the gradient stays finite."""
    live = weights > 0
    prod = weights * torch.where(live, values, torch.zeros_like(values))
    return prod.flatten(-dims).sum(-1) if dims else prod


class LinearChainCRF(TorchDistribution):
    """Distribution over tag sequences ``(..., T)`` of a linear-chain CRF.

    Args:
        emissions: ``(..., T, C)`` float scores ``h_t[c]``; ``-inf`` forbids a tag at a
            position. Batch shape is ``emissions.shape[:-2]``.
        transitions: ``(C, C)`` scores, ``[i, j]`` for tag ``i`` followed by tag ``j``.
        start, end: optional ``(C,)`` scores of the first / last tag.
        lengths: optional ``(...)`` integer lengths in ``1..T``. Or
        mask: optional ``(..., T)`` bool, True on the valid prefix of each sequence.
        allowed: optional ``(C, C)`` bool transition mask, or a :class:`TagConstraints`
            (transition, start and end masks), e.g. :func:`bmes_constraints`.
        method: ``"auto"``, ``"factored"``, ``"sequential"`` or ``"scan"``. ``"factored"``
            computes ``log Z`` (and its gradient) and Viterbi by the CRF-specific recursions
            of :mod:`jointkl.factored_chain`; ``"sequential"`` and ``"scan"`` by the generic
            semiring recursion of :mod:`jointkl.chain` in that order. ``"auto"``: on CPU,
            ``"factored"`` except where the generic log-depth scan is faster (for ``log Z``,
            ``batch * C^3 <= FACTORED_SCAN_WORK`` and ``T > FACTORED_MAX_T``; for Viterbi,
            wherever the generic recursion's ``"auto"`` picks the scan); on other devices the
            generic recursion's own choice. Marginals, entropy, sampling and top-k always
            use the generic recursion (``"auto"`` for ``"factored"``).
        validate_args: check values (NaN, lengths, tags); shapes are always checked.

    Positions past a sequence's length are padding: ``log_prob`` ignores the tags there, and
    ``mode``, ``sample`` and ``top_k`` put tag 0 there.
    """

    arg_constraints: dict = {}
    has_rsample = False
    has_enumerate_support = False

    def __init__(
        self,
        emissions: torch.Tensor,
        transitions: torch.Tensor,
        start: torch.Tensor | None = None,
        end: torch.Tensor | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        mask: torch.Tensor | None = None,
        allowed: torch.Tensor | TagConstraints | None = None,
        method: CRFMethod = "auto",
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(emissions, torch.Tensor) or emissions.dim() < 2:
            got = tuple(emissions.shape) if isinstance(emissions, torch.Tensor) else emissions
            raise InputError(f"emissions must be a tensor of shape (..., T, C), got {got!r}")
        if not emissions.dtype.is_floating_point:
            raise InputError(f"emissions must be floating point, got {emissions.dtype}")
        T, C = emissions.shape[-2:]
        if T < 1 or C < 1:
            raise InputError(
                f"emissions need T >= 1 and C >= 1, got shape {tuple(emissions.shape)}"
            )
        if not isinstance(transitions, torch.Tensor) or transitions.shape != (C, C):
            got = tuple(transitions.shape) if isinstance(transitions, torch.Tensor) else transitions
            raise InputError(f"transitions must have shape ({C}, {C}), got {got!r}")
        for name, v in (("start", start), ("end", end)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape != (C,)):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else v
                raise InputError(f"{name} must have shape ({C},), got {got!r}")
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
        batch_shape = emissions.shape[:-2]
        lengths = self._lengths(lengths, mask, batch_shape, T, emissions.device)
        allowed = self._allowed(allowed, C, emissions.device)
        check = validate_args if validate_args is not None else self._validate_args
        if check:
            _check_finite("emissions", emissions, allow_neg_inf=True)
            _check_finite("transitions", transitions, allow_neg_inf=True)
            for name, v in (("start", start), ("end", end)):
                if v is not None:
                    _check_finite(name, v, allow_neg_inf=True)
            if lengths is not None and lengths.numel() > 0:
                # One reduction for both bounds.
                lo, hi = (int(v) for v in torch.aminmax(lengths))
                if lo < 1 or hi > T:
                    raise InputError(
                        f"lengths must lie in 1..{T} (the emissions' T), got values from "
                        f"{lo} to {hi}"
                    )
        self.emissions = emissions
        self.transitions = transitions
        self.start = start
        self.end = end
        self.lengths = lengths
        self.allowed = allowed
        self.method = method
        super().__init__(batch_shape, torch.Size([T]), validate_args=validate_args)

    # ---- construction helpers -------------------------------------------------------------

    @staticmethod
    def _lengths(lengths, mask, batch_shape, T, device) -> torch.Tensor | None:
        if lengths is not None and mask is not None:
            raise InputError("give either lengths or mask, not both")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise InputError("mask must be a bool tensor of shape (..., T)")
            if mask.shape[-1:] != (T,):
                raise InputError(f"mask must have shape (..., {T}), got {tuple(mask.shape)}")
            lengths = mask.sum(-1)
            # A prefix mask is non-increasing along T: it equals its running minimum.
            if not torch.equal(mask.cummin(-1).values, mask):
                raise InputError(
                    "mask must be True on a prefix of each sequence (from position 0) and "
                    "False after it"
                )
        if lengths is None:
            return None
        # Conversions only where needed: on a small decode each operation counts.
        if not isinstance(lengths, torch.Tensor) or lengths.device != device:
            lengths = torch.as_tensor(lengths, device=device)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise InputError(f"lengths must be integers, got dtype {lengths.dtype}")
        if lengths.dtype == torch.long and lengths.shape == batch_shape:
            return lengths
        try:
            return lengths.long().expand(batch_shape)
        except RuntimeError as e:
            raise InputError(
                f"lengths of shape {tuple(lengths.shape)} do not broadcast to the emissions' "
                f"batch shape {tuple(batch_shape)}"
            ) from e

    @staticmethod
    def _allowed(allowed, C, device) -> TagConstraints | None:
        if allowed is None:
            return None
        if isinstance(allowed, torch.Tensor):
            allowed = TagConstraints(allowed)
        if not isinstance(allowed, TagConstraints):
            raise InputError("allowed must be a (C, C) bool tensor or a TagConstraints")
        trans, start, end = allowed
        for name, m, shape in (
            ("allowed.transitions", trans, (C, C)),
            ("allowed.start", start, (C,)),
            ("allowed.end", end, (C,)),
        ):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != shape:
                got = (m.dtype, tuple(m.shape)) if isinstance(m, torch.Tensor) else m
                raise InputError(f"{name} must be a bool tensor of shape {shape}, got {got}")
        return TagConstraints(*(None if m is None else m.to(device) for m in (trans, start, end)))

    def expand(self, batch_shape, _instance=None) -> LinearChainCRF:
        batch_shape = torch.Size(batch_shape)
        T, C = self.emissions.shape[-2:]
        lengths = None if self.lengths is None else self.lengths.expand(batch_shape)
        return LinearChainCRF(
            self.emissions.expand(batch_shape + (T, C)),
            self.transitions,
            self.start,
            self.end,
            lengths=lengths,
            allowed=self.allowed,
            method=self.method,
            validate_args=False,
        )

    @property
    def num_tags(self) -> int:
        return self.emissions.shape[-1]

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.num_tags - 1), 1)

    # ---- scores in chain form ---------------------------------------------------------------

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Effective (transitions, start, end) with constraints applied as true -inf."""
        C = self.num_tags
        trans, start, end = self.transitions, self.start, self.end
        if start is None or end is None:
            zeros = self.emissions.new_zeros(C)
            start = zeros if start is None else start
            end = zeros if end is None else end
        if self.allowed is not None:
            a_trans, a_start, a_end = self.allowed
            if a_trans is not None:
                trans = trans.masked_fill(~a_trans, float("-inf"))
            if a_start is not None:
                start = start.masked_fill(~a_start, float("-inf"))
            if a_end is not None:
                end = end.masked_fill(~a_end, float("-inf"))
        return trans, start, end

    def _chain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(init (..., C), potentials (..., T-1, C, C), final (C,)) for :mod:`jointkl.chain`."""
        trans, start, end = self._scores()
        h = self.emissions
        init = start + h[..., 0, :]
        potentials = trans + h[..., 1:, None, :]  # emission of the tag moved into
        return init, potentials, end

    # ---- the distribution API ---------------------------------------------------------------

    @property
    def _chain_method(self) -> Method:
        """The method handed to :mod:`jointkl.chain` (which knows no ``"factored"``)."""
        return "auto" if self.method == "factored" else self.method

    def _factored(self, semiring: type[Semiring] = LogSemiring) -> bool:
        """Whether ``log Z`` (``LogSemiring``) or Viterbi (``MaxSemiring``) takes the
        CRF-specific recursions of :mod:`jointkl.factored_chain`."""
        if self.method != "auto":
            return self.method == "factored"
        if self.emissions.device.type != "cpu":
            return False  # on a GPU the generic recursion's fewer, larger steps are kept
        T, C = self.event_shape[0], self.num_tags
        b = self.batch_shape.numel()
        if semiring is MaxSemiring:
            return auto_method(b, T - 1, C, self.emissions.device, semiring) == "sequential"
        return T <= FACTORED_MAX_T or b * C**3 > FACTORED_SCAN_WORK

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Emissions ``(B, T, C)`` and lengths ``(B,)`` with the batch flattened."""
        T, C = self.emissions.shape[-2:]
        h = self.emissions.reshape(-1, T, C)
        lengths = None if self.lengths is None else self.lengths.reshape(-1)
        return h, lengths

    @property
    def log_partition(self) -> torch.Tensor:
        """``log Z``, shape ``batch_shape``; ``-inf`` when the constraints allow no path."""
        if self._factored():
            trans, start, end = self._scores()
            h, lengths = self._flat()
            log_z = factored_chain.log_partition(h, trans, start, end, lengths)
            # None: the scaled arithmetic could not be trusted (or no path is possible);
            # the log-space recursion below is exact there.
            if log_z is not None:
                return log_z.reshape(self.batch_shape)
        init, potentials, end = self._chain()
        return self._log_z(init, potentials, end)

    def _log_z(self, init, potentials, end) -> torch.Tensor:
        alpha = chain_contract(init, potentials, LogSemiring, self.lengths, self._chain_method)
        return LogSemiring.plus(alpha + end, dim=-1)

    def _validate_sample(self, value: torch.Tensor) -> None:
        if value.shape[-1:] != self.event_shape:
            raise InputError(
                f"tags must have shape (..., {self.event_shape[0]}), got {tuple(value.shape)}"
            )
        self._tags_shape(value)
        if value.dtype.is_floating_point and not torch.equal(value, value.round()):
            raise InputError("tags must be integer tag indices")
        if value.numel() > 0 and value.dtype != torch.bool:
            # Fast path, one reduction: every entry in range (padding included) needs no
            # mask (item(), not int(): a float tag may be inf).
            lo, hi = (v.item() for v in torch.aminmax(value))
            if lo >= 0 and hi < self.num_tags:
                return
        valid = self._valid_mask()
        bad = ((value < 0) | (value >= self.num_tags)) & valid
        if bad.any():
            raise InputError(f"tags must lie in 0..{self.num_tags - 1} at non-padding positions")

    def _tags_shape(self, tags: torch.Tensor) -> torch.Size:
        """``tags.shape`` broadcast with ``batch_shape + event_shape``."""
        try:
            return broadcast_shapes(tags.shape, self.batch_shape + self.event_shape)
        except RuntimeError as e:
            raise InputError(
                f"tags of shape {tuple(tags.shape)} do not broadcast with the batch and event "
                f"shape {tuple(self.batch_shape + self.event_shape)}"
            ) from e

    def _valid_mask(self) -> torch.Tensor:
        T = self.event_shape[0]
        pos = torch.arange(T, device=self.emissions.device)
        if self.lengths is None:
            return torch.ones(self.batch_shape + (T,), dtype=torch.bool, device=pos.device)
        return pos < self.lengths.unsqueeze(-1)

    def score(self, tags: torch.Tensor) -> torch.Tensor:
        """Unnormalised path score ``s(y)`` (``-inf`` for a forbidden path); shape
        ``tags.shape[:-1]`` broadcast with the batch shape. Padding tags are ignored."""
        trans, start, end = self._scores()
        valid = self._valid_mask()
        tags = tags.long()
        shape = self._tags_shape(tags)
        tags = tags.expand(shape)
        valid = valid.expand(shape)
        y = tags.masked_fill(~valid, 0)  # any in-range index; its terms are masked below
        h = self.emissions.expand(shape + (self.num_tags,))
        zero = h.new_zeros(())
        emit = torch.where(valid, h.gather(-1, y.unsqueeze(-1)).squeeze(-1), zero).sum(-1)
        # take() on the flattened (i, j) index: its backward is cheaper than 2-D indexing's.
        pairs = torch.take(trans, y[..., :-1] * self.num_tags + y[..., 1:])
        step = torch.where(valid[..., 1:], pairs, zero).sum(-1)
        if self.lengths is None:
            last = y[..., -1]
        else:
            idx = (self.lengths - 1).expand(shape[:-1]).unsqueeze(-1)
            last = y.gather(-1, idx).squeeze(-1)
        return start[y[..., 0]] + emit + step + end[last]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``s(y) - log Z``; ``-inf`` for paths the constraints forbid."""
        if self._validate_args:
            self._validate_sample(value)
        if value.shape == self.batch_shape + self.event_shape and self._factored():
            # One autograd node for s(y) - log Z (the path's indicators minus the marginals
            # as its gradient) instead of the path score's gathers and sums.
            trans, start, end = self._scores()
            h, lengths = self._flat()
            lp = factored_chain.log_likelihood(
                h, trans, start, end, lengths, value.reshape(h.shape[:2])
            )
            if lp is not None:
                return lp.reshape(self.batch_shape)
        s = self.score(value)
        log_z = self.log_partition
        # When no path is possible (log Z = -inf) every path has probability 0; avoid -inf - -inf.
        return torch.where(torch.isfinite(s), s - log_z, torch.full_like(s, float("-inf")))

    def viterbi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tags (..., T), score (...))``: the most probable path and its score ``s(y)``."""
        if self._factored(MaxSemiring):
            path = self._factored_viterbi()
            return path, self.score(path)
        init, potentials, end = self._chain()
        score, path = chain_viterbi(init, potentials, end, self.lengths, self._chain_method)
        return path, score

    def _factored_viterbi(self) -> torch.Tensor:
        trans, start, end = self._scores()
        h, lengths = self._flat()
        path = factored_chain.viterbi(h, trans, start, end, lengths)
        return path.reshape(self.batch_shape + self.event_shape)

    @property
    def mode(self) -> torch.Tensor:
        """The Viterbi path, ``(..., T)`` int64, padding positions 0."""
        return self._factored_viterbi() if self._factored(MaxSemiring) else self.viterbi()[0]

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most probable paths, best first: ``(tags (k, ..., T), scores (k, ...))``.

        Scores are the unnormalised ``s(y)``; subtract :attr:`log_partition` for log
        probabilities. If fewer than ``k`` paths are possible, the extra scores are ``-inf``.
        """
        init, potentials, end = self._chain()
        scores, paths = chain_kbest(init, potentials, k, end, self.lengths)
        return paths, scores

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Exact samples ``sample_shape + batch_shape + (T,)`` by forward filtering, backward
        sampling; padding positions are 0."""
        init, potentials, end = self._chain()
        return chain_sample(init, potentials, end, self.lengths, sample_shape, self._chain_method)

    def _marginals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """Marginals as gradients of log Z with respect to the chain's inputs.

        Returns (log Z, grad init (..., C), grad potentials (..., T-1, C, C), chain inputs).
        When the parameters require grad the graph is kept (``create_graph``) so marginals
        and the entropy are differentiable too.
        """
        with torch.enable_grad():
            init, potentials, end = self._chain()
            keep = init.requires_grad or potentials.requires_grad or end.requires_grad
            # Differentiate with respect to the chain inputs themselves: leaves when nothing
            # upstream needs grad, else the live (non-leaf) tensors, so marginals stay in the graph.
            if not init.requires_grad:
                init = init.detach().requires_grad_()
            if not potentials.requires_grad:
                potentials = potentials.detach().requires_grad_()
            # log Z may be -inf (no possible path): its gradient is 0, and so are the marginals.
            log_z = self._log_z(init, potentials, end)
            g_init, g_pot = torch.autograd.grad(
                log_z.sum(), (init, potentials), create_graph=keep, allow_unused=True
            )
        g_init = torch.zeros_like(init) if g_init is None else g_init
        g_pot = torch.zeros_like(potentials) if g_pot is None else g_pot
        if not keep:  # the leaves above were ours: hand back plain tensors
            log_z, init, potentials = log_z.detach(), init.detach(), potentials.detach()
        return log_z, g_init, g_pot, (init, potentials, end)

    @property
    def marginals(self) -> torch.Tensor:
        """Node marginals ``p(y_t = c)``, ``(..., T, C)``; zero at padding positions."""
        _, g_init, g_pot, _ = self._marginals()
        # Position t+1's marginal is the edge marginal summed over the previous tag.
        return torch.cat([g_init.unsqueeze(-2), g_pot.sum(-2)], dim=-2)

    @property
    def edge_marginals(self) -> torch.Tensor:
        """Edge marginals ``p(y_t = i, y_{t+1} = j)``, ``(..., T-1, C, C)``; zero past the end."""
        return self._marginals()[2]

    def entropy(self) -> torch.Tensor:
        """``H = log Z - E[s(y)]``, with ``E[s(y)]`` from the marginals (exact)."""
        log_z, g_init, g_pot, (init, potentials, end) = self._marginals()
        node_last = torch.cat([g_init.unsqueeze(-2), g_pot.sum(-2)], dim=-2)
        if self.lengths is None:
            last = node_last[..., -1, :]
        else:
            idx = (self.lengths - 1)[..., None, None].expand(*self.batch_shape, 1, self.num_tags)
            last = node_last.gather(-2, idx).squeeze(-2)
        expected = (
            _safe_dot(g_init, init, 1) + _safe_dot(g_pot, potentials, 3) + _safe_dot(last, end, 1)
        )
        h = log_z - expected
        return torch.where(torch.isfinite(log_z), h, torch.zeros_like(h))
