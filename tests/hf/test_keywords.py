"""A ``visibility=`` is never silently ignored where the bridge can see it.

transformers passes unknown keywords through ``**kwargs`` to the model's attention function, and
``sdpa`` / ``eager`` ignore them; the bridge does not patch them process-wide. What is checked
instead (``causalmix.hf.model``): ``generate(visibility=)`` is refused on every model that is not
attached (the keyword is not declared for all models), and an attached model -- or one given a
default spec -- refuses a spec at every forward once any of its parts stops running causalmix.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Full, Prefix, Segments, Window  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402

GEN = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_register_does_not_make_visibility_a_keyword_of_every_model():
    from transformers.utils.generic import TransformersKwargs

    cmhf.register()
    assert "visibility" not in TransformersKwargs.__optional_keys__


@pytest.mark.parametrize("impl", ["sdpa", "eager", "causalmix"])
def test_generate_with_visibility_on_a_model_that_is_not_attached_raises(impl, tiny):
    model = tiny.fresh("llama", impl)
    with pytest.raises(ValueError, match="visibility"):
        model.generate(tiny.ids(1, 6), visibility=Full(), **GEN)
    cmhf.attach(model)
    assert model.generate(tiny.ids(1, 6), visibility=Prefix(6), **GEN).shape == (1, 8)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_an_attached_model_switched_back_refuses_a_spec_in_forward_and_generate(impl, tiny):
    model = cmhf.attach(tiny.fresh("llama", impl))
    ids = tiny.ids(2, 9)
    bidirectional = model(ids, visibility=Full()).logits
    causal = model(ids).logits
    assert not torch.allclose(bidirectional, causal)
    model.set_attn_implementation(impl)
    for call in (lambda: model(ids, visibility=Full()),
                 lambda: model.model(ids, visibility=Full()),  # the base model on its own
                 lambda: model.generate(ids, visibility=Full(), use_cache=False, **GEN)):
        with pytest.raises(ValueError, match=f"not every layer runs.*{impl}"):
            call()
    assert torch.allclose(model(ids).logits, causal, atol=1e-5)  # no spec: the model's own


def test_a_default_spec_is_checked_at_every_forward(tiny):
    model = cmhf.attach(tiny.fresh("llama", "sdpa"), Full())
    ids = tiny.ids(1, 7)
    out = model(ids).logits
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="not every layer"):
        model(ids)
    with pytest.raises(ValueError, match="not every layer"):
        model.generate(ids, use_cache=False, **GEN)
    cmhf.attach(model, Full())  # (attach without a spec clears the default)
    assert torch.equal(model(ids).logits, out)


def test_set_visibility_refuses_a_model_that_does_not_run_causalmix(tiny):
    model = tiny.fresh("llama", "sdpa")
    with pytest.raises(ValueError, match="attach"):
        cmhf.set_visibility(model, Full())
    cmhf.set_visibility(model, None)  # clearing is always fine


def test_detach_restores_the_backend_and_keeps_the_check(tiny):
    model = cmhf.attach(tiny.fresh("mistral", "sdpa"), Prefix(4))
    assert cmhf.backends(model) == {"": "causalmix"}
    cmhf.detach(model)
    assert cmhf.backends(model) == {"": "sdpa"}
    ids = tiny.ids(1, 7)
    ref = tiny.model("mistral", "sdpa")(ids).logits
    assert torch.equal(model(ids).logits, ref)  # no default spec left
    with pytest.raises(ValueError, match="visibility"):
        model.generate(ids, visibility=Full(), **GEN)  # transformers' own keyword check again
    with pytest.raises(ValueError, match="not every layer"):
        model(ids, visibility=Full())


def _llava():
    t = transformers
    text = t.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vision = t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, image_size=16, patch_size=8)
    cfg = t.LlavaConfig(text_config=text, vision_config=vision, image_token_index=96,
                        vision_feature_layer=-1)
    torch.manual_seed(0)
    return t.LlavaForConditionalGeneration(cfg).eval()


def test_a_model_whose_parts_run_different_backends_refuses_a_spec(tiny):
    """transformers sets attention implementations per sub-model (not per layer): a composite
    model with its vision tower on sdpa and its language model on causalmix refuses a spec."""
    model = cmhf.attach(_llava())
    assert set(cmhf.backends(model).values()) == {"causalmix"}
    ids = tiny.ids(1, 8)
    assert model(ids, visibility=Full()).logits.shape == (1, 8, 97)
    model.set_attn_implementation({"vision_config": "sdpa"})
    assert cmhf.backends(model)["model.vision_tower"] == "sdpa"
    with pytest.raises(ValueError, match=r"model\.vision_tower: 'sdpa'"):
        model(ids, visibility=Full())
    model(ids)  # no spec: fine


# ================================================================== copies and saved specs


def test_a_deep_copy_of_an_attached_model_runs_alone(tiny):
    """``copy.deepcopy`` after ``attach``: the copy keeps its default spec (a new valid tensor
    spec), gives the same logits, and its ``generate`` runs the copy's weights, not the
    original's."""
    spec = Prefix(torch.tensor([5, 3]))
    model = cmhf.attach(tiny.fresh("gemma3", "causalmix"), spec)
    twin = copy.deepcopy(model)
    ids = tiny.ids(2, 9)
    assert torch.equal(twin(ids).logits, model(ids).logits)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    prompt = tiny.ids(2, 5)
    gen = twin.generate(prompt, return_dict_in_generate=True, output_logits=True, **GEN)
    first = twin(prompt, use_cache=False).logits[:, -1]
    assert_close(gen.logits[0], first.double(), first, name="the copy's own weights")
    assert not torch.allclose(model(prompt).logits[:, -1], first)
    assert torch.equal(model(ids).logits, model(ids, visibility=spec).logits)


