"""Linear attention: chunk and recurrent vs the reference, states, gradients, bad inputs.

Every comparison checks outputs, final states and all gradients (q, k, v, decay, initial state)
with tolerances from a same-precision eager baseline (the reference run in the input dtype)
against the truth (the reference in fp64 on the same values).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from causalmix.ops.linear import (
    LinearOutput,
    chunk_linear_attention,
    factorise,
    linear_attention,
    recurrent_linear_attention,
)
from causalmix.testing import assert_all_close, assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments, Window

B, H, D, DV = 2, 4, 8, 6
DECAY = (0.5, 0.8, 0.99, 0.999)
LENGTHS = (1, 7, 63, 113, 500)
DIVISOR = {1: 1, 7: 7, 63: 21, 113: 113, 500: 50}


def _ids(total: int, seed: int, batch: bool) -> torch.Tensor:
    """Contiguous segment ids covering [0, total): runs of random length 1..40."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B if batch else 1):
        lens = torch.randint(1, 40, (total,), generator=g)
        ids = torch.repeat_interleave(torch.arange(total), lens)[:total]
        rows.append(ids)
    return torch.stack(rows) if batch else rows[0]


def _specs(total: int):
    """(name, spec) pairs for a call covering absolute positions [0, total)."""
    return [
        ("causal", Causal()),
        ("full", Full()),
        ("prefix", Prefix(45)),
        ("prefix_batch", Prefix(torch.tensor([3, 80]))),
        ("chunked", Chunked(8)),
        ("chunked_la", Chunked(5, lookahead=2)),
        ("seg_causal", Segments(_ids(total, 1, False)) & Causal()),
        ("seg_full", Segments(_ids(total, 2, True))),
        ("seg_prefix", Segments(_ids(total, 3, False)) & Prefix(50)),
        ("seg_chunked", Chunked(6) & Segments(_ids(total, 4, True))),
        ("seg_chunked_la", Segments(_ids(total, 5, False)) & Chunked(4, lookahead=1)),
    ]


SPEC_NAMES = [name for name, _ in _specs(10)]


def _spec(name: str, total: int):
    return dict(_specs(total))[name]


def _inputs(t, dtype, seed, decay=True, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, H, D, generator=g).to(dtype)
    k = torch.randn(B, t, H, D, generator=g).to(dtype)
    v = torch.randn(B, t, H, DV, generator=g).to(dtype)
    dec = torch.tensor(DECAY) if decay else None
    s0 = torch.randn(B, H, D, DV, generator=g) if state else None
    do = torch.randn(B, t, H, DV, generator=g)
    ds = torch.randn(B, H, D, DV, generator=g)
    return q, k, v, dec, s0, do, ds


def _run(impl, q, k, v, spec, dec, off, s0, c, do, ds, cd=None):
    """Output, final state and gradients of (out . do + state . ds), inputs cast to ``cd``."""
    leaves = [x.detach().to(cd or x.dtype).requires_grad_() for x in (q, k, v)]
    dec_ = None if dec is None else dec.detach().to(cd or torch.float32).requires_grad_()
    sd = torch.float64 if (cd or q.dtype) == torch.float64 else torch.float32
    s0_ = None if s0 is None else s0.detach().to(sd).requires_grad_()
    out, state = linear_attention(
        *leaves, spec, decay=dec_, q_offset=off, k_offset=off, initial_state=s0_,
        return_final_state=True, impl=impl, chunk_size=c,
    )
    assert out.dtype == leaves[0].dtype and state.dtype == sd
    loss = (out.to(sd) * do.to(sd)).sum() + (state * ds.to(sd)).sum()
    wrt = leaves + [x for x in (dec_, s0_) if x is not None]
    grads = torch.autograd.grad(loss, wrt)
    return [out, state, *grads]


NAMES = ["out", "state", "dq", "dk", "dv", "ddecay", "dstate0"]


def _check(impl, t, spec, *, dtype, decay, off, state, c, seed=0):
    q, k, v, dec, s0, do, ds = _inputs(t, dtype, seed, decay, state)
    truth = _run("reference", q, k, v, spec, dec, off, s0, c, do, ds, cd=torch.float64)
    base = _run("reference", q, k, v, spec, dec, off, s0, c, do, ds)
    got = _run(impl, q, k, v, spec, dec, off, s0, c, do, ds)
    names = NAMES[:5] + (["ddecay"] if decay else []) + (["dstate0"] if state else [])
    assert_all_close(names, got, truth, base, label=f"{impl} {spec!r} T={t} {dtype}")


