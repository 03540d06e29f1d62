"""The single-sample ELBO for fully reparameterised guides, without the general machinery.

For a guide whose every latent site has ``rsample`` and a model that enumerates nothing,
Pyro's ``Trace_ELBO`` reduces to the pathwise estimator

    −ELBO = −Σ_observed s·log p(x | z) − Σ_latent s·[log p(z) − log q(z | x)],  z ~ q(z | x),

(s the site's scale, e.g. the mini-batch's N/B; masks applied), and ``TraceMeanField_ELBO``
replaces each latent term by −s·KL(q ‖ p) where the KL has a closed form. The general
classes also compute what this case never uses — log-densities of every site up front,
score-function parts and their entropy terms, a pruned copy of each trace, per-site shape and
NaN checks — which on the digits VAE cost about 1.5 ms of a 10 ms step (see
scripts/bench/svi_overhead.py). :class:`ReparamELBO` computes only the sum above, from the
same two traces (guide, then the model replayed against it), so with the same seed it draws
the same z and returns the same value as the Pyro class it stands in for.

The first call goes to the general Pyro ELBO, whose validation (model/guide site matching,
log-prob shapes against the plates) catches structural mistakes once; the engine's own check
of the loss and gradients catches NaNs at every step. When a step's traces fall outside the
reparameterised case (a non-reparameterisable guide site, or a latent site the
guide does not sample under the analytic-KL estimator) that step is redrawn from the same
random state by the general ELBO, and so is every later one: the estimator never silently
loses a score-function term, and a resumed run reproduces the numbers of an unbroken one.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn.module import _is_module_local_param_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from jointkl.minibatch import ScaleDataPlate
from jointkl.sites import DATA_PLATE

from .traced_elbo import TracedELBO, site_signature

__all__ = ["ReparamELBO"]


class _SitePass(Messenger):
    """``poutine.trace`` (sample sites only), ``poutine.replay`` and a param capture, as one
    handler: every message of the model and guide passes through each handler on the stack,
    and on a small network those visits cost as much as the arithmetic.

    It keeps the sample messages themselves (Pyro makes a new one per call) by name, the
    unconstrained params by name, and, given ``replay`` (the guide's sites), gives each
    latent site of the model the guide's value. Anything outside the plain case (a repeated
    site name, a model latent the guide observed) sets :attr:`invalid`, and the step is
    redone by Pyro's own classes, whose messages say what is wrong.
    """

    def __init__(self, replay: dict | None = None):
        super().__init__()
        self.replay = replay
        self.sites: dict[str, Any] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.invalid = False

    def _pyro_sample(self, msg) -> None:
        if self.replay is None or msg["is_observed"]:
            return
        g = self.replay.get(msg["name"])
        if g is not None:
            if g["is_observed"]:
                self.invalid = True
            msg["value"] = g["value"]
            msg["infer"] = g["infer"]
            msg["done"] = True

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            return
        if msg["name"] in self.sites:
            self.invalid = True
        self.sites[msg["name"]] = msg

    def _pyro_post_param(self, msg) -> None:
        self.params[msg["name"]] = msg["value"].unconstrained()


class _AutoNormalSites:
    """An :class:`~pyro.infer.autoguide.AutoNormal` guide's step without its call through
    Pyro: the same draws, values, log-densities and gradients, read straight from the param
    store.

    Each call of AutoNormal re-creates its plates, fetches every loc and scale through a
    ``pyro.param`` message (a PyroModule attribute look-up, the handler stack), builds the
    transform to the site's support and two distribution objects per latent, all with the
    same result every step: the guide's structure is its prototype trace, fixed once built.
    This computes, per latent site in the prototype's order, what AutoNormal's ``forward``
    does,

        u = loc + ε·scale,  ε ~ N(0, I)        (site ``<name>_unconstrained``, auxiliary)
        z = T(u),  log-density log|det ∂T⁻¹/∂z|   (site ``<name>``, a Delta at z)

    with T = ``biject_to(support)``, loc and scale the constrained params (``store[name]``,
    exactly what ``pyro.param`` returns), so the torch RNG is consumed in the same order. It
    returns the sites in the format of :class:`_SitePass`, so the ELBO is summed by the same
    code. :meth:`plan` builds one only for a guide it can reproduce: AutoNormal's own
    ``forward`` and ``_get_loc_and_scale``, no ``create_plates``, no subsampled plate, and
    each loc and scale already in the param store; :meth:`applies` re-checks per step that no
    outer handler would have seen the guide's messages and that the prototype is unchanged.
    """

    def __init__(self, guide: AutoNormal, entries: list[tuple]):
        self.guide = guide
        self.prototype = guide.prototype_trace
        self.entries = entries

    @classmethod
    def plan(cls, guide: Any) -> _AutoNormalSites | None:
        """The plan for ``guide``, or None when its step must go through Pyro."""
        if (
            not isinstance(guide, AutoNormal)
            or type(guide).forward is not AutoNormal.forward
            or type(guide)._get_loc_and_scale is not AutoNormal._get_loc_and_scale
            or guide.prototype_trace is None
            or guide.create_plates is not None
            or guide.master is not None
            or _is_module_local_param_enabled()
        ):
            return None
        store = pyro.get_param_store()
        entries = []
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
            if any(f.full_size not in (None, f.size) for f in site["cond_indep_stack"]):
                return None  # a subsampled plate slices the params: Pyro's job
            names = []
            for module in (guide.locs, guide.scales):
                path, _, attr = name.rpartition(".")
                owner = attrgetter(path)(module) if path else module
                names.append(owner._pyro_get_fullname(attr))
            if not all(n in store for n in names):
                return None
            transform = biject_to(site["fn"].support)
            if _is_identity(transform):
                transform = None  # a real support (of any event size): see sites()
            event_dim = site["fn"].event_dim
            entries.append((name, names[0], names[1], transform, event_dim, frames))
        return cls(guide, entries)

    def applies(self, guide: Any) -> bool:
        """This plan stands for this call of ``guide``: same guide and prototype, and no
        handler outside the ELBO (a user's ``poutine`` context) that would see its messages."""
        return guide is self.guide and guide.prototype_trace is self.prototype and not _PYRO_STACK

    def sites(self) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
        """One draw of the guide: (sites by name, as :class:`_SitePass` keeps them;
        unconstrained params by name, in the order the guide touches them)."""
        store = pyro.get_param_store()
        raw = store._params
        sites: dict[str, dict] = {}
        params: dict[str, torch.Tensor] = {}
        for name, loc_name, scale_name, transform, event_dim, frames in self.entries:
            loc, scale = store[loc_name], store[scale_name]
            params[loc_name], params[scale_name] = raw[loc_name], raw[scale_name]
            q = dist.Normal(loc, scale, validate_args=False)
            u = q.rsample()
            # The auxiliary site is summed unmasked, through its base distribution (the
            # ELBO's _log_density_total unwraps an Independent): the Normal itself.
            sites[name + "_unconstrained"] = _guide_site(q, u, frames)
            if transform is None:
                # A real-valued latent: T is the identity, z = u and log|det| = 0, so the
                # site's own log-density term is −s·Σ0 = −0: adding it changes no bit of the
                # loss nor of any gradient, and it is left out (with the zero tensor, the
                # transform calls and the Delta's log-density broadcast). The Delta stays:
                # an analytic-KL ELBO reads KL(δ_z ‖ p) = −log p(z) from it.
                delta = dist.Delta(u, event_dim=event_dim, validate_args=False)
                sites[name] = _guide_site(delta, u, frames)
                sites[name]["own_log_density"] = _ZERO
                continue
            value = transform(u)
            log_density = transform.inv.log_abs_det_jacobian(value, u)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
            delta = dist.Delta(
                value, log_density=log_density, event_dim=event_dim, validate_args=False
            )
            sites[name] = _guide_site(delta, value, frames)
            if log_density.shape == delta.batch_shape:
                # log Delta(z | z) = log 1 + log|det| = the log-density itself, exactly:
                # the ELBO reads it without Delta.log_prob's comparison, log and addition.
                sites[name]["own_log_density"] = log_density
        return sites, params


# The own log-density of a real-valued AutoNormal latent (identity transform): known zero.
_ZERO = object()


def _is_identity(transform) -> bool:
    """Is ``transform`` the identity: ``biject_to`` of a real support, an empty composition,
    possibly with event dimensions reinterpreted (whose log|det| is then a sum of zeros)?"""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _guide_site(fn, value: torch.Tensor, frames: tuple) -> dict[str, Any]:
    """A guide sample site with the keys the ELBO sum and the model's replay read."""
    return {
        "name": None,
        "fn": fn,
        "value": value,
        "is_observed": False,
        "infer": {},
        "scale": 1.0,
        "mask": None,
        "cond_indep_stack": frames,
    }


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _site_scale(site: dict, data_scale: float) -> Any:
    """The site's scale s, times the mini-batch factor N/B when it lies in the data plate."""
    scale = site["scale"]
    if data_scale != 1.0 and any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
        scale = scale * data_scale
    return scale


def _log_density_total(fn, value: torch.Tensor, site: dict, data_scale: float) -> torch.Tensor:
    """Σ s·mask·log fn(value). Without a mask, the sum over everything does not need the
    event dimensions summed first: an ``Independent`` is read through its base distribution
    (one reduction instead of two, and none of Independent's own bookkeeping)."""
    if site["mask"] is None:
        while isinstance(fn, Independent):
            fn = fn.base_dist
    return _weighted(fn.log_prob(value), site, data_scale)


def _weighted(log_density: torch.Tensor, site: dict, data_scale: float = 1.0) -> torch.Tensor:
    """Σ s·mask·log-density of a site (s including the mini-batch factor)."""
    scale, mask = _site_scale(site, data_scale), site["mask"]
    if mask is None and not torch.is_tensor(scale):
        # A number: scale the sum, not every element (one scalar op, forward and backward).
        total = log_density.sum()
        return total if scale == 1.0 else total * scale
    if mask is None and scale.dim() == 0 and torch._C._get_tracing_state() is not None:
        # Under tracing Pyro hands a plate's scale over as a 0-dim tensor: the same number
        # as the eager step's, so the same order of operations (sum, then scale) gives the
        # eager step's bits (a traced graph must reproduce it: traced_elbo.py).
        return log_density.sum() * scale
    return scale_and_mask(log_density, scale, mask).sum()


class ReparamELBO:
    """Trace_ELBO (``analytic_kl=False``) or TraceMeanField_ELBO (``analytic_kl=True``) for
    reparameterised guides, one particle; the ``loss`` / ``loss_and_grads`` interface.

    :param bool analytic_kl: use KL(q ‖ p) in closed form for latent sites where one is
        registered (falling back to log p − log q at the sample where not).

    :attr:`data_scale` (N/B, set by the engine before each step) multiplies the sites in the
    ``"data"`` plate; model and guide are passed unscaled.
    """

    def __init__(self, analytic_kl: bool = False, compiled: bool = False):
        self.analytic_kl = analytic_kl
        # N/B of the current mini-batch, applied to the data plate's sites here rather than by
        # a ScaleDataPlate handler around model and guide: one handler fewer for every message
        # of every step (measured: 0.37 ms of a 0.8 ms VAE forward pass).
        self.data_scale = 1.0
        self.general = TraceMeanField_ELBO() if analytic_kl else Trace_ELBO()
        self._no_kl: set[tuple[type, type]] = set()
        self._calls = 0
        self.reparameterised = True  # False once a step needed the general estimator
        self.last_params: list[torch.Tensor] = []
        # An AutoNormal guide's step computed without Pyro's per-call machinery (built on the
        # first pathwise step; None: the guide is run through Pyro).
        self._autonormal: _AutoNormalSites | None = None
        self._planned_for: Any = None
        self.last_named: dict[str, torch.Tensor] = {}
        self.last_signature: tuple = ()
        # The compiled steps (set by the engine when its ``jit`` setting allows them).
        self.traced: TracedELBO | None = TracedELBO(self) if compiled else None

    def _negative_elbo(self, model, guide, args, kwargs) -> torch.Tensor | None:
        """−ELBO from one guide draw, or None (RNG rewound) when the general class must run."""
        self._calls += 1
        if self._calls == 1 or not self.reparameterised:
            return None
        rng = _rng_state()
        value = self._pathwise(model, guide, args, kwargs)
        if value is None:
            # A score-function term is needed (or the traces need Pyro's own checks): from
            # now on the general class, and this step redrawn from the same random state, so
            # the numbers, and any error message, are the general class's.
            self.reparameterised = False
            _set_rng_state(rng)
            return None
        if self.traced is not None and not self.traced.disabled:
            self.traced.observe(self.last_signature)
        return value

    def _pathwise(self, model, guide, args, kwargs) -> torch.Tensor | None:
        """−ELBO from one guide draw (the pathwise sum), or None when this step falls
        outside the reparameterised case. Leaves the unconstrained params it touched in
        :attr:`last_params` (and by name in :attr:`last_named`), and, while a
        :class:`~jointkl.inference.traced_elbo.TracedELBO` is deciding, the step's site
        signature in :attr:`last_signature`."""
        if self._planned_for is not guide:
            self._planned_for, self._autonormal = guide, _AutoNormalSites.plan(guide)
        if self._autonormal is not None and self._autonormal.applies(guide):
            guide_sites, guide_params = self._autonormal.sites()
            guide_invalid = False
        else:
            with _SitePass() as guide_pass:
                guide(*args, **kwargs)
            guide_sites, guide_params = guide_pass.sites, guide_pass.params
            guide_invalid = guide_pass.invalid
        with _SitePass(replay=guide_sites) as model_pass:
            model(*args, **kwargs)
        if (
            guide_invalid
            or model_pass.invalid
            or not all(g["fn"].has_rsample for g in guide_sites.values())
        ):
            return None
        if self.traced is not None and not self.traced.disabled:
            self.last_signature = site_signature(model_pass.sites, guide_sites)
        guide_sites = dict(guide_sites)
        self.last_named = {**guide_params, **model_pass.params}
        self.last_params = list(self.last_named.values())
        elbo: Any = 0.0
        k = self.data_scale
        for name, site in model_pass.sites.items():
            g = guide_sites.pop(name, None)
            if site["is_observed"] or g is None:
                # Observed, or (Trace_ELBO only) sampled from the model's own prior.
                if g is None and not site["is_observed"] and self.analytic_kl:
                    return None  # TraceMeanField_ELBO's error message
                elbo = elbo + _log_density_total(site["fn"], site["value"], site, k)
                continue
            kl = self._kl(g["fn"], site["fn"]) if self.analytic_kl else None
            if kl is not None:
                if not torch.is_tensor(kl):  # a constant per batch element
                    kl = kl * torch.Size(g["fn"].batch_shape).numel()
                    elbo = elbo - _site_scale(g, k) * kl
                else:
                    elbo = elbo - _weighted(kl, g, k)
            else:
                elbo = elbo + _log_density_total(site["fn"], site["value"], site, k)
                own = g.get("own_log_density")
                if own is _ZERO:
                    pass  # −s·Σ0: nothing to subtract
                elif own is not None:
                    elbo = elbo - _weighted(own, g, k)
                else:
                    elbo = elbo - _log_density_total(g["fn"], g["value"], g, k)
        for g in guide_sites.values():  # guide-only (auxiliary) sites: their −log q
            elbo = elbo - _log_density_total(g["fn"], g["value"], g, k)
        return -torch.as_tensor(elbo)

    def last_signature_shapeless(self) -> tuple:
        """The last step's site signature without shapes (see :func:`site_signature`)."""
        from .traced_elbo import _shapeless

        return _shapeless(self.last_signature)

    def _kl(self, q, p) -> torch.Tensor | None:
        key = (type(q), type(p))
        if key in self._no_kl:
            return None
        try:
            return kl_divergence(q, p)
        except NotImplementedError:
            self._no_kl.add(key)
            return None

    def loss(self, model, guide, *args: Any, **kwargs: Any) -> float:
        """−ELBO, one sample, no gradients."""
        with torch.no_grad():
            value = self._negative_elbo(model, guide, args, kwargs)
        if value is None:
            return self.general.loss(*self._scaled(model, guide), *args, **kwargs)
        return float(value)

    def _scaled(self, model, guide) -> tuple:
        """Model and guide with the data plate scaled by N/B, for Pyro's classes."""
        if self.data_scale == 1.0:
            return model, guide
        return ScaleDataPlate(self.data_scale)(model), ScaleDataPlate(self.data_scale)(guide)

    def loss_and_grads(self, model, guide, *args: Any, **kwargs: Any) -> float:
        """−ELBO, one sample, with its gradient accumulated into the parameters' ``.grad``;
        the unconstrained parameters it touched are left in :attr:`last_params`. With
        :attr:`traced` set, a step after the first checked ones may run through (or build)
        a traced graph of the same computation."""
        if self.traced is not None and self.reparameterised and self._calls >= 1:
            loss = self.traced.step(model, guide, args, kwargs)
            if loss is not None:
                return loss
        value = self._negative_elbo(model, guide, args, kwargs)
        if value is None:
            with poutine.trace(param_only=True) as capture:
                loss = self.general.loss_and_grads(*self._scaled(model, guide), *args, **kwargs)
            self.last_params = [s["value"].unconstrained() for s in capture.trace.nodes.values()]
            return loss
        if value.requires_grad:
            value.backward()
        return float(value.detach())
