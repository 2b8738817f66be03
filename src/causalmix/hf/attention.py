"""The attention function registered as ``"causalmix"``: the spec of one layer's call, then
:func:`causalmix.softmax_attention` at absolute positions.

The spec of a self-attention call is composed from what the :class:`~causalmix.hf.LayerMask`
and the keywords say::

    visibility (or the model's rule)  &  the layer type's sliding window
                                      &  Segments(from position_ids)       (packed sequences)
                                      &  ValidKeys(attention_mask)         (padding)

The bidirectional layers of an encoder-decoder model (encoder self-attention, cross-attention)
keep the model's rule: every key visible but padding (and the layer's window), whatever
``visibility=`` says -- their keys are another sequence, or not the one the spec is about.

With a cache, the queries of a call are new positions after ``q_offset`` cached ones. The
cached keys and values were computed before the new positions existed, so they are exact only
if no cached position may see a new one; :func:`check_cache_is_exact` asks the spec (exactly,
through its tile counts) at every step and refuses otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from causalmix.caching import LRUCache
from causalmix.hf.mask import LayerMask
from causalmix.ops.softmax import softmax_attention
from causalmix.visibility import Causal, Full, Segments, ValidKeys, Visibility, Window

__all__ = ["DEFAULT_ATTR", "NAME", "SERVED_ATTR", "SERVED_LAYER_TYPES", "causalmix_attention",
           "check_cache_is_exact", "check_documents_stay_apart",
           "check_spec_reaches_every_layer", "layer_visibility",
           "packed_segments", "unserved_layer_types"]

#: The name registered as an attention and a mask implementation (``attn_implementation=``).
NAME = "causalmix"

#: Attribute holding a model's default spec on each of its modules (see ``attach``).
DEFAULT_ATTR = "causalmix_visibility"
#: Attribute holding, on each module of an attached model, the layer types outside
#: :data:`SERVED_LAYER_TYPES` whose layers causalmix runs there (``causalmix.hf.hybrid``).
SERVED_ATTR = "causalmix_served_layer_types"
#: Attribute holding, on each module of an attached model, the keywords of the model call in
#: progress (``causalmix.hf.hybrid.context.CallContext``: ``top()`` gives them as a dict).
CONTEXT_ATTR = "causalmix_hybrid_context"
#: The keyword under which an attached model's decoder layers pass those keywords down (a
#: gradient-checkpointed layer runs again in the backward pass, after the model call).
CALL_KEYWORD = "causalmix_call"

#: Why only some specs can be generated with a cache (said by every refusal).
CACHE_RULE = (
    "A cache is exact only when no cached position may see a later one: Causal(), Prefix(n) "
    "with n <= the prompt length, Window(left, 0), Segments(...) & one of those (judged from the "
    "spec at every step). Pass use_cache=False to recompute every step instead"
)


#: Layer types (``config.layer_types``) whose every layer runs the attention function; any other
#: (``"linear_attention"``: Gated DeltaNet, KDA, Mamba-2; ``"conv"``; ``"hybrid"``; sparse
#: indexers) has a token mixer causalmix does not run.
SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})


def unserved_layer_types(config, served: frozenset[str] = frozenset()) -> list[str]:
    """The layer types of ``config`` whose token mixer does not go through causalmix (``served``:
    the types an attached model runs through :mod:`causalmix.hf.hybrid`)."""
    types = getattr(config, "layer_types", None) or ()
    return sorted({str(t) for t in types} - SERVED_LAYER_TYPES - set(served))


def check_spec_reaches_every_layer(config, visibility: Visibility | None,
                                   served: frozenset[str] = frozenset()) -> None:
    """A spec other than ``Causal()`` on a model with layers causalmix does not run (hybrid and
    state-space layers keep their own causal scan) would reach its attention layers only:
    ``ValueError`` naming the layer types. ``served``: the layer types an attached model runs
    through causalmix (:func:`causalmix.hf.attach`)."""
    if visibility is None or visibility == Causal():
        return
    unserved = unserved_layer_types(config, served)
    if unserved:
        raise ValueError(
            f"visibility {visibility!r}: the model also has layers of type {unserved} (their own "
            f"token mixer, e.g. Gated DeltaNet, KDA or Mamba-2), which causalmix does not run "
            f"here: they would stay causal and see across documents. Only Causal() (or no "
            f"visibility) is accepted; causalmix.hf.attach(model) runs the hybrid layers it "
            f"serves (Mamba-2 family) through causalmix"
        )


def check_documents_stay_apart(config, documents: Segments | None,
                               served: frozenset[str] = frozenset()) -> None:
    """Packed documents (from ``position_ids`` or ``cu_seq_lens_*``) on a model with layers
    causalmix does not run would leak through those layers (transformers' torch paths of
    Mamba-2, Gated DeltaNet and KDA carry state and convolution across them): ``ValueError``."""
    if documents is None:
        return
    unserved = unserved_layer_types(config, served)
    if unserved:
        raise ValueError(
            f"packed documents (restarting position_ids or cu_seq_lens_*) on a model with layers "
            f"of type {unserved}, whose own token mixer causalmix does not run here: their state "
            f"and short convolution would carry one document into the next. Run the documents "
            f"as separate rows, or causalmix.hf.attach(model) if its hybrid layers are served"
        )


#: (spec, cached, new) -> whether a cached position sees a new one.
_STALE: LRUCache[bool] = LRUCache(64)


# ============================================================================ the spec of a call


def _whole_sequence(mask: LayerMask) -> bool:
    return mask.q_offset == 0 and mask.kv_offset == 0 and mask.q_length == mask.kv_length


def _segments(position_ids: torch.Tensor | None, mask: LayerMask) -> Segments | None:
    """Packed sequences: ``Segments`` where ``position_ids`` restart (a new document starts where
    ``position_ids[t] != position_ids[t - 1] + 1``), for a whole sequence without a cache."""
    if position_ids is None or not _whole_sequence(mask):
        return None
    if position_ids.shape[-1] != mask.q_length:
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if bool((pos[:, 1:] == pos[:, :-1] + 1).all()):
        return None
    if pos.shape[0] == 1:
        pos = pos[0]
    elif pos.shape[0] != mask.batch_size:
        raise ValueError(
            f"position_ids has batch size {pos.shape[0]} but the input has batch size "
            f"{mask.batch_size}"
        )
    return Segments.from_position_ids(pos)


def packed_segments(mask: LayerMask, position_ids: torch.Tensor | None = None, *,
                    cu_seq_lens_q: torch.Tensor | None = None,
                    cu_seq_lens_k: torch.Tensor | None = None) -> Segments | None:
    """The documents of a packed batch, from ``position_ids`` (restarts) and / or the
    flash-attention keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``[N + 1]`` cumulative
    lengths over a batch of one, as ``DataCollatorWithFlattening`` makes them); when both are
    given they must agree. ``None``: one document per row."""
    from_pos = _segments(position_ids, mask)
    if cu_seq_lens_q is None and cu_seq_lens_k is None:
        return from_pos
    if cu_seq_lens_q is None or cu_seq_lens_k is None or not torch.equal(
            cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError(
            "cu_seq_lens_q and cu_seq_lens_k must both be given and equal (self-attention over "
            "packed documents)"
        )
    if mask.batch_size != 1 or not _whole_sequence(mask):
        raise ValueError(
            f"cu_seq_lens_q describes a packed batch of one without a cache, got batch size "
            f"{mask.batch_size}, queries at {mask.q_offset}, keys at {mask.kv_offset}"
        )
    seg = Segments.from_cu_seqlens(cu_seq_lens_q.cpu())
    if seg.covered_length != mask.q_length:
        raise ValueError(
            f"cu_seq_lens_q covers {seg.covered_length} tokens but the input has {mask.q_length}"
        )
    if from_pos is not None and from_pos != seg:
        raise ValueError("cu_seq_lens_q and position_ids describe different documents")
    return seg


def layer_visibility(
    mask: LayerMask,
    *,
    visibility: Visibility | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    segments: Segments | None = None,
) -> Visibility:
    """The spec one layer runs: ``visibility`` (else the model's rule) & the layer's sliding
    window & ``segments`` (packed documents) & padding. ``causal`` is the model's rule when
    ``visibility`` is ``None`` (``Causal()``, else ``Full()``). ``sliding_window`` is the
    layer's own (the keyword transformers passes to attention functions); it must agree with the
    mask's. The window keeps the mask's meaning: ``j > i - w`` under a causal mask (whatever
    ``visibility`` says about later keys), ``|i - j| <= w`` under a bidirectional one."""
    window = _window(mask, sliding_window)
    rule = (Causal() if causal else Full()) if visibility is None else visibility
    if window is None:
        spec = rule
    elif mask.rule == "full":
        spec = Window(window, window) if rule == Full() else rule & Window(window, window)
    else:
        # transformers' sliding_window_overlay: keys j > i - window (a key past the last one
        # never exists, so `right` only needs to reach it).
        win = Window(window - 1, mask.kv_offset + mask.kv_length)
        spec = Window(window - 1) if rule == Causal() else rule & win
    if segments is not None:
        spec = spec & segments
    if mask.padding is not None:
        spec = spec & ValidKeys(mask.padding)
    return spec


def _window(mask: LayerMask, from_layer: int | None) -> int | None:
    """The mask's window, checked against the layer's ``sliding_window`` keyword: the same under
    a causal mask; under a bidirectional one the mask's or one more (flash attention's symmetric
    ``window_size = (sliding_window - 1,) * 2``, which ModernBERT matches with a ``+ 1``)."""
    from_mask = mask.window
    if from_layer is not None and from_mask is None:
        raise ValueError(
            f"attn_implementation='causalmix': the layer has sliding_window={from_layer} but "
            f"transformers built a full-attention mask for it"
        )
    if from_layer is not None:
        full = mask.rule == "full" or mask.single_position
        allowed = (from_mask, from_mask + 1) if full else (from_mask,)
        if int(from_layer) not in allowed:
            raise ValueError(
                f"attn_implementation='causalmix': the layer's sliding_window ({from_layer}) and "
                f"the mask's ({from_mask}) differ"
            )
    return from_mask


def check_cache_is_exact(spec: Visibility, mask: LayerMask, shown: str) -> None:
    """Refuse a call with ``q_offset`` cached positions if one of them may see one of the new
    ones (``ValueError``; ``shown`` names the spec). Exact, from the spec's tile counts over
    (cached queries x new keys); free when the spec declares no lookahead."""
    cached, new = mask.q_offset, mask.q_length
    if cached == 0 or new == 0 or spec.lookahead_frames == 0:
        return
    # every layer of a layer type asks the same question in one step: count once
    stale = _STALE.get_or_make((spec, cached, new), lambda: bool(
        (spec.count_visible(cached, new, q_offset=0, k_offset=cached) > 0).any()))
    if stale:
        span = f"position {cached}" if new == 1 else f"positions {cached}..{cached + new - 1}"
        raise ValueError(
            f"attn_implementation='causalmix': {shown} lets positions already in the cache see "
            f"the new {span}: their cached keys and values were "
            f"computed before those existed and would give stale numbers. {CACHE_RULE} (e.g. "
            f"model.generate(..., use_cache=False))."
        )


# ======================================================================= the attention function

# Keywords transformers may pass that causalmix cannot honour: (name, what it is).
_REFUSED = (
    ("softcap", "logit soft-capping"),
    ("s_aux", "attention sinks"),
    ("sinks", "attention sinks"),
    ("position_bias", "an additive position bias"),
    ("seq_idx", "flattened sequence indices (pass position_ids instead)"),
)


def _check_call(query, key, attention_mask, dropout, kwargs) -> LayerMask:
    for name, what in _REFUSED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='causalmix' cannot honour {name}= ({what})")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "attn_implementation='causalmix' cannot honour output_attentions=True (it never "
            "forms the attention weights); use attn_implementation='eager' for them"
        )
    if dropout:
        raise ValueError(
            f"attn_implementation='causalmix' cannot honour attention dropout ({dropout}) in "
            f"training; set config.attention_dropout = 0.0 or call model.eval()"
        )
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attn_implementation='causalmix' got a prepared {attention_mask.dim()}-D attention "
            f"mask tensor; pass the 2-D padding attention_mask and visibility= instead"
        )
    if not isinstance(attention_mask, LayerMask):
        raise ValueError(
            f"attn_implementation='causalmix' got attention_mask={type(attention_mask).__name__}: "
            f"the model did not build its mask through the registered 'causalmix' mask function "
            f"(paged / continuous-batching caches and custom mask code are not supported)"
        )
    mask = attention_mask
    if query.shape[0] != mask.batch_size or query.shape[2] != mask.q_length:
        raise ValueError(
            f"attn_implementation='causalmix': queries [B={query.shape[0]}, T={query.shape[2]}] "
            f"do not match the mask's [B={mask.batch_size}, T={mask.q_length}]"
        )
    if key.shape[2] != mask.kv_length:
        raise ValueError(
            f"attn_implementation='causalmix': {key.shape[2]} keys but the mask describes "
            f"{mask.kv_length} (positions {mask.kv_offset} ..)"
        )
    return mask


def _call_visibility(module, kwargs) -> Visibility | None:
    """The spec of this call: ``visibility=``, else the model's default (``attach``), else
    ``None`` (the model's own rule)."""
    visibility = kwargs.get("visibility")
    if visibility is None:
        visibility = getattr(module, DEFAULT_ATTR, None)
    if visibility is None:
        return None
    if kwargs.get("is_causal") is not None:
        raise ValueError(
            f"got is_causal={kwargs['is_causal']} and visibility {visibility!r}: pass one of them"
        )
    if not isinstance(visibility, Visibility):
        raise ValueError(
            f"visibility must be a causalmix spec (Causal(), Prefix(n), Full(), ...), got "
            f"{type(visibility).__name__}"
        )
    return visibility


def _keyword(module, kwargs: dict, name: str):
    """A keyword of the call, else of the attached model's call in progress (some models do not
    hand ``position_ids`` to their attention layers, e.g. GraniteMoeHybrid)."""
    value = kwargs.get(name)
    if value is not None:
        return value
    frame = kwargs.get(CALL_KEYWORD)
    if frame is None:
        ctx = module.__dict__.get(CONTEXT_ATTR)
        frame = ctx.top() if ctx is not None else {}
    return frame.get(name)


def _model_rule(module, mask: LayerMask, is_causal: bool | None) -> bool:
    """Whether the model's own rule for this layer is causal (else bidirectional)."""
    if mask.rule == "full":
        return False
    if is_causal is not None:  # the per-call keyword of transformers (False: bidirectional)
        return bool(is_causal)
    if getattr(module, "is_causal", True) is False:
        if mask.single_position:
            return False
        raise ValueError(
            "attn_implementation='causalmix': the layer is bidirectional (is_causal=False) but "
            "transformers built a causal mask for it"
        )
    return True


def _self_attention_spec(module, mask: LayerMask, sliding_window, kwargs) -> Visibility:
    """The spec of a self-attention call (keys and queries on one position axis), refused when
    a cache would make it stale."""
    visibility = _call_visibility(module, kwargs)
    config, served = getattr(module, "config", None), getattr(module, SERVED_ATTR, frozenset())
    check_spec_reaches_every_layer(config, visibility, served)
    if visibility is not None and visibility.batch_size not in (None, mask.batch_size):
        raise ValueError(
            f"visibility {visibility!r} is for batch size {visibility.batch_size} but the input "
            f"has batch size {mask.batch_size}"
        )
    if mask.kv_offset + mask.kv_length != mask.q_offset + mask.q_length:
        # A static cache hands over all its slots, written or not: keys past the last query.
        raise ValueError(
            f"attn_implementation='causalmix': keys end at position "
            f"{mask.kv_offset + mask.kv_length} but queries at {mask.q_offset + mask.q_length} "
            f"(a static cache?); use the default dynamic cache"
        )
    causal = visibility is not None or _model_rule(module, mask, kwargs.get("is_causal"))
    documents = packed_segments(mask, _keyword(module, kwargs, "position_ids"),
                                cu_seq_lens_q=_keyword(module, kwargs, "cu_seq_lens_q"),
                                cu_seq_lens_k=_keyword(module, kwargs, "cu_seq_lens_k"))
    check_documents_stay_apart(config, documents, served)
    spec = layer_visibility(mask, visibility=visibility, sliding_window=sliding_window,
                            causal=causal, segments=documents)
    shown = repr(visibility) if visibility is not None else (
        "the model's causal rule" if causal else "the model's bidirectional rule")
    check_cache_is_exact(spec, mask, shown)
    return spec


def _model_rule_spec(mask: LayerMask, sliding_window, kwargs) -> Visibility:
    """The bidirectional layers of an encoder-decoder model: every key but padding (and the
    layer's window)."""
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError(
            "attn_implementation='causalmix': packed documents (cu_seq_lens_q / _k) in the "
            "encoder or the cross-attention of an encoder-decoder model are not supported"
        )
    return layer_visibility(mask, sliding_window=sliding_window, causal=False)


def causalmix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"causalmix"`` (transformers calls it as
    ``(module, query, key, value, attention_mask, **keywords)``).

    ``query: [B, Hq, Tq, D]``, ``key: [B, Hkv, Tk, D]``, ``value: [B, Hkv, Tk, Dv]`` (transformers'
    layout), ``attention_mask``: the :class:`LayerMask` of the layer type. Keywords read:
    ``visibility`` (a spec replacing the model's rule for this call), ``is_causal``,
    ``position_ids`` and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (packed sequences); the ones in
    ``_REFUSED``, ``output_attentions=True`` and dropout > 0 raise ``ValueError``, and so does a
    call whose cached positions may see its new ones (:func:`check_cache_is_exact`).
    Returns ``([B, Tq, Hq, Dv], None)``.
    """
    mask = _check_call(query, key, attention_mask, dropout, kwargs)
    if mask.model_rule_only:
        spec = _model_rule_spec(mask, sliding_window, kwargs)
    else:
        spec = _self_attention_spec(module, mask, sliding_window, kwargs)
    out = softmax_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), spec,
        q_offset=mask.q_offset, k_offset=mask.kv_offset, scale=scaling,
    )
    return out, None
