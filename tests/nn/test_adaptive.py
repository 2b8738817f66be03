"""Adaptive lookahead: the spec, the layer (hard and relaxed gates), latency recursion against a
brute-force dependency trace, the regulariser's gradient, stream == parallel (the lab study is
in tests/lab/test_adaptive_study.py)."""

from __future__ import annotations

import random

import pytest
import torch

from causalmix.nn.adaptive import (
    AdaptiveConfig,
    AdaptiveModel,
    AdaptiveModelStream,
)
from causalmix.ops.linear import linear_attention
from causalmix.ops.softmax import softmax_attention
from causalmix.stream import compounded_latency, expected_latency
from causalmix.testing import assert_close
from causalmix.visibility import AdaptiveLookahead, Causal, Full, Window

LENGTHS = (1, 7, 63, 113)
MIXERS = {
    "softmax": {},
    "softmax-gqa": {"n_kv_heads": 2},
    "linear": {"mixer": "linear", "feature_dim": 4, "decay": (0.5, 0.8, 0.95, 1.0)},
}


def _model(kind: str, max_lookahead=(2, 3), seed: int = 0, choices: str = "all",
           vocab: int | None = None, sharp: float = 3.0) -> AdaptiveModel:
    torch.manual_seed(seed)
    extra = dict(MIXERS[kind])
    mixer = extra.pop("mixer", "softmax")
    io = {"vocab_size": vocab} if vocab else {"input_dim": 5, "output_dim": 3}
    cfg = AdaptiveConfig.of(d_model=16, n_heads=4, mixer=mixer, max_lookahead=max_lookahead,
                            choices=choices, **io, **extra)
    m = AdaptiveModel(cfg)
    for blk in m.blocks:  # spread the gates so that every choice occurs
        if blk.gate is not None:
            torch.nn.init.normal_(blk.gate.weight, std=sharp)
    return m.eval()


# ============================================================================ the spec


