"""Scaffolding of the Hugging Face bridge tests: tiny random-initialised transformers models,
built from configs in the test (no download), one per (family, backend, dtype), same weights for
every backend.

Families: Llama (full attention), Qwen3 (layer 0 full, layer 1 sliding), Mistral (every layer
sliding, window 5 < T) and Gemma 3 text (layer 0 sliding, layer 1 full).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              attention_dropout=0.0, tie_word_embeddings=False)
SW = 5  # sliding window of the sliding families, shorter than every sequence of the tests
FAMILIES = ["llama", "qwen3", "mistral", "gemma3"]


class Tiny:
    """Builders shared by the tests of ``tests/hf`` (the ``tiny`` fixture)."""

    VOCAB, COMMON, SW, FAMILIES = VOCAB, COMMON, SW, FAMILIES

    def __init__(self):
        self._models: dict = {}

    @staticmethod
    def config(family: str):
        t = transformers
        if family == "llama":
            return t.LlamaConfig(**COMMON)
        if family == "qwen3":
            return t.Qwen3Config(**COMMON, use_sliding_window=True, sliding_window=SW,
                                 max_window_layers=1)  # layer 0 full, layer 1 sliding
        if family == "mistral":
            return t.MistralConfig(**COMMON, sliding_window=SW)
        if family == "gemma3":
            return t.Gemma3TextConfig(**COMMON, sliding_window=SW,
                                      layer_types=["sliding_attention", "full_attention"])
        raise AssertionError(family)

    def model(self, family: str, impl: str, dtype=torch.float32):
        """One random-initialised LM per family (same weights for every backend), eval mode,
        shared by the tests: do not change it (``fresh`` gives a private one)."""
        key = (family, impl, dtype)
        if key not in self._models:
            self._models[key] = self.fresh(family, impl, dtype)
        return self._models[key]

    def fresh(self, family: str, impl: str, dtype=torch.float32):
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(self.config(family),
                                                          attn_implementation=impl)
        assert m.config._attn_implementation == impl  # each model has its own config
        return m.to(dtype).eval()

    @staticmethod
    def custom(cls, impl: str = "causalmix", **kw):
        """A model of config class ``cls`` with the common sizes and ``kw``."""
        torch.manual_seed(0)
        cfg = cls(**{**COMMON, **kw})
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)

    @staticmethod
    def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, VOCAB, (b, t), generator=g)

    @staticmethod
    def left_padding(b: int, t: int, pads: list[int]) -> torch.Tensor:
        am = torch.ones(b, t, dtype=torch.long)
        for r, p in enumerate(pads):
            am[r, :p] = 0
        return am


_TINY = Tiny()


@pytest.fixture
def tiny() -> Tiny:
    return _TINY
