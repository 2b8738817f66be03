"""Data-dependent gates (``log_gate`` / ``reverse_log_gate``) for the linear family.

chunk and recurrent against the reference over every spec, lengths, chunk sizes, offsets,
fp32 / bf16, with all gradients (q, k, v, both gates, initial state); tolerances from the
reference run in the input dtype against the reference in fp64. Plus: constant gates == decay,
strong gates, document boundaries in both directions, GQA, split-and-carry, gradcheck in fp64,
NaN propagation, bad input, the stream, the nn gated mixer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalmix.nn import ModelConfig, SequenceModel
from causalmix.ops.linear import chunk_linear_attention, linear_attention
from causalmix.stream import LinearStream, ModelStream
from causalmix.testing import assert_all_close, assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

B, H, D, DV = 2, 4, 8, 6
LENGTHS = (1, 7, 63, 113, 500)
DIVISOR = {1: 1, 7: 7, 63: 21, 113: 113, 500: 50}
#: Gate shapes of the tests both serve: ``[B, T, H]`` and per key dimension ``[B, T, H, D]``
#: (GLA; the tests of that shape alone are in test_vector_gates.py).
GATES = ["scalar", "vector"]


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


def _inputs(t, seed, *, strength=1.5, hkv=H, reverse=True, gate="scalar"):
    """q, k, v (``hkv`` key / value heads), gates ``[B, t, H]`` (``gate="vector"``: per key
    dimension, ``[B, t, H, D]``) in ``[-strength, 0]``, an initial state, and the weights of
    the output and final state in the compared loss."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, t, H, D, generator=g)
    k = torch.randn(B, t, hkv, D, generator=g)
    v = torch.randn(B, t, hkv, DV, generator=g)
    shape = (B, t, H, D) if gate == "vector" else (B, t, H)
    lg = -strength * torch.rand(*shape, generator=g)
    lgr = -strength * torch.rand(*shape, generator=g) if reverse else None
    s0 = torch.randn(B, H, D, DV, generator=g)
    do = torch.randn(B, t, H, DV, generator=g)
    ds = torch.randn(B, H, D, DV, generator=g)
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
    # a spec without a reverse part never reads reverse_log_gate: its gradient is 0
    return [out, state, *torch.autograd.grad(loss, wrt, allow_unused=True,
                                             materialize_grads=True)]


def _check(impl, t, spec, *, dtype, off, c, seed=0, reverse=True, state=True, hkv=H,
           strength=1.5):
    inputs = list(_inputs(t, seed, strength=strength, hkv=hkv, reverse=reverse))
    if not state:
        inputs[5] = None
    truth = _run("reference", inputs, spec, off, c, torch.float64)
    base = _run("reference", inputs, spec, off, c, dtype)
    got = _run(impl, inputs, spec, off, c, dtype)
    names = ["out", "state", "dq", "dk", "dv", "dlog_gate"] + (["dreverse"] if reverse else []) \
        + (["dstate0"] if state else [])
    assert_all_close(names, got, truth, base, label=f"{impl} {spec!r} T={t} {dtype}")


IMPL_LENGTHS = [(i, t) for i in ("chunk", "recurrent") for t in LENGTHS
                if not (i == "recurrent" and t == 500)]


