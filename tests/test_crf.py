"""LinearChainCRF against brute-force enumeration of all tag paths, pytorch-crf, and Pyro."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as pdist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from jointkl import factored_chain
from jointkl.distributions import (
    LinearChainCRF,
    TagConstraints,
    bmes_constraints,
    constraint_violations,
)
from jointkl.errors import InputError
from jointkl.semiring import MaxSemiring

SETTINGS = settings(max_examples=30, deadline=None)
NEG_INF = float("-inf")


def _crf(seed: int, batch: int, T: int, C: int, constrained: bool, method: str = "auto"):
    """A random CRF (float64) with random lengths and, optionally, random constraints."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if constrained:
        kw["allowed"] = TagConstraints(
            torch.rand(C, C, generator=g) < 0.7,
            torch.rand(C, generator=g) < 0.8,
            torch.rand(C, generator=g) < 0.8,
        )
    return LinearChainCRF(
        torch.randn(batch, T, C, generator=g, dtype=torch.float64),
        torch.randn(C, C, generator=g, dtype=torch.float64),
        start=torch.randn(C, generator=g, dtype=torch.float64),
        end=torch.randn(C, generator=g, dtype=torch.float64),
        lengths=torch.randint(1, T + 1, (batch,), generator=g),
        method=method,
        **kw,
    )


def _enumerate(crf: LinearChainCRF, b: int) -> dict[tuple[int, ...], float]:
    """Score of every tag path of sequence b, written out from the definition."""
    h, A = crf.emissions[b], crf.transitions
    C = crf.num_tags
    start = crf.start if crf.start is not None else torch.zeros(C, dtype=h.dtype)
    end = crf.end if crf.end is not None else torch.zeros(C, dtype=h.dtype)
    allowed = crf.allowed
    L = int(crf.lengths[b]) if crf.lengths is not None else h.shape[0]
    out = {}
    for y in itertools.product(range(C), repeat=L):
        ok = allowed is None or (
            (allowed.start is None or allowed.start[y[0]])
            and (allowed.end is None or allowed.end[y[-1]])
            and all(allowed.transitions[y[t], y[t + 1]] for t in range(L - 1))
        )
        s = start[y[0]] + h[0, y[0]] + end[y[-1]]
        s = s + sum(A[y[t], y[t + 1]] + h[t + 1, y[t + 1]] for t in range(L - 1))
        out[y] = float(s) if ok else NEG_INF
    return out


def _probs(scores: dict) -> dict:
    finite = [s for s in scores.values() if s > NEG_INF]
    if not finite:
        return {y: 0.0 for y in scores}
    m = max(finite)
    logz = m + math.log(sum(math.exp(s - m) for s in finite))
    return {y: (math.exp(s - logz) if s > NEG_INF else 0.0) for y, s in scores.items()}


def _pad(y, T):
    return list(y) + [0] * (T - len(y))


crfs = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from(["sequential", "scan", "factored"]),
)


@SETTINGS
@given(crfs)
def test_log_partition_and_log_prob_equal_enumeration(args):
    crf = _crf(*args)
    logz = crf.log_partition
    for b in range(crf.batch_shape[0]):
        scores = _enumerate(crf, b)
        finite = [s for s in scores.values() if s > NEG_INF]
        ref = torch.logsumexp(torch.tensor(finite, dtype=torch.float64), 0) if finite else NEG_INF
        assert float(logz[b]) == pytest.approx(float(ref), abs=1e-9)
        paths = torch.tensor([_pad(y, crf.event_shape[0]) for y in scores])
        # log_prob on a (paths, batch, T) sample-shaped input, checked for sequence b.
        lp = crf.log_prob(paths.unsqueeze(1).expand(-1, crf.batch_shape[0], -1))[:, b]
        probs = _probs(scores)
        for i, y in enumerate(scores):
            want = math.log(probs[y]) if probs[y] > 0 else NEG_INF
            assert float(lp[i]) == pytest.approx(want, abs=1e-9)


