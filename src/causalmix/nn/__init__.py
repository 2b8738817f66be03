"""nn.Modules: attention layers (softmax / linear / gated linear / Gated DeltaNet / GLA / KDA
mixers) under a visibility spec, pre-norm blocks, and a small sequence model with per-layer
visibility; typed configs with presets, and the tagged dict form of a spec
(:func:`spec_to_dict` / :func:`spec_from_dict`); ``SequenceModel.generate`` decodes on the
model stream (:mod:`causalmix.nn.generate`)."""

from causalmix.nn.config import (
    MIXERS,
    PRESETS,
    AttentionConfig,
    BlockConfig,
    ModelConfig,
    head_decays,
    impl_choices,
    spec_from_dict,
    spec_to_dict,
)
from causalmix.nn.delta import DeltaMixer
from causalmix.nn.gated import GatedMixer
from causalmix.nn.generate import Generation
from causalmix.nn.gla import GLAMixer
from causalmix.nn.kda import KDAMixer
from causalmix.nn.layers import (
    Attention,
    Block,
    ModelBase,
    SequenceModel,
    feature_map,
    rotary,
)
from causalmix.nn.mixing import MixingLayer, mix

__all__ = [
    "MIXERS",
    "PRESETS",
    "Attention",
    "AttentionConfig",
    "Block",
    "BlockConfig",
    "DeltaMixer",
    "GLAMixer",
    "GatedMixer",
    "Generation",
    "KDAMixer",
    "MixingLayer",
    "ModelBase",
    "ModelConfig",
    "SequenceModel",
    "feature_map",
    "head_decays",
    "impl_choices",
    "mix",
    "rotary",
    "spec_from_dict",
    "spec_to_dict",
]
