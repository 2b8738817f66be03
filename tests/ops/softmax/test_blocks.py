"""blocks' band path (shift-invariant specs such as Window: batched matmuls over a strided view
of the keys, or PyTorch's fused CPU kernel where queries and values have one head size) against
the reference: outputs, lse and every gradient, with offsets, GQA, keys before/after the queries
and bf16; and the plan actually takes it."""

import pytest
import torch

from causalmix import Causal, Chunked, Window, softmax_attention
from causalmix.ops.softmax import _band as band_path
from causalmix.ops.softmax import _plan
from causalmix.testing import assert_close
from causalmix.testing import check_softmax_impl as check_impl


def _band(spec, tq, tk, q_offset=0, k_offset=0):
    geo = _plan.Geometry(tq, tk, q_offset, k_offset)
    rows = _plan.row_size(spec, geo, _plan.Heads(1, 4, 16), 64)
    sizes = _plan.Sizes(rows, 64, 512, torch.float32, torch.device("cpu"))
    return _plan.plan(spec, geo, sizes).band


@pytest.mark.parametrize(
    "spec,tq,tk,q_offset,k_offset",
    [
        (Window(40, 5), 500, 500, 0, 0),
        (Window(0), 300, 300, 0, 0),  # the diagonal only
        (Window(17, 30), 333, 400, 10, 0),  # lookahead, more keys than queries
        (Window(64), 260, 700, 500, 300),  # a cache before the queries
        (Window(25, 3) & Causal(), 400, 400, 0, 0),  # key_range still one band
        (Window(9), 300, 300, 100, 113),  # keys start after the first queries
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_path_matches_reference(spec, tq, tk, q_offset, k_offset, dtype):
    assert _band(spec, tq, tk, q_offset, k_offset) is not None
    check_impl("blocks", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, dtype=dtype)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2)])
def test_band_path_gqa(hq, hkv):
    check_impl("blocks", Window(30, 2), tq=300, tk=300, hq=hq, hkv=hkv)


@pytest.mark.parametrize(
    "spec,tq,tk,q_offset,k_offset,hq,hkv",
    [
        (Window(40, 5), 500, 500, 0, 0, 4, 2),  # width 96: not a multiple of the key tile
        (Window(17, 30), 333, 400, 10, 0, 2, 2),
        (Window(64), 260, 700, 500, 300, 4, 1),
        (Window(9), 300, 300, 100, 113, 6, 2),
        (Window(25, 3) & Causal(), 400, 400, 0, 0, 2, 2),
    ],
    ids=str,
)
@pytest.mark.parametrize("with_lse", [False, True])
def test_fused_band_path_matches_reference(spec, tq, tk, q_offset, k_offset, hq, hkv,
                                           with_lse):
    """Queries and values of one head size: the band runs in PyTorch's fused CPU kernel (the
    backward too when no lse gradient comes back; with one, the plain band backward reads the
    fused forward's lse)."""
    assert _band(spec, tq, tk, q_offset, k_offset) is not None
    q = torch.zeros(1, 1, 1, 16)
    assert band_path.fused(q, q)
    check_impl("blocks", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, hq=hq,
               hkv=hkv, d=16, dv=16, with_lse=with_lse)


@pytest.mark.parametrize("t", [1, 7, 113, 500])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_window_at_awkward_lengths_one_head_size(t, hq, hkv):
    """hq == hkv: the band runs in the calling thread for every head at once (forward_all)."""
    kw = dict(tq=t, tk=t, hq=hq, hkv=hkv, d=16, dv=16)
    check_impl("blocks", Window(100), with_lse=False, **kw)
    check_impl("blocks", Window(100), q_offset=3, k_offset=0, **kw)
    check_impl("blocks", Window(37, 5), b=3, with_lse=False, **kw)


@pytest.mark.parametrize("heads", [(2, 2), (2, 1)])
def test_fused_band_path_fp64_gradcheck(heads):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 290, h, 3, generator=g, dtype=torch.float64).requires_grad_()
               for h in (heads[0], heads[1], heads[1]))
    spec = Window(5, 1)
    assert _band(spec, 290, 290) is not None and band_path.fused(q, v)

    def f(q, k, v):
        return softmax_attention(q, k, v, spec, impl="blocks")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)
    ref = softmax_attention(q, k, v, spec, impl="reference")
    assert_close(f(q, k, v), ref, ref, name="fp64 fused band", dtype=torch.float64)


def test_band_with_one_head_size_overflow_and_nan_rows():
    """A score that overflows makes its row NaN (the fused kernel is not used then), a NaN key
    the rows that see it, as in the reference; every other row stays finite."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 300, 2, 16, generator=g) for _ in range(3))
    assert _band(Window(20), 300, 300) is not None
    k = k.abs() + 0.1
    q[1, 150, 1] = 3e38
    o, lse = softmax_attention(q, k, v, Window(20), impl="blocks", return_lse=True)
    assert torch.isnan(o[1, 150, 1]).all() and torch.isnan(lse[1, 150, 1])
    o[1, 150, 1], lse[1, 150, 1] = 0.0, 0.0
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    q[1, 150, 1] = 0.5
    k[1, 150, 0] = float("nan")
    o = softmax_attention(q, k, v, Window(20), impl="blocks")
    ref = softmax_attention(q, k, v, Window(20), impl="reference")
    assert torch.isnan(o[1, 150:171, 0]).all()  # the NaN key reaches the 20 queries after it
    assert torch.equal(torch.isnan(o), torch.isnan(ref))


def test_band_path_not_taken_where_it_does_not_apply():
    assert _band(Causal(), 500, 500) is None  # unbounded left
    assert _band(Chunked(16, 1), 500, 500) is None  # not shift-invariant
    assert _band(Window(200), 300, 300) is None  # hardly sparse
    assert _band(Window(10), 100, 100) is None  # too few rows


def test_band_path_fp64_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 290, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    spec = Window(5, 1)
    assert _band(spec, 290, 290) is not None

    def f(q, k, v):
        return softmax_attention(q, k, v, spec, impl="blocks", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)
    ref = softmax_attention(q, k, v, spec, impl="reference")
    assert_close(f(q, k, v)[0], ref, ref, name="fp64 band", dtype=torch.float64)  # 8 ulps


def test_worker_threads_survive_fork():
    import multiprocessing as mp
    import warnings

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (torch.randn(1, 300, 2, 8) for _ in range(3))
        ref = softmax_attention(q, k, v, Window(20), impl="blocks")  # makes the worker pool
        ctx = mp.get_context("fork")
        with warnings.catch_warnings():
            # Python >= 3.12 warns that forking a multi-threaded process may deadlock: the point
            # of this test is that blocks' worker pool does not.
            warnings.simplefilter("ignore", DeprecationWarning)
            with ctx.Pool(1) as pool:
                out = pool.apply_async(_in_child, (q, k, v)).get(timeout=60)
        assert torch.equal(out, ref)
    finally:
        torch.set_num_threads(before)


def _in_child(q, k, v):
    torch.set_num_threads(2)
    return softmax_attention(q, k, v, Window(20), impl="blocks")
