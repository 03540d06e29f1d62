"""Fit -> ``arviz.InferenceData``, for any engine and any Pyro model.

``az.from_pyro`` covers only MCMC; this converter works from posterior draws of the latent
and global sites (whatever engine made them) and re-runs the model to get

* ``log_likelihood``: pointwise over the ``"data"`` plate, with every enumerated discrete
  latent summed out exactly (tensor-variable elimination, ``pyro.ops.contract``), so
  ``az.loo``/``az.waic``/``az.compare`` see log p(x_i | θ) and not log p(x_i | z_i, θ);
* ``posterior_predictive``: the observed sites re-sampled from the model given each draw;
* ``observed_data`` and ``sample_stats`` (the objective per step, dimension ``step``).

Dimensions are named from plates (``data``, ``components``); event dimensions get
``<site>_dim_<k>``.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_factor

from jointkl.errors import InputError
from jointkl.sites import DATA_PLATE, max_plate_nesting, trace_model

__all__ = ["to_inference_data"]


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


def _at_draw(model, draw: Mapping[str, torch.Tensor], params: frozenset):
    """``model`` with one posterior draw fixed: sample sites conditioned on it, and
    ``pyro.param`` sites (EM's Laplace draws of maximum-likelihood parameters) substituted,
    so each draw, not the point estimate, reaches the likelihood."""
    fixed = {k: v for k, v in draw.items() if k in params}
    cond = poutine.condition(model, data={k: v for k, v in draw.items() if k not in params})
    return poutine.substitute(cond, data=fixed) if fixed else cond


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


def _pointwise_log_likelihood(model, args, kwargs, draw, observed, nesting, params=frozenset()):
    """{var name: tensor of shape (n_points...)} for one posterior draw."""
    cond = _at_draw(model, draw, params)
    enum = poutine.enum(cond, first_available_dim=-nesting - 1)
    with torch.no_grad():
        tr = poutine.trace(enum).get_trace(*args, **kwargs)
    tr.compute_log_prob()
    tr.pack_tensors()
    if DATA_PLATE not in tr.plate_to_symbol:
        # No data plate: each observed site's elementwise log-density is the pointwise one.
        return {n: tr.nodes[n]["log_prob"] for n in observed}
    data_sym = tr.plate_to_symbol[DATA_PLATE]
    target = frozenset({data_sym})

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
        t = packed.unpack(t, tr.symbol_to_dim)
        size = next(
            f.size
            for s in tr.nodes.values()
            if s["type"] == "sample"
            for f in s["cond_indep_stack"]
            if f.name == DATA_PLATE
        )
        # t broadcasts against the data plate: size 1 everywhere but (maybe) the data dim.
        return t.reshape(-1).expand(size) if t.numel() == 1 else t.reshape(size)

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
            out[n] = tr.nodes[n]["log_prob"]
    return out


def _indexed_site_groups(
    names: list[str], dims: Mapping[str, list[str]]
) -> dict[str, tuple[list[str], int, list[str]]]:
    """Observed sites named ``<stem>_0 … <stem>_{n-1}`` (n >= 2, same dims, no site called
    ``<stem>``): {stem: (names in index order, axis of the new step dimension, the stem's
    dims)}. The step axis goes after the sites' plate dimensions."""
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


def _stack(rows: list[Mapping[str, torch.Tensor]], chains: int) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        t = torch.stack(
            [
                r[k].detach().to("cpu", torch.float64)
                if r[k].dtype.is_floating_point
                else r[k].detach().cpu()
                for r in rows
            ]
        )
        out[k] = t.reshape(chains, -1, *t.shape[1:]).numpy()
    return out


def to_inference_data(
    model,
    args: tuple,
    kwargs: Mapping[str, Any],
    draws: Mapping[str, torch.Tensor],
    *,
    history: list[float] | tuple = (),
    objective: str = "loss",
    log_density_offset: float = 0.0,
    num_samples: int = 500,
    sample_stats: Mapping[str, torch.Tensor] | None = None,
):
    """Build the InferenceData of ``model`` on its data (see the module docstring).

    :param draws: posterior draws of the latent and global sites, each ``(chain, draw,
        *site_shape)``, from whatever engine made them (``Engine.posterior_draws``).
    :param history: the objective per step, for ``sample_stats``; ``objective`` names it.
    :param log_density_offset: a constant added to every pointwise log-likelihood (e.g.
        −log Z, when the model's density is known up to an estimated normaliser).
    :param num_samples: draws per chain when ``draws`` is empty (a model with no latents).
    :param sample_stats: per-draw sampler statistics ``(chain, draw)`` by ArviZ name (an
        MCMC engine's ``diverging``, ``tree_depth``, ...), put in ``sample_stats`` beside
        the objective's history.
    """
    import arviz as az

    base = trace_model(model, args, kwargs)
    observed = [n for n, s in base.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        # An objective-only model (e.g. InfoMax): no likelihood to compare with data, so only
        # the posterior draws (if any) and the objective trace.
        idata = _without_observations(draws, history, objective)
        _add_sample_stats(idata, sample_stats)
        return idata
    nesting = max_plate_nesting(base)
    chains, ndraw = next(iter(draws.values())).shape[:2] if draws else (1, num_samples)

    flat = [{k: v[c, d] for k, v in draws.items()} for c in range(chains) for d in range(ndraw)]
    # pyro.factor sites are observed but carry no value: no predictive draws, no data.
    valued = [n for n in observed if not site_is_factor(base.nodes[n])]
    ll_rows, pp_rows = [], []
    uncond = poutine.uncondition(model)
    params = frozenset(n for n, s in base.nodes.items() if s["type"] == "param")
    for draw in flat:
        ll_rows.append(
            _pointwise_log_likelihood(model, args, kwargs, draw, observed, nesting, params)
        )
        with torch.no_grad():
            tr = poutine.trace(_at_draw(uncond, draw, params)).get_trace(*args, **kwargs)
        pp_rows.append({n: tr.nodes[n]["value"] for n in valued})

    dims: dict[str, list[str]] = {}
    for n, s in base.nodes.items():
        if s["type"] == "sample" and (n in draws or n in observed):
            dims[n] = _site_dims(s, n)
    ll = _stack(ll_rows, chains)
    if log_density_offset:
        ll = {k: v + log_density_offset for k, v in ll.items()}
    for k, v in ll.items():
        if k not in dims:
            dims[k] = [DATA_PLATE] if v.ndim == 3 else [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
    posterior = {
        k: v.detach().cpu().double().numpy()
        if v.dtype.is_floating_point
        else v.detach().cpu().numpy()
        for k, v in draws.items()
    }
    observed_data = {n: base.nodes[n]["value"].detach().cpu().numpy() for n in valued}
    predictive = _stack(pp_rows, chains) if valued else {}
    for stem, (names, axis, stem_dims) in _indexed_site_groups(valued, dims).items():
        # obs_0 … obs_{T-1} of a pyro.markov chain become one variable ``obs`` with a step
        # dimension, as the data were before the model split them per step.
        observed_data[stem] = np.stack([observed_data.pop(n) for n in names], axis=axis)
        predictive[stem] = np.stack([predictive.pop(n) for n in names], axis=axis + 2)
        for n in names:
            dims.pop(n)
        dims[stem] = stem_dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_dict(
            posterior=posterior or None,
            posterior_predictive=predictive or None,
            log_likelihood=ll,
            observed_data=observed_data or None,
            dims=dims,
        )
    _add_history(idata, history, objective)
    _add_sample_stats(idata, sample_stats)
    return idata


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


def _add_history(idata, history, objective: str) -> None:
    import xarray as xr

    if len(history):
        stats = xr.Dataset({objective: (("step",), np.asarray(history, dtype=float))})
        idata.add_groups(sample_stats=stats)


def _without_observations(draws: Mapping[str, torch.Tensor], history, objective: str):
    import arviz as az

    posterior = {
        k: v.detach().cpu().double().numpy()
        if v.dtype.is_floating_point
        else v.detach().cpu().numpy()
        for k, v in draws.items()
    }
    idata = az.from_dict(posterior=posterior) if posterior else az.InferenceData()
    _add_history(idata, history, objective)
    return idata
