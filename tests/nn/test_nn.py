"""causalmix.nn: layers honour their visibility, match a dense eager formula (outputs and every
parameter gradient), implement the streaming protocol pointwise in time, and reject bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from causalmix.nn import (
    PRESETS,
    AttentionConfig,
    Block,
    BlockConfig,
    ModelConfig,
    SequenceModel,
    feature_map,
    head_decays,
    rotary,
)
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Window

LENGTHS = (1, 7, 63, 113, 500)


def _block(mixer: str, vis, *, n_kv_heads=None, d_model=32, n_heads=4, fmap="taylor",
           decay=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    attn = AttentionConfig(
        d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, mixer=mixer, feature_dim=4,
        feature_map=fmap, decay=head_decays(n_heads) if (mixer == "linear" and decay) else None)
    return Block(BlockConfig(attn, vis)).to(dtype)


def _dense_block(block: Block, x: torch.Tensor, vis, offset: int = 0) -> torch.Tensor:
    """Eager, dense formula of a block, written from the definitions (not via the ops)."""
    cfg = block.cfg.attention
    b, t, _ = x.shape
    pos = torch.arange(offset, offset + t)
    h = block.norm1(x)
    q = block.attn.q_proj(h).view(b, t, cfg.n_heads, -1)
    k = block.attn.k_proj(h).view(b, t, cfg.n_kv_heads, -1)
    v = block.attn.v_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    mask = vis.mask(t, t, q_offset=offset, k_offset=offset)  # [t, t] or [B, t, t]
    mask = mask if mask.dim() == 3 else mask.expand(b, t, t)
    mask = mask[:, None]  # [B, 1, t, t]
    if cfg.mixer == "softmax":
        # rotary: pair (x1[i], x2[i]) rotated by pos * base^(-2i/D)
        d = cfg.head_dim
        inv = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
        ang = pos.to(x.dtype)[:, None] * inv
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]

        def rot(z):
            z1, z2 = z[..., : d // 2], z[..., d // 2:]
            return torch.cat([z1 * c - z2 * s, z1 * s + z2 * c], -1)

        scores = torch.einsum("bihd,bjhd->bhij", rot(q), rot(k)) / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, -1).nan_to_num(0.0)
        o = torch.einsum("bhij,bjhd->bihd", p, v)
    else:
        fq, fk = feature_map(q, cfg.feature_map), feature_map(k, cfg.feature_map)
        w = torch.einsum("bihd,bjhd->bhij", fq, fk)
        if cfg.decay is not None:
            lam = torch.tensor(cfg.decay, dtype=x.dtype)[:, None, None]
            w = w * lam ** (pos[:, None] - pos[None, :]).abs().to(x.dtype)
        w = w * mask
        o = torch.einsum("bhij,bjhd->bihd", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + 1e-6)
    h2 = x + block.attn.o_proj(o.reshape(b, t, -1))
    return h2 + block.mlp(block.norm2(h2))


def _grads(module, x, fn):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(module, x)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if out.dtype \
        == torch.float32 else torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                           dtype=out.dtype)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


SPECS = {
    "softmax": [Causal(), Full(), Prefix(5), Chunked(8, lookahead=1), Causal() | Window(0, 3)],
    "linear": [Causal(), Full(), Prefix(5), Chunked(8, lookahead=1)],
}


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
@pytest.mark.parametrize("t", LENGTHS)
def test_block_matches_dense_formula_outputs_and_grads(mixer, t):
    """The block (fast mixer, fp32) against the dense eager formula in fp64 (reference) with the
    fp32 dense formula as the same-precision baseline: output, input grad, every param grad."""
    long = t >= 500  # the long length on a subset, to keep the suite fast
    for vis in SPECS[mixer][:3] if long else SPECS[mixer]:
        for kv in (None,) if long else (None, 2):
            blk = _block(mixer, vis, n_kv_heads=kv)
            ref_blk = copy.deepcopy(blk).double()
            x = torch.randn(2, t, 32, generator=torch.Generator().manual_seed(t))
            offset = 3
            out, gx, gp = _grads(blk, x, lambda m, z, o=offset: m(z, offset=o))
            rout, rgx, rgp = _grads(ref_blk, x.double(),
                                    lambda m, z, s=vis, o=offset: _dense_block(m, z, s, o))
            bout, bgx, bgp = _grads(blk, x, lambda m, z, s=vis, o=offset: _dense_block(m, z, s, o))
            name = f"{mixer} {vis!r} kv={kv} T={t}"
            assert_close(out, rout, bout, name=f"{name} out")
            assert_close(gx, rgx, bgx, name=f"{name} dx")
            for n in gp:
                assert_close(gp[n], rgp[n], bgp[n], name=f"{name} d{n}")


def _model(mixer, vis, vocab=11):
    torch.manual_seed(0)
    preset = "tiny-softmax" if mixer == "softmax" else "tiny-linear"
    return SequenceModel(ModelConfig.from_name(preset, d_model=32, vocab_size=vocab,
                                               visibility=vis)).double()


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
def test_causal_model_earlier_outputs_ignore_future_tokens(mixer):
    """Changing token t changes no output before t (exactly) and does change outputs at t."""
    m = _model(mixer, (Causal(), Causal()))
    x = torch.randint(0, 11, (2, 40), generator=torch.Generator().manual_seed(0))
    for t in (0, 17, 39):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 11
        _, h1 = m(x, return_hidden=True)
        _, h2 = m(x2, return_hidden=True)
        for layer in range(2):
            assert torch.equal(h1[layer][:, :t], h2[layer][:, :t]), (layer, t)
            assert (h1[layer][:, t] - h2[layer][:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
@pytest.mark.parametrize("vis", ["prefix", "full-first"])
def test_prefix_and_bidirectional_layers_see_future_tokens(mixer, vis):
    """Under Prefix(n) (every layer) or Full() in the first layer, changing a token changes
    earlier outputs; for Prefix only inside the prefix, never after it for later tokens."""
    n, t_len = 16, 40
    specs = (Prefix(n), Prefix(n)) if vis == "prefix" else (Full(), Causal())
    m = _model(mixer, specs)
    x = torch.randint(0, 11, (2, t_len), generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 11  # inside the prefix
    _, h1 = m(x, return_hidden=True)
    _, h2 = m(x2, return_hidden=True)
    assert (h1[0][:, :10] - h2[0][:, :10]).abs().max() > 1e-6  # first layer sees ahead
    assert (h1[1][:, :10] - h2[1][:, :10]).abs().max() > 1e-6  # and so the stack
    if vis == "prefix":
        x3 = x.clone()
        x3[:, 30] = (x3[:, 30] + 1) % 11  # after the prefix: causal again
        _, h3 = m(x3, return_hidden=True)
        for layer in range(2):
            assert torch.equal(h1[layer][:, :30], h3[layer][:, :30])


def test_per_example_prefix_and_lookahead_window():
    m = _model("softmax", (Causal() | Window(0, 3), Causal()))
    x = torch.randint(0, 11, (1, 30), generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 11
    _, h1 = m(x, return_hidden=True)
    _, h2 = m(x2, return_hidden=True)
    assert torch.equal(h1[1][:, :17], h2[1][:, :17])  # 3 frames of lookahead, then no more
    assert (h1[1][:, 17] - h2[1][:, 17]).abs().max() > 1e-6
    # per-example prefix lengths via a call-time override: example 0 reads 25 tokens
    # bidirectionally, example 1 only 5
    pm = _model("linear", (Causal(), Causal()))
    lens = torch.tensor([25, 5])
    xb = x.expand(2, 30).clone()
    xb2 = xb.clone()
    xb2[:, 20] = (xb2[:, 20] + 1) % 11
    vis = (Prefix(lens), Prefix(lens))
    o1, o2 = pm(xb, visibility=vis), pm(xb2, visibility=vis)
    assert (o1[0, :20] - o2[0, :20]).abs().max() > 1e-6
    assert torch.equal(o1[1, :20], o2[1, :20])


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
def test_stream_protocol_pointwise_in_time(mixer):
    """forward == stream_out(x, mix(stream_qkv(x, pos)), pos), and stream_qkv / stream_out on a
    slice of time equal the same slice of the whole (pointwise)."""
    from causalmix.nn import mix

    blk = _block(mixer, Causal(), n_kv_heads=2)
    assert blk.mixer == mixer and blk.visibility == Causal()
    x = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5, 55)
    f = blk.stream_qkv(x, pos)
    assert set(f) == {"q", "k", "v"}  # the per-frame inputs by name
    q, k, v = f["q"], f["k"], f["v"]
    mixed = mix(mixer, q, k, v, Causal(), q_offset=5, k_offset=5, **blk.mixer_kwargs())
    assert torch.equal(blk.stream_out(x, mixed, pos), blk(x, offset=5))
    f2 = blk.stream_qkv(x[:, 20:33], pos[20:33])
    q2, k2, v2 = f2["q"], f2["k"], f2["v"]
    for a, b in ((q2, q), (k2, k), (v2, v)):
        torch.testing.assert_close(a, b[:, 20:33], rtol=0, atol=1e-6)
    torch.testing.assert_close(blk.stream_out(x[:, 20:33], mixed[:, 20:33], pos[20:33]),
                               blk.stream_out(x, mixed, pos)[:, 20:33], rtol=0, atol=1e-6)
    kw = blk.mixer_kwargs()
    if mixer == "softmax":
        assert kw == {"scale": 1 / math.sqrt(8)}
        assert q.shape == (2, 50, 4, 8) and k.shape == (2, 50, 2, 8)
    else:
        assert kw["decay"].shape == (4,)
        assert q.shape == (2, 50, 4, 1 + 4 + 16) and v.shape == (2, 50, 4, 9)


@pytest.mark.parametrize("mixer", ["softmax", "linear", "gated"])
def test_attention_layers_are_real_layers(mixer):
    """Block.attn (an Attention, or a GatedMixer for "gated") runs on its own:
    attn(norm1(x), visibility=, offset=) is the block's mixing step, equal to its stream parts,
    and Block.mixer is the op family the layer streams with."""
    from causalmix.nn import Attention, GatedMixer, MixingLayer, mix

    blk = _block("softmax" if mixer == "softmax" else mixer, Full(), decay=False)
    attn = blk.attn
    assert isinstance(attn, GatedMixer if mixer == "gated" else Attention)
    assert isinstance(attn, MixingLayer) and blk.mixer == attn.op
    assert attn.op == ("softmax" if mixer == "softmax" else "linear")
    assert blk.cfg.attention.mixer == mixer
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(5))
    h = blk.norm1(x)
    pos = torch.arange(4, 17)
    f = attn.qkv(h, pos)
    assert set(f) == {"q", "k", "v"} | ({"log_gate", "reverse_log_gate"} if mixer == "gated"
                                        else set())
    mixed = mix(attn.op, f.pop("q"), f.pop("k"), f.pop("v"), Prefix(9), q_offset=4, k_offset=4,
                **attn.mixer_kwargs(), **f)
    y = attn(h, visibility=Prefix(9), offset=4)
    assert y.shape == x.shape and torch.equal(y, attn.out(mixed, h))
    h2 = x + y
    assert torch.equal(blk(x, offset=4, visibility=Prefix(9)), h2 + blk.mlp(blk.norm2(h2)))
    with pytest.raises(ValueError, match="Attention: mixer must be 'softmax' or 'linear'"):
        Attention(AttentionConfig(mixer="gated"))
    with pytest.raises(ValueError, match="GatedMixer: mixer must be 'gated'"):
        GatedMixer(AttentionConfig(mixer="linear"))


def test_rotary_depends_on_relative_position_only():
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        return float((rotary(q, torch.tensor([i])) * rotary(k, torch.tensor([j]))).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-6)
    assert torch.equal(rotary(q, torch.tensor([0])), q)


def test_feature_maps():
    q = torch.randn(5, 6, dtype=torch.float64)
    k = torch.randn(5, 6, dtype=torch.float64)
    s = (q * k).sum(-1) / math.sqrt(6)
    dot = (feature_map(q, "taylor") * feature_map(k, "taylor")).sum(-1)
    torch.testing.assert_close(dot, 1 + s + s**2 / 2)
    assert (dot >= 0.5 - 1e-12).all()
    assert (feature_map(q, "elu") > 0).all()
    with pytest.raises(ValueError, match="feature_map"):
        feature_map(q, "relu")


def test_linear_normaliser_gives_a_weighted_average():
    """With a ones-column normaliser, a constant value sequence passes through unchanged."""
    blk = _block("linear", Causal(), dtype=torch.float64)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    pos = torch.arange(9)
    f = blk.stream_qkv(x, pos)
    q, k, v = f["q"], f["k"], f["v"]
    v = torch.cat([torch.full_like(v[..., :-1], 2.5), v[..., -1:]], -1)
    from causalmix.nn import mix
    mixed = mix("linear", q, k, v, Causal(), **blk.mixer_kwargs())
    torch.testing.assert_close(mixed[..., :-1] / mixed[..., -1:],
                               torch.full_like(mixed[..., :-1], 2.5))


def test_presets_and_gqa():
    for name in PRESETS:
        cfg = ModelConfig.from_name(name, vocab_size=10)
        assert cfg.output_dim == 10 and len(cfg.blocks) == len(cfg.visibility)
        out = SequenceModel(cfg)(torch.randint(0, 10, (2, 9)))
        assert out.shape == (2, 9, 10)
    cfg = ModelConfig.from_name("tiny-gqa", vocab_size=10)
    assert cfg.blocks[0].attention.n_kv_heads == 2
    feats = SequenceModel(ModelConfig(input_dim=3, output_dim=1, d_model=16, n_heads=2))
    assert feats(torch.randn(2, 5, 3)).shape == (2, 5, 1)
    assert head_decays(4) == (0.5, 0.911612, 0.984375, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="ssm"), "mixer"),
    (dict(d_model=30, n_heads=4), "d_model"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(mixer="linear", decay=(0.5, 1.0)), "decay"),
    (dict(mixer="linear", decay=(0.5, 1.0, 1.0, 1.5)), "decay"),
    (dict(decay=(1.0,) * 4), "decay"),
    (dict(feature_map="relu"), "feature_map"),
    (dict(n_heads=0), "n_heads"),
])
def test_attention_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**{"d_model": 32, "n_heads": 4, **kwargs})


def test_model_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig()
    with pytest.raises(ValueError, match="output_dim"):
        ModelConfig(input_dim=3)
    with pytest.raises(TypeError, match="one spec per layer"):
        ModelConfig(vocab_size=5, visibility=Causal())
    with pytest.raises(TypeError, match="visibility"):
        BlockConfig(AttentionConfig(), "causal")
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("huge")
    m = SequenceModel(ModelConfig(vocab_size=5, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="inputs must be int64 tokens"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="one spec per layer"):
        m(torch.zeros(2, 3, dtype=torch.int64), visibility=(Causal(),))
    # a spec the mixer cannot serve: refused by the config (layer, spec, mixer named) ...
    with pytest.raises(ValueError, match=r"visibility\[0\] \(layer 0\): mixer='linear' does "
                                         r"not support visibility Window"):
        ModelConfig.from_name("tiny-linear", vocab_size=5, visibility=(Window(4), Causal()))
    # ... and, given per call, by the op (it names the spec and what it supports)
    lin = SequenceModel(ModelConfig.from_name("tiny-linear", vocab_size=5))
    with pytest.raises(ValueError, match="Window"):
        lin(torch.zeros(1, 6, dtype=torch.int64), visibility=(Window(4), Causal()))


@pytest.mark.parametrize("mixer, specs", [
    ("softmax", (Causal() | Window(0, 2), Chunked(4, lookahead=1))),
    ("linear", (Causal(), Chunked(4, lookahead=1))),
])
def test_blocks_stream_through_model_stream(mixer, specs):
    """The blocks satisfy causalmix.stream's layer protocol: streaming them frame chunk by
    frame chunk gives the parallel forward's outputs."""
    from causalmix.stream import ModelStream

    m = _model(mixer, specs)
    x = torch.randint(0, 11, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, hidden = m(x, return_hidden=True)
        emb = m.embed(x)
        stream = ModelStream(list(m.blocks))
        parts = [stream.push(emb[:, a:a + n]) for a, n in ((0, 1), (1, 6), (7, 13), (20, 17))]
        parts.append(stream.flush())
        # baseline: the same parallel forward in fp32 (the stream merges softmax partials
        # through an fp32 log-sum-exp, so fp64 inputs do not give fp64-exact results)
        _, base = copy.deepcopy(m).float()(x, return_hidden=True)
    assert_close(torch.cat(parts, dim=1), hidden[-1], base[-1], name=f"{mixer} stream",
                 dtype=torch.float32)
