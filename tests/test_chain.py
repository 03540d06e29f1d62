"""The generic chain recursion: brute force, scan == sequential, lengths, -inf safety."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jointkl.chain import (
    chain_backtrack,
    chain_contract,
    chain_forward,
    chain_kbest,
    chain_viterbi,
    mask_potentials,
)
from jointkl.errors import InputError
from jointkl.semiring import LogSemiring, MaxSemiring

SETTINGS = settings(max_examples=40, deadline=None)


def _case(seed: int, batch: int, T: int, C: int, neg_inf: bool):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(batch, C, generator=g, dtype=torch.float64)
    pot = torch.randn(batch, T - 1, C, C, generator=g, dtype=torch.float64)
    if neg_inf:  # knock out some transitions and start states
        pot = pot.masked_fill(torch.rand(pot.shape, generator=g) < 0.3, float("-inf"))
        init = init.masked_fill(torch.rand(init.shape, generator=g) < 0.3, float("-inf"))
    lengths = torch.randint(1, T + 1, (batch,), generator=g)
    return init, pot, lengths


def _path_weights(init, pot, length):
    """Every path of the given length with its weight, by enumeration."""
    C = init.shape[-1]
    out = []
    for y in itertools.product(range(C), repeat=length):
        w = init[y[0]] + sum(pot[t, y[t], y[t + 1]] for t in range(length - 1))
        out.append((y, float(w)))
    return out


cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 4),
    st.booleans(),
)


@SETTINGS
@given(cases, st.sampled_from(["sequential", "scan"]))
def test_contract_equals_enumeration(case, method):
    init, pot, lengths = _case(*case)
    logz = LogSemiring.plus(chain_contract(init, pot, LogSemiring, lengths, method), -1)
    best = MaxSemiring.plus(chain_contract(init, pot, MaxSemiring, lengths, method), -1)
    for b in range(init.shape[0]):
        ws = torch.tensor(
            [w for _, w in _path_weights(init[b], pot[b], int(lengths[b]))], dtype=torch.float64
        )
        assert torch.allclose(logz[b], torch.logsumexp(ws, 0), atol=1e-9, equal_nan=False)
        assert torch.allclose(best[b], ws.max(), atol=1e-12)


@SETTINGS
@given(cases)
def test_viterbi_path_attains_the_best_score(case):
    init, pot, lengths = _case(*case)
    score, path = chain_viterbi(init, pot, None, lengths)
    for b in range(init.shape[0]):
        L = int(lengths[b])
        weights = dict(_path_weights(init[b], pot[b], L))
        best = max(weights.values())
        assert score[b].item() == pytest.approx(best, abs=1e-9) or best == score[b].item()
        if best > float("-inf"):
            assert weights[tuple(path[b, :L].tolist())] == pytest.approx(best, abs=1e-9)
        assert (path[b, L:] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 70),
    st.integers(1, 5),
    st.booleans(),
)
def test_scan_equals_sequential_values_and_gradients(seed, batch, T, C, neg_inf):
    init, pot, lengths = _case(seed, batch, T, C, neg_inf)
    for semiring in (LogSemiring, MaxSemiring):
        outs, grads = [], []
        for method in ("sequential", "scan"):
            i, p = init.clone().requires_grad_(), pot.clone().requires_grad_()
            fwd = chain_forward(i, p, semiring, lengths, method)
            total = semiring.plus(fwd[..., -1, :], -1)
            finite = torch.isfinite(total)
            total[finite].sum().backward()
            outs.append(fwd)
            # An unused input (T = 1, or nothing finite) gets no gradient at all: read it as 0.
            grads.append(tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in (i, p)))
            assert torch.equal(
                fwd[..., -1, :], chain_contract(init, pot, semiring, lengths, method)
            )
        assert torch.allclose(outs[0], outs[1], atol=1e-9)
        if semiring is LogSemiring:  # max-semiring gradients may split ties differently
            for a, b in zip(grads[0], grads[1], strict=True):
                assert torch.isfinite(a).all() and torch.isfinite(b).all()
                assert torch.allclose(a, b, atol=1e-9)


def test_forward_vectors_are_carried_past_each_length():
    init, pot, _ = _case(3, 2, 6, 3, False)
    lengths = torch.tensor([2, 6])
    for method in ("sequential", "scan"):
        fwd = chain_forward(init, pot, LogSemiring, lengths, method)
        assert torch.equal(fwd[0, 1:], fwd[0, 1:2].expand(5, 3))
        full = chain_forward(init[1], pot[1], LogSemiring, None, method)
        assert torch.allclose(fwd[1], full)


def test_length_one_and_empty_potentials():
    init = torch.randn(4, 3)
    pot = torch.randn(4, 0, 3, 3)
    assert torch.equal(chain_contract(init, pot), init)
    assert chain_forward(init, pot).shape == (4, 1, 3)
    score, path = chain_viterbi(init, pot)
    assert torch.equal(path[:, 0], init.argmax(-1)) and torch.equal(score, init.amax(-1))


def test_shared_potentials_broadcast_over_the_batch():
    # HMM-style use: one init, one set of transfer matrices, many lengths.
    init = torch.randn(3, dtype=torch.float64)
    pot = torch.randn(7, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([1, 4, 8])
    for method in ("sequential", "scan"):
        out = chain_contract(init, pot, LogSemiring, lengths, method)
        assert out.shape == (3, 3)
        for b, L in enumerate(lengths.tolist()):
            ref = chain_contract(init, pot[: L - 1], LogSemiring, None, "sequential")
            assert torch.allclose(out[b], ref)


def test_all_impossible_gives_neg_inf_with_finite_gradients():
    init = torch.full((2, 3), float("-inf"), requires_grad=True)
    pot = torch.randn(2, 4, 3, 3, requires_grad=True)
    for method in ("sequential", "scan"):
        logz = LogSemiring.plus(chain_contract(init, pot, LogSemiring, None, method), -1)
        assert torch.isneginf(logz).all()
        logz.sum().backward()
        assert torch.isfinite(init.grad).all() and torch.isfinite(pot.grad).all()
        init.grad = pot.grad = None


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 40), st.integers(1, 6))
def test_backtrack_equals_a_plain_loop(seed, batch, T, S):
    g = torch.Generator().manual_seed(seed)
    pointers = torch.randint(0, S, (batch, T - 1, S), generator=g)
    last = torch.randint(0, S, (batch,), generator=g)
    lengths = torch.randint(1, T + 1, (batch,), generator=g)
    path = chain_backtrack(pointers, last, lengths)
    for b in range(batch):
        L = int(lengths[b])
        y = [int(last[b])]
        for t in range(L - 2, -1, -1):
            y.append(int(pointers[b, t, y[-1]]))
        assert path[b, :L].tolist() == y[::-1]
        assert (path[b, L:] == 0).all()


@SETTINGS
@given(cases, st.integers(1, 6))
def test_kbest_equals_sorted_enumeration(case, k):
    init, pot, lengths = _case(*case)
    scores, paths = chain_kbest(init, pot, k, None, lengths)
    assert scores.shape == (k, init.shape[0]) and paths.shape == (
        k,
        *pot.shape[:-3],
        pot.shape[-3] + 1,
    )
    for b in range(init.shape[0]):
        L = int(lengths[b])
        weights = dict(_path_weights(init[b], pot[b], L))
        ref = sorted(weights.values(), reverse=True)[:k]
        ref += [float("-inf")] * (k - len(ref))
        assert scores[:, b].tolist() == pytest.approx(ref, abs=1e-9)
        finite = [tuple(paths[r, b, :L].tolist()) for r in range(k) if scores[r, b] > -float("inf")]
        assert len(set(finite)) == len(finite)  # distinct paths
        for r, y in enumerate(finite):
            assert weights[y] == pytest.approx(scores[r, b].item(), abs=1e-9)


def test_mask_potentials_uses_identity_past_the_end():
    pot = torch.randn(2, 3, 2, 2)
    out = mask_potentials(pot, torch.tensor([1, 4]), LogSemiring)  # T = 4
    eye = LogSemiring.identity(2, like=pot)
    assert torch.equal(out[0], eye.expand(3, 2, 2)) and torch.equal(out[1], pot[1])


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="potentials"):
        chain_contract(torch.randn(3), torch.randn(4, 2, 2))
    with pytest.raises(InputError, match="method"):
        chain_contract(torch.randn(3), torch.randn(4, 3, 3), method="fast")
    with pytest.raises(InputError, match="lengths"):
        chain_contract(torch.randn(2, 3), torch.randn(2, 4, 3, 3), lengths=torch.ones(2))
    with pytest.raises(InputError, match="k must"):
        chain_kbest(torch.randn(3), torch.randn(4, 3, 3), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    init, pot, lengths = _case(5, 4, 50, 4, True)
    for method in ("sequential", "scan"):
        cpu = chain_forward(init, pot, LogSemiring, lengths, method)
        gpu = chain_forward(init.cuda(), pot.cuda(), LogSemiring, lengths.cuda(), method)
        assert torch.allclose(cpu, gpu.cpu(), atol=1e-9)
        s_cpu, p_cpu = chain_viterbi(init, pot, None, lengths, method)
        s_gpu, p_gpu = chain_viterbi(init.cuda(), pot.cuda(), None, lengths.cuda(), method)
        assert torch.equal(p_cpu, p_gpu.cpu())
