"""Encoder-decoder models (a tiny random BART) and bidirectional encoders with a sliding window
(a tiny random ModernBERT) under causalmix.

What a spec means per attention kind: ``visibility=`` is the decoder's self-attention spec; the
encoder's self-attention and the decoder's cross-attention keep the model's rule (every key but
padding), whatever ``visibility=`` says. Comparisons follow the project's rule (fp32 causalmix vs
an fp64 reference, at most twice the error of an fp32 baseline).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402

VOCAB = 97


def _bart(impl: str, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=impl)
    return model.to(dtype).eval()


def _inputs(b=2, s=11, t=7, seed=0):
    """Source ids with right padding in row 0 (encoder length 11 != decoder length 7); the
    decoder ids start with the decoder start token (as generate() makes them)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    am[0, s - 4:] = 0
    dec = torch.randint(3, VOCAB, (b, t), generator=g)
    dec[:, 0] = 2
    return src, am, dec


def _additive(allowed, dtype):
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


def test_bart_without_a_spec_equals_sdpa_with_padding_and_unequal_lengths():
    src, am, dec = _inputs()
    outs = {}
    for impl, dtype in (("causalmix", torch.float32), ("sdpa", torch.float64),
                        ("sdpa", torch.float32)):
        o = _bart(impl, dtype)(input_ids=src, attention_mask=am, decoder_input_ids=dec)
        outs[(impl, dtype)] = o
    out, ref, base = (outs[k] for k in (("causalmix", torch.float32), ("sdpa", torch.float64),
                                        ("sdpa", torch.float32)))
    assert_close(out.logits, ref.logits, base.logits, name="logits")
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state,
                 base.encoder_last_hidden_state, name="encoder")


def test_bart_visibility_is_the_decoders_self_attention_spec_only():
    """``visibility=Prefix(4)``: the decoder's self-attention reads its first 4 positions
    bidirectionally (== eager fed that 4-D decoder mask, every gradient too); the encoder and
    the cross-attention are untouched (padding still hidden)."""
    src, am, dec = _inputs()
    t = dec.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    prefix = ((j <= i) | (j < 4))[None, None].expand(2, 1, t, t)
    res = {}
    for impl, dtype in (("causalmix", torch.float32), ("eager", torch.float64),
                        ("eager", torch.float32)):
        model = _bart(impl, dtype)
        kw = (dict(visibility=Prefix(4)) if impl == "causalmix"
              else dict(decoder_attention_mask=_additive(prefix, dtype)))
        o = model(input_ids=src, attention_mask=am, decoder_input_ids=dec, use_cache=False, **kw)
        g = torch.Generator().manual_seed(3)
        (o.logits * torch.randn(o.logits.shape, generator=g).to(dtype)).sum().backward()
        res[(impl, dtype)] = (o, {n: p.grad for n, p in model.named_parameters()
                                  if p.grad is not None})
    (out, g_out), (ref, g_ref), (base, g_base) = (
        res[k] for k in (("causalmix", torch.float32), ("eager", torch.float64),
                         ("eager", torch.float32)))
    assert_close(out.logits, ref.logits, base.logits, name="logits")
    assert len(g_ref) > 20 and g_out.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g_out[name], g_ref[name], g_base[name], name=f"d{name}")
    causal = _bart("causalmix")(input_ids=src, attention_mask=am, decoder_input_ids=dec)
    assert torch.equal(causal.encoder_last_hidden_state, out.encoder_last_hidden_state)
    assert not torch.allclose(causal.logits, out.logits)


def _generate(model, src, am, **kw):
    return model.generate(src, attention_mask=am, max_new_tokens=5, min_new_tokens=5,
                          do_sample=False, return_dict_in_generate=True, output_logits=True,
                          **kw)


def test_bart_generates_with_its_cache_like_sdpa():
    src, am, _ = _inputs()
    ref = _generate(_bart("sdpa"), src, am)
    out = _generate(cmhf.attach(_bart("causalmix")), src, am)
    assert torch.equal(out.sequences, ref.sequences)
    for s, (a, r) in enumerate(zip(out.logits, ref.logits, strict=True)):
        assert_close(a, r.double(), r, name=f"step {s}")
    again = _generate(cmhf.attach(_bart("causalmix")), src, am, visibility=Causal())
    assert torch.equal(again.sequences, ref.sequences)


