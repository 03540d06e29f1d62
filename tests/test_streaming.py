"""SVI and NCE on data from a memory-mapped file (a RowArray): each step reads only its
batch's rows, the iterates equal those of the in-memory fit, and the process's memory stays
far below the file's size."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from jointkl.inference import NCE, SVI
from jointkl.models import EnergyModel, GaussianMixture

from jointkl.data.arrays import open_rows
from jointkl.errors import InputError


def _same(f1, f2, exact: bool):
    assert f1.params.keys() == f2.params.keys()
    for k in f1.params:
        if exact:
            assert torch.equal(f1.params[k], f2.params[k]), k
        else:
            torch.testing.assert_close(f1.params[k], f2.params[k], rtol=0, atol=1e-12)
    assert f1.history == f2.history if exact else np.allclose(f1.history, f2.history, 0, 1e-12)


@pytest.fixture
def points(tmp_path):
    def make(dtype, rows=300, folder=False):
        x = np.random.default_rng(0).standard_normal((rows, 2)).astype(dtype)
        x[: rows // 2] += 4.0
        if folder:  # three shards, so batches cross file boundaries
            d = tmp_path / "shards"
            d.mkdir()
            for i, part in enumerate(np.array_split(x, 3)):
                np.save(d / f"part-{i:03d}.npy", part)
            return x, open_rows(d)
        np.save(tmp_path / "x.npy", x)
        return x, open_rows(tmp_path / "x.npy")

    return make


@pytest.mark.parametrize("folder", [False, True])
def test_svi_streamed_equals_in_memory_float32(points, folder):
    x, rows = points(np.float32, folder=folder)
    # the default GaussianMixture has MAP globals: an autoguide started from the data
    common = dict(steps=15, batch_size=32, progress=False, seed=3)
    f1 = SVI(**common).fit(GaussianMixture(2), torch.as_tensor(x))
    f2 = SVI(**common).fit(GaussianMixture(2), rows)
    _same(f1, f2, exact=True)
    assert f2.info["data_size"] == len(x)


def test_svi_streamed_equals_in_memory_float64(points):
    x, rows = points(np.float64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model's params in the data's precision
    try:
        common = dict(steps=15, batch_size=50, progress=False)
        f1 = SVI(**common).fit(GaussianMixture(2, priors=None), torch.as_tensor(x))
        f2 = SVI(**common).fit(GaussianMixture(2, priors=None), rows)
    finally:
        torch.set_default_dtype(previous)
    assert f2.params["locs"].dtype == torch.float64
    _same(f1, f2, exact=False)


@pytest.mark.parametrize("batch_size", [40, 1000])  # 1000 > N: every row each step
def test_nce_streamed_equals_in_memory(points, batch_size):
    x, rows = points(np.float32, folder=True)
    common = dict(steps=10, batch_size=batch_size, progress=False)
    f1 = NCE(**common).fit(EnergyModel(), torch.as_tensor(x))
    f2 = NCE(**common).fit(EnergyModel(), rows)
    _same(f1, f2, exact=True)


def test_nce_unigram_noise_counts_every_row(tmp_path):
    ids = np.random.default_rng(0).integers(0, 5, 400)
    ids[-1] = 7  # a category seen once, at the very end of the file
    np.save(tmp_path / "ids.npy", ids)
    rows = open_rows(tmp_path / "ids.npy")

    def model(w):
        logits = pyro.param("logits", torch.zeros(8))
        with pyro.plate("data", len(w)):
            pyro.sample("w", dist.Categorical(logits=logits), obs=w)

    common = dict(steps=5, batch_size=64, progress=False)
    f1 = NCE(**common).fit(model, torch.as_tensor(ids))
    f2 = NCE(**common).fit(model, rows)
    _same(f1, f2, exact=True)


def test_streamed_rows_need_a_batch_size(points):
    _, rows = points(np.float32)
    with pytest.raises(InputError, match="SVI: data from a memory-mapped file .* set batch_size"):
        SVI(steps=2, progress=False).fit(GaussianMixture(2), rows)
    with pytest.raises(InputError, match="NCE: data from a memory-mapped file .* set batch_size"):
        NCE(steps=2, progress=False).fit(EnergyModel(), rows)
    assert SVI(batch_size=8).streams_rows() and not SVI().streams_rows()


def test_streamed_plate_must_follow_the_data(points):
    _, rows = points(np.float32)

    def fixed_plate(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", 100):
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    with pytest.raises(InputError, match="has size 100 on 300 streamed rows"):
        SVI(steps=2, batch_size=16, progress=False).fit(fixed_plate, rows)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from jointkl.data.arrays import open_rows
    from jointkl.inference import SVI
    from jointkl.models import GaussianMixture

    def status_mib(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024

    # a first small fit in memory: what the libraries allocate once is not the data's
    SVI(steps=3, batch_size=16, progress=False).fit(GaussianMixture(3), torch.randn(64, 4))
    # "5" resets the peak resident set (VmHWM) to the current one, so the peak after is
    # the fit's own. (getrusage's ru_maxrss is not used: it keeps the peak of the process
    # that forked this one, before exec, here the test runner's.)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmHWM")
    rows = open_rows(sys.argv[1])
    fit = SVI(steps=20, batch_size=256, progress=False).fit(GaussianMixture(3), rows)
    assert fit.info["data_size"] == len(rows)
    print(json.dumps({"before": before, "after": status_mib("VmHWM"), "steps": fit.n_iter}))
    """
)


def test_svi_on_a_file_larger_than_its_memory_growth(tmp_path):
    """A 200 MB file, fitted 20 steps: the peak resident set grows by a small fraction of it
    (the data are read a batch at a time, never whole)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak resident set is read from Linux's /proc/self (not here)")
    path = tmp_path / "big.npy"
    # float32 rows of 16: 200 MB. The batch order holds a permutation of the row numbers
    # (4 bytes a row), the one part of a streamed fit that grows with N.
    rows, dim = 3_125_000, 16
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:  # written in chunks: the test process holds no copy either
        np.lib.format.write_array_header_1_0(f, header)
        for lo in range(0, rows, 1_000_000):
            f.write(rng.standard_normal((min(1_000_000, rows - lo), dim), np.float32).tobytes())
    size_mib = path.stat().st_size / 2**20
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS {probe['before']:.0f} -> {probe['after']:.0f} MiB, file {size_mib:.0f} MiB")
    growth = probe["after"] - probe["before"]
    assert probe["steps"] == 20
    assert size_mib > 190
    # reading it whole would take the file's size (a tensor of it), so a quarter is far off
    assert growth < 0.25 * size_mib, f"peak RSS grew {growth:.1f} MiB on a {size_mib:.0f} MiB file"