@SETTINGS
@given(crfs)
def test_node_and_edge_marginals_equal_enumeration(args):
    crf = _crf(*args)
    node, edge = crf.marginals, crf.edge_marginals
    T, C = crf.event_shape[0], crf.num_tags
    assert node.shape == (*crf.batch_shape, T, C) and edge.shape == (*crf.batch_shape, T - 1, C, C)
    for b in range(crf.batch_shape[0]):
        ref_node = torch.zeros(T, C, dtype=torch.float64)
        ref_edge = torch.zeros(max(T - 1, 0), C, C, dtype=torch.float64)
        for y, p in _probs(_enumerate(crf, b)).items():
            for t, tag in enumerate(y):
                ref_node[t, tag] += p
            for t in range(len(y) - 1):
                ref_edge[t, y[t], y[t + 1]] += p
        assert torch.allclose(node[b], ref_node, atol=1e-9)
        assert torch.allclose(edge[b], ref_edge, atol=1e-9)


@SETTINGS
@given(crfs)
def test_viterbi_path_and_score_equal_enumeration(args):
    crf = _crf(*args)
    tags, score = crf.viterbi()
    assert torch.equal(tags, crf.mode)
    for b in range(crf.batch_shape[0]):
        scores = _enumerate(crf, b)
        best = max(scores.values())
        L = len(next(iter(scores)))
        assert float(score[b]) == pytest.approx(best, abs=1e-9)
        assert (tags[b, L:] == 0).all()
        if best > NEG_INF:
            y = tuple(tags[b, :L].tolist())
            assert scores[y] == pytest.approx(best, abs=1e-9)
            runner_up = sorted(scores.values())[-2] if len(scores) > 1 else NEG_INF
            if best - runner_up > 1e-6:  # unique optimum: the path itself is determined
                assert y == max(scores, key=scores.get)


@SETTINGS
@given(crfs, st.integers(1, 5))
def test_top_k_equals_sorted_enumeration(args, k):
    crf = _crf(*args)
    paths, scores = crf.top_k(k)
    assert paths.shape == (k, *crf.batch_shape, crf.event_shape[0])
    for b in range(crf.batch_shape[0]):
        ref = sorted(_enumerate(crf, b).values(), reverse=True)[:k]
        ref += [NEG_INF] * (k - len(ref))
        assert scores[:, b].tolist() == pytest.approx(ref, abs=1e-9)
        finite = scores[:, b] > NEG_INF
        # Each listed path really has its listed score (also via the public score()).
        path_scores = crf.score(paths[:, b : b + 1].expand(-1, crf.batch_shape[0], -1))[:, b]
        assert torch.allclose(path_scores[finite], scores[finite, b], atol=1e-9)
        listed = {tuple(p) for p in paths[finite, b].tolist()}
        assert len(listed) == int(finite.sum())


@SETTINGS
@given(crfs)
def test_entropy_equals_enumeration(args):
    crf = _crf(*args)
    H = crf.entropy()
    for b in range(crf.batch_shape[0]):
        ref = -sum(p * math.log(p) for p in _probs(_enumerate(crf, b)).values() if p > 0)
        assert float(H[b]) == pytest.approx(ref, abs=1e-9)


@settings(max_examples=12, deadline=None)
@given(crfs)
def test_samples_follow_the_enumerated_distribution(args):
    crf = _crf(*args)
    n = 4000
    pyro.set_rng_seed(args[0])
    samples = crf.sample((n,))
    T = crf.event_shape[0]
    assert samples.shape == (n, *crf.batch_shape, T)
    for b in range(crf.batch_shape[0]):
        probs = _probs(_enumerate(crf, b))
        L = len(next(iter(probs)))
        assert (samples[:, b, L:] == 0).all()
        if sum(probs.values()) == 0:
            continue  # no possible path: the samples are meaningless
        counts = dict.fromkeys(probs, 0)
        for y in map(tuple, samples[:, b, :L].tolist()):
            assert probs[y] > 0, f"sampled the impossible path {y}"
            counts[y] += 1
        # Chi-square over paths, pooling the rare ones so every bin expects >= 5 draws.
        obs, exp, pool_o, pool_e = [], [], 0, 0.0
        for y, p in probs.items():
            if p == 0:
                continue
            if n * p >= 5:
                obs.append(counts[y])
                exp.append(n * p)
            else:
                pool_o += counts[y]
                pool_e += n * p
        if pool_e > 0:
            obs.append(pool_o)
            exp.append(pool_e)
        if len(obs) > 1:
            exp = [e * n / sum(exp) for e in exp]
            assert chisquare(obs, exp).pvalue > 1e-6


