"""softmax_attention at the edges (issue 19): empty batches, meta tensors, specs modified in place
(refused by every impl, and never poisoning the caches for equal new specs), and threads (no
process-wide setting changes, during a call, after it, or after an exception inside it)."""

import threading

import pytest
import torch

from causalmix import (
    Causal,
    Chunked,
    Full,
    Prefix,
    Segments,
    ValidKeys,
    Window,
    softmax_attention,
)
from causalmix.ops.softmax import _workers, available_impls
from causalmix.ops.softmax.impl import blocks
from causalmix.testing import assert_close
from causalmix.testing import check_softmax_impl as check_impl
from causalmix.visibility import AdaptiveLookahead

IMPLS = ["reference", "blocks", "auto"]


def _qkv(b, tq, tk, hq=4, hkv=2, d=16, dv=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, t, h, c, generator=g, dtype=dtype).to(device)
               for t, h, c in ((tq, hq, d), (tk, hkv, d), (tk, hkv, dv)))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


# ------------------------------------------------------------------ empty batch
EMPTY_BATCH_SPECS = {
    "causal": lambda t: Causal(),
    "window": lambda t: Window(5, 2),
    "chunked": lambda t: Chunked(4, 1),
    "prefix_b0": lambda t: Prefix(torch.zeros(0, dtype=torch.long)),
    "segments_b0": lambda t: Segments(torch.zeros(0, t, dtype=torch.long)) & Causal(),
    "valid_keys_b0": lambda t: Causal() & ValidKeys(torch.ones(0, t, dtype=torch.bool)),
    "adaptive_b0": lambda t: AdaptiveLookahead(torch.ones(0, t, dtype=torch.long)),
}


