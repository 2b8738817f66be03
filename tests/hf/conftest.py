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


# ================================================================== hybrid and state-space models

HYBRID_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     attention_dropout=0.0, pad_token_id=0, tie_word_embeddings=False)
MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2,
             mamba_chunk_size=8, mamba_expand=2)
GDN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
           linear_value_head_dim=16, linear_conv_kernel_dim=4,
           layer_types=["linear_attention", "full_attention"])
#: The hybrid layers causalmix serves, by model folder: (LM class, mixer class).
HYBRID_ARCHS = {
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Mixer"),
    "bamba": ("BambaForCausalLM", "BambaMixer"),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridMambaLayer"),
    "nemotron_h": ("NemotronHForCausalLM", "NemotronHMamba2Mixer"),
    "zamba2": ("Zamba2ForCausalLM", "Zamba2MambaMixer"),
    "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Mixer"),
    "falcon_h1_no_norm": ("FalconH1ForCausalLM", "FalconH1Mixer"),
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextGatedDeltaNet"),
    "qwen3_5": ("Qwen3_5ForCausalLM", "Qwen3_5GatedDeltaNet"),
    "olmo_hybrid": ("OlmoHybridForCausalLM", "OlmoHybridGatedDeltaNet"),
    "kimi_linear": ("KimiLinearForCausalLM", "KimiLinearDeltaAttention"),
}
MAMBA2_ARCHS = ["mamba2", "bamba", "granitemoehybrid", "nemotron_h", "zamba2", "falcon_h1",
                "falcon_h1_no_norm"]
GDN_ARCHS = ["qwen3_next", "qwen3_5", "olmo_hybrid"]
#: Kimi Linear: one KDA layer and one MLA attention layer.
KIMI = dict(num_hidden_layers=2, linear_num_heads=4, linear_head_dim=16, linear_conv_kernel_dim=4,
            num_experts=0, mlp_layer_types=["dense", "dense"],
            layer_types=["linear_attention", "full_attention"])


class HybridTiny:
    """Tiny random hybrid / state-space LMs (the ``hybrid`` fixture): every architecture
    causalmix serves with one hybrid layer and one attention layer (Mamba-2 itself: two Mamba-2
    layers; Nemotron-H adds an MLP layer), mixer parameters spread so that the state carries
    across many tokens (transformers' initialisation decays it within a few)."""

    ARCHS = list(HYBRID_ARCHS)

    @staticmethod
    def config(arch: str):
        t = transformers
        c = HYBRID_COMMON
        if arch == "mamba2":
            return t.Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_heads=8, head_dim=16,
                                  state_size=16, n_groups=2, num_hidden_layers=2, chunk_size=8,
                                  expand=2, tie_word_embeddings=False)
        if arch == "bamba":
            return t.BambaConfig(**c, **MAMBA, num_hidden_layers=2, attn_layer_indices=[1])
        if arch == "granitemoehybrid":
            return t.GraniteMoeHybridConfig(**c, **MAMBA, num_hidden_layers=2, num_local_experts=0,
                                            layer_types=["linear_attention", "full_attention"])
        if arch == "nemotron_h":
            return t.NemotronHConfig(**c, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                                     n_groups=2, chunk_size=8,
                                     layers_block_type=["linear_attention", "full_attention",
                                                        "mlp"])
        if arch == "zamba2":
            kw = {k: v for k, v in c.items() if k != "head_dim"}
            return t.Zamba2Config(**kw, num_hidden_layers=2, mamba_d_state=16, mamba_headdim=16,
                                  mamba_ngroups=2, n_mamba_heads=8, chunk_size=8,
                                  layers_block_type=["mamba", "hybrid"], num_mem_blocks=1)
        if arch.startswith("falcon_h1"):  # its muP scales, and with or without its norm
            kw = {k: v for k, v in MAMBA.items() if k != "mamba_expand"}
            return t.FalconH1Config(**c, **kw, num_hidden_layers=2, mamba_d_ssm=128,
                                    mamba_rms_norm=arch == "falcon_h1",
                                    mamba_norm_before_gate=False, ssm_in_multiplier=0.7,
                                    ssm_multipliers=[1.3, 0.8, 1.1, 0.9, 1.2])
        if arch == "qwen3_next":
            return t.Qwen3NextConfig(**c, **GDN, num_hidden_layers=2, num_experts=0)
        if arch == "qwen3_5":
            return t.Qwen3_5TextConfig(**c, **GDN, num_hidden_layers=2)
        if arch == "olmo_hybrid":
            return t.OlmoHybridConfig(**c, **GDN, num_hidden_layers=2, eos_token_id=None,
                                      linear_allow_neg_eigval=True)
        if arch == "kimi_linear":
            return t.KimiLinearConfig(**{**c, "num_key_value_heads": 4}, **KIMI)
        raise AssertionError(arch)

    @staticmethod
    def close(name: str, actual, ref, baselines) -> None:
        """``causalmix.testing.assert_close`` with the largest error of several same-precision
        baselines, each given as ``(baseline, its reference)`` (fp32 floor)."""
        from causalmix.testing import max_error

        base = max(max_error(b, r) for b, r in baselines)
        tol = 2 * base + 8 * torch.finfo(torch.float32).eps * max(1.0, float(ref.abs().max()))
        err = max_error(actual, ref)
        assert err <= tol, f"{name}: max error {err:.3g} exceeds 2 x baseline {base:.3g} + floor"

    @staticmethod
    def mixers(model) -> list:
        return [m for m in model.modules() if type(m).__name__ in
                {mixer for _, mixer in HYBRID_ARCHS.values()}]

    def model(self, arch: str, dtype=torch.float32,
              impl: str = "sdpa", seed: int = 0):
        """A fresh model of ``arch`` (same weights for every dtype and backend), eval mode."""
        torch.manual_seed(seed)
        kw = {} if arch == "mamba2" else {"attn_implementation": impl}  # no attention at all
        m = transformers.AutoModelForCausalLM.from_config(self.config(arch), **kw)
        m.generation_config.eos_token_id = None  # generate every step (random weights)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for mixer in self.mixers(m):
                gates = getattr(mixer, "forget_gate", mixer)  # KDA keeps them in its gate
                a_log, dt_bias = gates.A_log, gates.dt_bias
                a_log.copy_(torch.empty(a_log.shape).uniform_(0.1, 1.0, generator=g).log())
                dt_bias.copy_(torch.randn(dt_bias.shape, generator=g) * 0.5 - 1.5)
                if hasattr(mixer, "D"):
                    mixer.D.copy_(torch.randn(mixer.D.shape, generator=g))
                for lin in mixer.modules():
                    if isinstance(lin, (torch.nn.Linear, torch.nn.Conv1d)):
                        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
                if mixer.conv1d.bias is not None:
                    mixer.conv1d.bias.copy_(torch.randn(mixer.conv1d.bias.shape, generator=g) * 0.1)
        return m.to(dtype).eval()

    @staticmethod
    def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, VOCAB, (b, t), generator=g)


_HYBRID = HybridTiny()


@pytest.fixture
def hybrid() -> HybridTiny:
    return _HYBRID


@pytest.fixture
def kda_refused(monkeypatch):
    """Kimi Linear's KDA layers as a layer refused by name (``causalmix.hf.hybrid.REFUSED``):
    the refusal machinery, exercised now that no layer is refused for real."""
    from causalmix.hf import hybrid as hy

    key = ("kimi_linear", "KimiLinearDeltaAttention")
    monkeypatch.delitem(hy.SERVED, key)
    monkeypatch.setitem(hy.REFUSED, key, "refused for this test")
    return key