def test_bart_generation_under_a_decoder_prefix_equals_recompute_and_full_refuses():
    """A decoder prompt of 4 tokens read bidirectionally (``Prefix(4)``) generates with the
    cache, equal to a recompute at every step; ``Full()`` would be stale with the cache and is
    refused, and generates without one."""
    src, am, dec = _inputs(t=4)
    model = cmhf.attach(_bart("causalmix"))
    ref_model = _bart("causalmix", torch.float64)
    for spec, use_cache in ((Prefix(4), True), (Full(), False), (Chunked(2, 1), False)):
        out = _generate(model, src, am, decoder_input_ids=dec, visibility=spec,
                        use_cache=use_cache)
        for s in range(5):
            prefix = out.sequences[:, : 4 + s]
            kw = dict(input_ids=src, attention_mask=am, decoder_input_ids=prefix,
                      visibility=spec, use_cache=False)
            ref, base = ref_model(**kw).logits[:, -1], model(**kw).logits[:, -1]
            assert_close(out.logits[s], ref, base, name=f"{spec} step {s}")
    for spec in (Full(), Prefix(6), Chunked(2, 1)):
        with pytest.raises(ValueError, match="stale"):
            _generate(model, src, am, decoder_input_ids=dec, visibility=spec)


# ================================================================== ModernBERT: |i - j| <= w


def _modernbert(impl: str, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, local_attention=6, global_attn_every_n_layers=3,
        attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation=impl)
    return model.to(dtype).eval()


@pytest.mark.parametrize("t", [1, 7, 19])
def test_modernbert_bidirectional_sliding_window_equals_eager(t):
    """ModernBERT's local layers see ``|i - j| <= local_attention // 2`` (transformers' mask):
    served as ``Window(w, w)``; logits and every gradient == the model's own eager path, with
    padding."""
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(1, VOCAB, (2, t), generator=g)
    am = torch.ones(2, t, dtype=torch.long)
    # at most w = 3 padded: no query row of the window layers is fully masked (eager in fp32
    # turns such a row into NaN that its zero attention weights then spread)
    am[1, t - min(3, t // 3):] = 0
    res = {}
    for impl, dtype in (("causalmix", torch.float32), ("eager", torch.float64),
                        ("eager", torch.float32)):
        model = _modernbert(impl, dtype)
        logits = model(ids, attention_mask=am).logits
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        (logits * w * am[..., None]).sum().backward()
        res[(impl, dtype)] = (logits, {n: p.grad for n, p in model.named_parameters()
                                       if p.grad is not None})
    (out, g_out), (ref, g_ref), (base, g_base) = (
        res[k] for k in (("causalmix", torch.float32), ("eager", torch.float64),
                         ("eager", torch.float32)))
    tokens = am.bool()
    assert_close(out[tokens], ref[tokens], base[tokens], name="logits")
    for name in g_ref:
        assert_close(g_out[name], g_ref[name], g_base[name], name=f"d{name}")


def test_modernbert_visibility_replaces_the_rule_and_keeps_the_window():
    """``visibility=Causal()`` on ModernBERT: causal within each layer's own window."""
    ids = torch.randint(1, VOCAB, (1, 15), generator=torch.Generator().manual_seed(2))
    t = ids.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    res = {}
    for impl, dtype in (("causalmix", torch.float32), ("eager", torch.float64),
                        ("eager", torch.float32)):
        model = _modernbert(impl, dtype)
        if impl == "causalmix":
            res[(impl, dtype)] = model(ids, visibility=Causal()).logits
            continue
        masks = {"full_attention": _additive((j <= i)[None, None], dtype),
                 "sliding_attention": _additive(((j <= i) & (i - j <= 3))[None, None], dtype)}
        res[(impl, dtype)] = model(ids, attention_mask=masks).logits
    assert_close(res[("causalmix", torch.float32)], res[("eager", torch.float64)],
                 res[("eager", torch.float32)], name="causal ModernBERT")