def test_length_one_sequences():
    h = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    s, e = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    crf = LinearChainCRF(h, A, start=s, end=e)
    assert torch.allclose(crf.log_partition, torch.logsumexp(s + h[:, 0] + e, -1))
    assert torch.equal(crf.mode[:, 0], (s + h[:, 0] + e).argmax(-1))
    assert torch.allclose(crf.marginals[:, 0], torch.softmax(s + h[:, 0] + e, -1))
    loss = -crf.log_prob(torch.zeros(3, 1, dtype=torch.long)).sum() - crf.entropy().sum()
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(A.grad).all()
    assert torch.equal(A.grad, torch.zeros_like(A.grad))  # no transitions in length 1


def test_mask_and_lengths_agree():
    h, A = torch.randn(2, 5, 3), torch.randn(3, 3)
    lengths = torch.tensor([5, 2])
    mask = torch.arange(5) < lengths[:, None]
    a, b = LinearChainCRF(h, A, lengths=lengths), LinearChainCRF(h, A, mask=mask)
    tags = torch.randint(0, 3, (2, 5))
    assert torch.equal(a.log_prob(tags), b.log_prob(tags))
    assert torch.equal(a.mode, b.mode)


def _assert_bmes(tags: list[int], names=("B", "M", "E", "S")):
    seq = "".join(names[t] for t in tags)
    assert seq[0] in "BS" and seq[-1] in "ES", seq
    for a, b in zip(seq, seq[1:], strict=False):
        assert b in ({"B": "ME", "M": "ME", "E": "BS", "S": "BS"}[a]), seq


def test_bmes_constraints_are_honoured_by_decoding_sampling_and_top_k():
    torch.manual_seed(0)
    lengths = torch.tensor([7, 1, 2, 4])
    # Emissions that, unconstrained, favour illegal sequences (all M).
    h = torch.randn(4, 7, 4) + torch.tensor([0.0, 3.0, 0.0, 0.0])
    crf = LinearChainCRF(h, torch.zeros(4, 4), lengths=lengths, allowed=bmes_constraints())
    samples, (kbest, kscores) = crf.sample((50,)), crf.top_k(6)
    for b, L in enumerate(lengths.tolist()):
        _assert_bmes(crf.mode[b, :L].tolist())
        for y in samples[:, b, :L].tolist():
            _assert_bmes(y)
        for r in range(6):
            if kscores[r, b] > NEG_INF:
                _assert_bmes(kbest[r, b, :L].tolist())
    illegal = torch.full((4, 7), 1)  # all M
    assert torch.isneginf(crf.log_prob(illegal)).all()
    # The helper follows the given tag order.
    c = bmes_constraints(["s", "b", "m", "e"])
    assert c.start.tolist() == [True, True, False, False]
    assert c.transitions[1].tolist() == [False, False, True, True]  # b -> m, e


def test_gradients_finite_with_constraints_impossible_paths_and_length_one():
    torch.manual_seed(1)
    h = torch.randn(3, 4, 4, requires_grad=True)
    A = torch.randn(4, 4, requires_grad=True)
    s = torch.randn(4, requires_grad=True)
    e = torch.randn(4, requires_grad=True)
    # Sequence 1 has length 1 and must be a single S; every tag of sequence 2 is -inf at t=0.
    mask_h = torch.zeros(3, 4, 4)
    mask_h[2, 0] = NEG_INF
    crf = LinearChainCRF(
        h + mask_h, A, s, e, lengths=torch.tensor([4, 1, 3]), allowed=bmes_constraints()
    )
    gold = torch.tensor([[0, 2, 1, 1], [3, 0, 0, 0], [3, 3, 3, 0]])  # seq 0 ends illegally
    lp = crf.log_prob(gold)
    assert torch.isneginf(lp[0]) and torch.isfinite(lp[1]) and torch.isneginf(lp[2])
    assert torch.isneginf(crf.log_partition[2])
    total = (
        lp[1]
        + crf.log_partition.clamp(min=-1e4).sum()
        + crf.entropy().sum()
        + (crf.marginals * torch.randn(3, 4, 4)).sum()
    )
    total.backward()
    for name, x in (("emissions", h), ("transitions", A), ("start", s), ("end", e)):
        assert torch.isfinite(x.grad).all(), name
    # Forbidden transitions carry no gradient.
    assert (A.grad[~bmes_constraints().transitions] == 0).all()


