"""Generation under a spec: with a cache it is exact, or it raises -- never stale numbers.

A cached position's keys and values were computed when the later positions did not exist, so a
cache is exact only if no cached position may see a later one. The sweep below runs every kind
of spec through ``generate`` with the model's cache and checks each step's logits against a
recompute of the whole sequence without a cache (fp64 reference, fp32 baseline, the project's
tolerance rule), or that ``generate`` raises the cache refusal and returns nothing. Without a
cache (``use_cache=False``) every spec generates, equal to the recompute at every step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix, Segments, Window  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402
from causalmix.visibility import Visibility  # noqa: E402

P, STEPS = 6, 4  # prompt length, generated tokens
DOCS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])  # two documents over P + STEPS positions


@dataclasses.dataclass(frozen=True)
class Dilated(Visibility):
    """A user spec without a key range: causal, every other key (declares lookahead 0)."""

    def visible(self, b, i, j):
        return (j <= i) & ((i - j) % 2 == 0)

    @property
    def lookahead_frames(self):
        return 0


@dataclasses.dataclass(frozen=True)
class Later(Visibility):
    """A user spec that declares nothing: sees itself and the key 2 ahead (stale with a cache)."""

    def visible(self, b, i, j):
        return (j == i) | (j == i + 2)


# name -> (spec, exact with a cache?)
SPECS = {
    "causal": (Causal(), True),
    "prefix_shorter": (Prefix(4), True),
    "prefix_equal": (Prefix(P), True),
    "prefix_longer": (Prefix(P + 4), False),
    "prefix_per_row": (Prefix(torch.tensor([P, 2])), True),
    "prefix_per_row_longer": (Prefix(torch.tensor([P, P + 1])), False),
    "full": (Full(), False),
    "chunked": (Chunked(4), False),
    "chunked_aligned": (Chunked(3), False),  # prompt ends a chunk: the 2nd new token is stale
    "chunked_lookahead": (Chunked(2, lookahead=1), False),
    "window_left": (Window(3, 0), True),
    "window_right": (Window(2, 2), False),
    "segments_causal": (Segments(DOCS) & Causal(), True),
    "segments_prefix": (Segments(DOCS) & Prefix(P), True),
    "segments": (Segments(DOCS), False),
    "prefix_or_window": (Prefix(3) | Window(2, 0), True),
    "user_dilated": (Dilated(), True),
    "user_later": (Later(), False),
}


def _generate(model, ids, spec, **kw):
    return model.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                          visibility=spec, return_dict_in_generate=True, output_logits=True,
                          **kw)


def _assert_equals_recompute(tiny, family, out, spec, am=None):
    """Each step's logits == a recompute without cache; each token == the baseline's argmax."""
    ref_model = tiny.model(family, "causalmix", torch.float64)
    base_model = tiny.model(family, "causalmix")
    seq = out.sequences
    assert seq.shape[1] == P + STEPS
    for s in range(STEPS):
        prefix = seq[:, : P + s]
        mask = None if am is None else torch.nn.functional.pad(am, (0, s), value=1)
        ref = ref_model(prefix, attention_mask=mask, use_cache=False, visibility=spec).logits
        base = base_model(prefix, attention_mask=mask, use_cache=False, visibility=spec).logits
        assert_close(out.logits[s], ref[:, -1], base[:, -1], name=f"{family} step {s}")
        assert torch.equal(seq[:, P + s], base[:, -1].argmax(-1))


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("name", list(SPECS))
def test_generate_with_a_cache_equals_recompute_or_refuses(family, name, tiny):
    spec, exact = SPECS[name]
    model = cmhf.attach(tiny.model(family, "causalmix"))
    ids = tiny.ids(2, P, seed=11)
    if exact:
        _assert_equals_recompute(tiny, family, _generate(model, ids, spec), spec)
    else:
        with pytest.raises(ValueError, match="stale") as info:
            _generate(model, ids, spec)
        assert "use_cache=False" in str(info.value) and "Prefix(n)" in str(info.value)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["prefix_longer", "full", "chunked_aligned", "window_right",
                                  "segments", "user_later", "causal"])
def test_generate_without_a_cache_recomputes_every_step(family, name, tiny):
    spec, _ = SPECS[name]
    model = cmhf.attach(tiny.model(family, "causalmix"))
    ids = tiny.ids(2, P, seed=12)
    _assert_equals_recompute(tiny, family, _generate(model, ids, spec, use_cache=False), spec)


def test_generate_with_left_padding_and_a_per_row_prefix(tiny):
    """Rows padded on the left: Prefix(n) per row with n <= the padded prompt is exact; the
    prefix really is read bidirectionally (not the causal run)."""
    model = cmhf.attach(tiny.model("gemma3", "causalmix"))
    ids = tiny.ids(2, P, seed=13)
    am = tiny.left_padding(2, P, [2, 0])
    spec = Prefix(torch.tensor([P, P - 1]))
    out = _generate(model, ids, spec, attention_mask=am)
    _assert_equals_recompute(tiny, "gemma3", out, spec, am=am)
    causal = _generate(model, ids, Causal(), attention_mask=am)
    assert not torch.allclose(causal.logits[0], out.logits[0])


def test_a_default_prefix_longer_than_the_prompt_refuses_and_a_long_prompt_is_exact(tiny):
    """``attach(model, Prefix(16))``: prompts shorter than 16 would be stale with a cache."""
    model = cmhf.attach(tiny.fresh("llama", "causalmix"), Prefix(16))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"Prefix\(16\).*stale"):
        model.generate(tiny.ids(1, 9), **kw)
    ids = tiny.ids(1, 17)
    out = model.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    for s in range(3):
        full = model(out.sequences[:, : 17 + s], use_cache=False).logits[:, -1]
        assert_close(out.logits[s], full.double(), full, name=f"step {s}")
    assert torch.equal(model.generate(ids, use_cache=False, **kw), out.sequences)


def test_a_manual_decode_loop_with_past_key_values_refuses_a_stale_step(tiny):
    model = tiny.model("llama", "causalmix")
    ids = tiny.ids(1, P)
    first = model(ids, visibility=Full(), use_cache=True)  # a forward alone is fine
    nxt = first.logits[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match=r"Full\(\).*stale"):
        model(nxt, cache=first.cache, visibility=Full(), use_cache=True)
    ok = model(ids, visibility=Prefix(P), use_cache=True)
    step = model(nxt, cache=ok.cache, visibility=Prefix(P), use_cache=True)
    whole = model(torch.cat([ids, nxt], 1), visibility=Prefix(P), use_cache=False).logits
    assert_close(step.logits[:, -1], whole[:, -1].double(), whole[:, -1], name="decode step")


def test_a_bidirectional_model_refuses_generation_with_a_cache(tiny):
    """The model's own bidirectional rule (``config.is_causal=False``) is stale with a cache
    too; without one it generates."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**tiny.COMMON, is_causal=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="causalmix")
    model.eval()
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="bidirectional rule.*stale"):
        model.generate(tiny.ids(1, P), **kw)
    assert model.generate(tiny.ids(1, P), use_cache=False, **kw).shape == (1, P + 2)


def test_check_cache_is_exact_judges_specs_through_the_protocol(tiny):
    """The public check on its own: the same spec is exact after a long prompt and stale after
    a short one; a spec declaring lookahead 0 is never counted."""
    from causalmix.hf import LayerMask, check_cache_is_exact

    def mask(cached, new=1):
        return LayerMask(rule="causal", window=None, padding=None, batch_size=1, q_length=new,
                         kv_length=cached + new, q_offset=cached, kv_offset=0)

    check_cache_is_exact(Prefix(8), mask(8), "Prefix(8)")
    check_cache_is_exact(Prefix(8), mask(0, 5), "a prefill")  # nothing cached
    with pytest.raises(ValueError, match="new position 7"):
        check_cache_is_exact(Prefix(8), mask(7), "Prefix(8)")
    with pytest.raises(ValueError, match=r"the new positions 9\.\.12"):
        check_cache_is_exact(Chunked(4, lookahead=1), mask(9, 4), "Chunked")
    check_cache_is_exact(Dilated(), mask(100), "Dilated")
