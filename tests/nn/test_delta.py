"""The Gated DeltaNet layer (``mixer="delta"``): an eager formula written from the definitions
(outputs and every parameter gradient), model stream == parallel at awkward lengths and push
sizes, step decode == parallel, packed documents never leak (neither through the state nor
through the short convolution, in either direction), the convolution's restarts against
``F.conv1d`` per document, and the config wiring (preset, dict form, refusals)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from causalmix import Causal, Chunked, Full, Prefix, Segments, Window
from causalmix.nn import (
    AttentionConfig,
    DeltaMixer,
    ModelConfig,
    SequenceModel,
    impl_choices,
)
from causalmix.nn.delta import CONV_INITS, QK_ACTIVATIONS, causal_conv
from causalmix.stream import ModelStream
from causalmix.testing import (
    assert_decode_equals_parallel,
    assert_layer_matches,
    assert_stream_equals_parallel,
)

V = 13


def _docs(t):
    ids = torch.zeros(t, dtype=torch.int64)
    ids[t // 3:] = 1
    ids[t // 3 + max(1, t // 4):] = 2
    return ids


def _model(vis, *, n_kv_heads=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, mixer="delta",
                      feature_dim=8, visibility=vis, **kw)
    return SequenceModel(cfg).eval()


# ------------------------------------------------------------------ the layer, from definitions
def _eager_layer(m: DeltaMixer, x: torch.Tensor) -> torch.Tensor:
    """``DeltaMixer`` under ``Causal()``, written out: F.conv1d with left padding, SiLU, L2
    norms, a Python loop over the recurrence, RMSNorm, output gate."""
    cfg, b, t = m.cfg, x.shape[0], x.shape[1]
    pre = m.qkv_proj(x)
    k_size = m.conv_size
    conv = F.conv1d(F.pad(pre.transpose(1, 2), (k_size - 1, 0)), m.conv_weight[:, None],
                    groups=pre.shape[2]).transpose(1, 2)
    q, k, v = conv.split(m.widths, -1)
    if m.qk_activation == "silu":
        q, k = F.silu(q), F.silu(k)
    v = F.silu(v)
    hk, h = cfg.n_kv_heads, cfg.n_heads
    q = F.normalize(q.view(b, t, hk, -1), dim=-1) / math.sqrt(cfg.feature_dim)
    k = F.normalize(k.view(b, t, hk, -1), dim=-1)
    v = v.reshape(b, t, h, -1)
    q, k = q.repeat_interleave(h // hk, 2), k.repeat_interleave(h // hk, 2)
    beta = torch.sigmoid(m.b_proj(x))
    g = -torch.exp(m.A_log) * F.softplus(m.a_proj(x) + m.dt_bias)
    s = x.new_zeros(b, h, cfg.feature_dim, cfg.head_dim)
    outs = []
    for i in range(t):
        s = torch.exp(g[:, i])[..., None, None] * s
        err = v[:, i] - torch.einsum("bhde,bhd->bhe", s, k[:, i])
        s = s + torch.einsum("bhd,bhe->bhde", k[:, i], beta[:, i, :, None] * err)
        outs.append(torch.einsum("bhde,bhd->bhe", s, q[:, i]))
    o = torch.stack(outs, 1)
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm_weight
    return m.o_proj((y * F.silu(m.z_proj(x).view(b, t, h, -1))).reshape(b, t, -1))


@pytest.mark.parametrize("t", [1, 7, 63])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("qk_activation", QK_ACTIVATIONS)
def test_layer_equals_its_eager_formula(t, n_kv_heads, qk_activation):
    # the option only changes the op's inputs: it runs on the recurrent op (the chunked op's
    # gate gradients at T=63 sit 2-5x the eager fp32 error with such inputs; see the op's tests)
    torch.manual_seed(t)
    impl = "auto" if qk_activation == "silu" else "recurrent"
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, mixer="delta",
                          feature_dim=8, impl=impl)
    layer = DeltaMixer(cfg, qk_activation=qk_activation)
    x = torch.randn(2, t, 32)

    def fast(mod, xx):
        return mod(xx, visibility=Causal())

    assert_layer_matches(fast, _eager_layer, layer, x, label=f"T={t}")


# ------------------------------------------------------------------ stream, decode
SPECS = {
    "causal": lambda t: Causal(),
    "prefix": lambda t: Prefix(max(1, t // 2)),
    "chunked": lambda t: Chunked(4),
    "chunked_la": lambda t: Chunked(5, lookahead=1),
    "docs_causal": lambda t: Segments(_docs(t)) & Causal(),
    "docs_chunked_la": lambda t: Segments(_docs(t)) & Chunked(3, lookahead=2),
}


@pytest.mark.parametrize("t,push", [(1, 1), (7, 3), (63, 10), (113, 37), (500, 128)])
@pytest.mark.parametrize("spec", list(SPECS))
def test_model_stream_equals_parallel(t, push, spec):
    vis = SPECS[spec](t)
    model = _model((vis, Causal()), n_kv_heads=2 if t % 2 else None)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(t))
    assert_stream_equals_parallel(model, ids, push, name=f"{spec} T={t} stream")


def test_stream_memory_is_bounded():
    """A causal delta model streams in constant memory: the carried state, the convolution's
    last inputs (counted by cache_nbytes) and nothing that grows with the stream."""
    model = _model((Causal(), Causal()))
    s = ModelStream(model)
    sizes = []
    with torch.no_grad():
        for _ in range(6):
            s.push(torch.randint(0, V, (1, 16)))
            sizes.append(s.cache_nbytes())
    conv = sum(b.attn.conv_size - 1 for b in model.blocks) * sum(model.blocks[0].attn.widths) * 4
    assert len(set(sizes)) == 1 and sizes[0] >= conv


@pytest.mark.parametrize("spec", ["causal", "docs_causal"])
def test_step_decode_equals_parallel(spec):
    t = 23
    model = _model((SPECS[spec](t),) * 2)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(2))
    assert_decode_equals_parallel(model, ids, 5, name=f"{spec} step decode")


# ------------------------------------------------------------------ documents
LEAK_SPECS = {
    "causal": Causal(), "full": Full(), "prefix": Prefix(4), "chunked_la": Chunked(3, 1),
}


@pytest.mark.parametrize("base", list(LEAK_SPECS))
def test_packed_documents_do_not_leak(base):
    """Changing one document's tokens changes no output of another document (in parallel and
    in the stream), in either direction; without Segments the same change does reach them
    (the check can fail)."""
    t = 30
    ids_doc = _docs(t)  # documents [0, 10), [10, 17), [17, 30)
    docs = Segments(ids_doc) & LEAK_SPECS[base]
    model = _model((docs, docs)).double()
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(3))
    for changed in (0, 2):
        other = ids.clone()
        where = ids_doc == changed
        other[:, where] = (other[:, where] + 1) % V
        with torch.no_grad():
            a, b = model(ids), model(other)
            leaky = _model((LEAK_SPECS[base],) * 2).double()
            la, lb = leaky(ids), leaky(other)
        rest = ids_doc != changed
        torch.testing.assert_close(a[:, rest], b[:, rest], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, where], b[:, where])
        if changed == 0 or base in ("full", "chunked_la"):  # only these look ahead that far
            assert not torch.allclose(la[:, rest], lb[:, rest])
    if base in ("causal", "chunked_la", "prefix"):
        with torch.no_grad():
            s = ModelStream(model)
            got = torch.cat([s.push(other[:, i:i + 4]) for i in range(0, t, 4)] + [s.flush()],
                            1)
        torch.testing.assert_close(got, b, rtol=0, atol=1e-10)


def test_conv_restarts_at_document_starts():
    """``causal_conv`` with documents == ``F.conv1d`` run on each document alone (zero
    padding on its left), and a NaN in one document reaches no other."""
    torch.manual_seed(0)
    ids = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    x = torch.randn(2, 16, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    past = torch.randn(2, 3, 6, dtype=torch.float64)  # the positions before: not read at 0
    for start in (0, 5):
        got = causal_conv(x[:, start:], past if start else past * 0, start, w, ids[None])
        for d in (0, 1, 2):
            sel = (ids == d)[start:]
            if not sel.any():
                continue
            seg = x[:, start:][:, sel]
            want = F.conv1d(F.pad(seg.transpose(1, 2), (3, 0)), w[:, None], groups=6)
            if d == 1 and start == 5:  # the run continues document 1 from the past inputs
                seg = torch.cat([x[:, 5:7]], 1)
                want = F.conv1d(F.pad(seg.transpose(1, 2), (3, 0)), w[:, None], groups=6)
            torch.testing.assert_close(got[:, sel], want.transpose(1, 2))
    bad = x.clone()
    bad[:, 3] = float("nan")
    got = causal_conv(bad, past * 0, 0, w, ids[None])
    assert torch.isnan(got[:, 3:5]).all() and not torch.isnan(got[:, 5:]).any()


def test_conv_reads_the_past_inside_a_document():
    """A run that continues a document reads the carried inputs: == one conv over both."""
    torch.manual_seed(1)
    x = torch.randn(1, 12, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    whole = causal_conv(x, x.new_zeros(1, 3, 3), 0, w, None)
    part = causal_conv(x[:, 7:], x[:, 4:7], 7, w, None)
    torch.testing.assert_close(part, whole[:, 7:])


# ------------------------------------------------------------------ config
def test_config_wiring():
    cfg = ModelConfig.from_name("tiny-delta", vocab_size=V, visibility=(Full(), Causal()))
    assert cfg.mixer == "delta" and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert set(impl_choices("delta")) == {"auto", "reference", "chunk", "recurrent"}
    model = SequenceModel(cfg)
    assert all(isinstance(b.attn, DeltaMixer) and b.mixer == "delta" for b in model.blocks)
    out = model(torch.randint(0, V, (1, 9)))
    assert out.shape == (1, 9, V) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"Window\(left=3, right=0\)"):
        ModelConfig(vocab_size=V, mixer="delta", visibility=(Window(3),))
    with pytest.raises(ValueError, match="impl must be one of"):
        ModelConfig(vocab_size=V, mixer="delta", impl="blocks")
    with pytest.raises(ValueError, match="DeltaMixer: mixer must be 'delta'"):
        DeltaMixer(AttentionConfig(mixer="gated"))
    with pytest.raises(ValueError, match="qk_activation must be one of"):
        DeltaMixer(AttentionConfig(mixer="delta"), qk_activation="relu")
    with pytest.raises(ValueError, match="conv_init must be one of"):
        DeltaMixer(AttentionConfig(mixer="delta"), conv_init="zeros")


# ------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("conv_init", CONV_INITS)
def test_init(conv_init):
    """The convolution's two starts: ``"identity"`` (newest tap 1, the others 0, so a frame's
    q / k / v are exactly its own projections) and ``"random"``; with either the gates keep
    between exp(-1.6) and exp(-1e-3) of the state per step at zero input (Mamba-2's dt in
    [1e-3, 1e-1] and -A in [1, 16])."""
    torch.manual_seed(0)
    cfg = AttentionConfig(d_model=32, n_heads=4, mixer="delta", feature_dim=8)
    layer = DeltaMixer(cfg, conv_init=conv_init)
    w = layer.conv_weight.detach()
    x = torch.randn(1, 4, 32)
    pre = layer.qkv_proj(x)
    conv = causal_conv(pre, pre.new_zeros(1, 3, pre.shape[2]), 0, layer.conv_weight, None)
    if conv_init == "identity":
        assert bool((w[:, -1] == 1).all()) and bool((w[:, :-1] == 0).all())
        torch.testing.assert_close(conv, pre, rtol=0, atol=0)
    else:
        assert 0.7 < float(w.std() * math.sqrt(layer.conv_size)) < 1.3
        assert not torch.allclose(conv, pre)
    _, g = layer.gates(torch.zeros(1, 1, 32))
    keep = g.exp().flatten()
    assert bool(((keep >= math.exp(-1.6) - 1e-6) & (keep <= math.exp(-1e-3) + 1e-6)).all())