@pytest.mark.parametrize("t", LENGTHS)
def test_spec_mask_intervals_and_block_map(t):
    g = torch.Generator().manual_seed(t)
    a = torch.randint(0, 5, (2, t), generator=g)
    spec = AdaptiveLookahead(a)
    i = torch.arange(t)
    brute = (i[None, None, :] <= i[None, :, None] + a[:, :, None])  # [B, Tq, Tk]
    assert torch.equal(spec.mask(t, t), brute)
    assert torch.equal(spec.horizon(i), i[None] + a)
    for bq, bk in ((16, 16), (7, 32)):
        counts = spec.tile_counts(t, t, bq, bk)
        pad_q, pad_k = (-t) % bq, (-t) % bk
        dense = torch.nn.functional.pad(brute.long(), (0, pad_k, 0, pad_q))
        dense = dense.view(2, -(-t // bq), bq, -(-t // bk), bk).sum((2, 4))
        assert torch.equal(counts, dense)
    assert spec.lookahead_frames == int(a.max()) and spec.lookback_frames is None
    assert spec.batch_size == 2
    assert spec == AdaptiveLookahead(a.clone()) and hash(spec) == hash(AdaptiveLookahead(a.clone()))
    assert spec != AdaptiveLookahead(a + 1)


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("q_offset", (0, 5))
def test_spec_softmax_blocks_vs_reference(t, q_offset):
    """The per-frame spec on the block-sparse kernel: outputs and every gradient."""
    g = torch.Generator().manual_seed(100 + t)
    n = q_offset + t
    a = torch.randint(0, 4, (2, n), generator=g)
    spec = AdaptiveLookahead(a) & Window(8, 4)
    q = torch.randn(2, t, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64)
    do = torch.randn(2, t, 4, 8, generator=g, dtype=torch.float64)

    def run(impl, dtype):
        xs = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = softmax_attention(*xs, spec, q_offset=q_offset, impl=impl)
        out.backward(do.to(dtype))
        return [out.detach().double(), *(x.grad.double() for x in xs)]

    ref = run("reference", torch.float64)
    base = run("reference", torch.float32)
    got = run("blocks", torch.float32)
    for name, x, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base, strict=True):
        assert_close(x.float(), r, b.float(), name=name)


def test_spec_bad_inputs():
    with pytest.raises(ValueError, match="integer"):
        AdaptiveLookahead(torch.zeros(3))
    with pytest.raises(ValueError, match=">= 0"):
        AdaptiveLookahead(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        AdaptiveLookahead(torch.zeros(1, 2, 3, dtype=torch.int64))
    spec = AdaptiveLookahead(torch.zeros(2, 5, dtype=torch.int64))
    q = torch.randn(2, 6, 1, 4)
    with pytest.raises(ValueError, match="defines positions"):
        softmax_attention(q, q, q, spec)


# ============================================================================ gates


@pytest.mark.parametrize("kind", list(MIXERS))
def test_gates_are_hard_at_inference(kind):
    m = _model(kind)
    x = torch.randn(3, 29, 5)
    out1, out2 = m(x), m(x)
    for blk, a in zip(m.blocks, out1.lookahead, strict=True):
        assert a.dtype == torch.int64 and a.shape == (3, 29)
        assert bool(torch.isin(a, blk.choices).all())
        if blk.gate is not None:  # the argmax of the gate logits, deterministic
            assert len(set(a.flatten().tolist())) > 1
    assert torch.equal(out1.output, out2.output)
    # hard gates == forcing the same lookaheads (the spec path / the band path)
    forced = m(x, lookahead=out1.lookahead)
    assert torch.equal(forced.output, out1.output)
    assert torch.equal(forced.latency, out1.latency)
    # in training mode, hard=True is the same computation; hard=False samples
    m.train()
    assert torch.equal(m(x, hard=True).output, out1.output)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    s1, s2 = m(x, generator=g1), m(x, generator=g2)
    assert any(not torch.equal(a, b) for a, b in zip(s1.lookahead, s2.lookahead, strict=True))


@pytest.mark.parametrize("kind", list(MIXERS))
@pytest.mark.parametrize("t", (1, 7, 40))
def test_relaxed_mixture_is_exact(kind, t):
    """Training output = sum_c g_c * mixer(AdaptiveLookahead(choice_c)) for any weights g
    (softmax: lse merge of the band; linear: the band terms), against the dense references."""
    m = _model(kind, max_lookahead=(3,))
    blk = m.blocks[0]
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, 16, generator=g)
    pos = torch.arange(t)
    f = blk.block.stream_qkv(x, pos)
    assert set(f) == {"q", "k", "v"}
    q, k, v = f["q"], f["k"], f["v"]
    kw = blk.block.mixer_kwargs()
    w = torch.rand(2, t, len(blk.choices), generator=g)
    w = w / w.sum(-1, keepdim=True)

    def ref_for(c, qq, kk, vv):
        spec = AdaptiveLookahead(torch.full((2, t), c, dtype=torch.int64))
        if blk.mixer == "softmax":
            return softmax_attention(qq, kk, vv, spec, impl="reference", **kw)
        return linear_attention(qq, kk, vv, spec, decay=kw.get("decay"), impl="reference")

    def mixture(qq, kk, vv, ww):
        if blk.mixer == "softmax":
            return blk._softmax_mixture(qq, kk, vv, ww, kw["scale"])
        steps = torch.arange(0, int(blk.choices.max()) + 1)
        gd = ww @ (blk.choices[:, None] >= steps).to(ww.dtype)
        return blk._linear_mixture(qq, kk, vv, gd, kw.get("decay"))

    def reference(qq, kk, vv, ww):
        return sum(ww[..., i, None, None] * ref_for(c, qq, kk, vv).to(ww.dtype)
                   for i, c in enumerate(blk.choices.tolist()))

    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g)
    if blk.mixer == "softmax" and q.shape[2] != v.shape[2]:
        do = torch.randn(q.shape[0], t, q.shape[2], v.shape[-1], generator=g)

    def grads(fn, dtype):
        xs = [y.detach().to(dtype).clone().requires_grad_() for y in (q, k, v, w)]
        out = fn(*xs)
        out.backward(do.to(dtype))
        return [out.detach(), *(y.grad for y in xs)]

    ref = grads(reference, torch.float64)
    base = grads(reference, torch.float32)
    got = grads(mixture, torch.float32)
    for name, a, r, b in zip(("out", "dq", "dk", "dv", "dg"), got, ref, base, strict=True):
        assert_close(a, r, b, name=name)


# ============================================================================ latency


def _dependency_trace(m: AdaptiveModel, x: torch.Tensor, lookahead) -> torch.Tensor:
    """Brute force: output t depends on input j iff d out[:, t] / d x[:, j] != 0 (gates frozen
    at the given lookaheads). Returns r^L_t = the largest such j, ``[B, T]``."""
    b, t, _ = x.shape
    r = torch.full((b, t), -1, dtype=torch.int64)
    for pos in range(t):
        xg = x.clone().requires_grad_()
        out = m(xg, lookahead=lookahead).output
        out[:, pos].sum().backward()
        dep = xg.grad.abs().sum(-1) > 0  # [B, T]
        idx = torch.arange(t).expand(b, t)
        r[:, pos] = torch.where(dep, idx, torch.full_like(idx, -1)).amax(1)
    return r


