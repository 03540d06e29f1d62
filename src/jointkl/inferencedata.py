"""Fit -> ``arviz.InferenceData``, for any engine and any Pyro model.

``az.from_pyro`` covers only MCMC; this converter works from posterior draws of the latent
and global sites (whatever engine made them) and re-runs the model to get

* ``posterior``: the draws, ``(chain, draw, ...)``, and every ``pyro.deterministic`` site
  computed at each draw (as Pyro's ``Predictive`` and ``az.from_pyro`` keep them);
* ``log_likelihood``: pointwise over the ``"data"`` plate, with every enumerated discrete
  latent summed out exactly (tensor-variable elimination, ``pyro.ops.contract``), so
  ``az.loo``/``az.waic``/``az.compare`` see log p(x_i | θ) and not log p(x_i | z_i, θ).
  A model whose only latents are per-datum continuous ones (a VAE) and that comes with a
  guide gets an importance-sampled estimate of log p(x_i) instead (IWAE with ``iwae_k``
  guide draws per point, :func:`jointkl.bounds.iwae_per_datum`): log p(x_i) ≥ IWAE_k(x_i),
  with equality as k → ∞;
* ``posterior_predictive``: the observed sites re-sampled from the model given each draw
  (at most :data:`PREDICTIVE_ELEMENTS` values per variable: big models keep fewer draws);
* ``observed_data`` and ``sample_stats`` (the objective per step, dimension ``step``).

What the draws are is stated in the ``draws`` attribute of the ``posterior``,
``log_likelihood`` and ``sample_stats`` groups (:data:`DRAW_KINDS`):

* ``"markov_chain"``: a sampler's chains (R-hat and ESS as usual);
* ``"independent"``: independent draws from an approximation (Laplace, a variational
  guide), split into chains only so that R-hat and ESS are defined; ``method`` names it;
* ``"point_estimate"``: no posterior spread. The log-likelihood does not depend on a draw,
  so it is computed once; with no posterior group it is stored once, ``(chain 1, draw 1)``
  (``az.waic`` works, ``az.loo`` needs draws: there is nothing to leave out), and with one
  it is broadcast over the posterior's draws.

``log_likelihood.attrs["pointwise"]`` says what each value is: ``"marginal"`` (enumerated
latents summed out, nothing else latent per point), ``"iwae"`` (with ``iwae_k``) or
``"conditional"`` (per-datum continuous latents held at their draws: log p(x_i | z_i, θ)).

The model is re-run once per draw unless it runs vectorised: all draws of a chunk at once
under an extra plate left of the model's plates (as Pyro's ``Predictive(parallel=True)``).
Whether it may is checked on the first chunk against the one-draw-at-a-time run (the same
log-densities, the same deterministic values); a model that indexes its parameters in a
way a batch dimension breaks falls back to the loop. Dimensions are named from plates
(``data``, ``components``); event dimensions get ``<site>_dim_<k>``.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_factor, site_is_subsample

from jointkl.bernoulli_log_prob import fill_site_log_prob, independent_bernoulli_log_prob
from jointkl.device import data_device
from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE, in_data_plate, is_enumerated, max_plate_nesting, trace_model

__all__ = ["to_inference_data", "DRAW_KINDS", "DEFAULT_CHAINS", "DEFAULT_IWAE_K"]

DRAW_KINDS = ("markov_chain", "independent", "point_estimate")
DEFAULT_CHAINS = 4  # chains of independent draws: R-hat and ESS need at least 2
DEFAULT_IWAE_K = 64  # importance samples per point of the IWAE log-likelihood
# Values kept per posterior-predictive variable (draws x elements of one draw): a corpus-
# sized observed site keeps a few draws, not hundreds of copies of the corpus.
PREDICTIVE_ELEMENTS = 20_000_000
# Elements of one vectorised pass (draws x the largest tensor of a one-draw trace).
VECTOR_ELEMENTS = 2**24
_DRAWS = "_jointkl_draws"


def _site_dims(site: Mapping[str, Any], name: str) -> list[str]:
    """Dimension names for a site's value: plates for batch dims, ``name_dim_k`` otherwise."""
    value = site["value"]
    event_dim = site["fn"].event_dim if hasattr(site["fn"], "event_dim") else 0
    batch_rank = value.dim() - event_dim
    by_dim = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    dims = []
    for i in range(value.dim()):
        neg = i - batch_rank  # negative batch index for batch dims
        if i < batch_rank and neg in by_dim and value.shape[i] == by_dim_size(site, neg):
            dims.append(by_dim[neg])
        else:
            dims.append(f"{name}_dim_{i}")
    return dims


