"""blocks' diagonal plan (runs of rectangles and causal squares in PyTorch's fused CPU kernel:
Causal, Prefix, Segments & Causal, Segments & Full) against the reference: outputs, lse and every
gradient, with and without an lse gradient, offsets, B = 2, GQA and fp64; that the plan is
actually taken for these specs and declined for the others; and that the kernel never runs in
the calling thread when torch has intra-op threads."""

import threading

import pytest
import torch

from causalmix import Causal, Chunked, Full, Prefix, Segments, Window, softmax_attention
from causalmix.ops.softmax import _diagonal, _plan
from causalmix.ops.softmax.impl import blocks
from causalmix.testing import assert_close
from causalmix.testing import check_softmax_impl as check_impl

LENGTHS = (1, 7, 63, 113, 500)


def _ids(lengths, batch=None):
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return ids if batch is None else ids[None].expand(batch, -1).clone()


def _diag(spec, tq, tk, q_offset=0, k_offset=0):
    return _diagonal.plan(spec, _plan.Geometry(tq, tk, q_offset, k_offset))


def _docs(lengths, rule):
    return Segments(_ids(lengths)) & rule


CASES = [  # spec, tq, tk, q_offset, k_offset
    (Causal(), 500, 500, 0, 0),
    (Causal(), 1024, 1024, 0, 0),  # squares split in the backward
    (Causal(), 300, 500, 200, 0),  # a cache before the queries: rectangle + square
    (Causal(), 500, 300, 0, 0),  # keys end first: square + rectangle
    (Causal(), 300, 300, 0, 50),  # the first 50 queries see nothing
    (Causal(), 113, 400, 290, 3),  # not aligned
    (Prefix(0), 500, 500, 0, 0),
    (Prefix(1), 500, 500, 0, 0),
    (Prefix(37), 500, 500, 0, 0),
    (Prefix(500), 500, 500, 0, 0),
    (Prefix(9), 300, 400, 100, 0),
    (Prefix(200), 300, 400, 100, 37),
    (_docs(LENGTHS, Causal()), 684, 684, 0, 0),
    (_docs((113,) * 4, Causal()), 452, 452, 0, 0),  # one batched call
    (_docs((512, 512), Causal()), 1024, 1024, 0, 0),
    (_docs(LENGTHS, Causal()), 400, 600, 84, 84),  # a slice of the documents
    (_docs(LENGTHS, Full()), 684, 684, 0, 0),
    (_docs((63,) * 5, Full()), 315, 315, 0, 0),
    (_docs((63,) * 5, Full()), 200, 250, 65, 40),
]


@pytest.mark.parametrize("spec,tq,tk,q_offset,k_offset", CASES, ids=str)
@pytest.mark.parametrize("with_lse", [False, True])
def test_diagonal_plan_matches_reference(spec, tq, tk, q_offset, k_offset, with_lse):
    assert _diag(spec, tq, tk, q_offset, k_offset) is not None
    check_impl("blocks", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, hq=2, hkv=2,
               d=16, dv=16, with_lse=with_lse)


@pytest.mark.parametrize("spec,tq,tk,q_offset,k_offset",
                         [CASES[i] for i in (0, 2, 8, 12, 16)], ids=str)
@pytest.mark.parametrize("with_lse", [False, True])
def test_diagonal_plan_gqa(spec, tq, tk, q_offset, k_offset, with_lse):
    check_impl("blocks", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, hq=4, hkv=2,
               d=16, dv=16, with_lse=with_lse)


def test_diagonal_plan_per_example_documents():
    """Segments with [B, T] ids: one plan per example."""
    t = 300
    ids = torch.stack([_ids((100, 100, 100)), _ids((1, 7, 63, 113, 116))])
    for rule in (Causal(), Full()):
        spec = Segments(ids) & rule
        diag = _diag(spec, t, t)
        assert diag is not None and len(diag.calls) == 2
        assert len(diag.calls[0]) == 1 and diag.calls[0][0].n == 3  # equal documents batched
        for with_lse in (False, True):
            check_impl("blocks", spec, tq=t, tk=t, hq=4, hkv=2, d=16, dv=16, with_lse=with_lse)


@pytest.mark.parametrize("spec", [Causal(), Prefix(13), _docs((1, 7, 63, 29), Causal()),
                                  _docs((40, 60), Full())], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (2, 1)])
def test_diagonal_plan_fp64_gradcheck(spec, heads):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 100, h, 4, generator=g, dtype=torch.float64).requires_grad_()
               for h in (heads[0], heads[1], heads[1]))
    assert _diag(spec, 100, 100) is not None

    def f(q, k, v):
        return softmax_attention(q, k, v, spec, impl="blocks", return_lse=True)

    def f_out(q, k, v):
        return softmax_attention(q, k, v, spec, impl="blocks")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)
    assert torch.autograd.gradcheck(f_out, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)
    ref = softmax_attention(q, k, v, spec, impl="reference")
    assert_close(f_out(q, k, v), ref, ref, name="fp64 diagonal", dtype=torch.float64)


def test_bf16_inputs_take_the_diagonal_plan():
    check_impl("blocks", _docs(LENGTHS, Causal()), tq=684, tk=684, hq=2, hkv=1, d=16, dv=16,
               dtype=torch.bfloat16, with_lse=False)