@pytest.mark.parametrize("impl,t", IMPL_LENGTHS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_gated_matches_reference(impl, t, name):
    off = 0 if t % 2 else 37
    spec = _specs(off + t + 64)[name]
    # fp32, separate reverse gate, chunk size that does not divide T, initial state
    _check(impl, t, spec, dtype=torch.float32, off=off, c=16)
    # bf16, reverse gate = log_gate, chunk size that divides T, other offset, no state, GQA
    _check(impl, t, spec, dtype=torch.bfloat16, off=37 - off, c=DIVISOR[t], seed=1,
           reverse=False, state=False, hkv=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_gated_recurrent_long(name):
    _check("recurrent", 500, _specs(600)[name], dtype=torch.float32, off=13, c=16)


@pytest.mark.parametrize("c", [1, 3, 64, 128, 10**9])
def test_gated_chunk_sizes(c):
    """Chunk sizes that do and do not divide T, and larger than T (clamped: same numbers)."""
    for name in ("causal", "full", "prefix", "seg_chunked", "chunked_la"):
        _check("chunk", 113, _specs(200)[name], dtype=torch.float32, off=5, c=c)


@pytest.mark.parametrize("name", ["causal", "full", "seg_chunked_la", "prefix_batch"])
def test_strong_gates(name):
    """Gates down to -30 per token: finite, and equal to the reference (all gradients)."""
    _check("chunk", 300, _specs(300)[name], dtype=torch.float32, off=0, c=64, strength=30.0)


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "reference"])
@pytest.mark.parametrize("name", ["causal", "full", "chunked_la", "seg_prefix"])
def test_constant_gates_equal_decay(impl, name):
    """decay == log_gate = log(decay) broadcast over time: identical numbers for chunk and
    recurrent (one code path); for the dense reference (lambda ** |i - j| vs differences of
    cumulative sums) within the reference's own fp32 error."""
    t = 70
    spec = _specs(t)[name]
    q, k, v, *_ = _inputs(t, 3)
    dec = torch.tensor([0.5, 0.8, 0.99, 1.0])
    lg = torch.log(dec).view(1, 1, H).expand(B, t, H)
    a = linear_attention(q, k, v, spec, decay=dec, impl=impl, chunk_size=16)
    b = linear_attention(q, k, v, spec, log_gate=lg, impl=impl, chunk_size=16)
    if impl == "reference":
        truth = linear_attention(q.double(), k.double(), v.double(), spec, decay=dec.double(),
                                 impl=impl)
        assert_close(b, truth, a, name="gated reference vs decay")
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["full", "chunked", "prefix", "chunked_la"])
def test_segment_boundary_blocks_both_directions(name):
    """Changing everything (q, k, v, both gates) in one document leaves the outputs of the
    others unchanged, for every impl: no information crosses a boundary either way."""
    t = 40
    ids = torch.tensor([0] * 13 + [1] * 14 + [2] * 13)
    spec = Segments(ids) & _specs(t)[name]
    q, k, v, lg, lgr = (x.double() for x in _inputs(t, 4)[:5])
    doc = ids == 1
    alt = [x.clone() for x in (q, k, v, lg, lgr)]
    for x in alt:
        x[:, doc] = x[:, doc] * 0.5 - 0.1 if x.dim() == 3 else torch.randn_like(x[:, doc])
    for impl in ("reference", "chunk", "recurrent"):
        o1 = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr, impl=impl,
                              chunk_size=8)
        o2 = linear_attention(*alt[:3], spec, log_gate=alt[3], reverse_log_gate=alt[4],
                              impl=impl, chunk_size=8)
        # unchanged up to fp64 rounding (the cumulative sums run through the other document);
        # a leak would move them by O(1)
        assert float((o1[:, ~doc] - o2[:, ~doc]).abs().max()) < 1e-10, impl
        assert float((o1[:, doc] - o2[:, doc]).abs().max()) > 1e-2


def test_gqa_equals_repeated_heads():
    t = 50
    q, k, v, lg, lgr, *_ = _inputs(t, 5, hkv=2)
    for spec in (Causal(), Full(), Chunked(4, lookahead=1)):
        ks, vs = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
        for impl in ("reference", "chunk", "recurrent"):
            a = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr, impl=impl)
            b = linear_attention(q, ks, vs, spec, log_gate=lg, reverse_log_gate=lgr, impl=impl)
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("name,cuts", [("causal", [1, 50, 63]), ("seg_causal", [17, 40, 41])])
@pytest.mark.parametrize("gate", GATES)
def test_gated_split_and_carry_equals_whole(impl, name, cuts, gate):
    """Causal specs: the carried state, with each call's own gates, equals the whole call
    (outputs, final state, gradients of q, k, v and the gates)."""
    t, off = 113, 11
    spec = _specs(off + t + 8)[name]
    q, k, v, lg, _, s0, do, ds = _inputs(t, 6, gate=gate)
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
@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_chunk_fp64(spec, gate):
    """The hand-written backward (incl. both gates and the state) against finite differences
    (vector gates: the recomputed blocks' backward)."""
    t = 11
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, t, 2, 3, generator=g), torch.randn(1, t, 2, 3, generator=g)
    v = torch.randn(1, t, 2, 2, generator=g)
    shape = (1, t, 2, 3) if gate == "vector" else (1, t, 2)
    lg, lgr = -torch.rand(*shape, generator=g), -torch.rand(*shape, generator=g)
    s0 = torch.randn(1, 2, 3, 2, generator=g)
    xs = [x.double().requires_grad_() for x in (q, k, v, lg, lgr, s0)]

    def f(q, k, v, lg, lgr, s0):
        return tuple(linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr,
                                      initial_state=s0, return_final_state=True,
                                      impl="chunk", chunk_size=4))

    assert torch.autograd.gradcheck(f, xs)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(0, 9), st.sampled_from(["causal", "full", "prefix",
       "chunked", "chunked_la", "seg_full", "seg_chunked_la"]), st.integers(1, 20),
       st.booleans(), st.integers(0, 10**6))
