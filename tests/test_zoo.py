"""The zoo protocol: every registered model declares it, rebuilds from its spec, and
``hook`` gives the protocol's defaults to objects that are not zoo models."""

from __future__ import annotations

import json

import jointkl.models
import pyro
import pyro.distributions as dist
import pytest
import torch

from jointkl.errors import InputError
from jointkl.pair import Pair
from jointkl.zoo import MODELS, ZooModel, build_pair, hook

# Lighter settings where the defaults would load a corpus (the CRF's People's Daily
# vocabulary); every other model is built with its defaults.
SMALL = {"crf-seg": {"vocab": "abcd", "bigram_dim": 0, "hidden_dim": 8, "embedding_dim": 8}}


def instance(name: str) -> ZooModel:
    return MODELS[name](**SMALL.get(name, {}))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_declare_the_protocol(name):
    cls = MODELS[name]
    assert issubclass(cls, ZooModel)
    assert cls.name == name
    assert cls.description
    assert cls.__name__ in jointkl.models.__all__


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_rebuilds_from_its_settings_and_spec(name):
    m = instance(name)
    spec = m.spec()
    assert spec == {"zoo": name, "settings": m.settings()}
    assert type(m)(**m.settings()).spec() == spec
    recorded = json.loads(json.dumps(spec))  # what a saved fit holds
    rebuilt = build_pair(recorded)
    assert type(rebuilt) is type(m)
    assert rebuilt.spec() == spec


def test_models_list_every_registered_model():
    assert sorted(jointkl.models.__all__) == sorted(c.__name__ for c in MODELS.values())


def test_hook_defaults_on_a_plain_pair():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    pair = Pair(model)
    for name in ("guide", "init_values", "default_loss", "candidate_scores", "default_guide"):
        assert hook(pair, name) is None
    for name in ("settings", "spec", "default_data", "diagnostic_plots"):
        assert hook(pair, name) is None
    assert hook(pair, "engine_defaults") == {}
    assert hook(pair, "description") == ""
    assert hook(pair, "model") is model
    assert hook(None, "engine_defaults") == {}  # a user file's model has no zoo class
    with pytest.raises(KeyError, match="not a hook"):
        hook(pair, "fit")


def test_hook_reads_what_a_zoo_model_provides():
    gmm, vae, infomax = MODELS["gmm"](), MODELS["vae"](), MODELS["infomax"]()
    assert hook(gmm, "init_values") == gmm.init_values
    assert hook(gmm, "default_guide") == "normal"  # a Gaussian over the globals
    assert hook(gmm, "guide") is None
    assert hook(vae, "init_values") is None
    assert hook(vae, "guide") == vae.guide
    assert hook(infomax, "default_loss") == infomax.loss
    assert hook(MODELS["skipgram"], "engine_defaults")["nce"]["batch_size"] == 1024
    assert hook(gmm, "candidate_scores") is None


def test_protocol_defaults_of_a_minimal_subclass():
    class Minimal(ZooModel):
        name = "minimal-test"

        def model(self, x):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    m = Minimal()
    assert m.spec() is None  # not registered, no settings: Fit.load needs the pair
    with pytest.raises(NotImplementedError, match="settings"):
        m.settings()
    with pytest.raises(InputError, match="no default dataset"):
        m.default_data()
    assert m.diagnostic_plots(None, None) == []
    assert m.guide is None
    for name in ("init_values", "default_loss", "candidate_scores"):
        assert hook(m, name) is None
    with pytest.raises(NotImplementedError, match="model"):
        ZooModel().model(torch.zeros(1))
    assert "minimal-test" not in MODELS  # not registered without the decorator