def test_diagonal_plan_shapes():
    t = 4096
    ids = torch.arange(t) * 4 // t
    (sq,), = _diag(Causal(), t, t).calls
    assert sq.causal and (sq.r0, sq.rows, sq.n, sq.width) == (0, t, 1, t)
    (doc,), = _diag(Segments(ids) & Causal(), t, t).calls
    assert doc.causal and (doc.rows, doc.n, doc.step) == (1024, 4, 1024)
    (doc,), = _diag(Segments(ids) & Full(), t, t).calls
    assert not doc.causal and (doc.rows, doc.n, doc.width) == (1024, 4, 1024)
    (head, rect, square), = _diag(Prefix(1000), t, t).calls
    assert (head.r0, head.rows, head.width, head.causal) == (0, 1000, 1000, False)
    assert (rect.r0, rect.rows, rect.shift, rect.width, rect.causal) == (1000, 3096, -1000, 1000,
                                                                           False)
    assert (square.r0, square.rows, square.shift, square.causal) == (1000, 3096, 0, True)
    assert rect.first and not square.first
    # The backward halves large causal squares where the kernel's cost model says it pays.
    assert _diagonal.square_depth(1024) > 0 and _diagonal.square_depth(300) == 0
    grads = _diag(Causal(), 1024, 1024).grads[0]
    assert sum(c.n * c.rows * c.width for c in grads if not c.causal) > 0


@pytest.mark.parametrize("spec", [Window(256), Chunked(64, 1), Window(64) & Causal(),
                                  Segments(torch.arange(4096) % 2) & Causal()], ids=str)
def test_diagonal_plan_declined(spec):
    assert _diag(spec, 4096, 4096) is None  # too many runs, or no contiguous key range


def _opts(spec, fused=True):
    return blocks._Opts(spec, 0, 0, 0.25, fused)


def test_diagonal_plan_declined_where_the_kernel_cannot_serve():
    q = torch.zeros(1, 64, 2, 16)
    units = blocks._units(1, 2, False, 1)
    assert blocks._diagonal_for((q, q, q), _opts(Causal()), units) is not None
    v = torch.zeros(1, 64, 2, 8)
    assert blocks._diagonal_for((q, q, v), _opts(Causal()), units) is None  # Dv != D
    assert blocks._diagonal_for((q, q, q), _opts(Causal(), fused=False), units) is None


def test_fused_kernel_runs_only_in_worker_threads():
    """With intra-op threads, the kernel runs in blocks' single-threaded workers, never in the
    calling thread (see ``_band``); with one unit only, the diagonal plan is declined."""
    before = torch.get_num_threads()
    seen = []
    real = _diagonal.FLASH, _diagonal.FLASH_BACKWARD

    def spy(fn):
        def call(*args, **kwargs):
            seen.append((threading.current_thread() is threading.main_thread(),
                         torch.get_num_threads()))
            return fn(*args, **kwargs)
        return call

    spec = Segments(_ids((50, 150))) & Causal()
    torch.set_num_threads(2)
    _diagonal.FLASH, _diagonal.FLASH_BACKWARD = spy(real[0]), spy(real[1])
    try:
        if blocks._pool(blocks._units(1, 2, False, 2), torch.device("cpu")) is None:
            pytest.skip("no single-threaded worker pool on this build")
        for hkv in (2, 1):
            seen.clear()
            q, k, v = (torch.randn(1, 200, hkv, 16).requires_grad_() for _ in range(3))
            o = softmax_attention(q, k, v, spec, impl="blocks")
            o.sum().backward()
            ref = softmax_attention(q, k, v, spec, impl="reference")
            assert_close(o, ref, ref, name="diagonal in workers", ulps=64)
            if hkv == 2:
                assert len(seen) == 4  # two units, forward and backward
                assert all(not main and threads == 1 for main, threads in seen)
            else:
                assert seen == []  # one unit: it would run in the calling thread
    finally:
        _diagonal.FLASH, _diagonal.FLASH_BACKWARD = real
        torch.set_num_threads(before)


class _Gapped(Causal):
    """A spec whose middle rows see nothing: queries [0, 100) and [200, 300) as ``Segments &
    Causal`` with documents of 100, queries [100, 200) see no key (``key_range`` says so)."""

    def visible(self, b, i, j):
        mid = (i >= 100) & (i < 200)
        return (j <= i) & (j // 100 == i // 100) & ~mid

    def key_range(self, i):
        lo = i // 100 * 100
        mid = (i >= 100) & (i < 200)
        return type(super().key_range(i))(lo, torch.where(mid, lo - 1, i))


def test_equal_runs_apart_are_not_batched():
    spec = _Gapped()
    diag = _diag(spec, 300, 300)
    assert diag is not None and [(c.r0, c.n) for c in diag.calls[0]] == [(0, 1), (200, 1)]
    for with_lse in (False, True):
        check_impl("blocks", spec, tq=300, tk=300, hq=2, hkv=2, d=16, dv=16, with_lse=with_lse)


def test_diagonal_plan_declined_for_tiny_calls():
    """Many tiny kernel calls cost more than tiles: short per-example prefixes (in-context
    regression at T = 24) and any call whose calls average under MIN_PAIRS_PER_CALL pairs."""
    assert _diag(Prefix(torch.arange(1, 17)), 24, 24) is None
    assert _diag(Causal(), 24, 24) is None
    assert _diag(_docs((8, 9) * 8, Causal()), 136, 136) is None  # 16 calls of 8 or 9 squared
    assert _diag(_docs((8,) * 16, Causal()), 128, 128) is not None  # one call: 16 x 8 x 8
    assert _diag(_docs((64,) * 4, Causal()), 256, 256) is not None  # one call of 4 x 64 x 64
    check_impl("blocks", Prefix(torch.arange(3, 19)[:2]), b=2, tq=24, tk=24, hq=2, hkv=2, d=16,
               dv=16, with_lse=True)