@pytest.mark.parametrize("tq,tk,q_offset", [(1, 7, 6), (7, 7, 0), (63, 113, 50), (0, 5, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(EMPTY_BATCH_SPECS))
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_gives_right_shaped_outputs_and_grads(impl, name, dtype, tq, tk, q_offset):
    spec = EMPTY_BATCH_SPECS[name](max(tq + q_offset, tk))
    q, k, v = _qkv(0, tq, tk, dtype=dtype)
    out, lse = softmax_attention(q, k, v, spec, q_offset=q_offset, impl=impl, return_lse=True)
    assert out.shape == (0, tq, 4, 24) and out.dtype == dtype
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.shape == (0, tq, 4) and lse.dtype == want
    plain = softmax_attention(q, k, v, spec, q_offset=q_offset, impl=impl)
    assert plain.shape == out.shape and plain.dtype == dtype
    grads = torch.autograd.grad((out.sum() + lse.sum()).float(), (q, k, v))
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype


def test_empty_batch_on_sdpa_and_its_refusals():
    q, k, v = _qkv(0, 9, 9)
    assert softmax_attention(q, k, v, Causal(), impl="sdpa").shape == (0, 9, 4, 24)
    with pytest.raises(ValueError, match="log-sum-exp"):
        softmax_attention(q, k, v, Causal(), impl="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="sdpa.*Window"):  # empty input: still the impl's rule
        softmax_attention(q, k, v, Window(3), impl="sdpa")


# ------------------------------------------------------------------ meta tensors
@pytest.mark.parametrize("spec", [Causal(), Full(), Window(7, 1), Chunked(8, 1),
                                  Segments(torch.arange(40) // 9) & Causal(),
                                  Prefix(torch.tensor([3, 30]))], ids=repr)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_inputs_give_shapes_without_reading_values(impl, spec, dtype):
    q, k, v = _qkv(2, 33, 40, dtype=dtype, device="meta")
    out, lse = softmax_attention(q, k, v, spec, impl=impl, return_lse=True)
    assert out.device.type == "meta" and out.shape == (2, 33, 4, 24) and out.dtype == dtype
    assert lse.device.type == "meta" and lse.shape == (2, 33, 4) and lse.dtype == torch.float32
    gq, gk, gv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape
    assert gq.device.type == "meta"


def test_meta_inputs_keep_each_impls_rules():
    q, k, v = _qkv(1, 8, 8, device="meta")
    assert softmax_attention(q, k, v, Causal(), impl="sdpa").device.type == "meta"
    with pytest.raises(ValueError, match="sdpa.*Window"):
        softmax_attention(q, k, v, Window(3), impl="sdpa")
    with pytest.raises(ValueError, match="flex.*meta"):
        softmax_attention(q, k, v, Window(3), impl="flex")
    why = available_impls(q, k, v, Window(3))
    assert why["blocks"] is None and why["reference"] is None and "meta" in why["flex"]
    with pytest.raises(ValueError, match="one device"):
        softmax_attention(q, torch.empty(k.shape), v, Causal())


# ------------------------------------------------------------------ specs modified in place
def _modify(spec) -> None:
    """Modify every tensor the spec (or its parts) holds, in place (as a careless user would)."""
    for name in ("ids", "n", "a", "b", "valid"):
        x = getattr(spec, name, None)
        if isinstance(x, torch.Tensor):
            x.logical_not_() if x.dtype == torch.bool else x.add_(1)
        elif x is not None and not isinstance(x, int):
            _modify(x)  # a part of a combination


TENSOR_SPECS = {
    "segments": lambda: Segments(torch.arange(120).view(2, 60) // 13) & Causal(),
    "prefix": lambda: Prefix(torch.tensor([5, 40])),
    "valid_keys": lambda: Causal() & ValidKeys(torch.arange(60).expand(2, 60) < 50),
    "adaptive": lambda: AdaptiveLookahead(torch.arange(120).view(2, 60) % 4),
    "windowed_docs": lambda: (Segments(torch.arange(60) // 21) & Window(9)) | Prefix(3),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(TENSOR_SPECS))
def test_modified_spec_refused_and_equal_new_spec_served(impl, name):
    spec = TENSOR_SPECS[name]()
    q, k, v = _qkv(2, 60, 60)
    softmax_attention(q, k, v, spec, impl=impl)  # fills the caches (plans, masks, hashes)
    _modify(spec)
    with pytest.raises(ValueError, match="modified in place"):
        softmax_attention(q, k, v, spec, impl=impl)
    for other in IMPLS:  # every impl refuses it, not only the one that cached it
        with pytest.raises(ValueError, match="modified in place"):
            softmax_attention(q, k, v, spec, impl=other)
    check_impl(impl, TENSOR_SPECS[name](), tq=60, tk=60)  # a new equal spec: served, exact
    fresh = TENSOR_SPECS[name]()
    _modify(fresh)
    with pytest.raises(ValueError, match="modified in place"):
        softmax_attention(q, k, v, fresh, impl=impl)
    check_impl(impl, TENSOR_SPECS[name](), tq=60, tk=60, q_offset=0)


def test_modified_spec_refused_by_flex_and_equal_new_spec_served():
    # flex caches its block mask, whose mask_mod reads the spec it was made for. Shapes as in
    # test_softmax.py's flex tests (one compiled shape).
    make = lambda: Segments(torch.arange(520) // 37) & Causal()  # noqa: E731
    spec = make()
    with torch.no_grad():
        q, k, v = _qkv(2, 63, 113)
        softmax_attention(q, k, v, spec, q_offset=50, impl="flex")
        _modify(spec)
        with pytest.raises(ValueError, match="modified in place"):
            softmax_attention(q, k, v, spec, q_offset=50, impl="flex")
        check_impl("flex", make(), tq=63, tk=113, q_offset=50, with_lse=False, backward=False)


# ------------------------------------------------------------------ threads
needs_pool = pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1],
    reason="blocks' single-threaded workers need torch's OpenMP backend")


class _Threads:
    """Use ``n`` torch threads in this test (conftest runs tests single-threaded), restore after;
    records every call of ``torch.set_num_threads`` made meanwhile by anyone but this class."""

    def __init__(self, monkeypatch, n=2):
        self.before = torch.get_num_threads()
        self.real = torch.set_num_threads
        self.real(n)
        self.calls: list[int] = []
        monkeypatch.setattr(torch, "set_num_threads", self.calls.append)

    def restore(self):
        self.real(self.before)


@pytest.fixture
def two_threads(monkeypatch):
    t = _Threads(monkeypatch)
    yield t
    t.restore()


@needs_pool
def test_blocks_uses_its_workers_and_matches_reference_multithreaded(two_threads):
    assert _workers.pool(2) is not None
    for spec, tq in [(Window(20, 3), 300), (Segments(torch.arange(400).view(2, 200) // 45)
                                            & Causal(), 200), (Chunked(16, 1), 113)]:
        check_impl("blocks", spec, tq=tq, tk=tq)
        check_impl("blocks", spec, tq=tq, tk=tq, hq=6, hkv=3)
    assert two_threads.calls == []


@needs_pool
def test_thread_count_unchanged_during_a_call_from_another_thread(two_threads, monkeypatch):
    q, k, v = _qkv(1, 400, 400, hq=8, hkv=8)
    seen_main, seen_new, inside = set(), set(), threading.Event()
    real = blocks._forward_unit

    def slow_unit(*args):
        inside.set()
        real(*args)
        real(*args)  # (recomputes the same values)

    monkeypatch.setattr(blocks, "_forward_unit", slow_unit)
    errors = []

    def work():
        try:
            for _ in range(3):
                softmax_attention(q, k, v, Window(100), impl="blocks").sum().backward()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=work)
    th.start()
    inside.wait(60)
    while th.is_alive():
        seen_main.add(torch.get_num_threads())
        probe = threading.Thread(target=lambda: seen_new.add(torch.get_num_threads()))
        probe.start()
        probe.join()
    th.join()
    assert not errors
    assert seen_main == {2} and seen_new == {2}
    assert two_threads.calls == [] and torch.get_num_threads() == 2
    info = torch.__config__.parallel_info()
    assert "mkl_get_max_threads() : 2" in info or "mkl_get_max_threads" not in info


@needs_pool
def test_an_exception_inside_a_call_changes_nothing(two_threads, monkeypatch):
    q, k, v = _qkv(2, 200, 200)

    def boom(*args):
        raise RuntimeError("boom in a worker")

    ref = softmax_attention(q, k, v, Window(30), impl="reference")
    with monkeypatch.context() as m:
        m.setattr(blocks, "_forward_unit", boom)
        with pytest.raises(RuntimeError, match="boom in a worker"):
            softmax_attention(q, k, v, Window(30), impl="blocks")
    assert torch.get_num_threads() == 2 and two_threads.calls == []
    probe = []
    th = threading.Thread(target=lambda: probe.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert probe == [2]
    out = softmax_attention(q, k, v, Window(30), impl="blocks")  # the workers still serve
    assert_close(out, ref, ref, name="after an exception")


@needs_pool
def test_concurrent_calls_from_two_threads(two_threads):
    specs = [Window(25, 2), Segments(torch.arange(300) // 70) & Causal()]
    inputs = [_qkv(1, 300, 300, hq=4, hkv=4) for _ in specs]
    refs = [softmax_attention(*x, s, impl="reference") for x, s in zip(inputs, specs,
                                                                       strict=True)]
    outs: dict = {}

    def work(i):
        outs[i] = [softmax_attention(*inputs[i], specs[i], impl="blocks") for _ in range(4)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, ref in enumerate(refs):
        for out in outs[i]:
            assert_close(out, ref, ref, name=f"concurrent {i}")
    assert two_threads.calls == []
