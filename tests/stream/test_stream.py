"""Streaming executors: pushing frames in random pieces gives exactly the parallel outputs, at the
analytic latency, in bounded memory where the spec allows it; decode steps equal the parallel run.

References are dense and computed here, in fp64 (``ref``); the baseline of every comparison is
the same dense computation in fp32 (a same-precision eager run), as ``assert_close`` wants.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from causalmix.checks import ArgumentTypeError
from causalmix.ops.linear import linear_attention
from causalmix.ops.softmax import softmax_attention
from causalmix.stream import (
    Frames,
    LatencyStats,
    LinearStream,
    ModelStream,
    SoftmaxStream,
    StreamableLayer,
    compounded_latency,
    latency_stats,
    mixer_stream,
)
from causalmix.stream.linear import fold_state
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments, Window

IDS = torch.repeat_interleave(torch.arange(6), torch.tensor([5, 30, 1, 20, 40, 30]))  # 126


# ============================================================================ dense references


def dense_softmax(q, k, v, vis, scale=None):
    """``q: [B, T, H, D]``, ``k, v: [B, T, Hkv, *]``: softmax over visible keys, q's dtype."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = vis.mask(t, t)[:, None].to(q.device)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def dense_linear(q, k, v, vis, decay=None):
    """``o_i = sum_{j visible} lambda^|i-j| (q_i . k_j) v_j`` in q's dtype."""
    b, t, h, d = q.shape
    pos = torch.arange(t)
    dist = (pos[:, None] - pos[None, :]).abs().to(q.dtype)
    lam = torch.ones(h, dtype=q.dtype) if decay is None else decay.to(q.dtype)
    w = lam[:, None, None] ** dist  # [H, T, T]
    mask = vis.mask(t, t).to(q.dtype)[:, None]  # [B', 1, T, T]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * w * mask
    return torch.einsum("bhqk,bkhd->bqhd", s, v)


def push_all(stream, sizes, *tensors):
    """Push ``tensors`` ([B, T, ...] each) in pieces of the given sizes (cycled), then flush;
    returns the concatenated outputs and the output count after each push."""
    t = tensors[0].shape[1]
    outs, counts, i, p = [], [], 0, 0
    while p < t:
        n = min(sizes[i % len(sizes)], t - p)
        i += 1
        outs.append(stream.push(*(x[:, p : p + n] for x in tensors)))
        p += n
        counts.append((p, stream.frames_out))
    outs.append(stream.flush())
    return torch.cat(outs, 1), counts


def rand_sizes(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([1, 1, 2, 3, 5, 17, 31, 64])
    return tuple(int(c) for c in choices[torch.randint(len(choices), (n,), generator=g)])


def analytic_ready(vis, t, layers=1):
    """Last input frame each output needs through ``layers`` layers of ``vis`` (closed forms)."""
    i = torch.arange(t)
    r = i
    for _ in range(layers):
        if isinstance(vis, Window):
            r = r + vis.right
        elif isinstance(vis, Chunked):
            r = (r // vis.size + vis.lookahead + 1) * vis.size - 1
        elif isinstance(vis, Prefix):
            # a batch-dependent prefix: the whole batch waits for the longest
            n = int(vis.n.max()) if isinstance(vis.n, torch.Tensor) else vis.n
            r = torch.clamp(r, min=n - 1)
        elif isinstance(vis, Causal):
            pass
        else:
            raise AssertionError(vis)
    return torch.clamp(r, max=t - 1)


# ============================================================================ single mixer: softmax

SOFTMAX_SPECS = [
    Causal(),
    Window(7),
    Window(5, 3),
    Chunked(16),
    Chunked(4, lookahead=2),
    Prefix(10),
    Chunked(8, lookahead=1) & Window(12, 4),
    Chunked(16) | Window(4),
    Segments(IDS),
    Segments(IDS) & Chunked(8, lookahead=1),
]


@pytest.mark.parametrize("vis", SOFTMAX_SPECS, ids=repr)
@pytest.mark.parametrize("t", [1, 7, 63, 113])
def test_softmax_stream_equals_parallel(vis, t):
    torch.manual_seed(t)
    b, h, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, t, h, d)
    k, v = torch.randn(b, t, hkv, d), torch.randn(b, t, hkv, d)
    s = SoftmaxStream(vis)
    out, _ = push_all(s, rand_sizes(t), q, k, v)
    ref = dense_softmax(q.double(), k.double(), v.double(), vis)
    assert_close(out, ref, dense_softmax(q, k, v, vis), name=f"{vis!r} T={t}")
    assert s.frames_out == t and s.latency.shape == (t,)


@pytest.mark.parametrize(
    "vis", [Window(16, 2), Chunked(32, lookahead=1), Prefix(torch.tensor([40, 3]))], ids=repr
)
def test_softmax_stream_long_and_explicit_impl(vis):
    t = 500
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, t, 2, 16) for _ in range(3))
    for impl in ("blocks", "reference"):
        out, _ = push_all(SoftmaxStream(vis, scale=0.3, impl=impl), rand_sizes(7), q, k, v)
        ref = dense_softmax(q.double(), k.double(), v.double(), vis, scale=0.3)
        assert_close(out, ref, dense_softmax(q, k, v, vis, scale=0.3), name=f"{vis!r} {impl}")


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
def test_stream_bfloat16(mixer):
    t = 113
    torch.manual_seed(5)
    vis = Chunked(8, lookahead=1)
    q, k, v = (torch.randn(2, t, 2, 16, dtype=torch.bfloat16) / 2 for _ in range(3))
    decay = torch.tensor([0.9, 0.99])
    if mixer == "softmax":
        s, dense = SoftmaxStream(vis), dense_softmax
    else:
        s, dense = LinearStream(vis, decay=decay), lambda *a: dense_linear(*a, decay)
    out, _ = push_all(s, rand_sizes(4), q, k, v)
    assert out.dtype == torch.bfloat16
    ref = dense(q.double(), k.double(), v.double(), vis)
    assert_close(out, ref, dense(q, k, v, vis))