@pytest.mark.parametrize("kind", ["softmax", "linear"])
@pytest.mark.parametrize("max_lookahead", [(2, 3), (0, 3), (3, 0, 2)])
def test_latency_recursion_vs_dependency_trace(kind, max_lookahead):
    m = _model(kind, max_lookahead=max_lookahead, seed=len(max_lookahead))
    t = 17
    x = torch.randn(2, t, 5, dtype=torch.float64)
    m = m.double()
    out = m(x)
    trace = _dependency_trace(m, x, out.lookahead)
    pos = torch.arange(t)
    # 1. the model's hard latency, 2. the mask-based recursion, 3. the perturbation trace
    assert torch.equal(out.latency, trace - pos)
    assert torch.equal(compounded_latency(m.visibilities(out.lookahead), t), trace - pos)
    # 4. boolean reachability through the per-layer masks
    reach = torch.eye(t, dtype=torch.bool).expand(2, t, t)
    for spec in m.visibilities(out.lookahead):
        mk = spec.mask(t, t).expand(2, t, t).double()
        reach = (mk @ reach.double()) > 0
    idx = torch.arange(t).expand(2, t, t)
    assert torch.equal(torch.where(reach, idx, -1).amax(-1), trace)
    # the gate never peeks: each layer's gate at t reads only that layer's input at t
    h = m.embed(x)
    for blk in m.blocks:
        if blk.gate is not None:
            h2 = h.clone()
            h2[:, 9:] = torch.randn_like(h2[:, 9:])
            assert torch.equal(blk.gate_logits(h)[:, :9], blk.gate_logits(h2)[:, :9])
        h = blk(h, hard=True)[0]


def test_compounded_latency_known_specs():
    t = 20
    pos = torch.arange(t)
    lat = compounded_latency([Causal() | Window(0, 3), Causal()], t)
    assert torch.equal(lat[0], torch.clamp(pos + 3, max=t - 1) - pos)
    assert torch.equal(compounded_latency([Full(), Causal()], t)[0], t - 1 - pos)
    # an adaptive first layer passes every frame's wait on through a causal layer above
    a = torch.zeros(1, t, dtype=torch.int64)
    a[0, 5] = 4
    lat = compounded_latency([AdaptiveLookahead(a), Causal()], t)[0]
    assert lat[5] == 4 and lat[6] == 3 and lat[9] == 0 and lat[4] == 0
    lat_last = compounded_latency([Causal(), AdaptiveLookahead(a)], t)[0]
    assert lat_last[5] == 4 and int(lat_last.sum()) == 4


def test_expected_latency_exact_for_one_hot_and_differentiable():
    t, b = 23, 3
    g = torch.Generator().manual_seed(0)
    choices = [torch.arange(4), None, torch.tensor([0, 5])]
    a = [torch.randint(0, 4, (b, t), generator=g), None,
         torch.tensor([0, 5])[torch.randint(0, 2, (b, t), generator=g)]]
    onehot = [None if c is None else (x[..., None] == c).double()
              for x, c in zip(a, choices, strict=True)]
    specs = [Causal() if x is None else AdaptiveLookahead(x) for x in a]
    exp = expected_latency(onehot, choices, t)
    assert torch.equal(exp.round().long(), compounded_latency(specs, t))
    assert float((exp - exp.round()).abs().max()) == 0.0
    # gradient against finite differences, at soft probabilities
    logits = [None if c is None else torch.randn(b, t, len(c), generator=g, dtype=torch.float64,
                                                 requires_grad=True) for c in choices]

    def f(l0, l2):
        return expected_latency([l0.softmax(-1), None, l2.softmax(-1)], choices, t).mean()

    assert torch.autograd.gradcheck(f, (logits[0], logits[2]))