def test_marginals_are_differentiable_when_parameters_require_grad():
    h = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, A: LinearChainCRF(h, A, lengths=torch.tensor([4, 2])).marginals, (h, A)
    )
    assert torch.autograd.gradcheck(lambda h, A: LinearChainCRF(h, A).entropy(), (h, A))


def test_bad_input_raises_input_error_naming_the_argument():
    h, A = torch.randn(2, 5, 3), torch.randn(3, 3)
    cases = [
        (dict(emissions=torch.randn(5)), "emissions"),
        (dict(transitions=torch.randn(3, 4)), "transitions"),
        (dict(start=torch.randn(4)), "start"),
        (dict(emissions=h.masked_fill(h > 1, float("nan"))), "emissions contains NaN"),
        (dict(transitions=A.masked_fill(A > 0, float("inf"))), r"transitions contains \+inf"),
        (dict(lengths=torch.tensor([0, 3])), "lengths must lie in 1..5"),
        (dict(lengths=torch.tensor([6, 3])), "lengths must lie in 1..5"),
        (dict(lengths=torch.tensor([1.0, 3.0])), "lengths must be integers"),
        (dict(lengths=torch.tensor([1, 2, 3])), "lengths of shape"),
        (dict(mask=torch.tensor([[True, False, True, False, False]] * 2)), "prefix"),
        (dict(lengths=[2, 3], mask=torch.ones(2, 5, dtype=torch.bool)), "either lengths or mask"),
        (dict(allowed=torch.ones(3, 3)), "allowed.transitions must be a bool"),
    ]
    for kw, msg in cases:
        args = dict(emissions=h, transitions=A) | kw
        with pytest.raises(InputError, match=msg):
            LinearChainCRF(**args)
    crf = LinearChainCRF(h, A, lengths=torch.tensor([5, 2]))
    with pytest.raises(InputError, match="tags must lie in 0..2"):
        crf.log_prob(torch.tensor([[0, 1, 2, 3, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(InputError, match="tags must have shape"):
        crf.log_prob(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="do not broadcast"):
        crf.log_prob(torch.zeros(3, 5, dtype=torch.long))
    # Padding tags are ignored, even out-of-range ones (e.g. an ignore index).
    assert torch.isfinite(
        crf.log_prob(torch.tensor([[0, 1, 2, 0, 0], [1, 1, -100, -100, 7]]))
    ).all()
    with pytest.raises(InputError, match="B, M, E and S"):
        bmes_constraints(["B", "I", "E", "S"])


def test_tag_check_fast_and_masked_paths_agree():
    # The tag check first reduces over every entry (padding included); only when that finds
    # an out-of-range value does it look at which positions are padding.
    h, A = torch.randn(2, 5, 3), torch.randn(3, 3)
    crf = LinearChainCRF(h, A, lengths=torch.tensor([5, 2]))
    good = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 0, 0, 0]])
    padded = good.clone()
    padded[1, 2:] = torch.tensor([-100, 3, 7])  # out of range, but only past the length
    torch.testing.assert_close(crf.log_prob(padded), crf.log_prob(good))
    as_float = good.double()
    torch.testing.assert_close(crf.log_prob(as_float), crf.log_prob(good))
    for bad_value in (3.0, -1.0, float("inf")):
        bad = as_float.clone()
        bad[1, 1] = bad_value  # a valid position of the length-2 row
        with pytest.raises(InputError, match="tags must lie in 0..2"):
            crf.log_prob(bad)


def test_pyro_site_in_a_data_plate():
    h, A = torch.randn(6, 5, 3), torch.randn(3, 3)
    lengths = torch.tensor([5, 4, 3, 2, 1, 5])
    tags = torch.randint(0, 3, (6, 5))

    def model():
        with pyro.plate("data", 6):
            pyro.sample("tags", LinearChainCRF(h, A, lengths=lengths), obs=tags)

    tr = pyro.poutine.trace(model).get_trace()
    tr.compute_log_prob()
    want = LinearChainCRF(h, A, lengths=lengths).log_prob(tags)
    assert torch.allclose(tr.nodes["tags"]["log_prob"], want)
    # expand() to a larger batch, as plates and enumeration do.
    ex = LinearChainCRF(h[0], A, lengths=lengths[0]).expand((2, 3))
    assert ex.batch_shape == (2, 3) and ex.sample().shape == (2, 3, 5)
    assert isinstance(ex, pdist.TorchDistribution)


def test_log_prob_matches_pytorch_crf():
    torchcrf = pytest.importorskip("torchcrf", reason="pytorch-crf not installed (bench extra)")
    torch.manual_seed(0)
    for B, T, C in [(4, 1, 3), (5, 7, 4), (3, 20, 6)]:
        ref = torchcrf.CRF(C, batch_first=True)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        h = torch.randn(B, T, C)
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        mask = torch.arange(T) < lengths[:, None]
        tags = torch.randint(0, C, (B, T))
        ours = LinearChainCRF(
            h, ref.transitions, ref.start_transitions, ref.end_transitions, mask=mask
        )
        theirs = ref(h, tags, mask=mask, reduction="none")
        assert torch.allclose(ours.log_prob(tags), theirs, atol=1e-5, rtol=0)
        decoded = ref.decode(h, mask=mask)
        for b, y in enumerate(decoded):
            assert ours.mode[b, : len(y)].tolist() == y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    crf = _crf(11, 4, 30, 4, True, "scan")
    dev = LinearChainCRF(
        crf.emissions.cuda(),
        crf.transitions.cuda(),
        crf.start.cuda(),
        crf.end.cuda(),
        lengths=crf.lengths.cuda(),
        allowed=crf.allowed,
    )
    assert torch.allclose(crf.log_partition, dev.log_partition.cpu())
    assert torch.allclose(crf.marginals, dev.marginals.cpu())
    assert torch.equal(crf.mode, dev.mode.cpu())
    assert dev.sample((3,)).device.type == "cuda"


@pytest.mark.parametrize("method", ["factored", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_path_equals_pytorch_crf_values_gradients_and_paths(dtype, method):
    """The factored path (and the default) against pytorch-crf at random lengths (length 1 included):
    log-likelihood, its gradients with respect to all four score tensors, Viterbi paths, to
    1e-5. The reference runs in float64 on the same values (in float32 its own rounding,
    accumulated over T steps of autograd, is itself of order 1e-5)."""
    torchcrf = pytest.importorskip("torchcrf", reason="pytorch-crf not installed (bench extra)")
    torch.manual_seed(3)
    for B, T, C in [(6, 1, 3), (7, 9, 4), (5, 50, 9), (4, 60, 20), (3, 100, 4)]:
        ref = torchcrf.CRF(C, batch_first=True).double()
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        h = torch.randn(B, T, C, dtype=torch.float64)
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0], lengths[-1] = T, 1
        mask = torch.arange(T) < lengths[:, None]
        tags = torch.randint(0, C, (B, T))
        scores = [h, ref.transitions, ref.start_transitions, ref.end_transitions]
        ours_in = [x.detach().to(dtype, copy=True).requires_grad_() for x in scores]
        theirs_in = [x.detach().clone().requires_grad_() for x in scores]
        crf = LinearChainCRF(*ours_in, mask=mask, method=method)
        ours = crf.log_prob(tags)
        theirs = torchcrf_log_likelihood(ref, *theirs_in, tags, mask)
        assert ours.dtype == dtype
        # float32 cannot hold -210 to 1e-5 (its spacing there is 1.5e-5): add 1e-6 relative.
        rtol = 0 if dtype == torch.float64 else 1e-6
        assert torch.allclose(ours.double(), theirs, atol=1e-5, rtol=rtol)
        weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
        kw = dict(allow_unused=True, materialize_grads=True)  # T = 1 uses no transitions
        g_ours = torch.autograd.grad((ours * weights.to(dtype)).sum(), ours_in, **kw)
        g_theirs = torch.autograd.grad((theirs * weights).sum(), theirs_in, **kw)
        names = ("emissions", "transitions", "start", "end")
        for name, a, b in zip(names, g_ours, g_theirs, strict=True):
            assert torch.allclose(a.double(), b, atol=1e-5, rtol=rtol), name
        with torch.no_grad():
            decoded = ref.decode(h, mask=mask)
        mode = LinearChainCRF(*(x.to(dtype) for x in scores), mask=mask, method=method).mode
        for b, y in enumerate(decoded):
            assert mode[b, : len(y)].tolist() == y
            assert (mode[b, len(y) :] == 0).all()


def torchcrf_log_likelihood(ref, emissions, transitions, start, end, tags, mask):
    """pytorch-crf's per-sequence log-likelihood with its score tensors swapped for the given
    leaves, so that gradients with respect to all four can be taken."""
    saved = ref.transitions, ref.start_transitions, ref.end_transitions
    try:
        del ref.transitions, ref.start_transitions, ref.end_transitions
        ref.transitions, ref.start_transitions, ref.end_transitions = transitions, start, end
        return ref(emissions, tags, mask=mask, reduction="none")
    finally:
        del ref.transitions, ref.start_transitions, ref.end_transitions
        ref.transitions, ref.start_transitions, ref.end_transitions = saved


@pytest.mark.parametrize("constrained", [False, True])
def test_factored_path_equals_the_generic_recursion(constrained):
    """Values and gradients of log_prob, and Viterbi paths and scores: factored = sequential
    (the generic log-semiring recursion), with constraints, -inf emissions and length 1."""
    g = torch.Generator().manual_seed(5)
    B, T, C = 9, 37, 4
    h = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 3
    h[2, 5, 1] = NEG_INF  # one forbidden tag at one position
    kwargs = dict(
        emissions=h,
        transitions=torch.randn(C, C, generator=g, dtype=torch.float64),
        start=torch.randn(C, generator=g, dtype=torch.float64),
        end=torch.randn(C, generator=g, dtype=torch.float64),
    )
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    extra = dict(lengths=lengths, allowed=bmes_constraints() if constrained else None)
    gen = LinearChainCRF(**kwargs, **extra, method="sequential")
    tags = gen.sample((3,))  # possible paths, so every log_prob is finite
    fast = LinearChainCRF(**kwargs, **extra, method="factored")
    assert torch.allclose(fast.log_partition, gen.log_partition, atol=1e-10, rtol=0)
    path_f, score_f = fast.viterbi()
    path_g, score_g = gen.viterbi()
    assert torch.equal(path_f, path_g)
    assert torch.allclose(score_f, score_g, atol=1e-10, rtol=0)
    # Gradients through the hand-written backward against autograd of the generic recursion.
    leaves = {k: v.clone().requires_grad_() for k, v in kwargs.items()}
    grads = {}
    for method in ("factored", "sequential"):
        for v in leaves.values():
            v.grad = None
        lp = LinearChainCRF(**leaves, **extra, method=method).log_prob(tags)
        (lp * torch.rand(lp.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads[method] = {k: v.grad.clone() for k, v in leaves.items()}
    for k in leaves:
        assert torch.allclose(grads["factored"][k], grads["sequential"][k], atol=1e-10), k
        assert torch.isfinite(grads["factored"][k]).all(), k


def test_factored_path_falls_back_where_the_scales_cannot_be_trusted():
    """Scores spanning thousands of nats underflow in scaled probability space: the fast
    recursion declines (None) and the CRF's log Z and gradients come from the log-space one."""
    torch.manual_seed(0)
    h = torch.randn(3, 12, 4, dtype=torch.float64) * 2000
    A = torch.randn(4, 4, dtype=torch.float64) * 2000
    zero = torch.zeros(4, dtype=torch.float64)
    assert factored_chain.log_partition(h, A, zero, zero, None) is None
    h.requires_grad_()
    fast = LinearChainCRF(h, A, method="factored").log_partition
    (g_fast,) = torch.autograd.grad(fast.sum(), h)
    slow = LinearChainCRF(h, A, method="sequential").log_partition
    (g_slow,) = torch.autograd.grad(slow.sum(), h)
    assert torch.allclose(fast, slow, atol=1e-9, rtol=1e-12)
    assert torch.allclose(g_fast, g_slow, atol=1e-9)
    # A sequence with no possible path (log Z = -inf) goes the same way, gradients finite.
    h2 = torch.randn(2, 5, 4, dtype=torch.float64)
    h2[1, 2] = NEG_INF
    h2.requires_grad_()
    lz = LinearChainCRF(h2, A / 2000, method="factored").log_partition
    assert torch.isneginf(lz[1]) and torch.isfinite(lz[0])
    lz.clamp(min=-1e4).sum().backward()
    assert torch.isfinite(h2.grad).all()


def test_factored_log_prob_has_a_correct_second_derivative():
    h = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    tags = torch.randint(0, 3, (3, 6))
    lengths = torch.tensor([6, 1, 4])

    def f(h, A):
        return LinearChainCRF(h, A, lengths=lengths, method="factored").log_prob(tags)

    assert torch.autograd.gradcheck(f, (h, A))
    assert torch.autograd.gradgradcheck(f, (h, A))


def test_method_is_validated_and_auto_picks_the_factored_path_where_it_is_faster():
    from jointkl.distributions.crf import FACTORED_MAX_T

    h, A = torch.randn(2, 5, 3), torch.randn(3, 3)
    with pytest.raises(InputError, match="method must be one of"):
        LinearChainCRF(h, A, method="fast")
    assert not LinearChainCRF(h, A, method="scan")._factored()
    for B, T, C in [(64, 100, 4), (32, 50, 9), (32, 50, 20)]:  # the tagging sizes
        crf = LinearChainCRF(torch.randn(B, T, C), torch.randn(C, C))
        assert crf._factored() and crf._factored(MaxSemiring)
    # Few long chains: the generic log-depth scan, unless asked.
    long = torch.randn(16, FACTORED_MAX_T + 1, 4)
    assert not LinearChainCRF(long, torch.randn(4, 4))._factored()
    assert not LinearChainCRF(long, torch.randn(4, 4))._factored(MaxSemiring)
    assert LinearChainCRF(long, torch.randn(4, 4), method="factored")._factored(MaxSemiring)


def test_constraint_violations_counts_illegal_bmes_sequences():
    B, M, E, S = 0, 1, 2, 3
    allowed = bmes_constraints()
    cases = [
        ([B, E, S], 0),
        ([S], 0),
        ([B, M, M, E, B, E], 0),
        ([B, B, E], 1),  # B followed by B
        ([B, S], 1),  # B followed by S
        ([M, E], 1),  # M without a preceding B or M (at the start)
        ([S, E], 1),  # E without a preceding B or M
        ([E], 1),  # starts with E (a legal last tag)
        ([B, M], 1),  # ends in M
        ([B], 1),  # ends in B
        ([S, M, B], 3),  # S -> M, M -> B, ends in B
    ]
    for tags, want in cases:
        got = int(constraint_violations(torch.tensor(tags), allowed))
        assert got == want, (tags, got, want)
    # Batched, with lengths: what lies past each length is ignored.
    tags = torch.tensor([[B, E, M, M], [S, B, B, B], [M, S, S, S]])
    got = constraint_violations(tags, allowed, lengths=torch.tensor([2, 1, 4]))
    assert got.tolist() == [0, 0, 2]  # third: starts with M, M -> S
    with pytest.raises(InputError, match="lengths must lie"):
        constraint_violations(tags, allowed, lengths=torch.tensor([0, 1, 1]))
    with pytest.raises(InputError, match="tags must lie"):
        constraint_violations(torch.tensor([0, 7]), allowed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_factored_path_matches_cpu():
    crf = _crf(12, 5, 40, 6, False, "factored")
    h = crf.emissions.cuda().requires_grad_()
    dev = LinearChainCRF(
        h,
        crf.transitions.cuda(),
        crf.start.cuda(),
        crf.end.cuda(),
        lengths=crf.lengths.cuda(),
        method="factored",
    )
    assert torch.allclose(crf.log_partition, dev.log_partition.cpu())
    dev.log_partition.sum().backward()
    assert torch.allclose(crf.marginals, h.grad.cpu(), atol=1e-9)
    assert torch.equal(crf.mode, dev.mode.cpu())


@pytest.mark.parametrize("method", ["factored", "sequential"])
def test_empty_batch_and_several_batch_dimensions(method):
    h = torch.randn(0, 5, 3, requires_grad=True)
    crf = LinearChainCRF(h, torch.randn(3, 3), method=method)
    lp = crf.log_prob(torch.zeros(0, 5, dtype=torch.long))
    lp.sum().backward()
    assert lp.shape == (0,) and crf.mode.shape == (0, 5) and h.grad.shape == h.shape
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 8, (2, 3), generator=g)
    crf = LinearChainCRF(h, A, lengths=lengths, method=method)
    ref = LinearChainCRF(h.reshape(6, 7, 4), A, lengths=lengths.reshape(6), method="sequential")
    assert torch.allclose(crf.log_partition.reshape(6), ref.log_partition, atol=1e-12)
    assert torch.equal(crf.mode.reshape(6, 7), ref.mode)


def _tie_rule_path(h, g, start, end, L: int) -> list[int]:
    """The path the factored Viterbi's documented tie rule picks, written out per position:
    best prefixes up to m - 1 = ceil(L/2) - 1, best suffixes from m, the first best join pair
    (y_{m-1}, y_m) in row-major order, then the lowest tag attaining each max going outwards."""
    h, g, start, end = h.tolist(), g.tolist(), start.tolist(), end.tolist()
    C, m = len(g), (L + 1) // 2
    pre = [[start[i] + h[0][i] for i in range(C)]]
    for t in range(1, m):
        pre.append([max(pre[-1][i] + g[i][j] for i in range(C)) + h[t][j] for j in range(C)])
    if L == 1:
        ends = [pre[0][j] + end[j] for j in range(C)]
        return [ends.index(max(ends))]
    suf = {L - 1: [h[L - 1][k] + end[k] for k in range(C)]}
    for t in range(L - 2, m - 1, -1):
        suf[t] = [max(suf[t + 1][k] + g[i][k] for k in range(C)) + h[t][i] for i in range(C)]
    joins = [pre[m - 1][j] + g[j][k] + suf[m][k] for j in range(C) for k in range(C)]
    best = joins.index(max(joins))
    y = {m - 1: best // C, m: best % C}
    for t in range(m - 2, -1, -1):
        s = [pre[t][i] + g[i][y[t + 1]] for i in range(C)]
        y[t] = s.index(max(s))
    for t in range(m + 1, L):
        s = [g[y[t - 1]][k] + suf[t][k] for k in range(C)]
        y[t] = s.index(max(s))
    return [y[t] for t in range(L)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_viterbi_breaks_ties_by_its_documented_rule(dtype):
    """Scores in {0, 1} (exact in floating point, so many paths tie): the factored Viterbi
    returns a best path, and the one its tie rule names (docs/models/crf.md)."""
    g = torch.Generator().manual_seed(3)
    B, T, C = 40, 9, 3

    def draw(*shape):
        return torch.randint(0, 2, shape, generator=g).to(dtype)

    h, trans, start, end = draw(B, T, C), draw(C, C), draw(C), draw(C)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    crf = LinearChainCRF(h, trans, start, end, lengths=lengths, method="factored")
    path, score = crf.viterbi()
    best = LinearChainCRF(h, trans, start, end, lengths=lengths, method="sequential").viterbi()[1]
    assert torch.equal(score, best)  # a best path
    ties = 0
    for b in range(B):
        L = int(lengths[b])
        assert path[b, :L].tolist() == _tie_rule_path(h[b], trans, start, end, L), b
        assert (path[b, L:] == 0).all()
        ties += sum(s == float(best[b]) for s in _enumerate(crf, b).values()) > 1
    assert ties >= B // 2  # the case does exercise ties