def test_softmax_stream_segments_and_causal():
    t = 113
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([10, 30, 1, 50, 22]))
    vis = Segments(ids) & Causal()
    q, k, v = (torch.randn(1, t, 2, 8) for _ in range(3))
    s = SoftmaxStream(vis)
    out, _ = push_all(s, (3, 17, 1), q, k, v)
    ref = dense_softmax(q.double(), k.double(), v.double(), vis)
    assert_close(out, ref, dense_softmax(q, k, v, vis))
    assert torch.equal(s.latency, torch.zeros(t, dtype=torch.int64))
    with pytest.raises(ValueError, match="defines positions"):
        SoftmaxStream(vis).push(*(torch.randn(1, t + 1, 2, 8) for _ in range(3)))


def test_softmax_matches_the_op_itself():
    """The stream calls the public op; its result equals the op's own parallel run too."""
    torch.manual_seed(3)
    vis = Chunked(8, lookahead=1)
    q, k, v = (torch.randn(1, 63, 2, 8) for _ in range(3))
    out, _ = push_all(SoftmaxStream(vis, impl="blocks"), (5,), q, k, v)
    par = softmax_attention(q, k, v, vis, impl="blocks")
    ref = dense_softmax(q.double(), k.double(), v.double(), vis)
    assert_close(out, ref, par)


# ============================================================================ latency


@pytest.mark.parametrize(
    "vis", [Causal(), Window(6, 3), Chunked(8), Chunked(5, lookahead=2), Prefix(20)], ids=repr
)
def test_mixer_latency_is_analytic_and_outputs_leave_as_soon_as_final(vis):
    t = 113
    q, k, v = (torch.randn(1, t, 1, 4) for _ in range(3))
    s = SoftmaxStream(vis)
    _, counts = push_all(s, (1, 3, 17, 2), q, k, v)
    ready = analytic_ready(vis, t)
    assert torch.equal(s.ready_at, ready)
    assert torch.equal(s.latency, ready - torch.arange(t))
    for frames_in, frames_out in counts:
        # exactly the outputs whose last needed frame has arrived
        assert frames_out == int((analytic_ready(vis, 10**6)[:t] < frames_in).sum())
    st = s.latency_stats()
    lat = (ready - torch.arange(t)).double()
    assert dataclasses.replace(st, compute=None) == LatencyStats(
        t, float(lat.mean()), float(lat.quantile(0.5)), float(lat.quantile(0.9)), int(lat.max())
    )
    assert st.compute is not None and st.measured is None  # timed; no frame duration given