# recurrent at T=500 runs in test_recurrent_long (slow): one Python step per position
IMPL_LENGTHS = [(i, t) for i in ("chunk", "recurrent") for t in LENGTHS
                if not (i == "recurrent" and t == 500)]


@pytest.mark.parametrize("impl,t", IMPL_LENGTHS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_matches_reference(impl, t, name):
    off = 0 if t % 2 else 37
    spec = _spec(name, off + t + 64)
    # fp32, mixed decay (differentiated), chunk size that does not divide T, initial state
    _check(impl, t, spec, dtype=torch.float32, decay=True, off=off, state=True, c=16)
    # bf16, no decay, chunk size that divides T, offset, no initial state
    _check(impl, t, spec, dtype=torch.bfloat16, decay=False, off=37 - off, state=False,
           c=DIVISOR[t], seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_recurrent_long(name):
    spec = _spec(name, 600)
    _check("recurrent", 500, spec, dtype=torch.float32, decay=True, off=13, state=True, c=16)


@pytest.mark.parametrize("c", [1, 3, 64, 128])
def test_chunk_sizes(c):
    for name in ("causal", "full", "prefix", "seg_chunked", "chunked_la"):
        _check("chunk", 113, _spec(name, 200), dtype=torch.float32, decay=True, off=5,
               state=True, c=c)


def test_numerically_safe_decay_long():
    """lambda = 0.5 over long chunks: any lambda ** -i would overflow fp32 (0.5 ** -256)."""
    t = 1024
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, t, 2, 16, generator=g), torch.randn(1, t, 2, 16, generator=g)
    v = torch.randn(1, t, 2, 16, generator=g)
    dec = torch.tensor([0.5, 0.9999], requires_grad=True)
    for spec in (Causal(), Full(), Prefix(700)):
        out = chunk_linear_attention(q, k, v, spec, decay=dec, chunk_size=256)
        ref = linear_attention(q.double(), k.double(), v.double(), spec, decay=dec.double(),
                               impl="reference")
        base = linear_attention(q, k, v, spec, decay=dec, impl="reference")
        assert torch.isfinite(out).all()
        assert_close(out, ref, base, name=f"{spec!r} out")
        (gd,) = torch.autograd.grad(out.sum(), dec)
        (gr,) = torch.autograd.grad(base.sum(), dec)
        assert torch.isfinite(gd).all()
        torch.testing.assert_close(gd, gr, rtol=1e-3, atol=1e-3 * float(gr.abs().max()))


def _split_run(impl, q, k, v, spec, dec, cuts, off=0, s0=None):
    outs, state = [], s0
    bounds = [0, *cuts, q.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        res = linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], spec, decay=dec,
                               q_offset=off + a, k_offset=off + a, initial_state=state,
                               return_final_state=True, impl=impl, chunk_size=16)
        outs.append(res.output)
        state = res.final_state
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize(
    "name,cuts",
    [
        ("causal", [1, 50, 63]),
        ("seg_causal", [17, 40, 41]),
        ("chunked", [16, 56]),  # multiples of the spec's chunk (8): split == whole
        ("seg_chunked", [18, 54]),  # multiples of 6
    ],
)
def test_split_and_carry_equals_whole(impl, name, cuts):
    t, off = 113, 11
    spec = _spec(name, off + t + 8)
    q, k, v, dec, s0, do, ds = _inputs(t, torch.float32, 4)
    dec = dec.requires_grad_()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    whole = linear_attention(*leaves, spec, decay=dec, q_offset=off, k_offset=off,
                             initial_state=s0, return_final_state=True, impl="reference")
    parts = _split_run(impl, *leaves, spec, dec, cuts, off=off, s0=s0)
    base = _split_run("reference", *leaves, spec, dec, cuts, off=off, s0=s0)
    truth = linear_attention(*[x.double() for x in leaves], spec, decay=dec.double(),
                             q_offset=off, k_offset=off, initial_state=s0.double(),
                             return_final_state=True, impl="reference")
    for i, nm in enumerate(("out", "state")):
        assert_close(parts[i], truth[i], base[i], name=f"split {nm}")
        assert_close(whole[i], truth[i], base[i], name=f"whole {nm}")
    # gradients flow through the carried state
    def grads(res):
        return torch.autograd.grad((res[0] * do).sum() + (res[1] * ds).sum(), [*leaves, dec])

    gt = torch.autograd.grad((truth[0] * do.double()).sum() + (truth[1] * ds.double()).sum(),
                             [*leaves, dec])
    names = ("dq", "dk", "dv", "ddecay")
    for nm, a, r, bl in zip(names, grads(parts), gt, grads(base), strict=True):
        assert_close(a, r, bl, name=f"split {nm}", dtype=torch.float32)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "seg_chunked_la"])