def test_property_gated_chunk_recurrent_reference_agree(t, off, name, c, reverse, seed):
    """fp64: chunk == recurrent == reference with random gates (outputs, states, gradients)."""
    spec = _specs(off + t + 40)[name]
    inputs = _inputs(t, seed, reverse=reverse)
    ref = _run("reference", inputs, spec, off, c, torch.float64)
    for impl in ("chunk", "recurrent"):
        got = _run(impl, inputs, spec, off, c, torch.float64)
        for i, (a, r) in enumerate(zip(got, ref, strict=True)):
            scale = 1 + float(r.detach().abs().max())
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * scale,
                                       msg=lambda m, i=i, impl=impl: f"{impl} #{i}: {m}")


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_fp64_is_computed_in_fp64(impl):
    """fp64 inputs (gates included) are computed in fp64: error ~1e-15, not fp32's ~1e-7."""
    t = 37
    q, k, v, lg, lgr, *_ = (x.double() if x is not None else None for x in _inputs(t, 8))
    for spec in (Causal(), Full(), Chunked(4, lookahead=1)):
        out = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr, impl=impl,
                               chunk_size=8)
        ref = linear_attention(q, k, v, spec, log_gate=lg, reverse_log_gate=lgr,
                               impl="recurrent" if impl == "reference" else "reference")
        assert out.dtype == torch.float64
        assert float((out - ref).abs().max()) < 1e-12 * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("where", ["q", "k", "v", "log_gate"])
@pytest.mark.parametrize("gate", GATES)
def test_nan_in_nan_out(impl, where, gate):
    """A NaN anywhere (in one key dimension of a vector gate too) reaches the outputs that read
    it, whichever impl (never a silent 0)."""
    t, pos = 40, 19
    q, k, v, lg, *_ = _inputs(t, 9, gate=gate)
    xs = {"q": q, "k": k, "v": v, "log_gate": lg}
    xs[where] = xs[where].clone()
    if where == "log_gate" and gate == "vector":
        xs[where][:, pos, :, 2] = float("nan")
    else:
        xs[where][:, pos] = float("nan")
    for spec, gated in ((Causal(), True), (Full(), True), (Chunked(8, lookahead=1), True),
                        (Causal(), False)):
        if not gated and (where == "log_gate" or gate == "vector"):
            continue
        kw = {"log_gate": xs["log_gate"]} if gated else {"decay": torch.full((H,), 0.9)}
        out = linear_attention(xs["q"], xs["k"], xs["v"], spec, impl=impl, chunk_size=16, **kw)
        assert torch.isnan(out[:, pos]).all(), (spec, gated)
        assert not torch.isnan(out[:, :pos]).any() or where != "q"


@pytest.mark.parametrize("gate,t", [("scalar", 16384), ("vector", 8192)])
def test_bf16_long_strong_gates_finite(gate, t):
    """bf16, gates from 0 down to -30 per token (and key dimension): outputs and every
    gradient finite (T = 1M scalar and 65536 vector in test_bf16_very_long_finite, slow)."""
    _finite(t, gate)


@pytest.mark.slow
@pytest.mark.parametrize("gate,t", [("scalar", 1 << 20), ("vector", 1 << 16)])
def test_bf16_very_long_finite(gate, t):
    _finite(t, gate)


def _finite(t, gate):
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, t, 2, 16, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    if gate == "vector":  # a bf16 gate: its own dtype rule
        lg = (-30 * torch.rand(1, t, 2, 16, generator=g) ** 4).bfloat16().requires_grad_()
    else:
        lg = (-30 * torch.rand(1, t, 2, generator=g) ** 4).requires_grad_()
    for spec in (Causal(), Full()):
        out = chunk_linear_attention(q, k, v, spec, log_gate=lg,
                                     chunk_size=64 if gate == "vector" else 256)
        grads = torch.autograd.grad(out.float().sum(), [q, k, v, lg])
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x).all() for x in grads)


# ------------------------------------------------------------------------ bad input


