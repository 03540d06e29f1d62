"""Devices: every engine's ``device`` setting, the one move at bind time, fits that load on
another device, the CLI's ``--device`` and what a run directory records.

The CPU tests run everywhere. The CUDA tests are marked ``skipif(not torch.cuda.is_available())``
and show as skipped on a machine without a GPU; on one, they fit every engine on ``cuda`` and
load the result on the CPU (and the other way round).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import EM, NCE, NUTS, SVI, Langevin
from jointkl.models import VAE, EnergyModel, GaussianMixture
from torch import nn

from jointkl import Fit, InputError
from jointkl.cli import main
from jointkl.device import follow, move_modules, moved, resolve_device
from jointkl.settings import compute_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
GPU = f"cuda:{torch.cuda.current_device()}" if CUDA else None  # what "cuda" resolves to


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def _blobs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(40, 2, generator=g) - 2, torch.randn(40, 2, generator=g) + 2])


def _ys() -> torch.Tensor:
    return torch.randn(30, generator=torch.Generator().manual_seed(1)) + 1.0


# engine name -> (engine with small settings, a pair, the data)
CASES = {
    "em": (lambda **d: EM(max_iter=20, progress=False, **d), lambda: GaussianMixture(), _blobs),
    "svi": (lambda **d: SVI(steps=20, progress=False, **d), lambda: GaussianMixture(), _blobs),
    "nce": (lambda **d: NCE(steps=20, progress=False, **d), lambda: EnergyModel(dim=2), _blobs),
    "langevin": (
        lambda **d: Langevin(num_samples=20, warmup=20, num_chains=2, progress=False, **d),
        lambda: normal_model,
        _ys,
    ),
    "nuts": (
        lambda **d: NUTS(draws=20, warmup=20, num_chains=2, progress=False, **d),
        lambda: normal_model,
        _ys,
    ),
}


def _fit(name: str, **settings) -> Fit:
    engine, pair, data = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deliberately short fits do not converge
        return engine(**settings).fit(pair(), data())


def _tensors(fit: Fit) -> dict[str, torch.Tensor]:
    out = {f"params/{k}": v for k, v in fit.params.items()}
    out.update({f"samples/{k}": v for k, v in fit.samples.items()})
    out.update({f"state/{k}": v for k, v in fit.state.items()})
    return out


# ---------------------------------------------------------------------- the setting
@pytest.mark.parametrize("engine", [EM, SVI, NCE, Langevin, NUTS], ids=lambda e: e.name)
def test_every_engine_has_the_device_setting(engine):
    assert engine().settings.device is None
    assert engine(device="cpu").config["device"] == "cpu"
    assert engine(device="auto").config["device"] == "auto"
    assert engine(device=torch.device("cpu")).config["device"] == "cpu"
    assert engine(device=" CPU ").config["device"] == "cpu"  # normalised


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:", "cpu:0", "", 3, True, 1.5, ["cpu"]])
@pytest.mark.parametrize("engine", [EM, SVI, NCE, Langevin, NUTS], ids=lambda e: e.name)
def test_bad_device_values_are_refused_in_one_line(engine, value):
    with pytest.raises(InputError) as e:
        engine(device=value)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{engine.Settings.owner}: device must be 'cpu', 'cuda', 'cuda:N'")
    assert repr(value) in msg


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_refused_before_any_work(value):
    with pytest.raises(InputError) as e:
        SVI(device=value)
    assert str(e.value) == (
        f"SVI: device {value!r} requested but torch.cuda.is_available() is False"
    )


@needs_cuda
def test_a_cuda_index_beyond_the_visible_devices_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(InputError, match=f"SVI: device 'cuda:{n}' requested but"):
        SVI(device=f"cuda:{n}")


def test_resolve_device():
    x = torch.zeros(3)
    assert resolve_device(None, (x,), {}) == torch.device("cpu")
    assert resolve_device(None, (), {}) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert str(resolve_device("auto")) == (GPU if CUDA else "cpu")
    # None follows the data, wherever they are (meta: a device with no data at all)
    assert resolve_device(None, ("text", x.to("meta")), {}) == torch.device("meta")
    assert compute_device(None, "X: device") is None


def test_moved_reaches_every_tensor_and_leaves_the_rest():
    meta = torch.device("meta")
    x, n = torch.zeros(2), 3
    out = moved(((x, [x, "a"]), {"k": x, "n": n}), meta)
    assert out[0][0].device == meta and out[0][1][0].device == meta and out[0][1][1] == "a"
    assert out[1]["k"].device == meta and out[1]["n"] == 3
    assert moved(x, torch.device("cpu")) is x  # already there: no copy


def test_the_networks_of_a_pair_move_with_it():
    class Pair:
        def __init__(self):
            self.net = nn.Linear(2, 2)
            self.other = "not a module"

        def model(self, x):
            pass

    pair = Pair()
    weight = pair.net.weight
    move_modules(pair, torch.device("cpu"))  # already there: the very same parameters
    assert pair.net.weight is weight
    # (between dense devices, CPU and CUDA, torch keeps the Parameter objects too; the meta
    # device, which holds no data, gets new ones)
    move_modules(pair, torch.device("meta"))
    assert pair.net.weight.device == torch.device("meta") and pair.other == "not a module"
    net = nn.Linear(2, 2)
    assert follow(net, torch.zeros(1, device="meta")) is net
    assert net.weight.device == torch.device("meta")
    assert follow(None, torch.zeros(1)) is None


# ---------------------------------------------------------------------- the CPU path
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_and_auto_give_the_same_fit_as_no_setting(name):
    base = _fit(name)
    assert base.info["device"] == "cpu"
    devices = ["cpu"] if CUDA else ["cpu", "auto"]  # auto is the CPU only without CUDA
    for device in devices:
        fit = _fit(name, device=device)
        assert fit.config["device"] == device and fit.info["device"] == "cpu"
        ours, theirs = _tensors(base), _tensors(fit)
        assert ours.keys() == theirs.keys() and ours
        for k, v in ours.items():
            assert theirs[k].device.type == "cpu", k
            assert torch.equal(v, theirs[k]), f"{name} {device}: {k} differs"
        assert fit.history == base.history


@pytest.mark.filterwarnings("ignore:SVI")
def test_a_vae_fit_keeps_its_networks_and_params_on_the_data_device():
    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    vae = VAE(latent_dim=2, hidden=[8])
    fit = SVI(steps=5, progress=False, device="cpu").fit(vae, x)
    store = pyro.get_param_store()
    assert all(store[k].device.type == "cpu" for k in store.keys())
    assert all(p.device.type == "cpu" for p in vae.encoder.parameters())
    assert fit.info["device"] == "cpu"


def test_fit_load_on_a_device(tmp_path):
    fit = _fit("em")
    fit.save(tmp_path / "run")
    for device in ("cpu", "auto", None, torch.device("cpu")):
        loaded = Fit.load(tmp_path / "run", device=device)
        want = "cuda" if device == "auto" and CUDA else "cpu"
        for k, v in _tensors(loaded).items():
            assert v.device.type == want, k
        assert all(a.device.type == want for a in loaded.args if isinstance(a, torch.Tensor))
        assert loaded.info["device"] == "cpu"  # where it ran, whatever it was loaded on
    with pytest.raises(InputError, match="Fit.load: device must be"):
        Fit.load(tmp_path / "run", device="gpu")


# ---------------------------------------------------------------------- the command line
def _csv(tmp_path):
    path = tmp_path / "x.csv"
    np.savetxt(path, _blobs().numpy(), delimiter=",")
    return path


def test_the_run_directory_records_the_device(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "em", "--data", str(_csv(tmp_path)), "--out", str(out)]
    argv += ["--device", "auto", "--draws", "2", "--set", "progress=false"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    resolved = GPU if CUDA else "cpu"
    assert config["device"] == resolved
    assert config["engine_config"]["device"] == "auto"  # as asked: a resume resolves it again
    fit = json.loads((out / "fit.json").read_text())
    assert fit["info"]["device"] == resolved and fit["config"]["device"] == "auto"
    assert main(["diagnose", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jointkl: error: --device must be") and len(err.splitlines()) == 1


def test_without_device_a_run_records_the_cpu(tmp_path):
    out = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "em", "--data", str(_csv(tmp_path)), "--out", str(out)]
    assert main([*argv, "--draws", "2", "--set", "progress=false"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cpu" and config["engine_config"]["device"] is None


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_exits_2_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "svi", "--data", str(_csv(tmp_path)), "--out", str(out)]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "jointkl: error: SVI: device 'cuda' requested but torch.cuda.is_available() is False"
    )
    assert not out.exists()


def test_a_resume_may_change_the_device(tmp_path):
    out = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "svi", "--data", str(_csv(tmp_path)), "--out", str(out)]
    argv += ["--draws", "2", "--set", "progress=false", "--set", "steps=10"]
    assert main([*argv, "--device", "cpu"]) == 0
    resume = ["fit", "gmm", "--out", str(out), "--resume", "--set", "steps=20", "--draws", "2"]
    assert main([*resume, "--device", "auto"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["engine_config"]["device"] == "auto"
    assert Fit.load(out).n_iter == 20


# ---------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_on_cuda_then_load_on_the_cpu(name, tmp_path):
    fit = _fit(name, device="cuda")
    assert fit.info["device"].startswith("cuda")
    for k, v in _tensors(fit).items():
        assert v.device.type == "cuda", k
    store = pyro.get_param_store()
    assert all(store[k].device.type == "cuda" for k in store.keys())
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")  # default: the CPU
    for k, v in _tensors(loaded).items():
        assert v.device.type == "cpu", k
        assert torch.equal(v, _tensors(fit)[k].cpu()), k
    loaded.to_arviz(num_samples=4, num_chains=2)  # the model runs again, on the CPU
    # and back: a fit saved from the GPU loaded onto it
    again = Fit.load(tmp_path / "run", device="cuda")
    assert all(v.device.type == "cuda" for v in _tensors(again).values())
    again.to_arviz(num_samples=4, num_chains=2)


@needs_cuda
def test_an_em_fit_on_cuda_matches_the_cpu_fit():
    # EM draws its initialisation on the CPU whatever the device, so the two fits take the
    # same path and differ by rounding only (the stochastic engines use the device's RNG)
    # (two components for two blobs: no flat direction for rounding to wander along)
    x = _blobs()
    cpu, gpu = (
        EM(max_iter=20, progress=False, device=d).fit(GaussianMixture(n_components=2), x)
        for d in ("cpu", "cuda")
    )
    ours, theirs = _tensors(cpu), _tensors(gpu)
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k].cpu(), v, rtol=1e-5, atol=1e-7)


@needs_cuda
@pytest.mark.filterwarnings("ignore:SVI")
def test_a_vae_fits_on_cuda_and_loads_on_the_cpu(tmp_path):
    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    vae = VAE(latent_dim=2, hidden=[8])
    fit = SVI(steps=5, progress=False, device="cuda").fit(vae, x)
    assert all(p.device.type == "cuda" for p in vae.encoder.parameters())
    assert fit.args[0].device.type == "cuda"
    fit.save(tmp_path / "run")
    loaded = Fit.load(tmp_path / "run")
    loaded.to_arviz(num_samples=4, num_chains=2)
    assert all(p.device.type == "cpu" for p in loaded.pair.encoder.parameters())


@needs_cuda
def test_cli_fit_on_cuda_and_diagnose_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", "gmm", "--engine", "svi", "--data", str(_csv(tmp_path)), "--out", str(out)]
    assert main([*argv, "--device", "cuda", "--draws", "2", "--set", "steps=20"]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == GPU
    assert main(["diagnose", str(out)]) == 0
    assert main(["diagnose", str(out), "--device", "cuda"]) == 0
