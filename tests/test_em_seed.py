"""Engine.seed gives the same draws as pyro.set_rng_seed (torch, random, NumPy)."""

import random

import numpy as np
import pyro
import torch
from jointkl.inference import EM


def draws() -> tuple:
    return torch.rand(5), torch.randn(3, dtype=torch.float64), random.random(), np.random.rand(2)


def test_engine_seed_matches_pyro_set_rng_seed():
    for seed in (0, 7, 2**31 + 5):
        pyro.set_rng_seed(seed)
        expected = draws()
        torch.rand(11), random.random(), np.random.rand(4)  # move every generator on
        EM(seed=seed, progress=False).seed()
        got = draws()
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert got[2] == expected[2]
        assert np.array_equal(got[3], expected[3])