@pytest.mark.parametrize("kind", list(MIXERS))
def test_regulariser_gradient_reaches_every_gate(kind):
    m = _model(kind, max_lookahead=(2, 0, 3)).train()
    x = torch.randn(2, 21, 5)
    out = m(x, generator=torch.Generator().manual_seed(0))
    out.expected_latency.mean().backward()
    for blk in m.blocks:
        if blk.gate is not None:
            assert blk.gate.weight.grad is not None
            assert float(blk.gate.weight.grad.abs().sum()) > 0
            assert float(blk.gate.bias.grad.abs().sum()) > 0
    # and the task loss reaches the gates through the straight-through mixture
    m.zero_grad()
    out = m(x, generator=torch.Generator().manual_seed(0))
    out.output.square().mean().backward()
    for blk in m.blocks:
        if blk.gate is not None:
            assert float(blk.gate.weight.grad.abs().sum()) > 0
    # at a uniform gate, d E[latency] / d logit_c = (M_c - mean_c M_c) / K per frame, with
    # M_c = t + choice_c (clipped at the end): it rises with the choice's lookahead
    m.zero_grad()
    last = m.blocks[2]
    with torch.no_grad():
        last.gate.weight.zero_()
        last.gate.bias.zero_()
    out = m(x, generator=torch.Generator().manual_seed(0))
    out.expected_latency.mean().backward()
    bias_grad = last.gate.bias.grad
    assert bool((bias_grad[1:] > bias_grad[:-1]).all()), bias_grad


# ============================================================================ streaming


def _stream(m, x, sizes):
    s = AdaptiveModelStream(m)
    got = {b: {} for b in range(x.shape[0])}
    p = 0
    for n in sizes:
        emitted = s.push(x[:, p:p + n])
        p += n
        for b, e in enumerate(emitted):
            for pos, o, lat in zip(e.positions.tolist(), e.output, e.latency.tolist(),
                                   strict=True):
                assert pos not in got[b]
                got[b][pos] = (o, lat, p - 1)
    for b, e in enumerate(s.flush()):
        for pos, o, lat in zip(e.positions.tolist(), e.output, e.latency.tolist(), strict=True):
            assert pos not in got[b]
            got[b][pos] = (o, lat, None)
    t = x.shape[1]
    assert all(sorted(got[b]) == list(range(t)) for b in got)
    out = torch.stack([torch.stack([got[b][i][0] for i in range(t)]) for b in got])
    lat = torch.tensor([[got[b][i][1] for i in range(t)] for b in got])
    at = [[got[b][i][2] for i in range(t)] for b in got]
    return out, lat, at


@pytest.mark.parametrize("kind", list(MIXERS))
@pytest.mark.parametrize("t", (1, 7, 33))
def test_stream_equals_parallel(kind, t):
    m = _model(kind, max_lookahead=(2, 0, 3), vocab=11)
    x = torch.randint(0, 11, (2, t))
    par = m(x)
    ref = m.double()(x).output
    m.float()
    out, lat, at = _stream(m, x, [1] * t)  # one frame per push
    assert_close(out, ref, par.output, name="stream output")
    assert torch.equal(lat, par.latency)
    # pushed frame by frame, output t leaves in the push of frame r^L_t exactly (or at flush
    # when r^L_t is the last frame and was clipped there)
    for b in range(2):
        for i in range(t):
            r = i + int(par.latency[b, i])
            assert at[b][i] == r or (at[b][i] is None and r == t - 1)
    # random push sizes: same outputs, same reported latencies
    rng = random.Random(t)
    sizes, left = [], t
    while left:
        sizes.append(rng.randint(1, min(left, 6)))
        left -= sizes[-1]
    out2, lat2, _ = _stream(m, x, sizes)
    assert_close(out2, ref, par.output, name="stream output (chunks)")
    assert torch.equal(lat2, par.latency)


def test_stream_out_of_order_emission():
    """A frame that chose no lookahead leaves before an earlier frame that waits."""
    m = _model("softmax", max_lookahead=(0, 4), vocab=11)
    x = torch.randint(0, 11, (1, 40))
    lat = m(x).latency[0]
    early = [i for i in range(39) if lat[i] > 1 and lat[i + 1] == 0]
    assert early, "the test needs a waiting frame followed by a frame that does not wait"
    s = AdaptiveModelStream(m)
    order = []
    for i in range(40):
        order += s.push(x[:, i:i + 1])[0].positions.tolist()
    order += s.flush()[0].positions.tolist()
    i = early[0]
    assert order.index(i + 1) < order.index(i)


def test_stream_bad_inputs():
    m = _model("softmax", vocab=11)
    s = AdaptiveModelStream(m)
    with pytest.raises(ValueError, match="int64 tokens"):
        s.push(torch.randn(1, 3))
    with pytest.raises(ValueError, match="nothing was pushed"):
        s.flush()
    s.push(torch.randint(0, 11, (2, 3)))
    with pytest.raises(ValueError, match="batch size 1 differs"):
        s.push(torch.randint(0, 11, (1, 3)))
    s.flush()
    with pytest.raises(ValueError, match="flushed"):
        s.push(torch.randint(0, 11, (2, 3)))
    with pytest.raises(TypeError, match="AdaptiveModel"):
        AdaptiveModelStream(torch.nn.Linear(2, 2))


