"""The factored log-likelihood kernels (jointkl.factored_chain: the scaled forward recursion
with the reversed one batched in the same loop, the bulk gradient, the fused gold-path score)
against autograd through the plain log-space recursion (jointkl.chain), for values and the
gradients with respect to all four score tensors: random lengths, length 1, one tag, one
position, forbidden tags and transitions, scores large enough that the rescaling matters,
float32 and float64; compiled = eager; CPU = CUDA (skipped without a device)."""

from __future__ import annotations

import pytest
import torch

from jointkl import factored_chain
from jointkl.chain import chain_contract
from jointkl.distributions import LinearChainCRF, bmes_constraints
from jointkl.semiring import LogSemiring

NEG_INF = float("-inf")


def _plain(h, trans, start, end, lengths, tags):
    """log Z and s(tags) - log Z by the generic log-space recursion and plain indexing, in
    float64 (autograd gives the reference gradients)."""
    B, T, C = h.shape
    init = start + h[:, 0]
    log_z = LogSemiring.plus(
        chain_contract(init, trans + h[:, 1:, None, :], LogSemiring, lengths, "sequential") + end,
        dim=-1,
    )
    score = []
    for b in range(B):
        y = tags[b, : int(lengths[b])]
        s = start[y[0]] + h[b, torch.arange(len(y)), y].sum() + end[y[-1]]
        score.append(s + trans[y[:-1], y[1:]].sum())
    score = torch.stack(score)
    return log_z, torch.where(torch.isfinite(score), score - log_z, NEG_INF)


def _case(seed, B, T, C, dtype, scale=1.0, forbid=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g, dtype=torch.float64) * scale
    trans = torch.randn(C, C, generator=g, dtype=torch.float64) * scale
    start = torch.randn(C, generator=g, dtype=torch.float64) * scale
    end = torch.randn(C, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[-1] = 1
    tags = torch.randint(0, C, (B, T), generator=g)
    if forbid and C > 1 and T > 2:
        h[0, 1, (tags[0, 1] + 1) % C] = NEG_INF  # a forbidden tag off the gold path
        trans[tags[1, 0], tags[1, 1]] = NEG_INF  # sequence 1's gold path is impossible
        lengths[1] = T
    return [x.to(dtype) for x in (h, trans, start, end)], lengths, tags


CASES = [
    (1, 1, 1),
    (3, 1, 4),
    (4, 6, 1),
    (5, 2, 3),
    (6, 9, 5),
    (32, 50, 9),
    (7, 40, 20),
    (3, 17, 4),  # T not a multiple of the rescaling interval
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,C", CASES)
@pytest.mark.parametrize("forbid", [False, True])
def test_values_and_gradients_equal_autograd_of_the_log_space_recursion(B, T, C, dtype, forbid):
    scores, lengths, tags = _case(B * 100 + T * 10 + C, B, T, C, dtype, forbid=forbid)
    leaves = [x.clone().requires_grad_() for x in scores]
    ref_leaves = [x.detach().double().requires_grad_() for x in scores]
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    kw = dict(allow_unused=True, materialize_grads=True)
    ref_z, ref_ll = _plain(*ref_leaves, lengths, tags)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    rtol = 0 if dtype == torch.float64 else 1e-6
    for which, ref in (("log_z", ref_z), ("loglik", ref_ll)):
        if which == "log_z":
            ours = factored_chain.log_partition(*leaves, lengths)
        else:
            ours = factored_chain.log_likelihood(*leaves, lengths, tags)
        assert ours is not None and ours.dtype == dtype and ours.shape == (B,)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours), finite)
        assert torch.allclose(ours.double()[finite], ref[finite], atol=atol, rtol=rtol)
        g_ours = torch.autograd.grad((ours * weights.to(dtype))[finite].sum(), leaves, **kw)
        g_ref = torch.autograd.grad(
            (ref * weights)[finite].sum(), ref_leaves, retain_graph=True, **kw
        )
        for name, a, b in zip(("h", "trans", "start", "end"), g_ours, g_ref, strict=True):
            assert a.dtype == dtype and torch.isfinite(a).all(), (which, name)
            assert torch.allclose(a.double(), b, atol=atol, rtol=rtol), (which, name)
    if forbid and C > 1 and T > 2:
        assert torch.isneginf(ref_ll[1])  # the impossible path was exercised


