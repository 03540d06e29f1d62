"""EM on data streamed in blocks of rows (memory-mapped .npy, row sources) and across
torch.distributed processes: the same iterates as the in-memory fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from jointkl.inference import EM
from jointkl.inference.em.streaming import block_rows_for, is_row_source, subsample_rows
from jointkl.models import HMM, BernoulliMixture, GaussianMixture

from jointkl.distributed import shard_bounds as shard
from jointkl.errors import InputError


class Rows:
    """The row-source protocol and nothing more: shape, dtype, len() and x[a:b]."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype = a, a.shape, a.dtype
        self.reads = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k):
        assert isinstance(k, slice), "a row source is only sliced"
        self.reads += 1
        return self.a[k].copy()


def gaussian_data(n: int = 700, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 3.0, 0.0], [-2.0, -2.0, 1.0], [0.0, 0.0, -3.0]])
    z = torch.randint(3, (n,), generator=g)
    return (centres[z] + torch.randn(n, 3, generator=g) * torch.tensor([1.0, 0.5, 0.8])).double()


def bernoulli_data(n: int = 500, high: float = 0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[high] * 6 + [1 - high] * 6, [1 - high] * 6 + [high] * 6])
    return torch.bernoulli(p[torch.randint(2, (n,), generator=g)], generator=g).double()


def memmap(tmp_path, x: torch.Tensor) -> np.ndarray:
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    return np.load(path, mmap_mode="r")


def assert_same_fit(a, b, tol: float = 1e-10) -> None:
    assert a.n_iter == b.n_iter
    for k in a.params:
        assert torch.allclose(a.params[k], b.params[k], rtol=0, atol=tol), k
    scale = max(1.0, abs(a.history[-1]))
    assert max(abs(u - v) for u, v in zip(a.history, b.history, strict=True)) <= tol * scale


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
@pytest.mark.parametrize("priors", ["weak", None])
def test_memmap_gaussian_mixture_follows_the_in_memory_iterates(tmp_path, covariance, priors):
    x = gaussian_data()
    model = GaussianMixture(n_components=3, covariance=covariance, priors=priors)
    whole = EM(progress=False, max_iter=6, tol=0).fit(model, x)
    # 700 rows in blocks of 160: four full blocks and a tail of 60
    streamed = EM(progress=False, max_iter=6, tol=0, block_rows=160).fit(model, memmap(tmp_path, x))
    assert streamed.info["streamed"]["passes"] == streamed.n_iter + 1 == 7
    assert_same_fit(whole, streamed)
    assert streamed.history[-1] > streamed.history[0]


@pytest.mark.parametrize("priors", ["weak", None])
def test_row_source_bernoulli_mixture_follows_the_in_memory_iterates(priors):
    # Overlapping clusters: EM still moves at its 8th step (by ~1e-4), so all 8 iterates are
    # compared. Well-separated ones reach a floating-point fixed point within 4 steps, where
    # tol=0's exact stop is decided by the last bit of the log-likelihood, which the two
    # paths round in different orders (blocks of rows; the in-memory fused steps).
    x = bernoulli_data(high=0.75)
    model = BernoulliMixture(n_components=2, priors=priors)
    rows = Rows(x.numpy())
    whole = EM(progress=False, max_iter=8, tol=0).fit(model, x)
    streamed = EM(progress=False, max_iter=8, tol=0, block_rows=128).fit(model, rows)
    assert_same_fit(whole, streamed)
    # 4 blocks a pass, one pass at the initial values and one per iteration, + the subsample
    assert rows.reads == 4 * (streamed.n_iter + 1) + 1


def test_a_file_that_fits_in_memory_is_read_whole(tmp_path):
    """Without ``block_rows``, a row source of at most IN_MEMORY_BYTES takes the in-memory
    path (all of EM's features), with the in-memory fit's numbers."""
    x = gaussian_data(500)
    model = GaussianMixture(n_components=3)
    whole = EM(progress=False).fit(model, x)
    read = EM(progress=False).fit(model, memmap(tmp_path, x))
    assert "streamed" not in read.info
    assert_same_fit(whole, read)


