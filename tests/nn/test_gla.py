"""The GLA layer (``mixer="gla"``): an eager formula written from the definitions (outputs and
every parameter gradient), model stream == parallel, step decode == parallel, bidirectional
training reaches both gates, documents never leak, the config wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from causalmix import Causal, Chunked, Full, Prefix, Segments
from causalmix.nn import GLAMixer, ModelConfig, SequenceModel
from causalmix.testing import (
    assert_decode_equals_parallel,
    assert_stream_equals_parallel,
)

V = 13


def _model(vis, *, n_kv_heads=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, mixer="gla",
                      feature_dim=8, visibility=vis)
    return SequenceModel(cfg).to(dtype).eval()


def _eager_layer(m: GLAMixer, x: torch.Tensor) -> torch.Tensor:
    """``GLAMixer`` under ``Causal()``, written out: sigmoid gates ** (1 / tau) from the
    low-rank projection, a Python loop over ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``,
    RMSNorm, output gate."""
    cfg, b, t = m.cfg, x.shape[0], x.shape[1]
    h, hk, f = cfg.n_heads, cfg.n_kv_heads, cfg.feature_dim
    q = m.q_proj(x).view(b, t, h, f) / math.sqrt(f)
    k = m.k_proj(x).view(b, t, hk, f).repeat_interleave(h // hk, 2)
    v = m.v_proj(x).view(b, t, hk, -1).repeat_interleave(h // hk, 2)
    w2, b2 = m.gate_up.weight[:h * f], m.gate_up.bias[:h * f]  # the forward gate's half
    alpha = torch.sigmoid(m.gate_down(x) @ w2.T + b2) ** (1 / m.temperature)  # [B, T, H * F]
    alpha = alpha.view(b, t, h, f)
    s = torch.zeros(b, h, f, v.shape[-1], dtype=x.dtype)
    outs = []
    for i in range(t):
        s = alpha[:, i, :, :, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, i], s))
    y = torch.stack(outs, 1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm_weight
    r = m.r_proj(x).view(b, t, h, -1)
    return m.o_proj((y * F.silu(r)).reshape(b, t, -1))


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_layer_equals_the_eager_formula(n_kv_heads):
    m = _model((Causal(),), n_kv_heads=n_kv_heads, dtype=torch.float64)
    layer = m.blocks[0].attn
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = layer(x, visibility=Causal())
    ref = _eager_layer(layer, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((got * w).sum(), params, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad((ref * w).sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("vis", [(Causal(), Causal()), (Prefix(6), Chunked(4, lookahead=1)),
                                 (Segments(torch.tensor([0] * 9 + [1] * 14)) & Causal(),)])
@pytest.mark.parametrize("push", [1, 4, 23])
def test_model_stream_equals_parallel(vis, push):
    t = 23
    model = _model(vis, n_kv_heads=2)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(1))
    assert_stream_equals_parallel(model, ids, push, name=f"{vis} push {push} stream")


def test_step_decode_equals_parallel():
    t = 23
    model = _model((Causal(),) * 2)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(2))
    assert_decode_equals_parallel(model, ids, 5, name="gla step decode")


def test_bidirectional_trains_both_gates():
    """Full(): the forward and the reverse gate projections get gradients, and the first
    position depends on the last."""
    m = _model((Full(),)).train()
    tok = torch.randint(0, V, (2, 9))
    m(tok).sum().backward()
    attn = m.blocks[0].attn
    h, f = attn.cfg.n_heads, attn.cfg.feature_dim
    for half in (slice(0, h * f), slice(h * f, 2 * h * f)):  # forward, reverse
        assert attn.gate_up.weight.grad[half].abs().max() > 0
        assert attn.gate_up.bias.grad[half].abs().max() > 0
    tok2 = tok.clone()
    tok2[:, -1] = (tok2[:, -1] + 1) % V
    with torch.no_grad():
        assert not torch.allclose(m(tok2)[:, 0], m(tok)[:, 0])


@pytest.mark.parametrize("spec", [Full(), Chunked(4, lookahead=1), Prefix(5)])
def test_documents_never_leak(spec):
    ids = torch.tensor([0] * 7 + [1] * 8)
    m = _model((Segments(ids) & spec,), dtype=torch.float64)
    tok = torch.randint(0, V, (1, 15))
    tok2 = tok.clone()
    tok2[:, 7:] = (tok2[:, 7:] + 3) % V
    with torch.no_grad():
        a, b = m(tok), m(tok2)
    assert float((a[:, :7] - b[:, :7]).abs().max()) < 1e-12
    assert float((a[:, 7:] - b[:, 7:]).abs().max()) > 1e-3


def test_config_wiring():
    cfg = ModelConfig.from_name("tiny-gla", vocab_size=V, visibility=(Full(), Causal()))
    m = SequenceModel(cfg)
    assert all(isinstance(b.attn, GLAMixer) and b.mixer == "linear" for b in m.blocks)
    gates = m.blocks[0].attn.gates(torch.randn(1, 3, 64))
    assert gates[0].shape == (1, 3, 4, 16) and bool((gates[0] <= 0).all())
    with pytest.raises(ValueError, match="temperature"):
        GLAMixer(cfg.blocks[0].attention, temperature=0.0)
    with pytest.raises(ValueError, match="mixer must be 'gla'"):
        GLAMixer(ModelConfig.from_name("tiny-gated", vocab_size=V).blocks[0].attention)
