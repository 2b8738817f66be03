"""The delta-rule stream: pushing frames in awkward pieces gives exactly the parallel
``delta_attention`` outputs (every served streamable spec, lengths 1, 7, 63, 113, gated or not,
GQA), at the analytic latency, in memory bounded by the lookahead; decode steps equal the
parallel run and the recurrent op with a carried state; bad frames raise and change nothing.

The reference is the dense definition in fp64 (``impl="reference"``); the baseline of every
comparison is the same definition in fp32 over the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.delta import delta_attention, recurrent_delta_attention
from causalmix.stream import DeltaStream, mixer_stream
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments, Window

IDS = torch.repeat_interleave(torch.arange(7), torch.tensor([5, 30, 1, 20, 40, 30, 10]))  # 136
IDS_B = torch.stack([IDS, torch.repeat_interleave(torch.arange(4), torch.tensor([50, 3, 60, 23]))])

SPECS = [
    Causal(),
    Prefix(10),
    Prefix(torch.tensor([3, 50])),
    Chunked(8),
    Chunked(8, lookahead=1),
    Chunked(5, lookahead=2),
    Segments(IDS) & Causal(),
    Segments(IDS_B) & Chunked(6, lookahead=1),
    Segments(IDS) & Prefix(40),
]


def inputs(t, seed, *, heads=(2, 2), gated=True, reverse=False, beta_max=1.95, b=2, d=8,
           vector=False):
    """``vector``: per-key-dimension gates ``[b, t, H, d]`` (KDA)."""
    g = torch.Generator().manual_seed(seed)
    h, hkv = heads
    gate = (b, t, h, d) if vector else (b, t, h)
    q = torch.randn(b, t, h, d, generator=g)
    k = torch.nn.functional.normalize(torch.randn(b, t, hkv, d, generator=g), dim=-1)
    v = torch.randn(b, t, hkv, 6, generator=g)
    extra = {"beta": 0.05 + (beta_max - 0.05) * torch.rand(b, t, h, generator=g)}
    if gated:
        extra["log_gate"] = -1.5 * torch.rand(*gate, generator=g)
    if reverse:
        extra["reverse_log_gate"] = -1.5 * torch.rand(*gate, generator=g)
    return (q, k, v), extra


def push_all(stream, sizes, qkv, extra):
    """Push in pieces of the given sizes (cycled), then flush; concatenated outputs."""
    t = qkv[0].shape[1]
    outs, i, p = [], 0, 0
    while p < t:
        n = min(sizes[i % len(sizes)], t - p)
        i += 1
        outs.append(stream.push(*(x[:, p:p + n] for x in qkv),
                                **{name: x[:, p:p + n] for name, x in extra.items()}))
        p += n
    outs.append(stream.flush())
    return torch.cat(outs, 1)


def rand_sizes(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([1, 1, 2, 3, 5, 17, 31, 64])
    return tuple(int(c) for c in choices[torch.randint(len(choices), (n,), generator=g)])


def parallel(qkv, extra, vis, dtype):
    return delta_attention(*(x.to(dtype) for x in qkv), vis, impl="reference",
                           **{n: x.to(dtype) for n, x in extra.items()})


def analytic_ready(vis, t):
    i = torch.arange(t)
    if isinstance(vis, Chunked):
        r = (i // vis.size + vis.lookahead + 1) * vis.size - 1
    elif isinstance(vis, Prefix):
        n = int(vis.n.max()) if isinstance(vis.n, torch.Tensor) else vis.n
        r = torch.clamp(i, min=n - 1)
    else:
        r = i
    return torch.clamp(r, max=t - 1)


@pytest.mark.parametrize("vis", SPECS, ids=repr)
@pytest.mark.parametrize("t", [1, 7, 63, 113])
def test_delta_stream_equals_parallel(vis, t):
    qkv, extra = inputs(t, t, reverse=t % 2 == 1)
    s = DeltaStream(vis, chunk_size=16)
    out = push_all(s, rand_sizes(t + 3), qkv, extra)
    assert_close(out, parallel(qkv, extra, vis, torch.float64),
                 parallel(qkv, extra, vis, torch.float32), name=f"{vis!r} T={t}")
    if isinstance(vis, (Causal, Chunked, Prefix)):
        assert torch.equal(s.latency, analytic_ready(vis, t) - torch.arange(t))
    assert s.latency_stats(frame_seconds=0.01).measured is not None


@pytest.mark.parametrize("vis", SPECS, ids=repr)
@pytest.mark.parametrize("t", [1, 7, 63, 113])
def test_delta_stream_vector_gates_equal_parallel(vis, t):
    """KDA's per-key-dimension gates ``[B, n, H, D]`` (and a reverse one for odd T), pushed in
    awkward pieces, chunks of 16 (the chunk's shortcut and sub-chunks)."""
    qkv, extra = inputs(t, t + 100, reverse=t % 2 == 1, vector=True)
    s = DeltaStream(vis, chunk_size=16)
    out = push_all(s, rand_sizes(t + 5), qkv, extra)
    assert_close(out, parallel(qkv, extra, vis, torch.float64),
                 parallel(qkv, extra, vis, torch.float32), name=f"{vis!r} T={t}")


def test_delta_decode_steps_vector_gates():
    """``step()`` with a per-key-dimension gate, one token at a time == one recurrent op call
    with the carried state, and the parallel op over the whole sequence."""
    qkv, extra = inputs(30, 8, vector=True)
    s = DeltaStream(Causal())
    state, outs = None, []
    for t in range(30):
        frame = [x[:, t:t + 1] for x in qkv]
        kw = {n: x[:, t:t + 1] for n, x in extra.items()}
        got = s.step(*frame, **kw)
        one, state = recurrent_delta_attention(*frame, Causal(), **kw, q_offset=t, k_offset=t,
                                               initial_state=state, return_final_state=True)
        torch.testing.assert_close(got, one, rtol=0, atol=0)
        outs.append(got)
    assert_close(torch.cat(outs, 1), parallel(qkv, extra, Causal(), torch.float64),
                 parallel(qkv, extra, Causal(), torch.float32), name="decode vector")
    with pytest.raises(ValueError, match="same gates as the first one"):
        s.step(*frame, beta=kw["beta"], log_gate=kw["log_gate"][..., 0])


@pytest.mark.parametrize("vis", [Causal(), Chunked(8, lookahead=1), Prefix(20)], ids=repr)
def test_delta_stream_deltanet_gqa_and_negative_eigenvalues(vis):
    """No gate (DeltaNet), k / v shared by two query heads, beta up to 2, one frame a push."""
    qkv, extra = inputs(45, 7, heads=(4, 2), gated=False, beta_max=2.0)
    out = push_all(DeltaStream(vis, impl="recurrent"), (1,), qkv, extra)
    assert_close(out, parallel(qkv, extra, vis, torch.float64),
                 parallel(qkv, extra, vis, torch.float32), name=repr(vis))


def test_delta_decode_steps_equal_parallel_and_the_recurrent_op():
    """``step()`` one token at a time == the parallel op, and each step == one
    ``recurrent_delta_attention`` call with T == 1 and the carried state."""
    qkv, extra = inputs(30, 3, reverse=False)
    s = DeltaStream(Causal())
    state, outs = None, []
    for t in range(30):
        frame = [x[:, t:t + 1] for x in qkv]
        kw = {n: x[:, t:t + 1] for n, x in extra.items()}
        got = s.step(*frame, **kw)
        one, state = recurrent_delta_attention(*frame, Causal(), **kw, q_offset=t, k_offset=t,
                                               initial_state=state, return_final_state=True)
        torch.testing.assert_close(got, one, rtol=0, atol=0)
        torch.testing.assert_close(s.state, state, rtol=0, atol=0)
        outs.append(got)
    assert_close(torch.cat(outs, 1), parallel(qkv, extra, Causal(), torch.float64),
                 parallel(qkv, extra, Causal(), torch.float32), name="decode")


def test_delta_decode_a_chunk_or_the_prefix_per_step():
    qkv, extra = inputs(24, 4)
    for vis, sizes in ((Chunked(6), (6,)), (Prefix(9), (9, 1, 1, 2, 1))):
        s, outs, p = DeltaStream(vis), [], 0
        i = 0
        while p < 24:
            n = min(sizes[min(i, len(sizes) - 1)], 24 - p)
            outs.append(s.step(*(x[:, p:p + n] for x in qkv),
                               **{m: x[:, p:p + n] for m, x in extra.items()}))
            assert outs[-1].shape[1] == n
            p, i = p + n, i + 1
        assert_close(torch.cat(outs, 1), parallel(qkv, extra, vis, torch.float64),
                     parallel(qkv, extra, vis, torch.float32), name=repr(vis))


def test_delta_stream_memory_is_bounded_by_the_lookahead():
    qkv, extra = inputs(400, 5)
    s = DeltaStream(Chunked(8, lookahead=1))
    sizes = []
    for p in range(0, 400, 3):
        s.push(*(x[:, p:p + 3] for x in qkv), **{n: x[:, p:p + 3] for n, x in extra.items()})
        assert s.buffer_len <= 2 * 8 + 3
        sizes.append(s.cache_nbytes())
    assert max(sizes[20:]) == max(sizes[20:40])  # no growth with the stream's length


def test_delta_stream_refusals_and_bad_frames_change_nothing():
    with pytest.raises(ValueError, match="unbounded lookahead"):
        DeltaStream(Full())
    with pytest.raises(ValueError, match="cannot stream Window"):
        DeltaStream(Window(4))
    with pytest.raises(ValueError, match="impl"):
        DeltaStream(Causal(), impl="nope")
    with pytest.raises(ValueError, match="not accepted by the 'delta' stream"):
        mixer_stream("delta", Causal(), decay=torch.ones(2))
    qkv, extra = inputs(10, 6)
    s = DeltaStream(Chunked(4, lookahead=1))
    first = [x[:, :3] for x in qkv]
    kw = {n: x[:, :3] for n, x in extra.items()}
    out0 = s.push(*first, **kw)
    before = (s.frames_in, s.frames_out, s.buffer_len, s.cache_nbytes())
    bad = [({**kw, "beta": None}, "beta is required"),
           ({**kw, "beta": kw["beta"] * 0 + 2.5}, r"beta values must lie in \(0, 2\]"),
           ({**kw, "log_gate": -kw["log_gate"] + 0.1}, "log_gate values must be <= 0"),
           ({"beta": kw["beta"]}, "same gates as the first one"),
           ({**kw, "beta": kw["beta"][:, :2]}, r"beta must have shape")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            s.push(*first, **args)
        assert (s.frames_in, s.frames_out, s.buffer_len, s.cache_nbytes()) == before
    with pytest.raises(ValueError, match="earlier outputs are still pending"):
        s.step(*first, **kw)
    rest = s.push(*(x[:, 3:] for x in qkv), **{n: x[:, 3:] for n, x in extra.items()})
    out = torch.cat([out0, rest, s.flush()], 1)  # the refused pushes left no trace
    vis = Chunked(4, lookahead=1)
    assert_close(out, parallel(qkv, extra, vis, torch.float64),
                 parallel(qkv, extra, vis, torch.float32), name="after refusals")