def by_dim_size(site: Mapping[str, Any], dim: int) -> int:
    for f in site["cond_indep_stack"]:
        if f.vectorized and f.dim == dim:
            return f.size
    return -1


def _joint_name(names: list[str]) -> str:
    """One variable name for observed sites that share enumerated latents: the common stem
    of ``obs_0 … obs_499`` (a ``pyro.markov`` chain) is ``obs``; unrelated names are joined
    with ``__`` when there are few of them."""
    if len(names) == 1:
        return names[0]
    stems = {re.sub(r"[_\[\]\d]+$", "", n) for n in names}
    if len(stems) == 1 and next(iter(stems)):
        return next(iter(stems))
    return "__".join(names) if len(names) <= 4 else "joint"


def _indexed_site_groups(
    names: list[str], dims: Mapping[str, list[str]]
) -> dict[str, tuple[list[str], int, list[str]]]:
    """Sites (observed, or drawn) named ``<stem>_0 … <stem>_{n-1}`` (n >= 2, same dims, none
    called ``<stem>``): {stem: (names in index order, axis of the new step dimension, the
    stem's dims)}. The step axis goes after the sites' plate dimensions."""
    groups: dict[str, dict[int, str]] = {}
    for n in names:
        m = re.fullmatch(r"(.+)_(\d+)", n)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = n
    out = {}
    for stem, by_index in groups.items():
        ordered = [by_index.get(i) for i in range(len(by_index))]
        if len(ordered) < 2 or None in ordered or stem in names:
            continue
        own = [d for d in dims[ordered[0]] if not d.startswith(f"{ordered[0]}_dim_")]
        if any(len(dims[n]) != len(dims[ordered[0]]) for n in ordered):
            continue
        axis = len(own)
        rest = len(dims[ordered[0]]) - axis
        stem_dims = [*own, f"{stem}_step", *(f"{stem}_dim_{axis + 1 + i}" for i in range(rest))]
        out[stem] = (ordered, axis, stem_dims)
    return out


def _model_sites(base) -> tuple[list[str], list[str]]:
    """(observed sites, deterministic sites) of a trace; plates' subsample sites are neither."""
    observed, determ = [], []
    for n, s in base.nodes.items():
        if s["type"] != "sample" or site_is_subsample(s):
            continue
        if s["infer"].get("_deterministic", False):
            determ.append(n)
        elif s["is_observed"]:
            observed.append(n)
    return observed, determ


def _at_draw(model, draw: Mapping[str, torch.Tensor], params: frozenset):
    """``model`` with posterior draws fixed: sample sites conditioned on them, and
    ``pyro.param`` sites (EM's Laplace draws of maximum-likelihood parameters) substituted,
    so each draw, not the point estimate, reaches the likelihood."""
    fixed = {k: v for k, v in draw.items() if k in params}
    cond = poutine.condition(model, data={k: v for k, v in draw.items() if k not in params})
    return poutine.substitute(cond, data=fixed) if fixed else cond


