import os

import pyro
import pytest
import torch

# Two cores shared by everything on the test machine: one intra-op thread per process keeps
# small tensor work from thrashing.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def blobs():
    """Three well-separated 2-D Gaussian clusters (seeded), 60 points each."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    x = torch.cat([c + 0.5 * torch.randn(60, 2, generator=g) for c in centres])
    return x, centres


@pytest.fixture
def float64_one_thread():
    """float64 default dtype and one thread for the test, restored after: statistical
    tolerances and round-off trajectory comparisons want float64; tiny fits, one thread."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
