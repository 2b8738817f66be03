"""Hugging Face bridge: run a transformers decoder under any causalmix visibility spec.

Importing ``causalmix.hf`` registers ``attn_implementation="causalmix"`` in transformers'
``AttentionInterface`` *and* ``AttentionMaskInterface`` (:func:`register`, idempotent). The mask
function returns a small :class:`LayerMask` (the model's rule, the layer type's sliding window,
the 2-D padding mask, absolute offsets; O(T) memory) instead of a T x T tensor, and the attention
function composes the spec of each call and runs :func:`causalmix.softmax_attention` with the
queries at their absolute positions::

    import causalmix.hf
    from causalmix import Prefix
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="causalmix")
    out = model(input_ids, attention_mask=am, visibility=Prefix(16))   # prefix-LM forward
    model.generate(input_ids, visibility=Prefix(input_ids.shape[1]), max_new_tokens=20)
    causalmix.hf.attach(model, Prefix(16))           # or: switch a loaded model, set a default

Per call, ``visibility=`` replaces the model's causal rule and is composed with what the model
and the inputs impose: each layer's own sliding window (``j > i - sliding_window``, as in
transformers), packed sequences (``position_ids`` that restart, or ``cu_seq_lens_q`` / ``_k``
-> ``Segments``) and the padding mask (:class:`ValidKeys`). Without it, the model's own rule (or
the default given to :func:`attach` / :func:`set_visibility`) applies. What the bridge cannot
honour -- logit soft-capping, attention sinks, attention dropout in training,
``output_attentions=True``, a spec for another batch size, a prepared 4-D mask, mask overlays
(image tokens, ``block_sequence_ids``), chunked attention layers, static caches -- raises
``ValueError`` naming it.

This is the only module of causalmix that imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils.generic import TransformersKwargs

from causalmix.hf.bridge import (
    DEFAULT_ATTR,
    NAME,
    LayerMask,
    causalmix_attention,
    causalmix_mask,
    layer_visibility,
)
from causalmix.visibility import ValidKeys, Visibility

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "NAME",
    "LayerMask",
    "ValidKeys",
    "attach",
    "causalmix_attention",
    "causalmix_mask",
    "layer_visibility",
    "register",
    "set_visibility",
]


def register() -> str:
    """Register ``"causalmix"`` as both an attention and a mask implementation (idempotent),
    and declare ``visibility`` one of the model-agnostic keyword arguments transformers passes
    through ``generate()`` and ``forward()`` to the attention function (``TransformersKwargs``), so
    that ``model.generate(..., visibility=spec)`` works on a causalmix model without
    :func:`attach`. Returns the name to pass as ``attn_implementation``."""
    AttentionInterface.register(NAME, causalmix_attention)
    AttentionMaskInterface.register(NAME, causalmix_mask)
    keys = TransformersKwargs.__optional_keys__
    if "visibility" not in keys:
        TransformersKwargs.__optional_keys__ = frozenset(keys | {"visibility"})
    return NAME


def set_visibility(model: torch.nn.Module, visibility: Visibility | None) -> None:
    """Make ``visibility`` the model's default spec (used when a call passes no
    ``visibility=``); ``None`` restores the model's own rule."""
    if visibility is not None and not isinstance(visibility, Visibility):
        raise ValueError(
            f"visibility must be a causalmix spec or None, got {type(visibility).__name__}"
        )
    for m in model.modules():
        if visibility is None:
            m.__dict__.pop(DEFAULT_ATTR, None)
        else:
            m.__dict__[DEFAULT_ATTR] = visibility


def attach(model: PreTrainedModel, visibility: Visibility | None = None) -> PreTrainedModel:
    """Switch ``model`` to ``attn_implementation="causalmix"``, set its default spec (see
    :func:`set_visibility`) and let ``model.generate(..., visibility=spec)`` accept the keyword
    (transformers' ``generate`` refuses keywords its ``prepare_inputs_for_generation`` does not
    name; the instance gets a wrapper that names it and passes it on to every forward).
    Returns ``model``."""
    register()
    model.set_attn_implementation(NAME)
    set_visibility(model, visibility)
    prepare = model.prepare_inputs_for_generation
    if not getattr(prepare, "_causalmix", False):
        def prepare_inputs_for_generation(*args, visibility=None, **kwargs):
            inputs = prepare(*args, **kwargs)
            if visibility is not None:
                inputs["visibility"] = visibility
            return inputs

        params = list(inspect.signature(prepare).parameters.values())
        extra = inspect.Parameter("visibility", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((n for n, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        prepare_inputs_for_generation.__signature__ = inspect.Signature(
            params[:at] + [extra] + params[at:]
        )
        prepare_inputs_for_generation._causalmix = True
        model.prepare_inputs_for_generation = prepare_inputs_for_generation
    return model


register()
