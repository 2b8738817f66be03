"""Hugging Face bridge: run a transformers model under any causalmix visibility spec.

Importing ``causalmix.hf`` registers ``attn_implementation="causalmix"`` in transformers'
``AttentionInterface`` *and* ``AttentionMaskInterface`` (:func:`register`, idempotent; nothing
else in transformers changes). The mask function returns a small :class:`LayerMask` (the
model's rule, the layer type's sliding window, the 2-D padding mask, absolute offsets; O(T)
memory) instead of a T x T tensor, and the attention function composes the spec of each call
and runs :func:`causalmix.softmax_attention` with the queries at their absolute positions::

    import causalmix.hf
    from causalmix import Prefix
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="causalmix")
    out = model(input_ids, attention_mask=am, visibility=Prefix(16))   # prefix-LM forward
    causalmix.hf.attach(model)                       # per model: generate() takes visibility=
    model.generate(input_ids, visibility=Prefix(input_ids.shape[1]), max_new_tokens=20)
    causalmix.hf.attach(model, Prefix(16))           # or: switch a loaded model, set a default

What a spec means per attention kind:

* **self-attention** of a decoder-only or encoder-only model, and the decoder's self-attention
  of an encoder-decoder model: ``visibility=`` replaces the model's rule and is composed with
  what the model and the inputs impose: each layer's own sliding window (``j > i - w`` under a
  causal mask, ``|i - j| <= w`` under a bidirectional one, as in transformers), packed
  sequences (``position_ids`` that restart, or ``cu_seq_lens_q`` / ``_k`` -> ``Segments``) and
  the padding mask (:class:`ValidKeys`). Without it, the model's own rule (or the default given
  to :func:`attach` / :func:`set_visibility`) applies.
* **encoder self-attention and cross-attention** of an encoder-decoder model (BART-style): the
  model's rule, whatever ``visibility=`` says (every key but padding, and the layer's window).
* **with a cache** (``generate``, ``past_key_values``): exact only when no cached position may
  see a later one -- ``Causal()``, ``Prefix(n)`` with n <= the prompt, ``Window(left, 0)``,
  ``Segments & those``; judged from the spec at every step, anything else raises
  ``ValueError`` before a stale number is returned (``use_cache=False`` recomputes instead).

**Hybrid and state-space layers** (:mod:`causalmix.hf.hybrid`): :func:`attach` also runs the
model's Mamba-2 layers (Mamba-2, Bamba, Granite 4 hybrids, Nemotron-H, Zamba2, Falcon-H1) and
Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) and Kimi Linear's KDA layers through
causalmix's linear and delta families, per instance, under the same spec: documents restart the
state and the short convolution, padding is exact anywhere, ``Full`` / ``Prefix`` / ``Chunked``
add the reverse scan (the convolution stays causal), generation carries both states in
transformers' own cache.

What the bridge cannot honour -- logit soft-capping, attention sinks, attention dropout in
training, ``output_attentions=True``, a spec for another batch size, a prepared 4-D mask, mask
overlays (image tokens, ``block_sequence_ids``), chunked attention layers, static caches, a spec
other than ``Causal()`` or packed documents on a model whose hybrid / state-space layers
causalmix does not run (:func:`check_spec_reaches_every_layer`,
:func:`check_documents_stay_apart`) -- raises ``ValueError`` naming it. A ``visibility=``
passed to a model that does not run causalmix is ignored by transformers itself;
:mod:`causalmix.hf.model` says what is checked instead.

This is the only module of causalmix that imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

from causalmix.hf.attention import (
    NAME,
    SERVED_LAYER_TYPES,
    causalmix_attention,
    check_cache_is_exact,
    check_documents_stay_apart,
    check_spec_reaches_every_layer,
    layer_visibility,
    packed_segments,
    unserved_layer_types,
)
from causalmix.hf.mask import LayerMask, causalmix_mask
from causalmix.hf.model import (
    GenerationInputs,
    attach,
    backends,
    detach,
    register,
    set_visibility,
)
from causalmix.visibility import ValidKeys

__all__ = [
    "NAME",
    "SERVED_LAYER_TYPES",
    "GenerationInputs",
    "LayerMask",
    "ValidKeys",
    "attach",
    "backends",
    "causalmix_attention",
    "causalmix_mask",
    "check_cache_is_exact",
    "check_documents_stay_apart",
    "check_spec_reaches_every_layer",
    "detach",
    "layer_visibility",
    "packed_segments",
    "register",
    "set_visibility",
    "unserved_layer_types",
]

register()
