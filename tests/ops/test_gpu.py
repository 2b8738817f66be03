"""The GPU paths, compared with the CPU reference. Marked ``gpu``: skipped without CUDA (no GPU
run has passed yet; the README says so)."""

from __future__ import annotations

import pytest
import torch

from causalmix import linear_attention, softmax_attention
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Prefix, Segments, Window

pytestmark = pytest.mark.gpu

SPECS = [Causal(), Prefix(17), Chunked(16, 1), Window(24, 3),
         Segments(torch.arange(113) // 30) & Causal()]


def _inputs(t, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, t, 4, 32, generator=g, dtype=torch.float32).to(device, dtype)
            .requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("impl", ["blocks", "flex"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_softmax_cuda_matches_the_cpu_reference(impl, spec):
    t = 113
    q, k, v = _inputs(t, torch.float32, "cuda")
    out = softmax_attention(q, k, v, spec, impl=impl)
    qc, kc, vc = (x.detach().cpu().requires_grad_() for x in (q, k, v))
    ref = softmax_attention(qc, kc, vc, spec, impl="reference")
    base = softmax_attention(q, k, v, spec, impl="reference")  # same precision, on the GPU
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.cuda())
    baseg = torch.autograd.grad(base, (q, k, v), g.cuda())
    refg = torch.autograd.grad(ref, (qc, kc, vc), g)
    assert_close(out.detach().cpu(), ref, baseline=base.detach().cpu())
    for a, b, r in zip(grads, baseg, refg, strict=True):
        assert_close(a.cpu(), r, baseline=b.cpu())


@pytest.mark.parametrize("spec", [Causal(), Chunked(16, 1), Prefix(20)], ids=repr)
def test_linear_chunk_cuda_matches_the_cpu_reference(spec):
    q, k, v = _inputs(113, torch.float32, "cuda")
    out = linear_attention(q, k, v, spec, impl="chunk")
    base = linear_attention(q, k, v, spec, impl="reference")
    ref = linear_attention(*(x.detach().cpu() for x in (q, k, v)), spec, impl="reference")
    assert_close(out.detach().cpu(), ref, baseline=base.detach().cpu())