def test_specs_survive_torch_save_and_load():
    for spec in (Prefix(torch.tensor([4, 2])), Segments(torch.tensor([0, 0, 1, 1, 1])) & Full(),
                 Prefix(3)):
        buf = io.BytesIO()
        torch.save(spec, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded == spec and hash(loaded) == hash(spec)
        assert torch.equal(loaded.mask(5, 5), spec.mask(5, 5))


# ================================================================== hybrid models


def _qwen3_next(impl="causalmix"):
    cfg = transformers.Qwen3NextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, num_experts=0, attention_dropout=0.0,
        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def test_a_spec_on_a_hybrid_model_whose_linear_layers_would_ignore_it_raises(tiny, hybrid,
                                                                             kda_refused):
    """Without attach, Qwen3-Next's Gated DeltaNet layers do not run through causalmix: a spec
    other than Causal() would reach the attention layers only, so it is refused. Attached, they
    do (tests/hf/test_hybrid.py); a layer refused by name (Kimi Linear's KDA made one here)
    does not, and a spec is refused on such an attached model -- on a forward, through the
    base model, as a default, and in generate."""
    model = _qwen3_next()
    ids = tiny.ids(1, 9)
    for spec in (Full(), Prefix(4), Segments(torch.tensor([0] * 4 + [1] * 5))):
        with pytest.raises(ValueError, match=r"\['linear_attention'\]"):
            model(ids, visibility=spec)
    assert torch.equal(model(ids, visibility=Causal()).logits, model(ids).logits)
    cmhf.attach(model)
    model.model(ids, visibility=Full())
    kimi = cmhf.attach(hybrid.model("kimi_linear", impl="causalmix"))
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention.*linear_attention"):
        kimi.model(ids, visibility=Full())
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention"):
        kimi.generate(ids, visibility=Prefix(9), **GEN)
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention"):
        cmhf.attach(kimi, Full())(ids)
    cmhf.set_visibility(kimi, None)
    cmhf.set_visibility(model, None)
    sdpa = _qwen3_next("sdpa")
    assert torch.allclose(model(ids).logits, sdpa(ids).logits, atol=1e-5)


def test_a_state_space_model_refuses_a_spec_until_attached():
    """Mamba-2 has no attention layer at all: before attach nothing of causalmix runs in it;
    attached, its mixers run through causalmix (tests/hf/test_hybrid.py), so a spec reaches
    them, on the LM and on the backbone alike; one the family cannot serve is refused."""
    cfg = transformers.Mamba2Config(vocab_size=97, hidden_size=64, num_heads=8, head_dim=16,
                                    state_size=16, n_groups=2, num_hidden_layers=2,
                                    chunk_size=8, expand=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(1, 97, (1, 6))
    causal = model.backbone(ids).last_hidden_state
    cmhf.attach(model)
    full = model.backbone(ids, visibility=Full()).last_hidden_state
    assert not torch.allclose(full[:, :-1], causal[:, :-1], atol=1e-4)
    assert torch.allclose(model.backbone(ids, visibility=Causal()).last_hidden_state, causal,
                          atol=1e-5)
    with pytest.raises(ValueError, match="Mamba2Mixer.*Window"):
        model.backbone(ids, visibility=Window(2))