def test_no_quadratic_tensor(name):
    """Forward + backward of chunk never builds a tensor larger than an input ([B, T, H, D]):
    no [T, T] scores, memory linear in T."""
    t = 2048
    spec = _spec(name, t)
    q, k, v, dec, s0, do, ds = _inputs(t, torch.float32, 8)
    leaves = [x.requires_grad_() for x in (q, k, v, dec.requires_grad_())]
    with _LargestTensor() as mode:
        out, state = chunk_linear_attention(*leaves[:3], spec, decay=leaves[3],
                                            initial_state=s0, return_final_state=True,
                                            chunk_size=64)
        ((out * do).sum() + (state * ds).sum()).backward()
    assert mode.largest <= B * t * H * max(D, DV), (mode.largest, t * t)
    assert all(x.grad is not None for x in leaves)


def test_decode_steps_equal_chunk():
    """Prefill with chunk, then T=1 recurrent steps, equals one chunk call over everything."""
    t, pre = 40, 29
    q, k, v, dec, s0, _, _ = _inputs(t, torch.float32, 5)
    whole, s_whole = chunk_linear_attention(q, k, v, Causal(), decay=dec, initial_state=s0,
                                            return_final_state=True, chunk_size=8)
    out, state = chunk_linear_attention(q[:, :pre], k[:, :pre], v[:, :pre], Causal(),
                                        decay=dec, initial_state=s0,
                                        return_final_state=True, chunk_size=8)
    outs = [out]
    for i in range(pre, t):
        o1, state = recurrent_linear_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                               Causal(), decay=dec, q_offset=i, k_offset=i,
                                               initial_state=state, return_final_state=True)
        outs.append(o1)
    ref = linear_attention(q.double(), k.double(), v.double(), Causal(), decay=dec.double(),
                           initial_state=s0.double(), return_final_state=True,
                           impl="reference")
    base = linear_attention(q, k, v, Causal(), decay=dec, initial_state=s0,
                            return_final_state=True, impl="reference")
    assert_close(torch.cat(outs, 1), ref[0], base[0], name="decode out")
    assert_close(state, ref[1], base[1], name="decode state")
    assert_close(whole, ref[0], base[0], name="whole out")
    assert_close(s_whole, ref[1], base[1], name="whole state")


def test_segment_reset_drops_state():
    """A segment starting at q_offset ignores the carried state; one continuing reads it."""
    ids = torch.tensor([0] * 10 + [1] * 10)
    q, k, v, dec, s0, _, _ = _inputs(5, torch.float32, 6)
    for off, reads in ((10, False), (12, True)):
        spec = Segments(ids) & Causal()
        with_s = chunk_linear_attention(q, k, v, spec, decay=dec, q_offset=off, k_offset=off,
                                        initial_state=s0)
        without = chunk_linear_attention(q, k, v, spec, decay=dec, q_offset=off, k_offset=off)
        assert torch.equal(with_s, without) != reads


def test_auto_and_outputs():
    q, k, v, dec, s0, _, _ = _inputs(20, torch.float32, 7)
    out = linear_attention(q, k, v, Causal(), decay=dec)
    assert out.shape == (B, 20, H, DV) and out.dtype == torch.float32
    res = linear_attention(q, k, v, Full(), return_final_state=True)
    assert isinstance(res, LinearOutput) and res.final_state.shape == (B, H, D, DV)
    assert res.final_state.dtype == torch.float32
    res16 = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), Causal(),
                             return_final_state=True)
    assert res16.output.dtype == torch.bfloat16 and res16.final_state.dtype == torch.float32
    empty = linear_attention(q[:, :0], k[:, :0], v[:, :0], Causal(), initial_state=s0,
                             return_final_state=True)
    assert empty.output.shape == (B, 0, H, DV) and torch.equal(empty.final_state, s0)


def test_factorise():
    assert factorise(Causal()).base == "causal"
    assert factorise(Full() & Causal()).base == "causal"
    assert factorise(Prefix(3) & Causal()).base == "causal"
    f = factorise(Segments(torch.tensor([0, 0, 1])))
    assert f.base == "full" and f.segments is not None
    f = factorise(Chunked(4, lookahead=2))
    assert f.band == 11 and not f.has_reverse
    assert factorise(Chunked(4)).has_reverse


