"""Per key dimension gates (``log_gate`` / ``reverse_log_gate`` ``[B, T, H, D]``, GLA) for the
linear family.

chunk and recurrent against the reference over every spec, awkward lengths, chunk sizes,
offsets, fp32 / bf16, with all gradients (q, k, v, both gates, initial state); tolerances from
the reference run in the input dtype against the reference in fp64. Plus: the reference against
its definition (a sum of D rank-one scalar-gated calls), a scalar gate broadcast over D == the
scalar gate, strong gates, head grouping, bad input, a stream that refuses a change of gate
kind. Split-and-carry, gradcheck, NaN propagation, bf16 at long lengths, stream and decode are
run for both gate shapes in test_gated.py.
"""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.linear import linear_attention
from causalmix.stream import LinearStream
from causalmix.testing import assert_all_close
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