def test_latency_stats_values():
    st = LatencyStats.of(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert (st.count, st.mean, st.p50, st.max) == (10, 4.5, 4.5, 9)
    assert st.p90 == pytest.approx(8.1)
    assert LatencyStats.of(torch.empty(0, dtype=torch.int64)).count == 0


# ============================================================================ unbounded / errors


def test_unbounded_lookahead_is_refused():
    with pytest.raises(ValueError, match="unbounded lookahead"):
        SoftmaxStream(Full())
    with pytest.raises(ValueError, match="unbounded lookahead"):
        SoftmaxStream(Causal() | Full())
    scattered = Segments(torch.tensor([0, 1, 0, 1, 2, 2]))  # no interval, no bounded lookahead
    with pytest.raises(ValueError, match="unbounded lookahead"):
        SoftmaxStream(scattered)
    with pytest.raises(ValueError, match="unbounded lookahead"):
        ModelStream([TinyLayer("softmax", Full())])


def test_bad_input_raises_clear_errors():
    s = SoftmaxStream(Causal())
    with pytest.raises(TypeError, match="visibility"):
        SoftmaxStream("causal")
    with pytest.raises(ValueError, match="impl"):
        SoftmaxStream(Causal(), impl="nope")
    with pytest.raises(ValueError, match="scale"):
        SoftmaxStream(Causal(), scale="big")
    with pytest.raises(ValueError, match="4-D"):
        s.push(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="same frames"):
        s.push(torch.randn(1, 3, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="at least one frame"):
        s.push(*(torch.randn(1, 0, 2, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="nothing was pushed"):
        s.flush()
    s.push(*(torch.randn(1, 3, 2, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="batch 2"):
        s.push(*(torch.randn(2, 3, 2, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="dtype"):
        s.push(*(torch.randn(1, 3, 2, 8, dtype=torch.float64) for _ in range(3)))
    s.flush()
    with pytest.raises(ValueError, match="flushed"):
        s.push(*(torch.randn(1, 3, 2, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="already flushed"):
        s.flush()
    with pytest.raises(ValueError, match="batch size 2"):
        SoftmaxStream(Prefix(torch.tensor([3, 4]))).push(*(torch.randn(3, 2, 1, 4) for _ in "qkv"))
    with pytest.raises(ValueError, match="mixer must be one of"):
        mixer_stream("mamba", Causal())
    with pytest.raises(ValueError, match="not accepted"):
        mixer_stream("softmax", Causal(), decay=torch.ones(2))
    with pytest.raises(ValueError, match="at least one"):
        ModelStream([])
    with pytest.raises(TypeError, match="not a StreamableLayer: it has no 'mixer'"):
        ModelStream([object()])
    m = ModelStream([TinyLayer("softmax", Causal())])
    with pytest.raises(ValueError, match=r"\[batch, n >= 1 frames, features\]"):
        m.push(torch.randn(1, 0, 16))


def test_linear_stream_rejects_what_it_cannot_carry():
    for vis in (Window(4), Causal() | Window(3), Chunked(8) & Window(16, 2)):
        with pytest.raises(ValueError, match=r"LinearStream: cannot stream .*supported: Causal"):
            LinearStream(vis)
    with pytest.raises(ValueError, match="unbounded lookahead"):
        LinearStream(Full())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        LinearStream(Causal(), decay=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="decay"):
        LinearStream(Causal(), decay=[0.5])
    with pytest.raises(ValueError, match="chunk_size"):
        LinearStream(Causal(), chunk_size=0)
    with pytest.raises(ValueError, match=r"multiple of k/v heads \(3\)"):  # GQA: must divide
        kv = (torch.randn(1, 2, 3, 8) for _ in "kv")
        LinearStream(Causal()).push(torch.randn(1, 2, 4, 8), *kv)
    with pytest.raises(ValueError, match="decay has 3 heads"):
        LinearStream(Causal(), decay=torch.full((3,), 0.9)).push(
            *(torch.randn(1, 2, 2, 4) for _ in "qkv")
        )


# ============================================================================ single mixer: linear

LINEAR_SPECS = [
    Causal(),
    Chunked(16),
    Chunked(4, lookahead=2),
    Prefix(10),
    Prefix(torch.tensor([3, 70])),
    Segments(IDS) & Chunked(8, lookahead=1),
    Segments(IDS) & Causal(),
    Segments(IDS),
]


def test_fold_state_is_the_recurrence():
    torch.manual_seed(0)
    k, v = torch.randn(2, 9, 3, 4), torch.randn(2, 9, 3, 5)
    lam = torch.tensor([0.5, 0.9, 1.0])
    s0 = torch.randn(2, 3, 4, 5)
    s = s0.clone()
    for t in range(9):
        s = lam[None, :, None, None] * s + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
    assert torch.allclose(fold_state(s0, k, v, lam), s, atol=1e-5, rtol=1e-5)
    assert torch.allclose(
        fold_state(None, k, v, None), torch.einsum("bnhd,bnhe->bhde", k.float(), v), atol=1e-5
    )


@pytest.mark.parametrize("vis", LINEAR_SPECS, ids=repr)
@pytest.mark.parametrize("t", [1, 7, 63, 113])
def test_linear_stream_equals_parallel(vis, t):
    torch.manual_seed(t)
    b, h, d = 2, 2, 8
    q, k, v = (torch.randn(b, t, h, d) / d**0.25 for _ in range(3))
    decay = torch.tensor([0.9, 1.0])
    s = LinearStream(vis, decay=decay)
    out, _ = push_all(s, rand_sizes(t + 1), q, k, v)
    ref = dense_linear(q.double(), k.double(), v.double(), vis, decay.double())
    assert_close(out, ref, dense_linear(q, k, v, vis, decay), name=f"{vis!r} T={t}")
    if isinstance(vis, (Causal, Window, Chunked, Prefix)):
        assert torch.equal(s.latency, analytic_ready(vis, t) - torch.arange(t))


@pytest.mark.parametrize("vis", [Chunked(32, lookahead=1), Prefix(40), Causal()], ids=repr)
def test_linear_stream_long(vis):
    t = 500
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, t, 2, 8) / 8**0.25 for _ in range(3))
    decay = torch.tensor([0.95, 0.99])
    for impl in ("chunk", "auto"):
        s = LinearStream(vis, decay=decay, impl=impl, chunk_size=16)
        out, _ = push_all(s, rand_sizes(11), q, k, v)
        ref = dense_linear(q.double(), k.double(), v.double(), vis, decay.double())
        assert_close(out, ref, dense_linear(q, k, v, vis, decay), name=impl)
    par = linear_attention(q, k, v, vis, decay=decay)  # the op's own parallel run agrees too
    assert_close(out, ref, par)


# ============================================================================ bounded memory


def test_softmax_window_cache_is_bounded():
    vis = Chunked(16, lookahead=1) & Window(40, 8)
    s = SoftmaxStream(vis)
    sizes = (7, 1, 13)
    nbytes = []
    for i in range(600):
        n = sizes[i % 3]
        s.push(*(torch.randn(1, n, 2, 8) for _ in range(3)))
        assert s.cache_len <= vis.lookback_frames + (s.frames_in - s.frames_out)
        assert s.frames_in - s.frames_out <= vis.lookahead_frames + n
        nbytes.append(s.cache_nbytes())
    assert s.frames_in == 4200
    assert max(nbytes[300:]) == max(nbytes[:300])  # allocation stopped growing early


def test_softmax_unbounded_lookback_keeps_everything():
    s = SoftmaxStream(Chunked(8))
    s.push(*(torch.randn(1, 100, 1, 4) for _ in range(3)))
    assert s.cache_len == 100 and s.cache_start == 0


@pytest.mark.parametrize("vis", [Causal(), Chunked(16, lookahead=1), Prefix(30)], ids=repr)
def test_linear_memory_is_constant(vis):
    s = LinearStream(vis, decay=torch.tensor([0.9, 0.99]))
    nbytes = []
    for i in range(500):
        n = (1, 9, 4)[i % 3]
        s.push(*(torch.randn(1, n, 2, 8) for _ in range(3)))
        held = s.frames_in - s.frames_out
        assert s.buffer_len == held <= vis.lookahead_frames + n
        nbytes.append(s.cache_nbytes())
    assert max(nbytes[250:]) == max(nbytes[:250])


# ============================================================================ stacks of layers


class TinyLayer(torch.nn.Module):
    """A pre-norm block implementing :class:`StreamableLayer`: projections with a
    position-dependent rotation of q/k, one mixer call, output projection + residual, MLP."""

    def __init__(self, mixer, visibility, c=16, h=2, d=8, decay=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mixer, self.visibility, self.h, self.d = mixer, visibility, h, d
        self.norm1, self.norm2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.qkv = torch.nn.Linear(c, 3 * h * d)
        self.proj = torch.nn.Linear(h * d, c)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(c, 2 * c), torch.nn.GELU(), torch.nn.Linear(2 * c, c)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
        self.register_buffer("decay", decay)

    def mixer_kwargs(self):
        if self.mixer == "softmax":
            return {"scale": 0.5}
        return {"decay": self.decay}

    def stream_qkv(self, x, positions):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.h, self.d).unbind(2)
        angle = (positions.to(x.dtype) * 0.05)[None, :, None, None]
        q = q * torch.cos(angle) + q.roll(1, -1) * torch.sin(angle)
        k = k * torch.cos(angle) + k.roll(1, -1) * torch.sin(angle)
        return q, k, v

    def stream_out(self, x, mixed, positions):
        h = x + self.proj(mixed.flatten(2))
        return h + self.mlp(self.norm2(h))


def run_parallel(layers, x):
    """The layers over the whole sequence with dense mixers, in x's dtype."""
    pos = torch.arange(x.shape[1])
    for layer in layers:
        q, k, v = layer.stream_qkv(x, pos)
        if layer.mixer == "softmax":
            mixed = dense_softmax(q, k, v, layer.visibility, **layer.mixer_kwargs())
        else:
            mixed = dense_linear(q, k, v, layer.visibility, layer.decay)
        x = layer.stream_out(x, mixed, pos)
    return x


def make_layers(mixers, vis, seed=0):
    decay = torch.tensor([0.9, 0.97])
    return [TinyLayer(m, vis, decay=decay, seed=seed + i) for i, m in enumerate(mixers)]


def check_model(layers, x, sizes):
    assert all(isinstance(layer, StreamableLayer) for layer in layers)
    m = ModelStream(layers)
    out, counts = push_all(m, sizes, x)
    with torch.no_grad():
        ref = run_parallel([copy.deepcopy(layer).double() for layer in layers], x.double())
        base = run_parallel(layers, x)
    assert_close(out, ref, base)
    return m, counts


MODEL_SPECS = [Causal(), Window(6, 2), Chunked(8, lookahead=1), Prefix(12)]


@pytest.mark.parametrize("vis", MODEL_SPECS, ids=repr)
@pytest.mark.parametrize("depth", [1, 3])
def test_model_stream_softmax(vis, depth):
    t = 113
    torch.manual_seed(depth)
    x = torch.randn(2, t, 16)
    m, counts = check_model(make_layers(["softmax"] * depth, vis), x, rand_sizes(depth))
    ready = analytic_ready(vis, t, depth)
    assert torch.equal(m.latency, ready - torch.arange(t))
    for frames_in, frames_out in counts[:-1]:
        assert frames_out == int((analytic_ready(vis, 10**6, depth)[:t] < frames_in).sum())


@pytest.mark.parametrize("vis", [Causal(), Chunked(8, lookahead=1), Prefix(12)], ids=repr)
@pytest.mark.parametrize("mixers", [["linear"], ["linear", "softmax", "linear"]], ids=len)
def test_model_stream_linear_and_mixed(vis, mixers):
    t = 113
    torch.manual_seed(len(mixers))
    x = torch.randn(2, t, 16)
    m, _ = check_model(make_layers(mixers, vis), x, rand_sizes(5))
    assert torch.equal(m.latency, analytic_ready(vis, t, len(mixers)) - torch.arange(t))


@pytest.mark.parametrize(
    "vis,mixers",
    [
        (Chunked(16, lookahead=1) & Window(24, 8), ["softmax"] * 3),
        (Chunked(16, lookahead=1), ["softmax", "linear", "softmax"]),
    ],
    ids=["softmax-chunked&window", "mixed-chunked"],
)
def test_model_stream_long_three_layers(vis, mixers):
    t = 500
    x = torch.randn(1, t, 16)
    m, _ = check_model(make_layers(mixers, vis), x, rand_sizes(9))
    st = m.latency_stats()
    assert st.count == t and st.max <= 3 * vis.lookahead_frames
    if isinstance(vis, Chunked):
        assert torch.equal(m.latency, analytic_ready(vis, t, 3) - torch.arange(t))


def test_model_latency_compounds_per_layer_spec():
    """Different specs per layer: ready = r_1(r_2(r_3(i)))."""
    t = 97
    specs = [Window(4, 3), Chunked(8, lookahead=1), Window(2, 1)]
    layers = [TinyLayer("softmax", s, seed=i) for i, s in enumerate(specs)]
    m = ModelStream(layers)
    out, _ = push_all(m, (3, 1, 17), torch.randn(1, t, 16))
    i = torch.arange(t)
    r = i + 1  # last layer: Window(2, 1)
    r = (r // 8 + 2) * 8 - 1  # middle: Chunked(8, 1)
    r = torch.clamp(r + 3, max=t - 1)  # first: Window(4, 3)
    assert torch.equal(m.latency, r - i)
    assert out.shape == (1, t, 16)


def test_model_memory_is_bounded():
    decay = torch.tensor([0.9, 0.99])
    layers = [
        TinyLayer("softmax", Window(16, 2)),
        TinyLayer("linear", Chunked(8, lookahead=1), decay=decay, seed=1),
        TinyLayer("softmax", Chunked(4) & Window(9), seed=2),
    ]
    m = ModelStream(layers)
    nbytes = []
    for i in range(400):
        m.push(torch.randn(1, (1, 5, 11)[i % 3], 16))
        nbytes.append(m.cache_nbytes())
    assert max(nbytes[200:]) == max(nbytes[:200])


# ============================================================================ decode


def generate(layers, prompt, steps, chunk):
    """Autoregressive generation with ``ModelStream.step``: the next frames are a function of
    the last outputs. Returns the whole input sequence and every output."""
    m = ModelStream(layers)
    xs, ys = [prompt], [m.step(prompt)]
    for _ in range(steps):
        last = ys[-1][:, -1:]
        nxt = torch.tanh(last).repeat(1, chunk, 1) + 0.1 * torch.arange(chunk)[None, :, None]
        xs.append(nxt)
        ys.append(m.step(nxt))
    return torch.cat(xs, 1), torch.cat(ys, 1)


DECODE = [
    (Causal(), 1, 1),  # (spec, prompt length, frames per step)
    (Prefix(9), 9, 1),
    (Window(6), 3, 1),
    (Chunked(8), 8, 8),
]


@pytest.mark.parametrize("vis,prompt_len,chunk", DECODE, ids=lambda x: repr(x))
@pytest.mark.parametrize("mixers", [["softmax"], ["softmax", "linear", "softmax"]], ids=len)
def test_decode_equals_parallel(vis, prompt_len, chunk, mixers):
    if "linear" in mixers and isinstance(vis, Window):
        mixers = ["softmax", "softmax", "softmax"]  # linear attention has no Window state
    torch.manual_seed(0)
    layers = make_layers(mixers, vis)
    x, y = generate(layers, torch.randn(2, prompt_len, 16), steps=40 // chunk * 2, chunk=chunk)
    with torch.no_grad():
        ref = run_parallel([copy.deepcopy(layer).double() for layer in layers], x.double())
        base = run_parallel(layers, x)
    assert_close(y, ref, base)


def test_decode_mixer_step_and_errors():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    s = SoftmaxStream(Causal())
    out = torch.cat([s.step(*(x[:, i : i + 1] for x in (q, k, v))) for i in range(20)], 1)
    ref = dense_softmax(q.double(), k.double(), v.double(), Causal())
    assert_close(out, ref, dense_softmax(q, k, v, Causal()))
    c = SoftmaxStream(Chunked(4))
    with pytest.raises(ValueError, match="not final after this step"):
        c.step(q[:, :3], k[:, :3], v[:, :3])
    assert c.frames_in == 0  # a step that raises pushes nothing
    c.push(q[:, :3], k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="still pending"):
        c.step(q[:, 3:4], k[:, 3:4], v[:, 3:4])
    m = ModelStream([TinyLayer("softmax", Window(4, 1))])
    with pytest.raises(ValueError, match="not final after this step"):
        m.step(torch.randn(1, 1, 16))
    assert m.frames_in == 0


# ============================================================================ the stream contract


def _state(s):
    """Everything observable about a stream (and its cache size and latencies)."""
    return (s.frames_in, s.frames_out, s.pending, s.closed, s.cache_nbytes(), repr(s),
            s.latency.tolist())


@pytest.mark.parametrize("make", [
    lambda: SoftmaxStream(Segments(IDS[:60]) & Chunked(8, lookahead=1)),
    lambda: SoftmaxStream(Window(6, 3)),
    lambda: LinearStream(Chunked(8, lookahead=1), decay=torch.tensor([0.9, 0.97])),
], ids=["softmax-segments", "softmax-window", "linear-chunked"])
def test_a_call_that_raises_leaves_the_stream_as_it_was(make):
    torch.manual_seed(0)
    t = 60
    q, k, v = (torch.randn(1, t, 2, 8) for _ in range(3))
    s = make()
    outs = [s.push(q[:, :5], k[:, :5], v[:, :5]), s.push(q[:, 5:17], k[:, 5:17], v[:, 5:17])]
    before = _state(s)
    bad = [
        (q[:, 17:20].double(), k[:, 17:20].double(), v[:, 17:20].double()),  # dtype
        (q[:, 17:20, :1], k[:, 17:20, :1], v[:, 17:20, :1]),  # heads
        (q[:, 17:17], k[:, 17:17], v[:, 17:17]),  # no frame
        (q[:, 17:20], k[:, 17:21], v[:, 17:21]),  # q and k/v differ
        (q[:, 17:20], k[:, 17:20], "v"),  # not a tensor
    ]
    for args in bad:
        with pytest.raises(ValueError):
            s.push(*args)
        assert _state(s) == before
    with pytest.raises(ValueError, match="still pending|not final"):
        s.step(q[:, 17:18], k[:, 17:18], v[:, 17:18])
    assert _state(s) == before
    if s.visibility.covered_length is not None:  # past the positions the spec defines
        long = torch.randn(1, t + 1 - 17, 2, 8)
        with pytest.raises(ValueError, match="would reach position 60.*defines positions"):
            s.push(long, long, long)
        assert _state(s) == before
    # the stream carries on exactly as if the bad calls never happened
    for a, b in ((17, 18), (18, 41), (41, t)):
        outs.append(s.push(q[:, a:b], k[:, a:b], v[:, a:b]))
    outs.append(s.flush())
    got = torch.cat(outs, 1)
    vis = s.visibility
    if isinstance(s, SoftmaxStream):
        ref, base = dense_softmax(q.double(), k.double(), v.double(), vis), dense_softmax(
            q, k, v, vis)
    else:
        ref = dense_linear(q.double(), k.double(), v.double(), vis, s.decay)
        base = dense_linear(q, k, v, vis, s.decay)
    assert_close(got, ref, base)


def test_streams_go_through_check_positions(monkeypatch):
    """Positions are ints below MAX_POSITION (2**53): a stream that would reach it raises (here
    with the limit lowered to 40 to reach it), leaving the stream as it was."""
    import causalmix.stream._common as stream_common
    import causalmix.visibility.base as visibility_base

    for module in (visibility_base, stream_common):  # every module that reads the limit
        monkeypatch.setattr(module, "MAX_POSITION", 40)
    x = torch.randn(1, 30, 2, 8)
    for s in (SoftmaxStream(Causal()), LinearStream(Causal())):
        s.push(x, x, x)
        before = _state(s)
        with pytest.raises(ValueError, match="would reach position 59.*<= 40"):
            s.push(x, x, x)
        assert _state(s) == before
        s.push(x[:, :10], x[:, :10], x[:, :10])
    m = ModelStream([TinyLayer("softmax", Causal())])
    m.push(torch.randn(1, 30, 16))
    with pytest.raises(ValueError, match="would reach position 59"):
        m.push(torch.randn(1, 30, 16))
    assert m.frames_in == 30 and m.layers[0].mixer.frames_in == 30


def test_explicit_impl_that_cannot_serve_fails_at_construction():
    for spec in (Causal(), Window(4), Chunked(4, lookahead=1)):
        with pytest.raises(ValueError, match=r"impl='sdpa' cannot serve the calls of a stream"):
            SoftmaxStream(spec, impl="sdpa")
    q, k, v = (torch.randn(1, 23, 2, 8) for _ in range(3))
    for impl in ("reference", "blocks"):  # these serve every stream: outputs as the parallel op
        s = SoftmaxStream(Window(5, 2), impl=impl)
        out, _ = push_all(s, (1, 7, 3), q, k, v)
        assert_close(out, dense_softmax(q.double(), k.double(), v.double(), Window(5, 2)),
                     dense_softmax(q, k, v, Window(5, 2)))
    # every linear impl serves every spec LinearStream accepts (the rest raise at construction)
    for spec in LINEAR_SPECS:
        if spec.batch_size not in (None, 1):
            continue
        for impl in ("chunk", "recurrent", "reference"):
            s = LinearStream(spec, impl=impl)
            out, _ = push_all(s, (1, 7, 3), q, k, v)
            assert_close(out, dense_linear(q.double(), k.double(), v.double(), spec),
                         dense_linear(q, k, v, spec))


def test_repr_and_pending():
    s = SoftmaxStream(Chunked(4, lookahead=1), scale=0.5, impl="blocks")
    x = torch.randn(1, 6, 2, 8)
    s.push(x, x, x)
    assert s.pending == 6 and s.frames_in == 6 and s.frames_out == 0
    assert repr(s) == ("SoftmaxStream(Chunked(size=4, lookahead=1), scale=0.5, impl='blocks'; "
                       "frames_in=6, frames_out=0, pending=6, open)")
    s.push(x[:, :2], x[:, :2], x[:, :2])
    assert s.pending == 4 and "frames_in=8, frames_out=4, pending=4" in repr(s)
    lin = LinearStream(Causal(), decay=torch.tensor([0.5, 1.0]))
    assert repr(lin).startswith("LinearStream(Causal(), decay=[0.5, 1.0], impl='auto', "
                                "chunk_size=64; frames_in=0")
    m = ModelStream([TinyLayer("softmax", Window(4, 1)), TinyLayer("linear", Causal())])
    m.push(torch.randn(1, 3, 16))
    assert m.pending == 1
    assert repr(m) == ("ModelStream(2 layers [softmax Window(left=4, right=1), linear Causal()]; "
                       "frames_in=3, frames_out=2, pending=1, open)")
    m.flush()
    assert repr(m).endswith("pending=0, closed)")


LINEAR_SPECS_FOR_MODELS = [Causal(), Chunked(4, lookahead=1)]


@pytest.mark.parametrize("preset,vis", [
    ("tiny-softmax", (Window(6, 2), Chunked(4, lookahead=1))),
    ("tiny-gqa", (Prefix(9), Causal())),
    ("tiny-linear", (Causal(), Chunked(4, lookahead=1))),
])
@pytest.mark.parametrize("t", [1, 7, 63])
def test_model_stream_of_a_whole_sequence_model(preset, vis, t):
    """Token ids in, logits out: equal to the parallel model, at the compounded latency."""
    from causalmix.nn import ModelConfig, SequenceModel

    torch.manual_seed(t)
    model = SequenceModel(ModelConfig.from_name(preset, vocab_size=11, visibility=vis)).eval()
    tokens = torch.randint(0, 11, (2, t))
    with torch.no_grad():
        base = model(tokens)
        ref = copy.deepcopy(model).double()(tokens)
    m = ModelStream(model)
    out, _ = push_all(m, rand_sizes(t), tokens)
    assert out.shape == (2, t, 11)
    assert_close(out, ref, base, name="model stream logits")
    # no output final yet (every case looks ahead): an empty result has the logits' width
    assert ModelStream(model).push(tokens[:, :1]).shape == (2, 0, 11)
    # bad input after good pushes changes nothing; the stream then carries on
    m = ModelStream(model)
    first = m.push(tokens[:, : t // 2 + 1])
    before = (m.frames_in, m.frames_out, repr(m))
    with pytest.raises(ValueError, match="int64 tokens"):
        m.push(torch.randn(2, 3))
    with pytest.raises(ValueError):
        m.push(tokens[:1, :2])  # batch differs
    with pytest.raises(ValueError, match="token ids in"):
        m.push(torch.full((2, 2), 11))  # outside the vocabulary
    assert (m.frames_in, m.frames_out, repr(m)) == before
    rest = [m.push(tokens[:, t // 2 + 1:])] if t // 2 + 1 < t else []
    out2 = torch.cat([first, *rest, m.flush()], 1)
    assert_close(out2, ref, base, name="model stream logits after refused pushes")


# ============================================================================ per-frame inputs


def test_each_push_is_checked_once(monkeypatch):
    """q, k, v and the gates are checked once per push / step (the skeleton never re-checks
    what the family's push checked), and no per-frame input is kept on the stream."""
    import causalmix.stream._common as stream_common
    import causalmix.stream.linear as stream_linear

    calls = {"qkv": 0, "gate": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(stream_common, "check_qkv", counting("qkv", stream_common.check_qkv))
    monkeypatch.setattr(stream_linear, "check_gate", counting("gate", stream_linear.check_gate))
    x = torch.randn(1, 4, 2, 8)
    g = -torch.rand(1, 4, 2)
    s = LinearStream(Chunked(4))
    s.push(x, x, x, log_gate=g, reverse_log_gate=g)
    assert calls == {"qkv": 1, "gate": 2}
    s.step(x, x, x, log_gate=g, reverse_log_gate=g)
    assert calls == {"qkv": 2, "gate": 4}
    soft = SoftmaxStream(Causal())
    soft.step(x[:, :1], x[:, :1], x[:, :1])
    soft.push(x, x, x)
    assert calls["qkv"] == 4
    held = {name for name, value in vars(s).items() if value is g or value is x}
    assert not held, held


class BetaFrames(Frames):
    """A family with its own per-frame input (the delta rule's ``beta``)."""

    beta: torch.Tensor | None = None


BetaFrames = dataclasses.dataclass(frozen=True)(BetaFrames)


class BetaSoftmaxStream(SoftmaxStream):
    """A toy family added as a subclass only: ``softmax(q, k, beta * v)``, with ``beta: [B, n,
    Hkv]`` pushed by name with its frames; the base class is unchanged."""

    frames_type = BetaFrames

    def push(self, q, k, v, *, beta):
        return self._push("push", BetaFrames(q, k, v, beta))

    def step(self, q, k, v, *, beta):
        return self._push("step", BetaFrames(q, k, v, beta))

    def _check_extras(self, name, frames):
        want = tuple(frames.v.shape[:3])
        if not isinstance(frames.beta, torch.Tensor) or tuple(frames.beta.shape) != want:
            raise ValueError(f"{name}: beta must be a [B, n, Hkv] = {list(want)} tensor")

    def _accept(self, frames):
        super()._accept(dataclasses.replace(frames, v=frames.v * frames.beta[..., None]))


def test_a_family_with_its_own_per_frame_input_is_a_subclass():
    torch.manual_seed(0)
    t, vis = 41, Chunked(4, lookahead=1)
    q, k, v = torch.randn(2, t, 4, 8), torch.randn(2, t, 2, 8), torch.randn(2, t, 2, 8)
    beta = torch.rand(2, t, 2)
    s = BetaSoftmaxStream(vis)
    outs, p = [], 0
    for n in (1, 5, 3, 17, 15):
        outs.append(s.push(q[:, p:p + n], k[:, p:p + n], v[:, p:p + n], beta=beta[:, p:p + n]))
        p += n
    outs.append(s.flush())
    vb = v * beta[..., None]
    assert_close(torch.cat(outs, 1), dense_softmax(q.double(), k.double(), vb.double(), vis),
                 dense_softmax(q, k, vb, vis))
    assert torch.equal(s.latency, analytic_ready(vis, t) - torch.arange(t))
    assert BetaFrames.names() == ("q", "k", "v", "beta")
    bad = BetaSoftmaxStream(vis)
    with pytest.raises(ValueError, match="beta must be"):
        bad.push(q[:, :2], k[:, :2], v[:, :2], beta=beta[:, :1])
    assert bad.frames_in == 0


class GatedTinyLayer(TinyLayer):
    """A linear layer whose ``stream_qkv`` returns its per-frame inputs by name (with gates)."""

    def __init__(self, visibility, seed=0):
        super().__init__("linear", visibility, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        self.gate = torch.nn.Linear(16, 2)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(2, 16, generator=g) * 0.3)

    def mixer_kwargs(self):
        return {}

    def frames(self, x, positions):
        q, k, v = super().stream_qkv(x, positions)
        return {"q": q, "k": k, "v": v,
                "log_gate": -torch.nn.functional.softplus(self.gate(x))}

    def stream_qkv(self, x, positions):
        return self.frames(x, positions)


def test_model_stream_takes_named_per_frame_inputs_from_layers():
    torch.manual_seed(1)
    t = 37
    vis = Chunked(4, lookahead=1)
    layers = [GatedTinyLayer(vis, seed=0), TinyLayer("softmax", vis, seed=1)]
    x = torch.randn(2, t, 16)
    m = ModelStream(layers)
    out, _ = push_all(m, (3, 1, 8), x)
    with torch.no_grad():  # the parallel run: the gated linear op over the whole sequence
        pos = torch.arange(t)
        inputs = layers[0].frames(x, pos)
        mixed = linear_attention(**inputs, visibility=vis, impl="reference")
        h = layers[1].stream_out(layers[0].stream_out(x, mixed, pos),
                                 softmax_attention(*layers[1].stream_qkv(
                                     layers[0].stream_out(x, mixed, pos), pos), vis,
                                     scale=0.5, impl="reference"), pos)
    torch.testing.assert_close(out, h, rtol=1e-4, atol=1e-5)
    assert torch.equal(m.latency, analytic_ready(vis, t, 2) - torch.arange(t))

    class Unknown(GatedTinyLayer):
        def stream_qkv(self, x, positions):
            return {**self.frames(x, positions), "beta": x[..., :2]}

    with pytest.raises(ValueError, match=r"layers\[0\].*unknown \['beta'\]"):
        ModelStream([Unknown(vis)]).push(x[:, :3])
    with pytest.raises(ArgumentTypeError, match="mapping of per-frame inputs"):
        layer = TinyLayer("softmax", vis)
        layer.stream_qkv = lambda x, p: [x, x, x]
        ModelStream([layer]).push(x[:, :3])


# ============================================================================ measured latency


class FakeClock:
    """A clock that moves only when told to: ``advance(seconds)``."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class SlowLayer(TinyLayer):
    """A layer whose output map costs ``cost`` seconds per frame (on the fake clock)."""

    def __init__(self, *args, clock, cost, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.cost = clock, cost

    def stream_out(self, x, mixed, positions):
        self.clock.advance(self.cost * x.shape[1])
        return super().stream_out(x, mixed, positions)


@pytest.mark.parametrize("vis", [Causal(), Chunked(4, lookahead=1), Window(6, 2)], ids=repr)
def test_measured_latency_is_algorithmic_plus_the_compute_of_the_releasing_push(monkeypatch, vis):
    """The compute part is measured: each output carries the (fake-clock) time of the push that
    released it, which a slower layer makes grow; the algorithmic part is the exact frames."""
    import causalmix.stream.latency as latency_module

    clock = FakeClock()
    monkeypatch.setattr(latency_module, "CLOCK", clock)
    t, sizes = 45, (1, 4, 2, 7)
    x = torch.randn(1, t, 16)
    runs = {}
    for cost in (0.001, 0.003):
        layers = [SlowLayer("softmax", vis, clock=clock, cost=cost, seed=i) for i in range(2)]
        m = ModelStream(layers)
        expected, p, i = [], 0, 0
        while p < t:
            n = min(sizes[i % len(sizes)], t - p)
            i += 1
            before, t0 = m.frames_out, clock.now
            m.push(x[:, p:p + n])
            expected += [clock.now - t0] * (m.frames_out - before)
            p += n
        before, t0 = m.frames_out, clock.now
        m.flush()
        expected += [clock.now - t0] * (m.frames_out - before)
        lat = analytic_ready(vis, t, 2) - torch.arange(t)
        assert torch.equal(m.latency, lat)  # the algorithmic part: today's exact frames
        want = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(m.compute_seconds, want, rtol=0, atol=1e-9)
        st = m.latency_stats(frame_seconds=0.01)
        total = lat.double() * 0.01 + want
        for got, ref in ((st.compute, want), (st.measured, total)):
            assert got == pytest.approx((float(ref.quantile(0.5)), float(ref.quantile(0.95)),
                                         float(ref.max())))
        # every layer's own mixer stream is timed too, by its own pushes
        assert m.layers[0].mixer.compute_seconds.shape == (t,)
        runs[cost] = want
    # the compute part is measured, not a constant: three times the cost, three times the time
    torch.testing.assert_close(runs[0.003], 3 * runs[0.001], rtol=1e-9, atol=1e-12)
    assert float(runs[0.001].max()) > float(runs[0.001].min())  # pushes of different sizes


def test_mixer_stream_compute_is_the_wall_time_of_the_releasing_push(monkeypatch):
    import causalmix.stream.latency as latency_module

    clock = FakeClock()
    monkeypatch.setattr(latency_module, "CLOCK", clock)

    class Slow(SoftmaxStream):
        def _compute(self, q, p0, k_end):
            clock.advance(0.5 * q.shape[1])  # half a second per output computed
            return super()._compute(q, p0, k_end)

    s = Slow(Chunked(4))
    x = torch.randn(1, 6, 2, 8)
    s.push(x[:, :3], x[:, :3], x[:, :3])  # nothing final yet
    s.push(x[:, 3:6], x[:, 3:6], x[:, 3:6])  # releases [0, 4)
    s.flush()  # releases [4, 6)
    assert s.compute_seconds.tolist() == [2.0] * 4 + [1.0] * 2
    assert s.latency.tolist() == [3, 2, 1, 0, 1, 0]
    st = s.latency_stats(frame_seconds=0.04)
    assert st.measured.max == pytest.approx(3 * 0.04 + 2.0)
    with pytest.raises(ValueError, match="frame_seconds must be finite and > 0"):
        s.latency_stats(frame_seconds=0.0)
    with pytest.raises(ArgumentTypeError, match="frame_seconds must be a float"):
        s.latency_stats(frame_seconds="10ms")


def test_latency_stats_of_values_and_the_deprecated_helper():
    st = LatencyStats.of(torch.tensor([0, 2, 4]), torch.tensor([0.1, 0.2, 0.3]),
                         frame_seconds=0.5)
    assert st.compute == pytest.approx((0.2, 0.29, 0.3))
    assert st.measured == pytest.approx((1.2, 2.19, 2.3))
    assert LatencyStats.of(torch.tensor([1, 2])).compute is None
    with pytest.raises(ValueError, match="frame_seconds needs compute"):
        LatencyStats.of(torch.tensor([1]), frame_seconds=0.01)
    with pytest.raises(ArgumentTypeError, match="latency must be"):
        LatencyStats.of([1, 2])
    with pytest.warns(DeprecationWarning, match=r"LatencyStats\.of"):
        assert latency_stats(torch.tensor([[0, 1], [2, 3]])) == pytest.approx(
            {"mean": 1.5, "p90": 2.7, "max": 3})


# ============================================================================ edge inputs


@pytest.mark.parametrize("make", [
    lambda: SoftmaxStream(Chunked(4, lookahead=1)),
    lambda: SoftmaxStream(Window(3, 2), impl="reference"),
    lambda: LinearStream(Chunked(4, lookahead=1), decay=torch.tensor([0.9, 0.8])),
    lambda: LinearStream(Causal()),
], ids=["softmax-chunked", "softmax-window", "linear-chunked", "linear-causal"])
def test_an_empty_batch_streams_with_right_shapes(make):
    """B = 0: every push and the flush give ``[0, m, H, Dv]`` with the latency of any batch."""
    t = 23
    q, k, v = torch.randn(0, t, 4, 8), torch.randn(0, t, 2, 8), torch.randn(0, t, 2, 5)
    s, ref = make(), make()
    if isinstance(s, LinearStream):
        k, v = torch.randn(0, t, 2, 8), torch.randn(0, t, 2, 5)
        q = torch.randn(0, t, 2, 8)
    out, counts = push_all(s, (1, 4, 2), q, k, v)
    assert out.shape == (0, t, q.shape[2], 5)
    one = [x.new_zeros((1, *x.shape[1:])) for x in (q, k, v)]
    _, ref_counts = push_all(ref, (1, 4, 2), *one)
    assert counts == ref_counts and torch.equal(s.latency, ref.latency)


def test_an_empty_batch_streams_gates_and_models():
    t = 9
    x, g = torch.randn(0, t, 2, 8), -torch.rand(0, t, 2)
    s = LinearStream(Chunked(2, lookahead=1))
    outs = [s.push(x[:, :4], x[:, :4], x[:, :4], log_gate=g[:, :4]),
            s.push(x[:, 4:], x[:, 4:], x[:, 4:], log_gate=g[:, 4:]), s.flush()]
    assert [o.shape for o in outs] == [(0, 2, 2, 8), (0, 4, 2, 8), (0, 3, 2, 8)]
    m = ModelStream([TinyLayer("softmax", Window(2, 1)), TinyLayer("linear", Causal())])
    out, _ = push_all(m, (2, 3), torch.randn(0, t, 16))
    assert out.shape == (0, t, 16) and m.latency.tolist() == [1] * (t - 1) + [0]


@pytest.mark.parametrize("impl", ["auto", "chunk", "recurrent", "reference"])
def test_linear_stream_with_per_row_segments(impl):
    """Per-row documents ``Segments([B, T])`` with a causal or chunked bound (issue 19.5: chunk
    crashed on them): every impl streams the dense definition."""
    ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor([5, 10, 3, 12])),
                       torch.repeat_interleave(torch.arange(3), torch.tensor([12, 1, 17]))])
    for vis in (Segments(ids) & Causal(), Segments(ids) & Chunked(2, lookahead=1)):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 30, 2, 4) / 2 for _ in range(3))
        decay = torch.tensor([0.9, 1.0])
        out, _ = push_all(LinearStream(vis, decay=decay, impl=impl, chunk_size=4), (7, 1, 3),
                          q, k, v)
        assert_close(out, dense_linear(q.double(), k.double(), v.double(), vis, decay.double()),
                     dense_linear(q, k, v, vis, decay), name=repr(vis))


def test_wrong_types_raise_argument_type_errors():
    """Wrong types raise ArgumentTypeError (a TypeError that is also a ValueError) in every
    constructor and public function of causalmix.stream."""
    from causalmix.stream.adaptive import AdaptiveStream

    x = torch.randn(1, 2, 2, 8)
    cases = [
        lambda: SoftmaxStream("causal"),
        lambda: SoftmaxStream(Causal(), scale="big"),
        lambda: LinearStream(Causal(), decay=[0.5]),
        lambda: LinearStream(None),
        lambda: mixer_stream("softmax", 3),
        lambda: ModelStream(3),
        lambda: ModelStream([object()]),
        lambda: ModelStream([TinyLayer("softmax", Causal())]).push([[1.0]]),
        lambda: SoftmaxStream(Causal()).push(x, x, "v"),
        lambda: LinearStream(Causal()).push(x, x, x, log_gate=[0.0]),
        lambda: AdaptiveStream(3),
        lambda: AdaptiveStream([object()]),
        lambda: compounded_latency(3, 4),
        lambda: compounded_latency([Causal(), "window"], 4),
        lambda: LatencyStats.of(torch.tensor([0.5])),
    ]
    for call in cases:
        with pytest.raises(ArgumentTypeError):
            call()

    class BadKwargs(TinyLayer):
        def mixer_kwargs(self):
            return [("scale", 0.5)]

    with pytest.raises(ArgumentTypeError, match=r"mixer_kwargs\(\) must return a dict"):
        ModelStream([BadKwargs("softmax", Causal())])
    # values of the right type that are wrong stay plain ValueErrors
    for call in (lambda: LinearStream(Causal(), chunk_size=0),
                 lambda: LinearStream(Causal(), impl="fast"),
                 lambda: SoftmaxStream(Causal(), impl=3)):
        with pytest.raises(ValueError):
            call()


def test_a_variable_length_tuple_from_a_layer_is_refused():
    """``stream_qkv`` gives a mapping of named inputs or exactly ``(q, k, v)``; the old
    ``(q, k, v, {gates})`` form is refused, naming the layer."""
    layer = GatedTinyLayer(Causal())
    layer.stream_qkv = lambda x, p: (*[layer.frames(x, p)[n] for n in "qkv"],
                                     {"log_gate": layer.frames(x, p)["log_gate"]})
    with pytest.raises(ArgumentTypeError, match=r"layers\[0\]: stream_qkv must return a mapping"):
        ModelStream([layer]).push(torch.randn(1, 3, 16))
