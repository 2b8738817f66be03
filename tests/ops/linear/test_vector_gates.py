"""Per key dimension gates (``log_gate`` / ``reverse_log_gate`` ``[B, T, H, D]``, GLA) for the
linear family.

chunk and recurrent against the reference over every spec, awkward lengths, chunk sizes,
offsets, fp32 / bf16, with all gradients (q, k, v, both gates, initial state); tolerances from
the reference run in the input dtype against the reference in fp64. Plus: the reference against
its definition (a sum of D rank-one scalar-gated calls), a scalar gate broadcast over D == the
scalar gate, strong gates, head grouping, split-and-carry, gradcheck, NaN propagation, bad
input, stream and decode.
"""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.linear import chunk_linear_attention, linear_attention
from causalmix.stream import LinearStream
from causalmix.testing import assert_all_close, assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

B, H, D, DV = 2, 4, 8, 6
LENGTHS = (1, 7, 63, 113, 500)
DIVISOR = {1: 1, 7: 7, 63: 21, 113: 113, 500: 50}


def _ids(total: int, seed: int, batch: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B if batch else 1):
        lens = torch.randint(1, 40, (total,), generator=g)
        rows.append(torch.repeat_interleave(torch.arange(total), lens)[:total])
    return torch.stack(rows) if batch else rows[0]


def _specs(total: int):
    return {
        "causal": Causal(),
        "full": Full(),
        "prefix": Prefix(45),
        "prefix_batch": Prefix(torch.tensor([3, 80])),
        "chunked": Chunked(8),
        "chunked_la": Chunked(5, lookahead=2),
        "seg_causal": Segments(_ids(total, 1, False)) & Causal(),
        "seg_full": Segments(_ids(total, 2, True)),
        "seg_prefix": Segments(_ids(total, 3, False)) & Prefix(50),
        "seg_chunked": Chunked(6) & Segments(_ids(total, 4, True)),
        "seg_chunked_la": Segments(_ids(total, 5, False)) & Chunked(4, lookahead=1),
    }


SPEC_NAMES = list(_specs(10))


def _inputs(t, seed, *, strength=1.5, heads=(H, H, H), reverse=True, d=D):
    """q, k, v with ``heads = (Hq, Hk, Hv)``, per-dimension gates of the output heads."""
    hq, hk, hv = heads
    ho = max(hq, hv)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, hq, d, generator=g)
    k = torch.randn(B, t, hk, d, generator=g)
    v = torch.randn(B, t, hv, DV, generator=g)
    lg = -strength * torch.rand(B, t, ho, d, generator=g)
    lgr = -strength * torch.rand(B, t, ho, d, generator=g) if reverse else None
    s0 = torch.randn(B, ho, d, DV, generator=g)
    do = torch.randn(B, t, ho, DV, generator=g)
    ds = torch.randn(B, ho, d, DV, generator=g)
    return q, k, v, lg, lgr, s0, do, ds


def _run(impl, inputs, spec, off, c, dtype):
    """Output, final state and the gradients of (out . do + state . ds), in ``dtype``."""
    q, k, v, lg, lgr, s0, do, ds = inputs
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    gates = [None if x is None else x.detach().to(sd).requires_grad_() for x in (lg, lgr)]
    s0_ = None if s0 is None else s0.detach().to(sd).requires_grad_()
    out, state = linear_attention(*leaves, spec, log_gate=gates[0], reverse_log_gate=gates[1],
                                  q_offset=off, k_offset=off, initial_state=s0_,
                                  return_final_state=True, impl=impl, chunk_size=c)
    loss = (out.to(sd) * do.to(sd)).sum() + (state * ds.to(sd)).sum()
    wrt = leaves + [x for x in (*gates, s0_) if x is not None]
    return [out, state, *torch.autograd.grad(loss, wrt, allow_unused=True,
                                             materialize_grads=True)]


def _check(impl, t, spec, *, dtype, off, c, seed=0, reverse=True, state=True, heads=(H, H, H),
           strength=1.5, d=D):
    inputs = list(_inputs(t, seed, strength=strength, heads=heads, reverse=reverse, d=d))
    if not state:
        inputs[5] = None
    truth = _run("reference", inputs, spec, off, c, torch.float64)
    base = _run("reference", inputs, spec, off, c, dtype)
    got = _run(impl, inputs, spec, off, c, dtype)
    names = ["out", "state", "dq", "dk", "dv", "dlog_gate"] + (["dreverse"] if reverse else []) \
        + (["dstate0"] if state else [])
    assert_all_close(names, got, truth, base, label=f"{impl} {spec!r} T={t} {dtype}")