def test_default_settings_converge_to_the_in_memory_fit(tmp_path, monkeypatch):
    import jointkl.inference.em.engine as em_engine

    monkeypatch.setattr(em_engine, "IN_MEMORY_BYTES", 0)  # stream even this small file
    x = gaussian_data(2000)
    model = GaussianMixture(n_components=3)
    whole = EM(progress=False).fit(model, x)
    streamed = EM(progress=False).fit(model, memmap(tmp_path, x))
    assert streamed.converged and streamed.info["streamed"]["block_rows"] == block_rows_for(3, 3)
    assert_same_fit(whole, streamed)


def test_initialisation_on_a_subsample_reaches_the_same_optimum(tmp_path):
    x = gaussian_data(3000, seed=2)
    model = GaussianMixture(n_components=3)
    whole = EM(progress=False, tol=1e-8).fit(model, x)
    streamed = EM(progress=False, tol=1e-8, init_rows=300, block_rows=1000).fit(
        model, memmap(tmp_path, x)
    )
    assert streamed.info["streamed"]["init_rows"] == 300
    assert abs(streamed.history[-1] - whole.history[-1]) / len(x) < 1e-8
    order = whole.params["locs"][:, 0].argsort()
    order_s = streamed.params["locs"][:, 0].argsort()
    assert torch.allclose(whole.params["locs"][order], streamed.params["locs"][order_s], atol=1e-5)


