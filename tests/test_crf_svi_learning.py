"""crf-seg under SVI: the fit moves every weight (network and CRF transitions) and lowers
the loss with the model's own engine defaults; its post-fit path runs the network over the
data once, in bounded chunks."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from jointkl.inference import SVI
from jointkl.models import CRFTagger
from jointkl.models import crf_tagger as crf_module

from jointkl.data.cws import cws_dataset


@pytest.fixture(scope="module")
def data():
    d = cws_dataset(limit=120, max_len=30)
    return d, (d.train_chars, d.train_lengths, d.train_tags)


def _fit(tagger, args, **settings):
    # the model's own SVI defaults (lr, cosine schedule, batch 64), fewer steps
    kw = {**CRFTagger.engine_defaults["svi"], "steps": 40, "progress": False, "seed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SVI(**{**kw, **settings}).fit(tagger, *args)


def test_svi_with_the_default_settings_updates_every_weight_and_lowers_the_loss(data):
    d, args = data
    tagger = CRFTagger.for_dataset(d, embedding_dim=16, hidden_dim=16)
    first = {}

    def after_first_step(step, loss):
        if step == 0:
            store = pyro.get_param_store()
            first.update({k: store[k].detach().clone() for k in store.keys()})

    fit = _fit(tagger, args, on_step=after_first_step)
    names = {k.split("$$$")[1] for k in fit.params}
    assert {"transitions", "start", "end", "embed.weight", "emit.weight"} <= names
    assert set(first) == set(fit.params)
    # every weight keeps moving after the first update (the transitions start at 0; only
    # the BMES-allowed ones get a gradient)
    for k, v in fit.params.items():
        assert float((v - first[k]).abs().max()) > 1e-4, k
    h = np.asarray(fit.history)
    assert h[-10:].mean() < 0.9 * h[:10].mean(), (h[:10].mean(), h[-10:].mean())


def test_chunked_emissions_equal_the_whole_batch(data, monkeypatch):
    d, args = data
    tagger = CRFTagger.for_dataset(d, embedding_dim=8, hidden_dim=8)
    tagger.net.eval()
    chars, lengths = args[0], args[1]
    with torch.no_grad():
        whole = tagger.net(chars, lengths)
        monkeypatch.setattr(crf_module, "EVAL_ROWS", 7)
        chunked = CRFTagger._emissions(tagger.net, chars, lengths)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_to_arviz_of_a_latent_free_fit_runs_the_network_over_the_data_once(data, monkeypatch):
    d, args = data
    tagger = CRFTagger.for_dataset(d, embedding_dim=8, hidden_dim=8)
    fit = _fit(tagger, args, steps=3, batch_size=16)
    rows = []
    forward = crf_module.TaggerNet.forward

    def counted(self, chars, lengths):
        rows.append(len(chars))
        return forward(self, chars, lengths)

    # on the class: activating the fit builds a new network (a fresh param store)
    monkeypatch.setattr(crf_module.TaggerNet, "forward", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = fit.to_arviz(num_samples=20)
    monkeypatch.undo()
    n = len(args[0])
    # activate: one row creates the params; the converter's trace: the data once. The
    # log-likelihood is read off that trace and the predictive is sampled from it.
    assert sum(rows) <= n + 1, (sum(rows), n)
    ll = idata.log_likelihood["tags"].values
    with torch.no_grad():
        tr = poutine.trace(tagger.model).get_trace(*args)
        expect = tr.nodes["tags"]["fn"].log_prob(tr.nodes["tags"]["value"]).double().numpy()
    np.testing.assert_allclose(ll.reshape(-1), expect, rtol=1e-5)