@st.composite
def _cases(draw):
    t = draw(st.integers(1, 70))
    off = draw(st.integers(0, 12))
    total = off + t
    kind = draw(st.sampled_from(["causal", "full", "prefix", "chunked"]))
    if kind == "causal":
        base = Causal()
    elif kind == "full":
        base = Full()
    elif kind == "prefix":
        base = Prefix(draw(st.integers(0, total + 3)))
    else:
        base = Chunked(draw(st.integers(1, 12)), lookahead=draw(st.integers(0, 3)))
    spec = base
    if draw(st.booleans()):
        lens = draw(st.lists(st.integers(1, 15), min_size=1, max_size=total))
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        ids = torch.cat([ids, ids.new_full((max(0, total - ids.numel()),), len(lens))])[:total]
        spec = Segments(ids) & base
    c = draw(st.integers(1, 24))
    return t, off, spec, c, draw(st.booleans()), draw(st.integers(0, 10**6))


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_property_chunk_recurrent_reference_agree(case):
    """fp64: chunk == recurrent == reference (outputs, states, all gradients) for random specs,
    lengths, offsets, chunk sizes and segmentations."""
    t, off, spec, c, decay, seed = case
    q, k, v, dec, s0, do, ds = _inputs(t, torch.float64, seed, decay, True)
    dec = None if dec is None else dec.double()
    s0 = s0.double()
    ref = _run("reference", q, k, v, spec, dec, off, s0, c, do, ds)
    for impl in ("chunk", "recurrent"):
        got = _run(impl, q, k, v, spec, dec, off, s0, c, do, ds)
        names = NAMES if decay else NAMES[:5] + NAMES[6:]
        for name, a, r in zip(names, got, ref, strict=True):
            scale = 1 + float(r.detach().abs().max())
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * scale,
                                       msg=lambda m, name=name, impl=impl: f"{impl} {name}: {m}")


# ------------------------------------------------------------------------ bad inputs


def _qkv(t=8):
    return torch.randn(1, t, 2, 4), torch.randn(1, t, 2, 4), torch.randn(1, t, 2, 3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_decay_out_of_range(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\]"):
        linear_attention(q, k, v, Causal(), decay=torch.tensor([0.9, bad]))


def test_bad_decay_shape_and_type():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"decay must have shape \[H\] = \[2\]"):
        linear_attention(q, k, v, Causal(), decay=torch.tensor([0.9, 0.9, 0.9]))
    with pytest.raises(TypeError, match="decay must be a"):
        linear_attention(q, k, v, Causal(), decay=0.9)
    with pytest.raises(ValueError, match="decay must be a floating"):
        linear_attention(q, k, v, Causal(), decay=torch.tensor([1, 1]))


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be 4-D"):
        linear_attention(q[0], k, v, Causal())
    with pytest.raises(ValueError, match="at least as long as q"):
        linear_attention(q, k[:, :5], v[:, :5], Causal())
    with pytest.raises(ValueError, match="head dims differ"):
        linear_attention(q[..., :3], k, v, Causal())
    # heads form GQA (k, v heads dividing q's: 2 query heads over 1 kv head is served; over 3
    # it is refused) or value grouping (q, k heads dividing v's), nothing else (issue 20)
    k3, v3 = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    with pytest.raises(ValueError, match=r"heads q 2, k 3, v 3 form no served grouping"):
        linear_attention(q, k3, v3, Causal())
    with pytest.raises(ValueError, match=r"heads q 2, k 2, v 3 form no served grouping"):
        linear_attention(q, k, v3, Causal())
    with pytest.raises(ValueError, match=r"heads q 3, k 3, v 2 form no served grouping"):
        linear_attention(torch.cat([q, q[:, :, :1]], 2), k3, v, Causal())
    with pytest.raises(ValueError, match="k and v must have the same length"):
        linear_attention(q, k, v[:, :4], Causal())


def test_bad_state():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, D, Dv\]"):
        linear_attention(q, k, v, Causal(), initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="initial_state must be torch.float32"):
        linear_attention(q, k, v, Causal(), initial_state=torch.zeros(1, 2, 4, 3).double())
    with pytest.raises(TypeError, match="initial_state must be a"):
        linear_attention(q, k, v, Causal(), initial_state=[0.0])
    with pytest.raises(ValueError, match="need q_offset == k_offset"):
        linear_attention(q, k, v, Causal(), q_offset=3, return_final_state=True,
                         impl="reference")