#: T = 500 in the default suite for these specs (the others are marked slow: the dense
#: per-dimension reference costs [B, H, T, T, D])
FAST_AT_500 = ("causal", "full", "prefix_batch", "seg_chunked_la")
CASES = [pytest.param(i, t, name, marks=[pytest.mark.slow] if t == 500 and name not in
                      FAST_AT_500 else []) for i in ("chunk", "recurrent") for t in LENGTHS
         for name in SPEC_NAMES if not (i == "recurrent" and t == 500)]


@pytest.mark.parametrize("impl,t,name", CASES)
def test_vector_gates_match_reference(impl, t, name):
    off = 0 if t % 2 else 37
    spec = _specs(off + t + 64)[name]
    small = {"d": 4} if t == 500 else {}
    # fp32, separate reverse gate, chunk size that does not divide T, initial state, mild
    # gates (chunks decay by less than exp(-40): the tile is one product)
    _check(impl, t, spec, dtype=torch.float32, off=off, c=24,
           heads=(2, 2, 2) if t == 500 else (H, H, H), **small)
    # bf16, reverse gate = log_gate, chunk size that divides T, other offset, no state, GQA,
    # gates strong enough that chunks decay past exp(-40) (the tile's secondary chunking)
    _check(impl, t, spec, dtype=torch.bfloat16, off=37 - off, c=DIVISOR[t], seed=1,
           reverse=False, state=False, heads=(2, 1, 1) if t == 500 else (H, 2, 2),
           strength=8.0, **small)


@pytest.mark.slow
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_vector_gates_recurrent_long(name):
    _check("recurrent", 500, _specs(600)[name], dtype=torch.float32, off=13, c=16)


@pytest.mark.parametrize("c", [1, 3, 16, 40, 64, 128, 10**9])
def test_vector_gates_chunk_sizes(c):
    """Chunk sizes below, at and above the sub-chunk (16), dividing T or not, larger than T;
    T = 300 spans several blocks of chunks for the small ones."""
    for name in ("causal", "full", "prefix", "seg_chunked", "chunked_la", "seg_full"):
        _check("chunk", 300, _specs(320)[name], dtype=torch.float32, off=5, c=c,
               heads=(2, 2, 2), d=4)


@pytest.mark.parametrize("grouping", [(H, 2, 2), (H, 1, 1), (2, 2, H), (1, 1, H)])
@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "seg_chunked_la"])
def test_vector_gates_head_grouping(grouping, name):
    """GQA (k, v shared) and value grouping (q, k shared; v, gates, states per value head)."""
    for impl in ("chunk", "recurrent"):
        _check(impl, 70, _specs(80)[name], dtype=torch.float32, off=3, c=16, heads=grouping)


@pytest.mark.parametrize("name", ["causal", "full", "seg_chunked_la", "prefix_batch"])
def test_vector_strong_gates(name):
    """Gates down to -30 per token and dimension: equal to the reference (all gradients)."""
    _check("chunk", 300, _specs(300)[name], dtype=torch.float32, off=0, c=64, strength=30.0,
           heads=(2, 2, 2), d=4)


@pytest.mark.parametrize("name", ["causal", "full", "prefix", "chunked_la", "seg_chunked"])
def test_reference_is_a_sum_over_key_dimensions(name):
    """The definition: with a per-dimension gate, the output is the sum over d of scalar-gated
    linear attention of the rank-one slices ``q[..., d], k[..., d]`` with gate ``g[..., d]``."""
    t = 40
    spec = _specs(t)[name]
    q, k, v, lg, lgr, s0, *_ = (x.double() for x in _inputs(t, 2, d=3))
    vec = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr, initial_state=s0,
                           return_final_state=True, impl="reference")
    parts = [linear_attention(q[..., d:d + 1], k[..., d:d + 1], v, spec, log_gate=lg[..., d],
                              reverse_log_gate=lgr[..., d], initial_state=s0[:, :, d:d + 1],
                              return_final_state=True, impl="reference") for d in range(3)]
    torch.testing.assert_close(vec.output, sum(p.output for p in parts), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vec.final_state, torch.cat([p.final_state for p in parts], 2),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "chunked_la", "seg_full"])