# ============================================================================ configs and inputs


def test_config_and_model_bad_inputs():
    with pytest.raises(TypeError, match="one int per layer"):
        AdaptiveConfig.of(vocab_size=4, max_lookahead=4)
    with pytest.raises(ValueError, match="ints >= 0"):
        AdaptiveConfig.of(vocab_size=4, max_lookahead=(1, -1))
    with pytest.raises(ValueError, match="choices must be one of"):
        AdaptiveConfig.of(vocab_size=4, choices="some")
    with pytest.raises(ValueError, match="tau"):
        AdaptiveConfig.of(vocab_size=4, tau=0.0)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        AdaptiveConfig.of()
    cfg = AdaptiveConfig.of(vocab_size=4, max_lookahead=(0, 4), choices="binary")
    assert cfg.layer_choices(0) == (0,) and cfg.layer_choices(1) == (0, 4)
    assert AdaptiveConfig.of(vocab_size=4, max_lookahead=(3,)).layer_choices(0) == (0, 1, 2, 3)
    m = AdaptiveModel(cfg).eval()
    with pytest.raises(ValueError, match="int64 tokens"):
        m(torch.randn(2, 3))
    x = torch.randint(0, 4, (2, 6))
    with pytest.raises(ValueError, match="one entry per layer"):
        m(x, lookahead=(None,))
    with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
        m(x, lookahead=(None, torch.full((2, 6), 5)))
    with pytest.raises(ValueError, match="must be 0 for a causal layer"):
        m(x, lookahead=(torch.ones(2, 6, dtype=torch.int64), None))
    with pytest.raises(ValueError, match=r"\[B, T\] = \[2, 6\]"):
        m(x, lookahead=(None, torch.zeros(2, 5, dtype=torch.int64)))
    out = m(x)
    assert set(out.lookahead[1].unique().tolist()) <= {0, 4}


# ============================================================================ layering


def test_config_holds_a_model_config():
    from causalmix.nn import ModelConfig

    cfg = AdaptiveConfig.from_name("tiny-linear", vocab_size=7, max_lookahead=(0, 2, 3),
                                   choices="binary")
    assert isinstance(cfg.model, ModelConfig) and cfg.model.vocab_size == 7
    assert cfg.model.mixer == "linear" and cfg.model.visibility == (Causal(),) * 3
    assert cfg == AdaptiveConfig(cfg.model, (0, 2, 3), "binary")
    with pytest.raises(ValueError, match=r"one Causal\(\) per layer"):
        AdaptiveConfig(ModelConfig(vocab_size=4), max_lookahead=(0, 1, 2))
    with pytest.raises(ValueError, match=r"one Causal\(\) per layer"):
        AdaptiveConfig(ModelConfig(vocab_size=4, visibility=(Causal(), Window(2))))
    with pytest.raises(TypeError, match="ModelConfig"):
        AdaptiveConfig({"vocab_size": 4})
    with pytest.raises(ValueError, match="set by max_lookahead"):
        AdaptiveConfig.of(vocab_size=4, visibility=(Causal(),))


def test_stream_push_that_raises_changes_nothing_and_positions_are_checked(monkeypatch):
    import causalmix.visibility as visibility

    m = _model("softmax", max_lookahead=(2, 3), vocab=11)
    x = torch.randint(0, 11, (2, 20))
    par = m(x)
    s = AdaptiveModelStream(m)
    first = s.push(x[:, :9])
    before = (s.frames_in, [r.tolist() for r in s.latency], repr(s))
    with pytest.raises(ValueError, match="int64 tokens"):
        s.push(torch.randn(2, 3))
    with pytest.raises(ValueError, match="batch size 1 differs"):
        s.push(x[:1, 9:12])
    monkeypatch.setattr(visibility.base, "MAX_POSITION", 12)
    with pytest.raises(ValueError, match="would reach position 12"):
        s.push(x[:, 9:13])
    monkeypatch.undo()
    assert (s.frames_in, [r.tolist() for r in s.latency], repr(s)) == before
    rest = [s.push(x[:, 9:]), s.flush()]
    for b in range(2):
        got = {}
        for e in (first[b], rest[0][b], rest[1][b]):
            got.update(zip(e.positions.tolist(), e.output, strict=True))
        out = torch.stack([got[i] for i in range(20)])
        assert_close(out, m.double()(x).output[b], par.output[b], name="stream output")
        m.float()
    assert repr(s) == "AdaptiveModelStream(AdaptiveModel: 2 layers; frames_in=20, closed)"