def test_subsample_is_seeded_spread_and_bounded():
    x = np.arange(10_000, dtype=np.float64).reshape(-1, 1)
    a = subsample_rows(x, 100, 3, torch.float64, "x")
    b = subsample_rows(Rows(x), 100, 3, torch.float64, "x")
    assert torch.equal(a, b) and a.shape == (100, 1)
    strata = (a[:, 0] // 100).long()
    assert torch.equal(strata, torch.arange(100))  # one row per stratum of 100
    assert not torch.equal(a, subsample_rows(x, 100, 4, torch.float64, "x"))


def test_shards_cover_the_rows_once():
    for n, p in [(10, 3), (7, 2), (5, 5)]:
        parts = [shard(n, r, p) for r in range(p)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(parts[i][1] == parts[i + 1][0] for i in range(p - 1))


def test_block_rows_budget():
    rows = block_rows_for(4, 3)
    per_row = 8 * (4 + 10 + 4 + 1 + 3)
    assert rows * per_row <= 64 * 2**20 < (rows + 1) * per_row
    assert is_row_source(np.zeros((3, 2))) and not is_row_source(torch.zeros(3, 2))


def test_streamed_data_refusals(tmp_path):
    x = gaussian_data(100)
    sampled = subsample_rows(np.arange(100.0)[:, None], 10, 0, torch.float64, "x")[:, 0]
    row = next(i for i in range(40, 80) if i not in sampled)  # missed by the init subsample
    bad = x.clone()
    bad[row, 1] = float("nan")
    with pytest.raises(InputError, match="rows 40..79 hold NaN"):
        EM(progress=False, block_rows=40, init_rows=10).fit(
            GaussianMixture(n_components=2), memmap(tmp_path, bad)
        )
    with pytest.raises(InputError, match="squarem"):
        EM(progress=False, accelerate="squarem", block_rows=50).fit(
            GaussianMixture(2), memmap(tmp_path, x)
        )
    (seqs,), _ = HMM(n_states=2).default_data()
    lengths = torch.full((len(seqs),), seqs.shape[1])
    with pytest.raises(InputError, match="'lengths' has one entry per row too"):
        EM(progress=False, block_rows=100).fit(HMM(n_states=2), seqs.numpy(), lengths=lengths)
    with pytest.raises(
        InputError, match="several blocks of rows need a mixture .* raise block_rows"
    ):
        EM(progress=False, block_rows=7).fit(HMM(n_states=2), seqs.numpy())
    with pytest.raises(InputError, match=r"\['scales'\] would need the gradient M-step"):
        EM(progress=False, block_rows=100).fit(HMM(n_states=2, priors="weak"), seqs.numpy())


def test_hmm_sequences_in_one_block_follow_the_in_memory_iterates():
    model = HMM(n_states=3)
    (x,), _ = model.default_data()
    whole = EM(progress=False, max_iter=5, tol=0).fit(model, x)
    streamed = EM(progress=False, max_iter=5, tol=0, block_rows=len(x)).fit(model, Rows(x.numpy()))
    assert streamed.info["streamed"]["passes"] == 6
    assert_same_fit(whole, streamed)


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from jointkl.inference import EM
    from jointkl.models import HMM, BernoulliMixture, GaussianMixture

    rank, size, init, path, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    x = np.load(path, mmap_mode="r")
    res = {}
    for cov in ("full", "diag"):
        f = EM(progress=False, max_iter=5, tol=0, block_rows=97).fit(
            GaussianMixture(n_components=3, covariance=cov), x
        )
        res[cov] = {"params": {k: v.tolist() for k, v in f.params.items()},
                    "history": f.history, "streamed": f.info["streamed"]}
    xb = torch.from_numpy(np.load(path.replace("x.npy", "b.npy")))
    f = EM(progress=False, max_iter=4, tol=0).fit(BernoulliMixture(n_components=2), xb)
    res["bernoulli"] = {"params": {k: v.tolist() for k, v in f.params.items()},
                        "history": f.history, "streamed": f.info["streamed"]}
    seqs = torch.from_numpy(np.load(path.replace("x.npy", "h.npy")))
    f = EM(progress=False, max_iter=4, tol=0).fit(HMM(n_states=3), seqs)
    res["hmm"] = {"params": {k: v.tolist() for k, v in f.params.items()},
                  "history": f.history, "streamed": f.info["streamed"]}
    json.dump(res, open(out + str(rank), "w"))
    dist.destroy_process_group()
    """
)


def test_two_gloo_processes_follow_the_one_process_iterates(tmp_path):
    x = gaussian_data(601)  # odd: the ranks hold 300 and 301 rows
    xb = bernoulli_data(301)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "b.npy", xb.numpy())
    (seqs,), _ = HMM(n_states=3).default_data()  # 20 sequences: 10 a rank
    np.save(tmp_path / "h.npy", seqs.numpy())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / "x.npy"), out],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.load(open(out + str(r))) for r in range(2)]
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    for cov in ("full", "diag"):
        one = EM(progress=False, max_iter=5, tol=0).fit(
            GaussianMixture(n_components=3, covariance=cov), x
        )
        assert [r[cov]["streamed"]["rank_rows"] for r in ranks] == [[0, 301], [301, 601]]
        assert ranks[0][cov]["streamed"]["processes"] == 2
        for r in ranks:
            for k, v in r[cov]["params"].items():
                assert torch.allclose(
                    torch.tensor(v, dtype=torch.float64), one.params[k], atol=1e-10
                )
            assert np.allclose(r[cov]["history"], one.history, rtol=1e-12, atol=0)
        assert mm.shape == (601, 3)
    one = EM(progress=False, max_iter=4, tol=0).fit(BernoulliMixture(n_components=2), xb)
    for r in ranks:
        assert r["bernoulli"]["streamed"]["rank_rows"] in ([0, 151], [151, 301])
        for k, v in r["bernoulli"]["params"].items():
            assert torch.allclose(torch.tensor(v, dtype=torch.float64), one.params[k], atol=1e-10)
        assert np.allclose(r["bernoulli"]["history"], one.history, rtol=1e-12, atol=0)
    one = EM(progress=False, max_iter=4, tol=0).fit(HMM(n_states=3), seqs)
    assert [r["hmm"]["streamed"]["rank_rows"] for r in ranks] == [[0, 10], [10, 20]]
    for r in ranks:
        for k, v in r["hmm"]["params"].items():
            assert torch.allclose(
                torch.tensor(v, dtype=one.params[k].dtype), one.params[k], atol=1e-10
            )
        assert np.allclose(r["hmm"]["history"], one.history, rtol=1e-12, atol=0)
