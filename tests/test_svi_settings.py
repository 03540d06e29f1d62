"""SVI's settings dataclass: values checked and normalised at construction, the config a Fit
records, and the pair's optional hooks read through the zoo protocol."""

from __future__ import annotations

import dataclasses
import inspect

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from jointkl.inference import SVI
from jointkl.inference.svi import SVISettings

from jointkl import InputError, Pair
from jointkl.zoo import ZooModel


def normal_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)


def test_settings_are_frozen_normalised_and_the_constructors_signature():
    engine = SVI(steps=2.0, early_stopping=1e-3, checkpoint_every=4.0, checkpoint_dir="ck")
    s = engine.settings
    assert isinstance(s, SVISettings)
    assert s.steps == 2 and isinstance(s.steps, int)
    assert s.checkpoint_every == 4 and isinstance(s.checkpoint_every, int)
    assert s.early_stopping == {"tol": 1e-3, "window": 50}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5
    params = inspect.signature(SVI).parameters
    assert list(params)[:3] == ["loss", "guide", "optim"] and params["steps"].default == 1000
    with pytest.raises(InputError, match="unknown setting"):
        SVI(stepz=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(early_stopping={"tol": 0.0}), "early_stopping must be a positive tolerance"),
        (dict(optim=3), "optim must be a name"),
        (dict(optim="lbfgs"), "needs a closure"),
        (dict(on_step=5), "on_step must be a callable"),
        (dict(resume=True), "resume=True needs checkpoint_dir"),
        (dict(clip_norm=0), "clip_norm must be a positive float or None"),
    ],
)
def test_more_bad_settings_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        SVI(**kwargs)


def test_config_records_callables_and_objects_by_kind_and_in_memory_settings_not_at_all():
    def loss(model, guide, x):
        return (pyro.param("a", torch.tensor(0.0)) - x.mean()) ** 2

    fit = SVI(loss=loss, steps=3, progress=False, on_step=lambda i, v: None).fit(
        Pair(lambda x: pyro.param("a", torch.tensor(0.0))), torch.ones(4)
    )
    assert fit.config["loss"] == "callable" and fit.config["resolved_loss"] == "callable"
    assert "progress" not in fit.config and "on_step" not in fit.config
    optim = pyro.optim.Adam({"lr": 0.01})
    assert SVI(optim=optim).config["optim"] == type(optim).__name__


class NoHooks(ZooModel):
    """A zoo class that declares its optional hooks as not provided (None)."""

    name = "no-hooks-test"

    def model(self, x):
        normal_model(x)

    def settings(self):
        return {}


def test_hooks_declared_none_are_not_provided():
    x = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 3.0
    fit = SVI(steps=300, lr=0.1, guide="delta", progress=False).fit(NoHooks(), x)
    assert fit.config["resolved_loss"] == "trace" and fit.config["resolved_guide"] == "delta"
    assert fit.guide is not None
    assert float(fit.params["loc"]) == pytest.approx(float(x.mean()), abs=0.2)
