"""Generation with the model's own cache through the hybrid layers causalmix runs: under
``Causal()`` and ``Prefix(n <= prompt)`` every step equals a recompute without a cache (fp64
reference, fp32 baseline), with the conv and recurrent states carried in transformers' own cache
object and layout; specs that a cache cannot serve exactly raise before anything is returned."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix, Segments  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402

P, STEPS = 7, 4
DOCS = torch.tensor([0] * 9 + [1] * 2)  # the second document starts at the 3rd new token


def _generate(model, ids, spec, **kw):
    return model.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                          visibility=spec, return_dict_in_generate=True, output_logits=True,
                          **kw)


def _assert_equals_recompute(ours, ours64, out, spec, am=None):
    seq = out.sequences
    assert seq.shape[1] == P + STEPS
    for s in range(STEPS):
        kw = dict(use_cache=False, visibility=spec)
        if am is not None:
            kw["attention_mask"] = torch.nn.functional.pad(am, (0, s), value=1)
        ref = ours64(seq[:, :P + s], **kw).logits[:, -1]
        base = ours(seq[:, :P + s], **kw).logits[:, -1]
        assert_close(out.logits[s], ref, base, name=f"{spec!r} step {s}")
        assert torch.equal(seq[:, P + s], base.argmax(-1))


CASES = [("mamba2", Causal()), ("mamba2", Prefix(P)), ("mamba2", Prefix(4)),
         ("mamba2", Segments(DOCS) & Causal()), ("bamba", Causal()), ("bamba", Prefix(P)),
         ("zamba2", Prefix(P)), ("nemotron_h", Causal()), ("qwen3_next", Causal()),
         ("qwen3_next", Prefix(P)), ("qwen3_5", Segments(DOCS) & Causal()),
         ("olmo_hybrid", Prefix(4)), ("falcon_h1_no_norm", Prefix(P)),
         ("kimi_linear", Causal()), ("kimi_linear", Prefix(P)), ("kimi_linear", Prefix(4)),
         ("kimi_linear", Segments(DOCS) & Causal())]


@pytest.mark.parametrize(("arch", "spec"), CASES, ids=lambda c: repr(c))
def test_generate_with_the_cache_equals_recompute(arch, spec, hybrid):
    ours = cmhf.attach(hybrid.model(arch))
    ours64 = cmhf.attach(hybrid.model(arch, torch.float64))
    ids = hybrid.ids(2, P, seed=11)
    with torch.no_grad():
        _assert_equals_recompute(ours, ours64, _generate(ours, ids, spec), spec)


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "qwen3_next", "kimi_linear"])
def test_generate_with_left_padding_and_a_prefix(arch, hybrid):
    ours = cmhf.attach(hybrid.model(arch))
    ours64 = cmhf.attach(hybrid.model(arch, torch.float64))
    ids, am = hybrid.ids(2, P, seed=12), torch.ones(2, P, dtype=torch.long)
    am[1, :3] = 0
    with torch.no_grad():
        out = _generate(ours, ids, Prefix(P), attention_mask=am)
        _assert_equals_recompute(ours, ours64, out, Prefix(P), am=am)
        causal = _generate(ours, ids, Causal(), attention_mask=am)
    assert not torch.allclose(causal.logits[0], out.logits[0], atol=1e-4)


@pytest.mark.parametrize("arch", ["mamba2", "qwen3_next", "kimi_linear"])
@pytest.mark.parametrize("spec", [Full(), Chunked(4), Prefix(P + 2), Segments(DOCS)], ids=repr)
def test_specs_a_cache_cannot_serve_are_refused(arch, spec, hybrid):
    model = cmhf.attach(hybrid.model(arch))
    with pytest.raises(ValueError, match="stale"):
        _generate(model, hybrid.ids(1, P), spec)


@pytest.mark.parametrize("arch", ["bamba", "qwen3_next", "kimi_linear"])
def test_the_cache_holds_the_models_own_layout_and_numbers(arch, hybrid):
    """After a causal prefill, the conv and recurrent states causalmix wrote equal those the
    model's own path writes (same object type, shapes, dtypes); under packed documents the
    conv state holds the last document's inputs only."""
    own, own64 = hybrid.model(arch), hybrid.model(arch, torch.float64)
    ours64 = cmhf.attach(copy.deepcopy(own64))
    ours = cmhf.attach(copy.deepcopy(own))
    ids = hybrid.ids(2, 13)
    with torch.no_grad():
        caches = [m(ids, use_cache=True).cache for m in (ours, ours64, own)]
    for get in ("get_conv_state", "get_recurrent_state"):
        a, r, b = (getattr(c, get)(0) for c in caches)
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype, get
        assert_close(a, r, b, name=get)
    with torch.no_grad():
        packed = ours(ids[:1], use_cache=True,
                      position_ids=torch.cat([torch.arange(11), torch.arange(2)])[None]).cache
        alone = ours(ids[:1, 11:], use_cache=True).cache
    assert_close(packed.get_conv_state(0), alone.get_conv_state(0), alone.get_conv_state(0))
    assert_close(packed.get_recurrent_state(0), alone.get_recurrent_state(0),
                 alone.get_recurrent_state(0))


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "qwen3_next", "kimi_linear"])
@pytest.mark.parametrize("spec", [Causal(), Prefix(3)], ids=repr)
def test_a_prompt_split_in_two_calls_equals_the_whole(arch, spec, hybrid):
    """Chunked prefill: a second multi-token call continues the first call's cache (state,
    convolution window and positions) exactly."""
    ours = cmhf.attach(hybrid.model(arch))
    ours64 = cmhf.attach(hybrid.model(arch, torch.float64))
    ids = hybrid.ids(2, 13, seed=4)
    with torch.no_grad():
        first = ours(ids[:, :5], use_cache=True, visibility=spec)
        pos = torch.arange(5, 13)[None]  # Bamba would restart them at 0 in the second call
        second = ours(ids[:, 5:], cache=first.cache, use_cache=True, visibility=spec,
                      position_ids=pos).logits
        ref = ours64(ids, visibility=spec).logits[:, 5:]
        base = ours(ids, visibility=spec).logits[:, 5:]
    assert_close(second, ref, base, name=f"{arch} {spec!r}")