class _Layout:
    """Where draws sit in a vectorised pass: one plate (size B) left of the model's
    ``nesting`` plate dimensions; enumeration goes left of that."""

    def __init__(self, base, nesting: int, batch: int | None):
        self.base, self.nesting, self.batch = base, nesting, batch
        self.rank = nesting + 1 if batch is not None else nesting

    def values(self, draw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Draws ``(B, *shape)`` reshaped to broadcast against the plates: a site's batch
        dims keep their plate positions; a param's dims are taken as event dims."""
        if self.batch is None:
            return dict(draw)
        out = {}
        for k, v in draw.items():
            site = self.base.nodes.get(k)
            rank = 0
            if site is not None and site["type"] == "sample":
                rank = site["value"].dim() - getattr(site["fn"], "event_dim", 0)
            out[k] = v.reshape(v.shape[0], *(1,) * (self.nesting - rank), *v.shape[1:])
        return out

    def rows(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A pass's value of a site whose one-draw value has ``shape``, as ``(B, *shape)``
        (``(1, *shape)`` for a one-draw pass); raises ValueError where it cannot be."""
        if self.batch is None:
            return t.reshape(1, *shape)
        B, event = self.batch, len(shape)
        if t.dim() < event or tuple(t.shape[t.dim() - event :]) != tuple(shape):
            if tuple(t.shape) == tuple(shape):  # the value does not depend on the draw
                return t.unsqueeze(0).expand(B, *shape)
            raise ValueError(f"shape {tuple(t.shape)} does not end in {tuple(shape)}")
        lead = t.shape[: t.dim() - event]
        if lead.numel() == 1:  # the value does not depend on the draw
            return t.reshape(shape).unsqueeze(0).expand(B, *shape)
        # the draws plate is the pass's leftmost dimension; the rest of ``lead`` is the
        # singleton padding of a site with fewer batch dims than the model has plates
        if lead.numel() != B or lead[0] != B:
            raise ValueError(f"shape {tuple(t.shape)} has no draws dimension of size {B}")
        return t.reshape(B, *shape)

    def plate(self):
        if self.batch is None:
            return _NullContext()
        return pyro.plate(_DRAWS, self.batch, dim=-(self.nesting + 1))


def _fill_matrix_log_probs(tr, names) -> None:
    """Set the log-densities of the observed sites ``names`` that are vectors of independent
    Bernoullis by one matrix product (:mod:`jointkl.bernoulli_log_prob`) before Pyro's
    ``compute_log_prob`` would expand them over every draw, component and point; it then
    skips the sites that have one."""
    for n in names:
        fill_site_log_prob(tr.nodes[n], independent_bernoulli_log_prob)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pointwise_log_likelihood(
    model, args, kwargs, draw, observed, lay: _Layout, params, trace=None
):
    """{var name: (B, n_points...)} for the draws of one pass (B = 1 without a batch).
    ``trace``: a trace of the model that is that pass already (a model with nothing latent,
    traced once: the one run it needs), used instead of running the model again."""
    B = lay.batch or 1
    if trace is not None:
        tr = trace
    else:
        cond = _at_draw(model, lay.values(draw), params)
        enum = poutine.enum(cond, first_available_dim=-lay.rank - 1)
        with torch.no_grad(), lay.plate():
            tr = poutine.trace(enum).get_trace(*args, **kwargs)
    _fill_matrix_log_probs(tr, observed)
    tr.compute_log_prob()
    tr.pack_tensors()
    size, data_dim = None, None
    for s in tr.nodes.values():
        if s["type"] == "sample":
            for f in s["cond_indep_stack"]:
                if f.name == DATA_PLATE:
                    size, data_dim = f.size, f.dim

    def per_row(t: torch.Tensor, keep_data: bool) -> torch.Tensor:
        """A log-density batched over (draws, data) -> (B, N) or (B, *rest)."""
        t = t.reshape((1,) * (lay.rank - t.dim()) + tuple(t.shape))
        if not keep_data:
            return t.expand(B, *t.shape[1:]) if lay.batch else t.unsqueeze(0)
        target = [1] * lay.rank
        if lay.batch:
            target[0] = B
        target[lay.rank + data_dim] = size
        t = t.expand(target).movedim(lay.rank + data_dim, -1)
        return t.reshape(B, size)

    if DATA_PLATE not in tr.plate_to_symbol:
        # No data plate: each observed site's elementwise log-density is the pointwise one.
        out = {}
        for n in observed:
            lp = tr.nodes[n]["log_prob"]
            shape = tuple(lp.shape[lay.rank - lay.nesting :]) if lay.batch else tuple(lp.shape)
            out[n] = lay.rows(lp, shape) if lay.batch else lp.unsqueeze(0)
        return out
    data_sym = tr.plate_to_symbol[DATA_PLATE]
    target = {data_sym}
    if lay.batch is not None:
        target.add(tr.plate_to_symbol[_DRAWS])
    target = frozenset(target)

    def ordinal(site):
        return frozenset(
            tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )

    enum_sites = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and s["infer"].get("_enumerate_dim") is not None
    ]
    sum_dims = set()
    for n in enum_sites:
        sum_dims.update(tr.nodes[n]["packed"]["log_prob"]._pyro_dims)
    sum_dims -= set(tr.plate_to_symbol.values())

    def contract(names):
        tree = OrderedDict()
        for n in names:
            s = tr.nodes[n]
            tree.setdefault(ordinal(s), []).append(s["packed"]["unscaled_log_prob"])
        t = contract_to_tensor(tree, set(sum_dims), target_ordinal=target)
        return per_row(packed.unpack(t, tr.symbol_to_dim), True)

    in_data = [n for n in observed if data_sym in ordinal(tr.nodes[n])]
    out = {}
    if enum_sites:
        # Observed sites that share enumerated latents are one joint variable per data point.
        local_enum = [n for n in enum_sites if data_sym in ordinal(tr.nodes[n])]
        if len(local_enum) != len(enum_sites):
            raise InputError(
                "pointwise log-likelihood needs every enumerated site inside the 'data' plate; "
                f"global enumerated sites: {sorted(set(enum_sites) - set(local_enum))}"
            )
        out[_joint_name(in_data)] = contract(in_data + local_enum)
    else:
        for n in in_data:
            out[n] = contract([n])
    for n in observed:
        if n not in in_data:
            out[n] = per_row(tr.nodes[n]["log_prob"], False)
    return out


def _predictive(model, args, kwargs, draw, names, lay: _Layout, params):
    """({site: (B, *shape)} of ``names`` re-sampled / computed at the draws of one pass,
    {site: (B,)} their log-densities, for the loop check)."""
    with torch.no_grad(), lay.plate():
        tr = poutine.trace(_at_draw(poutine.uncondition(model), lay.values(draw), params))
        tr = tr.get_trace(*args, **kwargs)
    values = {
        n: lay.rows(tr.nodes[n]["value"], tuple(lay.base.nodes[n]["value"].shape)) for n in names
    }
    sampled = {
        n: (s["value"], getattr(s["fn"], "event_dim", 0))
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s) and n not in draw
    }
    return values, sampled


def _log_density_rows(model, args, kwargs, draw, sampled, names, lay: _Layout, params):
    """Sum of the log-densities of ``names`` per draw, with every other sample site fixed at
    ``sampled``: (B,). Used to check a vectorised predictive pass against the loop."""
    m = poutine.condition(_at_draw(model, lay.values(draw), params), data=sampled)
    with torch.no_grad(), lay.plate():
        tr = poutine.trace(m).get_trace(*args, **kwargs)
    B = lay.batch or 1
    total = torch.zeros(B, dtype=torch.float64, device=data_device(args, kwargs))
    for n in names:
        site = tr.nodes[n]
        lp = independent_bernoulli_log_prob(site["fn"], site["value"])
        lp = site["fn"].log_prob(site["value"]) if lp is None else lp
        lp = lp.reshape((1,) * (lay.rank - lp.dim()) + tuple(lp.shape)) if lay.batch else lp
        if lay.batch:
            lp = lp.expand(B, *lp.shape[1:]).reshape(B, -1)
        else:
            lp = lp.reshape(1, -1)
        total = total + lp.sum(-1).double()
    return total


def _take(draws: Mapping[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in draws.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item())))


class _Passes:
    """The draws of the converter, run through the model in vectorised chunks where a
    check on the first chunk allows it, else one draw at a time."""

    def __init__(self, model, args, kwargs, base, nesting, params, progress: bool):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.base, self.nesting, self.params = base, nesting, params
        self.progress = progress
        self.vectorised: bool | None = None

    def _chunk(self, flat, total: int) -> int:
        """Draws per vectorised pass: the largest tensor of a one-draw trace bounds it."""
        with torch.no_grad():
            tr = poutine.trace(
                poutine.enum(
                    _at_draw(self.model, _take(flat, 0), self.params),
                    first_available_dim=-self.nesting - 1,
                )
            ).get_trace(*self.args, **self.kwargs)
        tr.compute_log_prob()
        big = max(
            (
                max(s["value"].numel(), s["log_prob"].numel() if "log_prob" in s else 0)
                for s in tr.nodes.values()
                if s["type"] == "sample"
            ),
            default=1,
        )
        return max(1, min(total, VECTOR_ELEMENTS // max(big, 1)))

    def run(self, flat, total: int, fn: Callable, check: Callable) -> list:
        """``fn(draw, layout)`` over all draws; returns its outputs in order (one per pass).
        ``check(vectorised_out, [loop outs], rows)`` says whether a vectorised pass agrees."""
        from tqdm.auto import tqdm

        one = _Layout(self.base, self.nesting, None)
        outs = []
        if self.vectorised is not False and total > 1:
            chunk = self._chunk(flat, total)
            try:
                first = range(0, chunk)
                lay = _Layout(self.base, self.nesting, chunk)
                out = fn(_take(flat, slice(0, chunk)), lay)
                rows = sorted({0, chunk - 1})
                loop = [fn(_take(flat, r), one) for r in rows]
                ok = check(out, loop, rows)
            except (ValueError, RuntimeError, IndexError, TypeError, NotImplementedError):
                ok = False
            self.vectorised = ok
            if ok:
                outs.append(out)
                bar = tqdm(total=total, desc="to_arviz", disable=not self.progress, leave=False)
                bar.update(len(first))
                for start in range(chunk, total, chunk):
                    stop = min(total, start + chunk)
                    lay = _Layout(self.base, self.nesting, stop - start)
                    outs.append(fn(_take(flat, slice(start, stop)), lay))
                    bar.update(stop - start)
                bar.close()
                return outs
        for i in tqdm(range(total), desc="to_arviz", disable=not self.progress, leave=False):
            outs.append(fn(_take(flat, i), one))
        return outs


def _cat(outs: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The values in the tensor's own dtype: the model's precision is the precision the
    draws and log-densities have (float32 draws widened to float64 only doubled the file:
    a VAE's 4 x 1,000 draws of 1,437 x 8 latents are 184 MB, not 368). Half precisions,
    which netCDF cannot hold (bfloat16 is not even a numpy type), become float32."""
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy()


def _iwae_log_likelihood(model, guide, args, kwargs, observed, k: int, seed: int):
    """{joint observed name: (N,)}: IWAE_k(x_i), an estimate of log p(x_i) from below."""
    from jointkl.bounds import iwae_per_datum

    with torch.no_grad():
        ll = iwae_per_datum(model, guide, *args, k=k, chunk_size=min(k, 16), seed=seed, **kwargs)
    return {_joint_name(observed): ll}


def to_inference_data(
    model,
    args: tuple,
    kwargs: Mapping[str, Any],
    draws: Mapping[str, torch.Tensor],
    *,
    history: list[float] | tuple = (),
    objective: str = "loss",
    log_density_offset: float = 0.0,
    draws_kind: str = "markov_chain",
    method: str = "",
    guide=None,
    iwae_k: int = DEFAULT_IWAE_K,
    seed: int = 0,
    num_predictive: int = 100,
    progress: bool = False,
    sample_stats: Mapping[str, torch.Tensor] | None = None,
):
    """Build the InferenceData of ``model`` on its data (see the module docstring).

    :param draws: posterior draws of the latent and global sites, each ``(chain, draw,
        *site_shape)``, from whatever engine made them (``Engine.posterior_draws``); empty
        for a model with no latents.
    :param history: the objective per step, for ``sample_stats``; ``objective`` names it.
    :param log_density_offset: a constant added to every pointwise log-likelihood (e.g.
        −log Z, when the model's density is known up to an estimated normaliser).
    :param draws_kind: one of :data:`DRAW_KINDS` (``"point_estimate"`` when ``draws`` is
        empty); ``method`` names the approximation (``"laplace"``, ``"variational"`` ...).
    :param guide: the fitted guide, when the engine has one: with it, a model whose latents
        are all per-datum continuous sites gets the IWAE log-likelihood with ``iwae_k``
        importance samples per point (seeded by ``seed``).
    :param num_predictive: posterior-predictive draws of a point estimate (no posterior
        draws to follow).
    :param progress: show a progress bar over the draws.
    :param sample_stats: per-draw sampler statistics ``(chain, draw)`` by ArviZ name (an
        MCMC engine's ``diverging``, ``tree_depth``, ...), put in ``sample_stats`` beside
        the objective's history.
    """
    import arviz as az

    if draws_kind not in DRAW_KINDS:
        raise InputError(f"draws_kind must be one of {DRAW_KINDS}, got {draws_kind!r}")
    base = trace_model(model, args, kwargs)
    observed, determ = _model_sites(base)
    # Only the model's own latent sites and params are posterior variables (a guide's plate
    # indices, say, are not).
    draws = {
        k: v
        for k, v in draws.items()
        if k in base.nodes
        and not site_is_subsample(base.nodes[k])
        and not base.nodes[k]["infer"].get("_deterministic", False)
    }
    if not draws:
        draws_kind = "point_estimate"
    chains, ndraw = next(iter(draws.values())).shape[:2] if draws else (1, 1)
    total = chains * ndraw
    flat = {k: v.reshape(total, *v.shape[2:]) for k, v in draws.items()}
    nesting = max_plate_nesting(base)
    params = frozenset(n for n, s in base.nodes.items() if s["type"] == "param")
    passes = _Passes(model, args, kwargs, base, nesting, params, progress)
    attrs = {"draws": draws_kind}
    if method:
        attrs["method"] = method

    dims: dict[str, list[str]] = {}
    for n, s in base.nodes.items():
        if s["type"] == "sample" and (n in draws or n in observed or n in determ):
            dims[n] = _site_dims(s, n)

    # ---- log-likelihood
    ll_attrs = dict(attrs)
    ll: dict[str, np.ndarray] = {}
    if observed:
        latent = [n for n in draws if base.nodes[n]["type"] == "sample"]
        local = [
            n for n in latent if in_data_plate(base.nodes[n]) and not is_enumerated(base.nodes[n])
        ]
        if guide is not None and local and len(local) == len(draws):
            once = _iwae_log_likelihood(model, guide, args, kwargs, observed, iwae_k, seed)
            ll_attrs.update(pointwise="iwae", iwae_k=iwae_k)
            ll_constant = True
        elif draws_kind == "point_estimate":
            one = _Layout(base, nesting, None)
            first = _take(flat, 0) if draws else {}
            # Nothing latent (every sample site observed, deterministic or a plate's
            # subsample): the model's one trace, ``base``, is the pass; a second run of it
            # would only repeat the work (a tagger's network over its whole corpus).
            latent_free = not draws and all(
                s["is_observed"] or site_is_subsample(s) or s["infer"].get("_deterministic")
                for s in base.nodes.values()
                if s["type"] == "sample"
            )
            once = {
                k: v[0]
                for k, v in _pointwise_log_likelihood(
                    model,
                    args,
                    kwargs,
                    first,
                    observed,
                    one,
                    params,
                    trace=base if latent_free else None,
                ).items()
            }
            ll_attrs["pointwise"] = "conditional" if local else "marginal"
            ll_constant = True
        else:
            ll_attrs["pointwise"] = "conditional" if local else "marginal"
            ll_constant = False

        if ll_constant:
            ll_attrs["constant_over_draws"] = 1
            for k, v in once.items():
                arr = _numpy(v)[None, None]
                ll[k] = np.broadcast_to(arr, (chains, ndraw, *arr.shape[2:])) if draws else arr
        else:

            def ll_fn(d, lay):
                return _pointwise_log_likelihood(model, args, kwargs, d, observed, lay, params)

            def ll_check(out, loop, rows):
                return all(
                    _close(out[k][r], lo[k][0])
                    for r, lo in zip(rows, loop, strict=True)
                    for k in lo
                )

            # Draws of enumerated sites (a sampler's assignments) are not conditioned on:
            # the pointwise log-likelihood sums them out, as its "marginal" label says.
            ll_flat = {k: v for k, v in flat.items() if not is_enumerated(base.nodes[k])}
            rows = _cat(passes.run(ll_flat, total, ll_fn, ll_check))
            ll = {k: _numpy(v).reshape(chains, ndraw, *v.shape[1:]) for k, v in rows.items()}
        if log_density_offset:
            ll = {k: v + log_density_offset for k, v in ll.items()}
        for k, v in ll.items():
            if k not in dims:
                dims[k] = (
                    [DATA_PLATE] if v.ndim == 3 else [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
                )

    # ---- posterior predictive and deterministic sites
    valued = [n for n in observed if not site_is_factor(base.nodes[n])]
    names = valued + determ
    predictive, det = {}, {}
    if names:
        if draws:
            p_chains, p_draws, p_flat = chains, ndraw, flat
        else:
            p_chains, p_draws = 1, max(1, num_predictive)
            p_flat = {}
        keep = p_draws
        biggest = max((base.nodes[n]["value"].numel() for n in valued), default=1)
        if biggest * p_chains * keep > PREDICTIVE_ELEMENTS:
            keep = max(1, PREDICTIVE_ELEMENTS // (biggest * p_chains))
        if keep < p_draws and not determ:
            # Only ``keep`` draws a chain are stored: the rest are not re-sampled at all
            # (a VAE's 1,437 × 64 pixels a draw made this most of its conversion time).
            # Deterministic sites belong to the posterior: with any, every draw runs.
            p_draws = keep
            if p_flat:
                p_flat = {
                    k: v[:, :keep].reshape(chains * keep, *v.shape[2:]) for k, v in draws.items()
                }
        p_total = p_chains * p_draws

        def pp_fn(d, lay):
            return _predictive(model, args, kwargs, d, names, lay, params)

        def pp_check(out, loop, rows):
            values, sampled = out
            if not all(
                _close(values[n][r], lo[0][n][0])
                for r, lo in zip(rows, loop, strict=True)
                for n in determ
            ):
                return False
            lay = _Layout(base, nesting, values[names[0]].shape[0])
            one = _Layout(base, nesting, None)
            # The batched scoring runs on the checked rows only (a sub-batch of the chunk's
            # draws and values): scoring every draw of the chunk was most of a Bernoulli
            # mixture's conversion, for rows the check never reads.
            pick = torch.tensor(rows)
            sub = _Layout(base, nesting, len(rows))
            d = _take(p_flat, pick) if p_flat else {}
            fixed = {n: _rows_at(v, ev, pick, lay) for n, (v, ev) in sampled.items()}
            vec = _log_density_rows(model, args, kwargs, d, fixed, valued, sub, params)
            for j, r in enumerate(rows):
                single = {n: _row_of(v, ev, r, lay) for n, (v, ev) in sampled.items()}
                dr = _take(p_flat, r) if p_flat else {}
                lo = _log_density_rows(model, args, kwargs, dr, single, valued, one, params)
                if not _close(vec[j], lo[0]):
                    return False
            return True

        alone = [
            n for n, s in base.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
        ]
        if not p_flat and not determ and alone == valued == [valued[0]]:
            # No latent, no deterministic site, one observed site: its distribution given
            # the fitted params is the whole predictive, so its p_total draws come from one
            # ``sample((p_total,))`` of the traced site (the model ran once, in ``base``),
            # not from p_total runs of the model on the data (a CRF tagger's network over
            # the corpus, 100 times).
            # One draw at a time: a CRF's sampler holds working tensors per draw far larger
            # than its draw (9 draws at once over a 16,804-row corpus: +3.5 GB).
            with torch.no_grad():
                n = valued[0]
                fn = base.nodes[n]["fn"]
                outs = [({n: torch.stack([fn.sample() for _ in range(p_total)])}, {})]
        elif p_flat:
            outs = passes.run(p_flat, p_total, pp_fn, pp_check)
        else:
            # a point estimate: nothing to condition on, the draws only re-sample
            outs = _Passes(model, args, kwargs, base, nesting, params, progress).run(
                {"_": torch.zeros(p_total)}, p_total, lambda d, lay: pp_fn({}, lay), pp_check
            )
        values = _cat([o[0] for o in outs])
        for n in determ:
            det[n] = _numpy(values[n]).reshape(p_chains, p_draws, *values[n].shape[1:])
        keep = min(keep, p_draws)
        for n in valued:
            v = values[n].reshape(p_chains, p_draws, *values[n].shape[1:])[:, :keep]
            # the model's own dtype (float32 for most): doubling it would add nothing but
            # bytes to write (a VAE's predictive pixels are most of its netCDF file)
            predictive[n] = v.detach().cpu().numpy()

    posterior = {k: _numpy(v) for k, v in draws.items()}
    posterior.update(det)
    observed_data = {n: _numpy(base.nodes[n]["value"]) for n in valued}
    for stem, (group, axis, stem_dims) in _indexed_site_groups(valued, dims).items():
        # obs_0 … obs_{T-1} of a pyro.markov chain become one variable ``obs`` with a step
        # dimension, as the data were before the model split them per step.
        observed_data[stem] = np.stack([observed_data.pop(n) for n in group], axis=axis)
        predictive[stem] = np.stack([predictive.pop(n) for n in group], axis=axis + 2)
        for n in group:
            dims.pop(n)
        dims[stem] = stem_dims
    drawn = [n for n in posterior if n in dims]
    for stem, (group, axis, stem_dims) in _indexed_site_groups(drawn, dims).items():
        # state_0 … state_{T-1} drawn along a pyro.markov chain (a sampler's discrete
        # draws): one variable ``state`` (chain, draw, data, state_step) likewise
        posterior[stem] = np.stack([posterior.pop(n) for n in group], axis=axis + 2)
        for n in group:
            dims.pop(n)
        dims[stem] = stem_dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(
            posterior=posterior or None,
            posterior_predictive=predictive or None,
            log_likelihood=ll or None,
            observed_data=observed_data or None,
            dims=dims,
        )
    if "posterior" in idata.groups():
        idata.posterior.attrs.update(attrs)
    if "log_likelihood" in idata.groups():
        idata.log_likelihood.attrs.update(ll_attrs)
    _add_history(idata, history, objective, attrs)
    _add_sample_stats(idata, sample_stats)
    return idata


def _row_of(v: torch.Tensor, event_dim: int, r: int, lay: _Layout) -> torch.Tensor:
    """Row ``r`` of a vectorised pass's sampled value (its draws dimension dropped): the
    draws dimension is batch dimension -(nesting + 1) when the value has that many."""
    batch = v.dim() - event_dim
    if batch < lay.nesting + 1:
        return v  # does not depend on the draw
    idx = batch - lay.nesting - 1
    return v.squeeze(idx) if v.shape[idx] == 1 else v.select(idx, r)


def _rows_at(v: torch.Tensor, event_dim: int, pick: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Rows ``pick`` of a vectorised pass's sampled value, its draws dimension kept (a
    sub-batch of the pass); a value that does not depend on the draw is returned as is."""
    batch = v.dim() - event_dim
    if batch < lay.nesting + 1:
        return v
    idx = batch - lay.nesting - 1
    return v if v.shape[idx] == 1 else v.index_select(idx, pick)


def _add_sample_stats(idata, stats: Mapping[str, torch.Tensor] | None) -> None:
    """Add (chain, draw) statistics to the ``sample_stats`` group (made if absent)."""
    import xarray as xr

    if not stats:
        return
    data = {}
    for k, v in stats.items():
        a = v.detach().cpu().numpy()
        data[k] = (("chain", "draw"), a)
    chains, ndraw = next(iter(data.values()))[1].shape
    coords = {"chain": np.arange(chains), "draw": np.arange(ndraw)}
    group = xr.Dataset(data, coords=coords)
    if "sample_stats" in idata.groups():
        idata.sample_stats = xr.merge([idata.sample_stats, group])
    else:
        idata.add_groups(sample_stats=group)


def _add_history(idata, history, objective: str, attrs: Mapping[str, Any] | None = None) -> None:
    import xarray as xr

    if len(history):
        stats = xr.Dataset({objective: (("step",), np.asarray(history, dtype=float))})
        stats.attrs.update(attrs or {})
        idata.add_groups(sample_stats=stats)