def test_bad_gates():
    q, k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 3)
    lg = -torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match="log_gate values must be <= 0"):
        linear_attention(q, k, v, Causal(), log_gate=lg + 0.5)
    with pytest.raises(ValueError, match="log_gate values must be <= 0 and finite"):
        linear_attention(q, k, v, Causal(), log_gate=torch.full((1, 8, 2), -float("inf")))
    with pytest.raises(ValueError, match=r"reverse_log_gate must have shape \[B, Tk, H\]"):
        linear_attention(q, k, v, Full(), log_gate=lg, reverse_log_gate=lg[:, :5])
    # per key dimension gates are served too: the message names both shapes
    with pytest.raises(ValueError, match=r"log_gate must have shape \[B, Tk, H\] or "
                                         r"\[B, Tk, H, D\] = \[1, 8, 2\] or \[1, 8, 2, 4\]"):
        linear_attention(q, k, v, Causal(), log_gate=lg[..., :1])
    with pytest.raises(ValueError, match="mutually exclusive"):
        linear_attention(q, k, v, Causal(), log_gate=lg, decay=torch.ones(2))
    with pytest.raises(ValueError, match="log_gate must have dtype"):
        linear_attention(q, k, v, Causal(), log_gate=lg.double())
    with pytest.raises(ValueError, match="log_gate must be on q's device"):
        linear_attention(q, k, v, Causal(), log_gate=lg.to("meta"))
    with pytest.raises(ValueError, match="log_gate must be a floating"):
        linear_attention(q, k, v, Causal(), log_gate=torch.zeros(1, 8, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="log_gate must be a"):
        linear_attention(q, k, v, Causal(), log_gate=[0.0])
    with pytest.raises(ValueError, match="reverse_log_gate needs log_gate"):
        linear_attention(q, k, v, Full(), reverse_log_gate=lg)
    with pytest.raises(ValueError, match="log_gate needs q_offset == k_offset"):
        linear_attention(q, k, v, Causal(), log_gate=lg, q_offset=2, impl="reference")
    with pytest.raises(ValueError, match="decay must be a"):
        linear_attention(q, k, v, Causal(), decay="0.9")


# ------------------------------------------------------------------------ stream and decode


@pytest.mark.parametrize("name", ["causal", "chunked", "chunked_la", "prefix", "seg_chunked_la"])
@pytest.mark.parametrize("gate", GATES)
def test_gated_stream_equals_parallel(name, gate):
    t = 61
    spec = _specs(t)[name]
    q, k, v, lg, lgr, *_ = _inputs(t, 11, hkv=2, gate=gate)
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


@pytest.mark.parametrize("gate", GATES)
def test_gated_decode_step_equals_parallel(gate):
    t, pre = 30, 17
    q, k, v, lg, *_ = _inputs(t, 12, gate=gate)
    par = linear_attention(q, k, v, Causal(), log_gate=lg)
    s = LinearStream(Causal())
    outs = [s.step(q[:, :pre], k[:, :pre], v[:, :pre], log_gate=lg[:, :pre])]
    for i in range(pre, t):
        outs.append(s.step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], log_gate=lg[:, i:i + 1]))
    torch.testing.assert_close(torch.cat(outs, 1), par, rtol=1e-5, atol=1e-5)


def test_gated_stream_refusals_leave_it_unchanged():
    q, k, v, lg, *_ = _inputs(6, 13)
    s = LinearStream(Causal())
    s.push(q[:, :2], k[:, :2], v[:, :2], log_gate=lg[:, :2])
    with pytest.raises(ValueError, match="same gates as the first"):
        s.push(q[:, 2:3], k[:, 2:3], v[:, 2:3])
    with pytest.raises(ValueError, match="log_gate values must be <= 0"):
        s.push(q[:, 2:3], k[:, 2:3], v[:, 2:3], log_gate=-lg[:, 2:3] + 1)
    assert s.frames_in == 2
    with pytest.raises(ValueError, match="exclusive"):
        LinearStream(Causal(), decay=torch.full((H,), 0.9)).push(q, k, v, log_gate=lg)


# ------------------------------------------------------------------------ nn gated mixer


@pytest.mark.parametrize("vis", [(Causal(), Causal()), (Prefix(6), Chunked(4, lookahead=1))])
def test_gated_model_streams_like_parallel(vis):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, mixer="gated", feature_dim=8,
                      input_dim=5, output_dim=3, visibility=vis)
    m = SequenceModel(cfg)
    x = m.embed(torch.randn(2, 23, 5))
    ref = x
    for blk in m.blocks:
        ref = blk(ref)
    ms = ModelStream(m.blocks)
    outs = [ms.push(x[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 11), (11, 23))]
    outs.append(ms.flush())
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-4, atol=1e-5)


def test_gated_model_bidirectional_trains():
    """Full() (Hydra style): both time steps and the rate get gradients; outputs mix both
    directions (the first position depends on the last)."""
    torch.manual_seed(1)
    m = SequenceModel(ModelConfig(d_model=32, n_heads=4, mixer="gated", feature_dim=8,
                                  vocab_size=11, visibility=(Full(),)))
    tok = torch.randint(0, 11, (2, 9))
    y = m(tok)
    y.sum().backward()
    attn = m.blocks[0].attn
    assert attn.A_log.grad.abs().min() > 0 and attn.dt_bias.grad.abs().min() > 0
    tok2 = tok.clone()
    tok2[:, -1] = (tok2[:, -1] + 1) % 11
    with torch.no_grad():
        assert not torch.allclose(m(tok2)[:, 0], m(tok)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "seg_chunked_la"])
def test_gated_long_chunk_matches_reference(name):
    _check("chunk", 3000, _specs(3010)[name], dtype=torch.float32, off=0, c=256, strength=0.5)
