"""Shared by the Hugging Face examples: a model (a tiny random Llama, or ``--model PATH``) and
batches of token ids (from the checkpoint's tokenizer, or random ids for the tiny model)."""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import causalmix.hf  # noqa: F401  (registers attn_implementation="causalmix")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a local transformers checkpoint (default: a tiny random Llama)")
    p.add_argument("--seed", type=int, default=0)
    return p


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)


def load(path: str | None, *, causal_lm: bool = True, seed: int = 0):
    """``(model, tokenizer or None)`` with ``attn_implementation="causalmix"``."""
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    if path is None:
        return cls.from_config(tiny_config(), attn_implementation="causalmix"), None
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.0  # the bridge refuses attention dropout in training
    model = cls.from_pretrained(path, config=config, attn_implementation="causalmix",
                                dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def encode(tokenizer, texts: list[str], vocab: int, lengths: list[int]) -> list[torch.Tensor]:
    """Token ids of each text (random ids of the given lengths without a tokenizer)."""
    if tokenizer is None:
        return [torch.randint(1, vocab, (n,)) for n in lengths]
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T])``, padded on the left."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, t - len(r):] = r
        mask[b, t - len(r):] = 1
    return ids, mask


def tiny_hybrid_config():
    """A tiny Qwen3-Next-style hybrid: Gated DeltaNet, attention, Gated DeltaNet layers."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                           linear_key_head_dim=16, linear_value_head_dim=16, num_experts=0,
                           attention_dropout=0.0,
                           layer_types=["linear_attention", "full_attention", "linear_attention"])


def load_hybrid(path: str | None, *, causal_lm: bool = True, seed: int = 0):
    """``(model, tokenizer or None)`` of a hybrid (a tiny random Qwen3-Next-style model, or the
    checkpoint at ``path``), ``attn_implementation="causalmix"``, its hybrid layers not yet
    attached."""
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    if path is None:
        return cls.from_config(tiny_hybrid_config(), attn_implementation="causalmix"), None
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.0
    model = cls.from_pretrained(path, config=config, attn_implementation="causalmix",
                                dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)
