"""NCE checkpoints: the progress of a fit is one LoopState; an interrupted fit resumed from its
checkpoint gives the numbers of a fit that never stopped, and a NaN/inf keeps the last good
state on disk."""

from __future__ import annotations

import pyro
import pytest
import torch
from jointkl.inference import NCE
from jointkl.models import EnergyModel, SkipGram

from jointkl.checkpoint import LoopState
from jointkl.errors import FitDivergedError, InputError

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def _skipgram_case():
    # Sparse embedding rows (lazy Adam) and the dense γ (torch Adam); shared noise.
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 50, (3000,), generator=g), torch.randint(0, 50, (3000,), generator=g))
    return SkipGram(vocab_size=50, dim=8), data, {"nu": 5, "lr": 0.05, "batch_size": 200}


def _energy_case():
    # An nn.Module energy, per-datum Gaussian noise, an epoch boundary every 5 steps.
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    return EnergyModel(hidden=8), (x,), {"nu": 4, "lr": 0.02, "batch_size": 100}


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def __call__(self, step: int, loss: float) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("case", [_skipgram_case, _energy_case], ids=["skipgram", "energy"])
def test_interrupted_fit_resumes_exactly(tmp_path, case):
    pair, data, settings = case()

    def engine(ckdir, **kw):
        return NCE(
            steps=30, checkpoint_every=10, checkpoint_dir=ckdir, seed=3, progress=False,
            **settings, **kw,
        )  # fmt: skip

    whole = engine(tmp_path / "whole").fit(pair, *data)
    cut = engine(tmp_path / "cut", on_step=StopAt(16)).fit(pair, *data)
    assert cut.n_iter == 17 and "interrupted" in cut.info["stop_reason"]
    saved = LoopState.load(tmp_path / "cut" / "step-00000017.pt")  # written on interruption
    assert saved.step == 17 and saved.history == cut.history
    resumed = engine(tmp_path / "cut", resume=True).fit(pair, *data)
    assert resumed.n_iter == 30
    assert resumed.history == whole.history  # every loss, bit for bit
    assert resumed.params.keys() == whole.params.keys()
    for k, v in whole.params.items():
        assert torch.equal(resumed.params[k], v), k
    # A fit that never stopped and one that did write the same final state.
    a = LoopState.load(tmp_path / "whole" / "step-00000030.pt")
    b = LoopState.load(tmp_path / "cut" / "step-00000030.pt")
    assert a.history == b.history and torch.equal(a.rng["torch"], b.rng["torch"])


def test_non_finite_loss_keeps_the_last_good_state_on_disk(tmp_path):
    def log_energy(x):
        scale = pyro.param("scale", torch.tensor(1.0))
        with pyro.plate("data", len(x)):
            # log(scale) is NaN once a large step takes scale below zero
            pyro.factor("energy", -((x / scale) ** 2) - scale.log())

    x = 0.1 * torch.randn(500, generator=torch.Generator().manual_seed(0))
    engine = NCE(
        optim="sgd", lr=5.0, steps=50, checkpoint_every=1, checkpoint_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    with pytest.raises(FitDivergedError, match="non-finite loss"):
        engine.fit(log_energy, x)
    # Step 1 met the NaN: the parameters it met (written as step-00000001.pt after step 0)
    # are no state to resume from (any lr diverges from them again), so that checkpoint is
    # gone and no other exists; the bad step applied nothing to the store.
    assert not list(tmp_path.glob("step-*.pt"))
    assert torch.isfinite(pyro.param("scale").detach())


def test_resume_with_different_settings_is_refused(tmp_path):
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    common = {"steps": 4, "checkpoint_dir": tmp_path, "progress": False, "nu": 3}
    NCE(**common).fit(EnergyModel(hidden=4), x)
    with pytest.raises(InputError, match="learned log Z"):
        NCE(log_z=0.0, resume=True, **common).fit(EnergyModel(hidden=4), x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_every": 5}, "needs checkpoint_dir"),
        ({"resume": True}, "needs checkpoint_dir"),
        ({"resume": True, "checkpoint_dir": "ck", "optim": "lbfgs"}, "stochastic optimiser"),
    ],
)
def test_bad_checkpoint_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(InputError, match=message):
        NCE(**kwargs)