def test_broadcast_vector_gate_equals_scalar_gate(impl, name):
    """A ``[B, T, H]`` gate broadcast over D gives the scalar numbers: outputs, state and every
    gradient (the gate's summed over D), to the rounding of a different summation order
    (fp64: 1e-12 relative), also with one gate scalar and the other per dimension."""
    t = 57
    spec = _specs(t)[name]
    q, k, v, _, _, s0, do, ds = (x.double() for x in _inputs(t, 4))
    g = torch.Generator().manual_seed(5)
    lg, lgr = (-1.5 * torch.rand(B, t, H, generator=g, dtype=torch.float64) for _ in range(2))

    def run(f, fr):
        xs = [x.clone().requires_grad_() for x in (q, k, v, lg, lgr, s0)]
        out, st = linear_attention(*xs[:3], spec, log_gate=f(xs[3]), reverse_log_gate=fr(xs[4]),
                                   initial_state=xs[5], return_final_state=True, impl=impl,
                                   chunk_size=16)
        loss = (out * do).sum() + (st * ds).sum()
        return [out, st, *torch.autograd.grad(loss, xs, allow_unused=True,
                                              materialize_grads=True)]

    def wide(x):
        return x[..., None].expand(B, t, H, D)

    scalar = run(lambda x: x, lambda x: x)
    for f, fr in ((wide, wide), (wide, lambda x: x), (lambda x: x, wide)):
        for i, (a, r) in enumerate(zip(run(f, fr), scalar, strict=True)):
            scale = 1 + float(r.detach().abs().max())
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12 * scale,
                                       msg=lambda m, i=i: f"#{i}: {m}")


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("name,cuts", [("causal", [1, 50, 63]), ("seg_causal", [17, 40, 41])])
def test_vector_split_and_carry_equals_whole(impl, name, cuts):
    """Causal specs: the carried state, with each call's own gates, equals the whole call
    (outputs, final state, gradients of q, k, v and the gate)."""
    t, off = 113, 11
    spec = _specs(off + t + 8)[name]
    q, k, v, lg, _, s0, do, ds = _inputs(t, 6)
    leaves = [x.requires_grad_() for x in (q, k, v, lg)]

    def split(impl_, xs):
        outs, state = [], s0.to(xs[0].dtype)
        bounds = [0, *cuts, t]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            res = linear_attention(*(x[:, a:b] for x in xs[:3]), spec, log_gate=xs[3][:, a:b],
                                   q_offset=off + a, k_offset=off + a, initial_state=state,
                                   return_final_state=True, impl=impl_, chunk_size=16)
            outs.append(res.output)
            state = res.final_state
        out = torch.cat(outs, 1)
        loss = (out * do.to(out.dtype)).sum() + (state * ds.to(state.dtype)).sum()
        return [out, state, *torch.autograd.grad(loss, xs)]

    truth = split("reference", [x.double() for x in leaves])
    whole = linear_attention(*[x.double() for x in leaves[:3]], spec, log_gate=leaves[3].double(),
                             q_offset=off, k_offset=off, initial_state=s0.double(),
                             return_final_state=True, impl="reference")
    torch.testing.assert_close(whole.output, truth[0])  # split == whole for the definition
    base = split("reference", leaves)
    got = split(impl, leaves)
    for nm, a, r, bl in zip(("out", "state", "dq", "dk", "dv", "dg"), got, truth, base,
                            strict=True):
        assert_close(a, r, bl, name=f"{impl} split {nm}", dtype=torch.float32)


@pytest.mark.parametrize("spec", [Causal(), Full(), Chunked(3, lookahead=1),
                                  Segments(torch.tensor([0] * 5 + [1] * 6)) & Prefix(7)])
def test_vector_gradcheck_chunk_fp64(spec):
    """The chunk backward (recomputed blocks, incl. both gates and the state) against finite
    differences."""
    t = 11
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, t, 2, 3, generator=g), torch.randn(1, t, 2, 3, generator=g)
    v = torch.randn(1, t, 2, 2, generator=g)
    lg, lgr = -torch.rand(1, t, 2, 3, generator=g), -torch.rand(1, t, 2, 3, generator=g)
    s0 = torch.randn(1, 2, 3, 2, generator=g)
    xs = [x.double().requires_grad_() for x in (q, k, v, lg, lgr, s0)]

    def f(q, k, v, lg, lgr, s0):
        return tuple(linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr,
                                      initial_state=s0, return_final_state=True,
                                      impl="chunk", chunk_size=4))

    assert torch.autograd.gradcheck(f, xs)


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("where", ["q", "k", "v", "log_gate"])
def test_vector_nan_in_nan_out(impl, where):
    """A NaN anywhere (one dimension of one gate too) reaches the outputs that read it."""
    t, pos = 40, 19
    q, k, v, lg, *_ = _inputs(t, 9)
    xs = {"q": q, "k": k, "v": v, "log_gate": lg}
    xs[where] = xs[where].clone()
    if where == "log_gate":
        xs[where][:, pos, :, 2] = float("nan")
    else:
        xs[where][:, pos] = float("nan")
    for spec in (Causal(), Full(), Chunked(8, lookahead=1)):
        out = linear_attention(xs["q"], xs["k"], xs["v"], spec, log_gate=xs["log_gate"],
                               impl=impl, chunk_size=16)
        assert torch.isnan(out[:, pos]).all(), spec
        assert not torch.isnan(out[:, :pos]).any() or where != "q"


