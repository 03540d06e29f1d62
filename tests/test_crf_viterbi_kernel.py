"""The factored Viterbi runs a TorchScript-compiled kernel: it must be that kernel (not the
silent eager fallback) on this torch, and give the eager function's paths bit for bit, on
CPU and CUDA, ties, lengths, one-tag and one-position cases and chunked back-pointers
included. (Optimality itself is pinned by tests/test_crf.py: enumeration, the generic
recursion, pytorch-crf and the documented tie rule.)"""

from __future__ import annotations

import pytest
import torch

from jointkl import factored_chain
from jointkl.distributions import LinearChainCRF
from jointkl.errors import InputError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases(device: str):
    g = torch.Generator().manual_seed(11)
    for B, T, C in [
        (1, 1, 1),
        (3, 1, 4),
        (4, 2, 3),
        (5, 7, 1),
        (6, 9, 5),
        (32, 50, 9),
        (7, 40, 20),
    ]:
        for dtype in (torch.float32, torch.float64):
            for ties in (False, True):

                def draw(*shape, ties=ties, dtype=dtype):
                    x = torch.randn(*shape, generator=g, dtype=dtype)
                    return (x > 0).to(dtype) if ties else x

                args = [draw(B, T, C), draw(C, C), draw(C), draw(C)]
                lengths = torch.randint(1, T + 1, (B,), generator=g)
                lengths[0] = T
                for L in (lengths, None):
                    yield [a.to(device) for a in args] + [None if L is None else L.to(device)]


def test_the_kernel_is_compiled():
    assert isinstance(factored_chain._compiled_kernel(), torch.jit.ScriptFunction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_bytes", [1, factored_chain.VITERBI_CHUNK_BYTES])
def test_compiled_kernel_equals_the_eager_function(device, chunk_bytes):
    kernel = factored_chain._compiled_kernel()
    n = 0
    for args in _cases(device):
        with torch.no_grad():
            eager = factored_chain._viterbi_kernel(*args, chunk_bytes)
            compiled = kernel(*args, chunk_bytes)
        assert compiled.device.type == device and compiled.dtype == torch.long
        assert torch.equal(compiled, eager)
        n += 1
    assert n == 56


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_factored_mode_matches_cpu_with_the_compiled_kernel():
    g = torch.Generator().manual_seed(5)
    h, A = torch.randn(16, 30, 9, generator=g), torch.randn(9, 9, generator=g)
    lengths = torch.randint(1, 31, (16,), generator=g)
    cpu = LinearChainCRF(h, A, lengths=lengths, method="factored")
    dev = LinearChainCRF(h.cuda(), A.cuda(), lengths=lengths.cuda(), method="factored")
    assert torch.equal(cpu.mode, dev.mode.cpu())


def test_emissions_that_require_grad_decode_without_a_graph():
    h = torch.randn(3, 6, 4, requires_grad=True)
    path = LinearChainCRF(h, torch.randn(4, 4), method="factored").mode
    assert not path.requires_grad and path.shape == (3, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_mask_gives_the_lengths_and_a_non_prefix_mask_is_refused(device):
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 8, (2, 3), generator=g)
    mask = (torch.arange(7) < lengths.unsqueeze(-1)).to(device)
    h = torch.randn(2, 3, 7, 4, generator=g).to(device)
    A = torch.randn(4, 4, generator=g).to(device)
    crf = LinearChainCRF(h, A, mask=mask)
    assert crf.lengths.device.type == device and torch.equal(crf.lengths.cpu(), lengths)
    assert torch.equal(crf.mode, LinearChainCRF(h, A, lengths=lengths.to(device)).mode)
    bad = mask.clone()
    bad[1, 2, 0] = False  # a hole at the start: not a prefix
    with pytest.raises(InputError, match="prefix"):
        LinearChainCRF(h, A, mask=bad)