def test_unsupported_specs_and_impls():
    q, k, v = _qkv()
    for spec in (Window(3), Causal() | Window(2, 2), Segments(torch.tensor([0, 1, 0] * 3)),
                 Prefix(3) & Chunked(2)):
        for impl in ("auto", "chunk", "recurrent"):
            with pytest.raises(ValueError, match="linear attention does not support visibility"):
                linear_attention(q, k, v, spec, impl=impl)
        # the reference defines any spec
        linear_attention(q, k, v, spec, impl="reference")
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attention(q, k, v, Causal(), impl="fast")
    with pytest.raises(ValueError, match="implementations that can: \\['reference'\\]"):
        linear_attention(q, k, v, Causal(), q_offset=1, k_offset=0, impl="chunk")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_attention(q, k, v, Causal(), chunk_size=0)
    with pytest.raises(ValueError, match="batch size 2"):
        linear_attention(q, k, v, Prefix(torch.tensor([1, 2])))
    with pytest.raises(TypeError, match="visibility must be"):
        linear_attention(q, k, v, "causal")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "seg_chunked_la"])
def test_long_chunk_matches_reference(name):
    t = 3000
    spec = _spec(name, t + 10)
    _check("chunk", t, spec, dtype=torch.float32, decay=True, off=0, state=True, c=256)


@pytest.mark.parametrize("tq,extra,off", [(1, 8, 3), (17, 19, 13), (63, 41, 0), (113, 70, 40)])
@pytest.mark.parametrize("name", ["causal", "chunked_la", "segments_chunked_la"])
def test_chunk_with_keys_past_the_last_query(name, tq, extra, off):
    # A stream's lookahead frames: queries [0, tq), keys [0, tq + extra) at the same offset.
    ids = torch.arange(400) // 37
    spec = {"causal": Causal(), "chunked_la": Chunked(8, lookahead=2),
            "segments_chunked_la": Segments(ids) & Chunked(5, lookahead=1)}[name]
    g = torch.Generator().manual_seed(tq + extra)
    tk = tq + extra
    dec = torch.tensor([0.5, 0.9, 0.999])
    s0 = torch.randn(2, 3, 8, 6, generator=g)
    q = torch.randn(2, tq, 3, 8, generator=g, requires_grad=True)
    k = torch.randn(2, tk, 3, 8, generator=g, requires_grad=True)
    v = torch.randn(2, tk, 3, 6, generator=g, requires_grad=True)
    w = torch.randn(2, tq, 3, 6, generator=g)

    def run(impl, dtype):
        args = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o = linear_attention(*args, spec, decay=dec.to(dtype), q_offset=off, k_offset=off,
                             initial_state=s0.to(dtype), impl=impl, chunk_size=16)
        return (o, *torch.autograd.grad((o * w.to(dtype)).sum(), args))

    truth = run("reference", torch.float64)
    base = run("reference", torch.float32)
    got = run("chunk", torch.float32)
    for name_, a, r, b in zip(("o", "dq", "dk", "dv"), got, truth, base, strict=True):
        assert_close(a, r, b, name=name_)
    # what chunk cannot serve with keys past the last query is refused, naming the reason
    with pytest.raises(ValueError, match="final state"):
        linear_attention(q, k, v, spec, q_offset=off, k_offset=off, impl="chunk",
                         return_final_state=True)
    with pytest.raises(ValueError, match="reverse scan"):
        linear_attention(q, k, v, Full(), impl="chunk")
    with pytest.raises(ValueError, match="as many keys"):
        linear_attention(q, k, v, spec, q_offset=off, k_offset=off, impl="recurrent")
    with pytest.raises(ValueError, match="at least as long"):
        linear_attention(k, q, q, spec, impl="reference")


@pytest.mark.parametrize("name", ["causal", "full", "chunked_la"])
def test_chunk_size_larger_than_the_sequence_is_clamped(name):
    """chunk_size > T never allocates by chunk_size (issue 10): it is clamped to T, which gives
    exactly the numbers of chunk_size = T, forward and backward."""
    t = 5
    spec = _spec(name, t)
    q, k, v, dec, s0, do, ds = _inputs(t, torch.float32, 11)
    outs = []
    for c in (t, 10**12):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with _LargestTensor() as mode:
            out, state = chunk_linear_attention(*leaves, spec, decay=dec, initial_state=s0,
                                                return_final_state=True, chunk_size=c)
            grads = torch.autograd.grad((out * do).sum() + (state * ds).sum(), leaves)
        assert mode.largest <= 4096
        outs.append([out, state, *grads])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
