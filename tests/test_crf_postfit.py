"""A CRF tagger's post-fit path: the model is the fitted network (no dropout) whenever it
runs without gradients, and ``to_arviz`` of the fit (no latents: a point estimate) runs
the network on the data a few times, not once per predictive draw."""

from __future__ import annotations

import warnings

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference import SVI
from jointkl.models import CRFTagger

from jointkl.data.cws import cws_dataset


@pytest.fixture(scope="module")
def tiny_fit():
    data = cws_dataset(limit=30, max_len=30)
    tagger = CRFTagger.for_dataset(data, embedding_dim=8, hidden_dim=8, dropout=0.5)
    args = (data.train_chars, data.train_lengths, data.train_tags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = SVI(steps=3, batch_size=8, progress=False, seed=0).fit(tagger, *args)
    return tagger, args, fit


def _log_prob(tagger, args) -> float:
    tr = poutine.trace(tagger.model).get_trace(*args)
    return float(tr.log_prob_sum().detach())


def test_dropout_only_while_gradients_are_taken(tiny_fit):
    tagger, args, _ = tiny_fit
    with torch.no_grad():
        a, b = _log_prob(tagger, args), _log_prob(tagger, args)
        assert not tagger.net.training
    assert a == b  # the same network on every run: no random dropout mask
    torch.manual_seed(0)
    c = _log_prob(tagger, args)
    assert tagger.net.training  # fitting (gradients on) keeps dropout
    assert c != a


def test_to_arviz_runs_the_network_a_few_times_not_once_per_draw(tiny_fit):
    tagger, args, fit = tiny_fit
    calls = []
    handle = tagger.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata = fit.to_arviz(num_samples=50)
    finally:
        handle.remove()
    # activate, the model's trace, the log-likelihood: each one pass over the data;
    # the 50 predictive draws come from one sample of the traced CRF
    assert len(calls) <= 6, len(calls)
    n, t = args[2].shape
    pp = idata.posterior_predictive["tags"].values
    assert pp.shape[:3] == (1, 50, n)
    lengths = args[1].numpy()
    valid = np.arange(pp.shape[-1])[None, :] < lengths[:, None]
    assert ((pp >= 0) & (pp < 4))[..., valid].all()
    # the draws differ (a sample, not one tag sequence repeated)
    assert not (pp[0, 0] == pp[0, 1]).all()
    ll = idata.log_likelihood["tags"].values
    assert ll.shape == (1, 1, n) and np.isfinite(ll).all()
    # the pointwise log-likelihood is the CRF's log p(tags_i | chars_i) without dropout
    with torch.no_grad():
        tr = poutine.trace(tagger.model).get_trace(*args)
        expect = tr.nodes["tags"]["fn"].log_prob(tr.nodes["tags"]["value"]).double().numpy()
    np.testing.assert_allclose(ll[0, 0], expect, rtol=1e-5)


def test_the_data_plate_size_is_found_without_running_the_network(tiny_fit, monkeypatch):
    """SVI sizes its mini-batches from the model's "data" plate before the first step: the
    plate comes before the network, so finding N never runs it over the whole corpus."""
    from jointkl.sites import data_plate_size

    tagger, args, _ = tiny_fit

    def refuse(*a, **k):
        raise AssertionError("the network ran")

    monkeypatch.setattr(type(tagger.net), "forward", refuse)  # also a freshly built network
    assert data_plate_size(tagger.model, args, {}) == len(args[0])
