"""The mask function reads the rule off transformers' own mask functions, and refuses what is
not a plain causal / bidirectional rule with a sliding window."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

from causalmix.hf import LayerMask, causalmix_mask, layer_visibility  # noqa: E402


def _mask(fn, *, t=12, q_offset=0, q=None, local_size=None, config=None) -> LayerMask:
    q = t - q_offset if q is None else q
    return causalmix_mask(2, q, q_offset + q, q_offset=q_offset, mask_function=fn,
                          local_size=local_size, config=config)


def _dense(fn, t):
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return torch.as_tensor(fn(0, 0, i, j)).expand(t, t)


@pytest.mark.parametrize("q_offset", [0, 5, 11])
@pytest.mark.parametrize("case", ["causal", "sliding", "full", "bidirectional_sliding"])
def test_transformers_rules_are_read_off_and_rebuilt_exactly(case, q_offset):
    w = 3
    fn, local = {
        "causal": (mu.causal_mask_function, None),
        "sliding": (mu.sliding_window_causal_mask_function(w), w),
        "full": (mu.bidirectional_mask_function, None),
        "bidirectional_sliding": (mu.sliding_window_bidirectional_mask_function(w), w),
    }[case]
    t = 12
    mask = _mask(fn, t=t, q_offset=q_offset, local_size=local)
    assert mask.rule == ("full" if case in ("full", "bidirectional_sliding") else "causal")
    assert mask.window == local
    spec = layer_visibility(mask, causal=mask.rule == "causal",
                            sliding_window=None if local is None else local + (case[0] == "b"))
    want = _dense(fn, t)[q_offset:]
    assert torch.equal(spec.mask(t - q_offset, t, q_offset=q_offset)[0], want)


def test_overlays_and_wrong_windows_are_refused():
    extra = mu.or_masks(mu.causal_mask_function, lambda b, h, i, j: (i == 7) & (j == 8))
    with pytest.raises(ValueError, match="next key"):
        _mask(extra)
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1]] * 2)
    image = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks))
    with pytest.raises(ValueError, match="overlay"):
        _mask(image)
    with pytest.raises(ValueError, match="outside its window"):  # a window of 4 told as 3
        _mask(mu.sliding_window_causal_mask_function(4), local_size=3)
    with pytest.raises(ValueError, match="outside its window"):
        _mask(mu.sliding_window_bidirectional_mask_function(4), local_size=3)
    with pytest.raises(ValueError, match="inside its window"):
        _mask(mu.sliding_window_bidirectional_mask_function(2), local_size=3)
    with pytest.raises(ValueError, match="itself"):
        _mask(lambda b, h, i, j: j < i)
    with pytest.raises(ValueError, match="sliding window of 0"):
        _mask(mu.causal_mask_function, local_size=0)


def test_encoder_decoder_bidirectional_masks_keep_the_models_rule():
    bart = transformers.BartConfig()
    cross = causalmix_mask(2, 3, 9, mask_function=mu.bidirectional_mask_function, config=bart)
    assert cross.model_rule_only and cross.rule == "full"
    decoder = causalmix_mask(2, 3, 3, mask_function=mu.causal_mask_function, config=bart)
    assert not decoder.model_rule_only
    llama = causalmix_mask(2, 3, 3, mask_function=mu.bidirectional_mask_function,
                           config=transformers.LlamaConfig())
    assert not llama.model_rule_only