def test_an_impossible_gold_path_has_zero_gradient_and_the_others_are_unaffected():
    (h, trans, start, end), lengths, tags = _case(4, 4, 8, 4, torch.float64, forbid=True)
    leaves = [x.clone().requires_grad_() for x in (h, trans, start, end)]
    ll = factored_chain.log_likelihood(*leaves, lengths, tags)
    possible = torch.isfinite(ll)
    assert not possible[1] and possible.any()
    (g_h,) = torch.autograd.grad(ll.clamp(min=-1e9).sum(), leaves[0])
    assert torch.isfinite(g_h).all() and (g_h[~possible] == 0).all()
    ref_leaves = [x.detach().requires_grad_() for x in (h, trans, start, end)]
    _, ref = _plain(*ref_leaves, lengths, tags)
    (g_ref,) = torch.autograd.grad(ref[possible].sum(), ref_leaves[0])
    assert torch.allclose(g_h, g_ref, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scores_spanning_hundreds_of_nats_stay_on_the_scaled_path_and_exact(dtype):
    """Scores of tens of nats each (N(0, 30^2)), log-likelihoods of thousands: without the
    per-position shifts and the rescaling every RESCALE_EVERY steps the probabilities would
    under- or overflow float64 within a few positions; the kernel must stay trusted (not
    fall back) and exact, its gradients included (float32 input: computed in float64)."""
    scores, lengths, tags = _case(9, 6, 300, 4, dtype, scale=30.0)
    leaves = [x.clone().requires_grad_() for x in scores]
    ours = factored_chain.log_likelihood(*leaves, lengths, tags)
    assert ours is not None  # the scaled path was taken
    ref_leaves = [x.detach().double().requires_grad_() for x in scores]
    _, ref = _plain(*ref_leaves, lengths, tags)
    assert ref.abs().max() > 1e3  # the rescaling matters: exp of this overflows
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(ours.double(), ref, atol=1e-9, rtol=rtol)
    g_ours = torch.autograd.grad(ours.sum(), leaves)
    g_ref = torch.autograd.grad(ref.sum(), ref_leaves)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a.double(), b, atol=1e-8 if dtype == torch.float64 else 1e-4)


def test_without_a_gradient_the_forward_only_recursion_gives_the_same_values():
    scores, lengths, tags = _case(2, 9, 30, 5, torch.float64)
    leaves = [x.clone().requires_grad_() for x in scores]
    with torch.no_grad():
        plain_z = factored_chain.log_partition(*leaves, lengths)
        plain_ll = factored_chain.log_likelihood(*leaves, lengths, tags)
    assert not plain_z.requires_grad and not plain_ll.requires_grad
    assert torch.allclose(plain_z, factored_chain.log_partition(*leaves, lengths), atol=1e-12)
    assert torch.allclose(
        plain_ll, factored_chain.log_likelihood(*leaves, lengths, tags), atol=1e-12
    )


def test_the_kernels_are_compiled_and_equal_the_eager_functions():
    for fn in (factored_chain._forward_kernel, factored_chain._gradient_kernel):
        assert isinstance(factored_chain._compiled(fn), torch.jit.ScriptFunction)
    for B, T, C in CASES:
        for dtype in (torch.float32, torch.float64):
            (h, trans, start, end), lengths, tags = _case(B + T + C, B, T, C, dtype)
            for t in (None, tags):
                for both in (False, True):
                    args = (h, trans, start, end, lengths, t, both, factored_chain.RESCALE_EVERY)
                    eager = factored_chain._forward_kernel(*args)
                    compiled = factored_chain._compiled(factored_chain._forward_kernel)(*args)
                    for a, b in zip(eager, compiled, strict=True):
                        assert torch.allclose(a, b, atol=1e-13, rtol=1e-13, equal_nan=True)
            _, _, _, *state = factored_chain._forward_kernel(
                h, trans, start, end, lengths, tags, True, factored_chain.RESCALE_EVERY
            )
            grad = torch.linspace(0.5, 1.5, B, dtype=dtype)
            for t in (None, tags):
                eager = factored_chain._gradient_kernel(*state, lengths, grad, t)
                compiled = factored_chain._compiled(factored_chain._gradient_kernel)(
                    *state, lengths, grad, t
                )
                for a, b in zip(eager[:4], compiled[:4], strict=True):
                    assert torch.allclose(a, b, atol=1e-13, rtol=1e-13)
                assert eager[4] and compiled[4]


def test_the_crf_takes_the_fused_path_and_keeps_broadcast_tags_and_constraints_exact():
    """log_prob with tags of the batch shape goes through the fused kernel; tags with a
    sample dimension, and BMES constraints (-inf scores), give the generic path's values."""
    (h, trans, start, end), lengths, _ = _case(6, 5, 12, 4, torch.float64)
    kw = dict(lengths=lengths, allowed=bmes_constraints())
    gen = LinearChainCRF(h, trans, start, end, method="sequential", **kw)
    tags = gen.sample((3,))  # possible paths
    bad = tags.clone()
    bad[:, :, 0] = 1  # M first: forbidden by the start constraint
    fast = LinearChainCRF(h, trans, start, end, method="factored", **kw)
    for y in (tags, bad):
        assert torch.allclose(fast.log_prob(y), gen.log_prob(y), atol=1e-10)
        for k in range(3):
            a, b = fast.log_prob(y[k]), gen.log_prob(y[k])
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-10)
    assert torch.isneginf(fast.log_prob(bad[0])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_log_likelihood_and_gradients_equal_cpu():
    for dtype in (torch.float32, torch.float64):
        scores, lengths, tags = _case(3, 16, 30, 9, dtype, forbid=True)
        out = {}
        for dev in ("cpu", "cuda"):
            leaves = [x.to(dev).requires_grad_() for x in scores]
            crf = LinearChainCRF(*leaves, lengths=lengths.to(dev), method="factored")
            ll = crf.log_prob(tags.to(dev))
            lz = crf.log_partition
            finite = torch.isfinite(ll)
            grads = torch.autograd.grad(ll[finite].sum() + lz.sum(), leaves)
            out[dev] = [ll, lz, *grads]
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for a, b in zip(out["cpu"], out["cuda"], strict=True):
            assert torch.allclose(a, b.cpu(), atol=tol, rtol=tol, equal_nan=True)
