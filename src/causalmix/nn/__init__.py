"""nn.Modules: attention layers (softmax / linear mixers) under a visibility spec, pre-norm
blocks, and a small sequence model with per-layer visibility."""

from causalmix.nn.config import (
    PRESETS,
    AttentionConfig,
    BlockConfig,
    ModelConfig,
    head_decays,
)
from causalmix.nn.layers import Attention, Block, SequenceModel, feature_map, mix, rotary

__all__ = [
    "PRESETS",
    "Attention",
    "AttentionConfig",
    "Block",
    "BlockConfig",
    "ModelConfig",
    "SequenceModel",
    "feature_map",
    "head_decays",
    "mix",
    "rotary",
]