def test_vector_bf16_long_strong_gates_finite():
    """bf16, per-dimension gates from 0 down to -30 per token: outputs and every gradient
    finite (T = 65536 in test_vector_bf16_65536_finite, slow)."""
    _finite(8192)


@pytest.mark.slow
def test_vector_bf16_65536_finite():
    _finite(1 << 16)


def _finite(t):
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, t, 2, 16, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    lg = (-30 * torch.rand(1, t, 2, 16, generator=g) ** 4).bfloat16().requires_grad_()
    for spec in (Causal(), Full()):
        out = chunk_linear_attention(q, k, v, spec, log_gate=lg, chunk_size=64)
        grads = torch.autograd.grad(out.float().sum(), [q, k, v, lg])
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x).all() for x in grads)


def test_bad_vector_gates():
    q, k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 3)
    lg = -torch.rand(1, 8, 2, 4)
    shape = r"log_gate must have shape \[B, Tk, H\] or \[B, Tk, H, D\] = \[1, 8, 2\] or " \
            r"\[1, 8, 2, 4\]"
    with pytest.raises(ValueError, match=shape):
        linear_attention(q, k, v, Causal(), log_gate=lg[..., :3])
    with pytest.raises(ValueError, match="reverse_" + shape):
        linear_attention(q, k, v, Full(), log_gate=lg, reverse_log_gate=lg[:, :, :1])
    with pytest.raises(ValueError, match=shape):
        linear_attention(q, k, v, Causal(), log_gate=lg[None])
    with pytest.raises(ValueError, match="log_gate values must be <= 0"):
        linear_attention(q, k, v, Causal(), log_gate=lg + 0.5)
    with pytest.raises(ValueError, match="log_gate values must be <= 0 and finite"):
        bad = lg.clone()
        bad[0, 3, 1, 2] = -float("inf")
        linear_attention(q, k, v, Causal(), log_gate=bad)
    with pytest.raises(ValueError, match="log_gate must have dtype"):
        linear_attention(q, k, v, Causal(), log_gate=lg.double())
    with pytest.raises(ValueError, match="log_gate needs q_offset == k_offset"):
        linear_attention(q, k, v, Causal(), log_gate=lg, q_offset=2, impl="reference")


# ------------------------------------------------------------------------ stream and decode


@pytest.mark.parametrize("name", ["causal", "chunked", "chunked_la", "prefix", "seg_chunked_la"])
def test_vector_stream_equals_parallel(name):
    t = 61
    spec = _specs(t)[name]
    q, k, v, lg, lgr, *_ = _inputs(t, 11, heads=(H, 2, 2))
    par = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr, impl="reference")
    for sizes in ([1] * t, [3, 7, 20, 31], [t]):
        s = LinearStream(spec, chunk_size=8)
        outs, a = [], 0
        for n in sizes:
            outs.append(s.push(q[:, a:a + n], k[:, a:a + n], v[:, a:a + n],
                               log_gate=lg[:, a:a + n], reverse_log_gate=lgr[:, a:a + n]))
            a += n
        outs.append(s.flush())
        base = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr,
                                impl="chunk" if spec.lookahead_frames == 0 else "reference")
        assert_close(torch.cat(outs, 1), par, base, name=f"stream {sizes[:3]}",
                     factor=4.0, ulps=64)
        assert s.buffer_len <= max(sizes) + 16


def test_vector_decode_step_equals_parallel():
    t, pre = 30, 17
    q, k, v, lg, *_ = _inputs(t, 12)
    par = linear_attention(q, k, v, Causal(), log_gate=lg)
    s = LinearStream(Causal())
    outs = [s.step(q[:, :pre], k[:, :pre], v[:, :pre], log_gate=lg[:, :pre])]
    for i in range(pre, t):
        outs.append(s.step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], log_gate=lg[:, i:i + 1]))
    torch.testing.assert_close(torch.cat(outs, 1), par, rtol=1e-5, atol=1e-5)


def test_vector_stream_refuses_a_change_of_gate_kind():
    q, k, v, lg, *_ = _inputs(6, 13)
    s = LinearStream(Causal())
    s.push(q[:, :2], k[:, :2], v[:, :2], log_gate=lg[:, :2])
    with pytest.raises(ValueError, match="log_gate"):
        s.push(q[:, 2:3], k[:, 2:3], v[:, 2:3], log_gate=lg[:, 2:3, :, 0])
    assert s.frames_in == 2
    out = s.push(q[:, 2:], k[:, 2:], v[:, 2:], log_gate=lg[:, 2:])
    par = linear_attention(q, k, v, Causal(), log_gate=lg)
    torch.testing.assert_close(out, par[:, 2:], rtol=1e-5, atol=1e-5)
