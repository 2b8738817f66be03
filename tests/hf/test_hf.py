"""The Hugging Face bridge (``causalmix.hf``) on tiny random-initialised transformers models.

Families: Llama (full attention), Qwen3 (layer 0 full, layer 1 sliding), Mistral (every layer
sliding, window 5 < T) and Gemma 3 text (layer 0 sliding, layer 1 full). Each comparison uses the
project's rule: the fp32 causalmix run may err against an fp64 reference at most twice what a
same-precision (fp32) transformers baseline errs (``causalmix.testing.assert_close``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix, Segments, Window  # noqa: E402
from causalmix.hf import LayerMask  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402
from causalmix.visibility import ValidKeys  # noqa: E402

SW = 5  # the sliding window of the tiny families (conftest.py)
FAMILIES = ["llama", "qwen3", "mistral", "gemma3"]


def _layer_windows(family: str) -> list[int | None]:
    """Each layer's sliding window (None: full attention), by the test's own reading of the
    config, as ``dict`` keys of the per-layer-type masks where the model takes them."""
    return {"llama": [None, None], "qwen3": [None, SW], "mistral": [SW, SW],
            "gemma3": [SW, None]}[family]


# ------------------------------------------------------------------ the test's own mask formula


def _allowed(rule: str, t: int, *, n=None, chunk=None, docs=None, window=None, valid=None):
    """[B, 1, T, T] bool by formula: the rule, then the layer's window, documents and padding."""
    i = torch.arange(t).view(t, 1)
    j = torch.arange(t).view(1, t)
    if rule == "causal":
        m = (j <= i)[None]
    elif rule == "full":
        m = torch.ones(1, t, t, dtype=torch.bool)
    elif rule == "prefix":
        n = torch.as_tensor(n).view(-1, 1, 1)
        m = (j <= i)[None] | (j[None] < n)
    elif rule == "chunked":
        size, ahead = chunk
        m = ((j // size) <= (i // size) + ahead)[None]
    else:
        raise AssertionError(rule)
    if window is not None:
        m = m & (j > i - window)[None]  # transformers: keys j > i - sliding_window
    if docs is not None:
        m = m & (docs[:, :, None] == docs[:, None, :])
    if valid is not None:
        m = m & valid.bool()[:, None, :]
    return m[:, None]


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _eager_mask(family: str, dtype, **kw):
    """The explicit 4-D additive mask(s) for the eager backend: one tensor when every layer has
    the same window, else transformers' per-layer-type dict."""
    t = kw.pop("t")
    wins = _layer_windows(family)
    masks = {w: _additive(_allowed(t=t, window=w, **kw), dtype) for w in set(wins)}
    if len(masks) == 1:
        return masks[wins[0]]
    return {"full_attention": masks[None], "sliding_attention": masks[SW]}


# ------------------------------------------------------------------ helpers


def _forward(model, ids, *, grads: bool, where=None, **kw):
    """Logits and (optionally) every parameter gradient of a fixed random projection of the
    logits (restricted to positions ``where``)."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = model(ids, use_cache=False, **kw).logits
        if not grads:
            return logits.detach(), {}
        g = torch.Generator().manual_seed(7)
        w = torch.randn(logits.shape, generator=g).to(logits.dtype)
        if where is not None:
            w = w * where[..., None].to(w.dtype)
        (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _compare(actual, ref, base, name, where=None):
    """``where``: [B, T] positions to compare (all if None)."""
    if where is not None:
        actual, ref, base = actual[where], ref[where], base[where]
    assert_close(actual, ref, base, name=name)


# ================================================================== registration and loading


def test_register_is_idempotent_and_both_loading_routes_work(tiny):
    assert cmhf.register() == "causalmix"
    assert cmhf.register() == "causalmix"
    assert transformers.AttentionInterface._global_mapping["causalmix"] is cmhf.causalmix_attention
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionMaskInterface._global_mapping["causalmix"] is cmhf.causalmix_mask
    m = tiny.fresh("llama", "sdpa")
    m.set_attn_implementation("causalmix")
    assert m.config._attn_implementation == "causalmix"
    ids = tiny.ids(1, 9)
    ref = tiny.model("llama", "sdpa")(ids).logits
    m.load_state_dict(tiny.model("llama", "sdpa").state_dict())
    assert_close(m.eval()(ids).logits, ref.double(), ref, name="set_attn_implementation")


def test_the_mask_is_O_T_never_a_dense_T_by_T_tensor(tiny):
    seen = []
    m = tiny.model("gemma3", "causalmix")
    t = 17
    am = tiny.left_padding(2, t, [3, 0])
    ids = tiny.ids(2, t)
    handle_fn = cmhf.causalmix_attention

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask)
        return handle_fn(module, q, k, v, attention_mask, **kw)

    transformers.AttentionInterface.register("causalmix", spy)
    try:
        m(ids, attention_mask=am)
    finally:
        cmhf.register()
    assert len(seen) == 2 and all(isinstance(x, LayerMask) for x in seen)
    assert {x.window for x in seen} == {SW, None}
    for x in seen:
        assert x.padding.shape == (2, t)  # key validity, O(B * T)
        assert torch.equal(x.padding, am.bool())


# ================================================================== causal == sdpa


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("t", [1, 7, 23])
def test_causal_logits_match_sdpa(family, padded, t, tiny):
    ids = tiny.ids(2, t)
    am = tiny.left_padding(2, t, [min(6, t - 1), 0]) if padded else None
    ref = tiny.model(family, "sdpa", torch.float64)(ids, attention_mask=am).logits
    base = tiny.model(family, "sdpa")(ids, attention_mask=am).logits
    out = tiny.model(family, "causalmix")(ids, attention_mask=am).logits
    # Fully padded query rows: SDPA (torch >= 2.5) and causalmix both give those rows output 0,
    # so every position is compared.
    assert_close(out, ref, base, name=f"{family} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_sdpa(family, tiny):
    ids = tiny.ids(2, 11, seed=3)
    am = tiny.left_padding(2, 11, [4, 0])
    kw = dict(attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = tiny.model(family, "sdpa").generate(ids, **kw)
    out = tiny.model(family, "causalmix").generate(ids, **kw)
    assert out.shape == (2, 31)
    assert torch.equal(out, ref)


# ================================================================== specs == eager + explicit mask


def _spec_case(case: str, b: int, t: int):
    """(visibility or None, forward kwargs, formula kwargs)."""
    if case == "prefix":
        return Prefix(9), {}, dict(rule="prefix", n=9)
    if case == "prefix_per_example":
        n = torch.tensor([4, 15])[:b]
        return Prefix(n), {}, dict(rule="prefix", n=n)
    if case == "full":
        return Full(), {}, dict(rule="full")
    if case == "chunked":
        return Chunked(4, lookahead=1), {}, dict(rule="chunked", chunk=(4, 1))
    if case == "packed":  # three documents in row 0, two in row 1; no visibility=: causal
        lengths = [[7, 9, t - 16], [12, t - 12]]
        pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
        docs = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                            for row in lengths])
        return None, dict(position_ids=pos), dict(rule="causal", docs=docs)
    if case == "packed_prefix":  # a spec composed with the documents
        pos = torch.cat([torch.arange(10), torch.arange(t - 10)]).expand(b, t)
        docs = (torch.arange(t) >= 10).long().expand(b, t)
        return Prefix(6), dict(position_ids=pos), dict(rule="prefix", n=6, docs=docs)
    raise AssertionError(case)


CASES = ["prefix", "prefix_per_example", "full", "chunked", "packed", "packed_prefix"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t", [21, 63])
def test_spec_logits_and_grads_match_eager_with_explicit_mask(family, case, t, tiny):
    b = 2
    ids = tiny.ids(b, t, seed=5)
    vis, fkw, formula = _spec_case(case, b, t)
    extra = {} if vis is None else dict(visibility=vis)
    out, g_out = _forward(tiny.model(family, "causalmix"), ids, grads=True, **extra, **fkw)
    res = {}
    for dtype in (torch.float64, torch.float32):
        mask = _eager_mask(family, dtype, t=t, **formula)
        res[dtype] = _forward(tiny.model(family, "eager", dtype), ids, grads=True,
                              attention_mask=mask, **fkw)
    (ref, g_ref), (base, g_base) = res[torch.float64], res[torch.float32]
    assert_close(out, ref, base, name=f"{family} {case} logits")
    assert g_out.keys() == g_ref.keys() and len(g_out) > 10
    for name in g_ref:
        assert_close(g_out[name], g_ref[name], g_base[name], name=f"{family} {case} d{name}")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prefix_with_left_padding_matches_eager_on_tokens(family, tiny):
    """Prefix-LM with left padding. The eager backend is ill-defined on fully padded query rows
    (an additive mask of finfo.min everywhere gives a uniform row, causalmix gives 0), and those
    rows never reach a token's output, so tokens are compared (logits and every gradient of a
    loss over tokens only)."""
    b, t, pads = 2, 19, [5, 0]
    ids = tiny.ids(b, t, seed=9)
    am = tiny.left_padding(b, t, pads)
    n = torch.tensor([pads[0] + 6, pads[1] + 6])  # 6 prompt tokens after the padding
    tokens = am.bool()
    out, g_out = _forward(tiny.model(family, "causalmix"), ids, grads=True, where=tokens,
                          attention_mask=am, visibility=Prefix(n))
    res = {}
    for dtype in (torch.float64, torch.float32):
        mask = _eager_mask(family, dtype, t=t, rule="prefix", n=n, valid=am)
        res[dtype] = _forward(tiny.model(family, "eager", dtype), ids, grads=True, where=tokens,
                              attention_mask=mask)
    (ref, g_ref), (base, g_base) = res[torch.float64], res[torch.float32]
    _compare(out, ref, base, f"{family} logits", where=tokens)
    for name in g_ref:
        assert_close(g_out[name], g_ref[name], g_base[name], name=f"{family} d{name}")


def test_packing_from_the_flattening_collator_with_flash_attention_keywords(tiny):
    """``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives position_ids and
    cu_seq_lens_q / _k: both describe the documents and must agree."""
    docs = [tiny.ids(1, n, seed=n)[0].tolist() for n in (9, 14, 6)]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collate([{"input_ids": d} for d in docs])
    assert {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k"} <= batch.keys()
    m = tiny.model("mistral", "causalmix")
    ids = batch["input_ids"]
    both = m(ids, position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
             cu_seq_lens_k=batch["cu_seq_lens_k"]).logits
    assert torch.equal(both, m(ids, position_ids=batch["position_ids"]).logits)
    for d, s in zip(docs, (0, 9, 23), strict=True):  # each document as if alone
        alone = m(torch.tensor([d])).logits
        assert_close(both[:, s:s + len(d)], alone.double(), alone, name="packed document")
    with pytest.raises(ValueError, match="different documents"):
        m(ids, position_ids=batch["position_ids"], cu_seq_lens_q=torch.tensor([0, 10, 29]),
          cu_seq_lens_k=torch.tensor([0, 10, 29]))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k"):
        m(ids, cu_seq_lens_q=batch["cu_seq_lens_q"])


# ================================================================== the model's rule, defaults


def test_bidirectional_config_and_is_causal_keyword_are_the_models_own_rule(tiny):
    """``config.is_causal=False`` (transformers builds a bidirectional mask) and the per-call
    ``is_causal=False`` keyword both mean ``Full()``."""
    ids = tiny.ids(2, 13)
    res = {}
    for impl, dtype in (("causalmix", torch.float32), ("eager", torch.float64),
                        ("eager", torch.float32)):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**tiny.COMMON, is_causal=False)
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        res[(impl, dtype)] = m.to(dtype).eval()(ids).logits
    out = res[("causalmix", torch.float32)]
    assert_close(out, res[("eager", torch.float64)], res[("eager", torch.float32)],
                 name="config.is_causal=False")
    m = tiny.model("llama", "causalmix")
    assert torch.equal(m(ids, is_causal=False).logits, m(ids, visibility=Full()).logits)
    assert torch.equal(m(ids, visibility=Full()).logits, out)


def test_visibility_reaches_every_layer_under_activation_checkpointing(tiny):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(tiny.config("gemma3"),
                                                      attn_implementation="causalmix")
    ids = tiny.ids(2, 17)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.activation_checkpointing_enable({"use_reentrant": False})
            assert m.is_activation_checkpointing
        m.train().zero_grad()
        m(ids, labels=ids, use_cache=False, visibility=Prefix(8)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_model_default_visibility_equals_per_call(tiny):
    model = tiny.model("qwen3", "causalmix")
    ids = tiny.ids(2, 15)
    per_call = model(ids, visibility=Full()).logits
    cmhf.set_visibility(model, Full())
    try:
        assert torch.equal(model(ids).logits, per_call)
        causal = model(ids, visibility=Causal()).logits  # a per-call spec wins over the default
    finally:
        cmhf.set_visibility(model, None)
    assert torch.equal(causal, model(ids).logits)
    assert not torch.allclose(per_call, causal)


# ================================================================== refusals


def test_refuses_logit_softcapping(tiny):
    model = tiny.custom(transformers.Gemma2Config, attn_logit_softcapping=50.0).eval()
    with pytest.raises(ValueError, match="softcap"):
        model(tiny.ids(1, 8))


def test_refuses_attention_sinks(tiny):
    model = tiny.custom(transformers.GptOssConfig, num_local_experts=2, num_experts_per_tok=1,
                  layer_types=["full_attention", "full_attention"]).eval()
    with pytest.raises(ValueError, match="sinks"):
        model(tiny.ids(1, 8))


def test_refuses_dropout_in_training_but_not_in_eval(tiny):
    model = tiny.custom(transformers.LlamaConfig, attention_dropout=0.1)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(tiny.ids(1, 8))
    model.eval()
    model(tiny.ids(1, 8))


def test_refuses_output_attentions(tiny):
    with pytest.raises(ValueError, match="output_attentions"):
        tiny.model("llama", "causalmix")(tiny.ids(1, 8), output_attentions=True)


def test_refuses_spec_for_another_batch_size(tiny):
    with pytest.raises(ValueError, match="batch size 3"):
        tiny.model("llama", "causalmix")(tiny.ids(2, 8), visibility=Prefix(torch.tensor([1, 2, 3])))


def test_refuses_a_prepared_4d_mask_and_a_non_spec(tiny):
    m = tiny.model("llama", "causalmix")
    with pytest.raises(ValueError, match="4-D attention mask"):
        m(tiny.ids(1, 8), attention_mask=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="visibility must be a causalmix spec"):
        m(tiny.ids(1, 8), visibility="prefix")
    with pytest.raises(ValueError, match="is_causal"):
        m(tiny.ids(1, 8), visibility=Full(), is_causal=False)


def test_refuses_static_caches(tiny):
    m = tiny.model("llama", "causalmix")
    with pytest.raises(ValueError, match="static"):
        m.generate(tiny.ids(1, 8), max_new_tokens=2, do_sample=False, pad_token_id=0,
                   cache_implementation="static")


def test_refuses_a_static_cache_in_a_forward(tiny):
    m = tiny.model("llama", "causalmix")
    cache = transformers.StaticCache(config=m.config, max_cache_len=16)
    with pytest.raises(ValueError, match="static cache"):
        m(tiny.ids(1, 8), cache=cache, use_cache=True)


def test_refuses_mask_overlays(tiny):
    """Gemma 3 with bidirectional attention overlays a custom mask function on the causal one."""
    model = tiny.custom(transformers.Gemma3TextConfig, sliding_window=SW,
                  layer_types=["sliding_attention", "full_attention"],
                  use_bidirectional_attention=True).eval()
    with pytest.raises(ValueError, match="overlay"):
        model(tiny.ids(1, 8))


# ================================================================== ValidKeys (the padding spec)


def test_validkeys_mask_block_map_and_attention_match_the_formula():
    valid = torch.tensor([[0] * 5 + [1] * 58, [1] * 63, [1] * 60 + [0] * 3,
                          [1, 0] * 31 + [1]]).bool()
    spec = Causal() & ValidKeys(valid)
    i = torch.arange(63).view(63, 1)
    j = torch.arange(63).view(1, 63)
    want = (j <= i)[None] & valid[:, None, :]
    assert torch.equal(spec.mask(63, 63), want)
    dense_counts = want.view(4, 63, 63)
    counts = spec.tile_counts(63, 63, 16, 16)
    pad = torch.nn.functional.pad(dense_counts.long(), (0, 1, 0, 1))
    assert torch.equal(counts, pad.view(4, 4, 16, 4, 16).sum((2, 4)))
    assert ValidKeys(valid[:3]).key_range(torch.arange(4)) is not None
    assert ValidKeys(valid).key_range(torch.arange(4)) is None  # row 3 has holes
    assert ValidKeys(valid) == ValidKeys(valid.clone()) and hash(ValidKeys(valid)) == hash(
        ValidKeys(valid.long()))
    with pytest.raises(ValueError, match="valid must be"):
        ValidKeys(torch.ones(3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ValidKeys(torch.full((1, 3), 2))
    buf = valid.clone()
    vk = ValidKeys(buf)
    buf.fill_(False)  # the spec holds its own copy
    assert torch.equal(vk.valid, valid)
    vk.valid.fill_(True)  # and refuses to be used after its copy changed in place
    with pytest.raises(ValueError, match="modified in place"):
        vk.mask(4, 4)


@pytest.mark.parametrize("t,q_offset", [(1, 0), (7, 0), (63, 0), (113, 0), (7, 50)])
def test_validkeys_blocks_equal_reference_with_grads(t, q_offset):
    from causalmix import softmax_attention

    g = torch.Generator().manual_seed(t)
    tk = q_offset + t
    valid = torch.ones(3, tk, dtype=torch.bool)
    valid[0, : tk // 3] = False  # left padding
    valid[2, 1::4] = False  # holes
    spec = (Window(20, 3) | Prefix(4)) & ValidKeys(valid)

    def run(impl, dtype):
        q = torch.randn(3, t, 4, 8, generator=g).to(dtype).requires_grad_()
        k = torch.randn(3, tk, 2, 8, generator=g).to(dtype).requires_grad_()
        v = torch.randn(3, tk, 2, 8, generator=g).to(dtype).requires_grad_()
        out = softmax_attention(q, k, v, spec, q_offset=q_offset, impl=impl)
        out.backward(torch.ones_like(out))
        return [out, q.grad, k.grad, v.grad]

    res = {}
    for impl, dtype in (("reference", torch.float64), ("reference", torch.float32),
                        ("blocks", torch.float32)):
        g.manual_seed(t)
        res[(impl, dtype)] = run(impl, dtype)
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), res[("blocks", torch.float32)],
                             res[("reference", torch.float64)],
                             res[("reference", torch.float32)], strict=True):
        assert_close(a, r, b, name=name)
    rows_without_keys = ~spec.mask(t, tk, q_offset=q_offset).any(-1)  # [B, t]
    assert torch.all(res[("blocks", torch.float32)][0][rows_without_keys] == 0)


def test_segments_from_position_ids_follow_transformers():
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [1, 1, 0, 1, 2, 3, 4, 5, 6]])
    ours = Segments.from_position_ids(pos)
    theirs = find_packed_sequence_indices(pos)
    assert torch.equal(ours.mask(9, 9), (theirs[:, :, None] == theirs[:, None, :]))


# ================================================================== the examples


@pytest.mark.parametrize("name", ["hf_prefix_lm_finetune", "hf_bidirectional_embeddings",
                                  "hf_packed_training", "hf_hybrid_packed",
                                  "hf_hybrid_embeddings"])
def test_examples_run_on_a_tiny_random_model(name, monkeypatch, capsys):
    import importlib
    import pathlib
    import sys

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
    monkeypatch.setattr(sys, "argv", [name])
    importlib.import_module(name).main()  # each asserts what it demonstrates
    assert capsys.readouterr().out.strip()
