"""The Kimi Delta Attention layer (``mixer="kda"``): an eager formula written from the
definitions (a Python loop over the per-key-dimension recurrence; outputs and every parameter
gradient), model stream == parallel at awkward lengths and push sizes under causal and
bidirectional specs, step decode == parallel, packed documents never leak, and the config
wiring (preset, dict form, refusals). Generation and whole-model sequence parallel:
tests/nn/test_generate.py and tests/distributed/test_model.py."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from causalmix import Causal, Chunked, Full, Prefix, Segments, Window
from causalmix.nn import AttentionConfig, KDAMixer, ModelConfig, SequenceModel
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


def _model(vis, *, n_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, mixer="kda",
                      feature_dim=8, visibility=vis)
    return SequenceModel(cfg).eval()


def _eager_layer(m: KDAMixer, x: torch.Tensor) -> torch.Tensor:
    """``KDAMixer`` under ``Causal()``, written out: F.conv1d with left padding, SiLU, L2
    norms, the low-rank gate, a Python loop over ``S = diag(exp(g)) S`` then the delta
    update, RMSNorm, output gate."""
    cfg, b, t = m.cfg, x.shape[0], x.shape[1]
    pre = m.qkv_proj(x)
    k_size = m.conv_size
    conv = F.conv1d(F.pad(pre.transpose(1, 2), (k_size - 1, 0)), m.conv_weight[:, None],
                    groups=pre.shape[2]).transpose(1, 2)
    q, k, v = F.silu(conv).split(m.widths, -1)
    hk, h, f = cfg.n_kv_heads, cfg.n_heads, cfg.feature_dim
    q = F.normalize(q.view(b, t, hk, -1), dim=-1) / math.sqrt(f)
    k = F.normalize(k.view(b, t, hk, -1), dim=-1)
    v = v.reshape(b, t, h, -1)
    q, k = q.repeat_interleave(h // hk, 2), k.repeat_interleave(h // hk, 2)
    beta = torch.sigmoid(m.b_proj(x))
    low = m.a_proj[1](m.a_proj[0](x))
    g = -torch.exp(m.A_log)[:, None] * F.softplus(low + m.dt_bias).view(b, t, h, f)
    s = x.new_zeros(b, h, f, cfg.head_dim)
    outs = []
    for i in range(t):
        s = torch.exp(g[:, i])[..., None] * s
        err = v[:, i] - torch.einsum("bhde,bhd->bhe", s, k[:, i])
        s = s + torch.einsum("bhd,bhe->bhde", k[:, i], beta[:, i, :, None] * err)
        outs.append(torch.einsum("bhde,bhd->bhe", s, q[:, i]))
    o = torch.stack(outs, 1)
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm_weight
    return m.o_proj((y * F.silu(m.z_proj(x).view(b, t, h, -1))).reshape(b, t, -1))


@pytest.mark.parametrize("t", [1, 7, 63])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_layer_equals_its_eager_formula(t, n_kv_heads):
    torch.manual_seed(t)
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, mixer="kda",
                          feature_dim=8)
    layer = KDAMixer(cfg, gate_rank=3)
    with torch.no_grad():  # spread the gates: strong and weak decays per dimension
        layer.dt_bias.add_(torch.randn(layer.dt_bias.shape))
    x = torch.randn(2, t, 32)

    def layer_call(mod, xx):
        return mod(xx, visibility=Causal())

    # the layer's wiring on the op's sequential implementation; chunk against the reference
    # (every gradient, fp32 / bf16, value grouping) is tests/ops/delta/test_kda.py's
    on_recurrent = copy.deepcopy(layer)
    on_recurrent.cfg = dataclasses.replace(cfg, impl="recurrent")
    names = assert_layer_matches(layer_call, _eager_layer, layer, x, label=f"T={t}",
                                 fast_layer=on_recurrent)
    assert "a_proj.0.weight" in names and "dt_bias" in names


def test_gate_is_per_key_dimension():
    """The op receives ``log_gate [B, n, H, F]`` ``<= 0`` that differs across dimensions."""
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, mixer="kda", feature_dim=8)
    layer = KDAMixer(cfg)
    x = torch.randn(2, 5, 32)
    inputs, _ = layer.stream_qkv(x, torch.arange(5), layer.stream_context(Causal()))
    g = inputs["log_gate"]
    assert g.shape == (2, 5, 4, 8) and bool((g <= 0).all())
    assert not torch.allclose(g, g[..., :1].expand_as(g))


SPECS = {
    "causal": lambda t: Causal(),
    "prefix": lambda t: Prefix(max(1, t // 2)),
    "chunked_la": lambda t: Chunked(5, lookahead=1),
    "docs_causal": lambda t: Segments(_docs(t)) & Causal(),
    "docs_chunked_la": lambda t: Segments(_docs(t)) & Chunked(3, lookahead=2),
}


@pytest.mark.parametrize("t,push", [(1, 1), (7, 3), (63, 10), (113, 37)])
@pytest.mark.parametrize("spec", list(SPECS))
def test_model_stream_equals_parallel(t, push, spec):
    vis = SPECS[spec](t)
    model = _model((vis, Causal()), n_kv_heads=2 if t % 2 else None)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(t))
    assert_stream_equals_parallel(model, ids, push, name=f"{spec} T={t} stream")


@pytest.mark.parametrize("spec", ["causal", "docs_causal"])
def test_step_decode_equals_parallel(spec):
    t = 23
    model = _model((SPECS[spec](t),) * 2, n_kv_heads=2)
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(2))
    assert_decode_equals_parallel(model, ids, 5, name=f"{spec} step decode")


LEAK_SPECS = {"causal": Causal(), "full": Full(), "chunked_la": Chunked(3, 1)}


@pytest.mark.parametrize("base", list(LEAK_SPECS))
def test_packed_documents_do_not_leak(base):
    """Changing one document's tokens changes no output of another document (parallel, and the
    stream where the spec streams); without Segments the same change does reach them."""
    t = 30
    ids_doc = _docs(t)  # documents [0, 10), [10, 17), [17, 30)
    docs = Segments(ids_doc) & LEAK_SPECS[base]
    model = _model((docs, docs)).double()
    leaky = _model((LEAK_SPECS[base],) * 2).double()
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(3))
    for changed in (0, 2):
        other = ids.clone()
        where = ids_doc == changed
        other[:, where] = (other[:, where] + 1) % V
        with torch.no_grad():
            a, b = model(ids), model(other)
            la, lb = leaky(ids), leaky(other)
        rest = ids_doc != changed
        torch.testing.assert_close(a[:, rest], b[:, rest], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, where], b[:, where])
        if changed == 0 or base != "causal":  # only these reach the other documents
            assert not torch.allclose(la[:, rest], lb[:, rest])
    if base != "full":
        with torch.no_grad():
            s = ModelStream(model)
            got = torch.cat([s.push(other[:, i:i + 4]) for i in range(0, t, 4)] + [s.flush()],
                            1)
        torch.testing.assert_close(got, b, rtol=0, atol=1e-10)


def test_config_wiring():
    cfg = ModelConfig.from_name("tiny-kda", vocab_size=V, visibility=(Full(), Causal()))
    assert cfg.mixer == "kda" and ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = SequenceModel(cfg)
    assert all(isinstance(b.attn, KDAMixer) and b.mixer == "delta" for b in model.blocks)
    out = model(torch.randint(0, V, (1, 9)))
    assert out.shape == (1, 9, V) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"Window\(left=3, right=0\)"):
        ModelConfig(vocab_size=V, mixer="kda", visibility=(Window(3),))
    with pytest.raises(ValueError, match="KDAMixer: mixer must be 'kda'"):
        KDAMixer(AttentionConfig(mixer="delta"))
    with pytest.raises(ValueError, match="gate_rank"):
        KDAMixer(AttentionConfig(mixer="kda"), gate_rank=0)
