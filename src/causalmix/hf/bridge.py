"""The attention function and the mask function registered with transformers as ``"causalmix"``.

transformers builds one mask per layer type (``create_causal_mask``,
``create_sliding_window_causal_mask``, ...) through the registered *mask function*, then hands
it to the registered *attention function* of every layer. Here the mask function returns a
:class:`LayerMask` (the model's rule, the layer type's sliding window, the 2-D padding mask and
the absolute offsets: O(T) memory, never a T x T tensor), and the attention function composes the
causalmix spec of the call from it::

    visibility (or the model's rule)  &  Window(sliding_window - 1, ...)   (sliding layers)
                                      &  Segments(from position_ids)       (packed sequences)
                                      &  ValidKeys(attention_mask)         (padding)

and runs :func:`causalmix.softmax_attention` with the queries and keys at their absolute
positions (``q_offset`` / ``k_offset`` from the cache), so prefill, decode and a prefix-LM or
chunked spec agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from transformers.masking_utils import bidirectional_mask_function

from causalmix.ops.softmax import softmax_attention
from causalmix.visibility import Causal, Full, Segments, ValidKeys, Visibility, Window

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "NAME", "LayerMask", "causalmix_attention", "causalmix_mask", "layer_visibility",
    "packed_segments",
]

#: The name registered as an attention and a mask implementation (``attn_implementation=``).
NAME = "causalmix"

#: Attribute holding a model's default spec on each of its modules (see ``attach``).
DEFAULT_ATTR = "causalmix_visibility"


@dataclasses.dataclass(frozen=True)
class LayerMask:
    """What the mask function learned for one layer type; O(T) memory.

    ``rule`` is ``"causal"`` or ``"full"``; ``window`` is transformers' ``sliding_window`` (a
    query at ``i`` sees keys ``j > i - window``) or ``None``; ``padding`` is the bool
    ``[B, kv_offset + kv_length]`` key validity, or ``None`` when nothing is padded. Queries sit
    at absolute positions ``q_offset + [0, q_length)``, keys at ``kv_offset + [0, kv_length)``.
    """

    rule: str
    window: int | None
    padding: torch.Tensor | None
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int

    @property
    def ndim(self) -> NoReturn:
        # transformers asks a mask it is handed back for its ndim (generate() with a static,
        # compileable cache prepares the masks ahead and passes them to forward): refuse clearly.
        raise ValueError(
            "attn_implementation='causalmix' does not support masks prepared ahead by generate() "
            "for static (compileable) caches; use the default dynamic cache"
        )


# ============================================================================ the mask function


def _probe(mask_function: Callable, rule: str, batch_size: int, q_offset: int, q_length: int,
           kv_offset: int, kv_length: int, device) -> None:
    """Check the identified rule against transformers' own ``mask_function`` on O(B * T) pairs:
    each query sees itself, and sees the next key iff the rule is ``"full"``. An overlay that
    changes either (image-token blocks, ``block_sequence_ids``, a custom rule) is refused."""
    lo = max(q_offset, kv_offset)
    hi = min(q_offset + q_length, kv_offset + kv_length - 1)  # i and i + 1 are both keys
    if hi <= lo:
        return
    i = torch.arange(lo, hi, device=device)[None, :]
    b = torch.arange(batch_size, device=device)[:, None]
    h = torch.zeros(1, 1, dtype=torch.long, device=device)
    sees_self = torch.as_tensor(mask_function(b, h, i, i)).expand(batch_size, hi - lo)
    sees_next = torch.as_tensor(mask_function(b, h, i, i + 1)).expand(batch_size, hi - lo)
    if not bool(sees_self.all()) or not bool((sees_next == (rule == "full")).all()):
        raise ValueError(
            f"attn_implementation='causalmix': the mask transformers built for this model is not "
            f"the plain {rule} rule (a query does not see itself, or "
            f"{'does not see' if rule == 'full' else 'sees'} the next key): an overlay such as "
            f"image-token blocks or block_sequence_ids, which causalmix cannot express; pass "
            f"visibility= with a spec for it instead"
        )


def causalmix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    config: PretrainedConfig | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> LayerMask:
    """The mask function registered as ``"causalmix"`` (the ``sdpa_mask`` signature).

    ``attention_mask`` is the 2-D padding mask ``[B, T_seen + q_length]`` (bool, True = token).
    Returns a :class:`LayerMask`; raises ``ValueError`` for patterns it cannot express.
    """
    if use_vmap:
        raise ValueError(
            "attn_implementation='causalmix': this model overlays a custom mask function "
            "(or_mask_function / and_mask_function, e.g. image tokens or bidirectional Gemma 3) "
            "that causalmix cannot express; pass visibility= with a spec for it instead"
        )
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(
            "attn_implementation='causalmix': chunked attention layers "
            f"(config.attention_chunk_size={config.attention_chunk_size}, chunks restarting after "
            "left padding) are not supported"
        )
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    rule = "full" if mask_function is bidirectional_mask_function else "causal"
    if rule == "full" and local_size is not None:
        raise ValueError(
            "attn_implementation='causalmix': bidirectional sliding-window masks are not supported"
        )
    if mask_function is not None:
        _probe(mask_function, rule, batch_size, q_offset, q_length, kv_offset, kv_length, device)
    return LayerMask(
        rule=rule,
        window=None if local_size is None else int(local_size),
        padding=_padding(attention_mask, kv_offset + kv_length),
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )


def _padding(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """The key validity ``[B, total]`` (padded with False past the mask, as transformers does),
    or ``None`` when every key is a token."""
    if attention_mask is None:
        return None
    valid = attention_mask.to(torch.bool)
    if valid.shape[-1] < total:
        valid = torch.nn.functional.pad(valid, (0, total - valid.shape[-1]), value=False)
    valid = valid[:, :total]
    return None if bool(valid.all()) else valid


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


def packed_segments(mask: LayerMask, position_ids: torch.Tensor | None = None,
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
    mask's."""
    window = _window(mask.window, sliding_window)
    if visibility is None:
        rule = Causal() if causal else Full()
    else:
        rule = visibility
    parts = []
    if window is not None:
        # transformers' sliding_window_overlay: keys j > i - window, whatever the rule says about
        # later keys (a key past the last one never exists, so `right` only needs to reach it).
        win = Window(window - 1, mask.kv_offset + mask.kv_length)
        parts.append(Window(window - 1) if rule == Causal() else rule & win)
    else:
        parts.append(rule)
    if segments is not None:
        parts.append(segments)
    if mask.padding is not None:
        parts.append(ValidKeys(mask.padding))
    spec = parts[0]
    for p in parts[1:]:
        spec = spec & p
    return spec


def _window(from_mask: int | None, from_layer: int | None) -> int | None:
    if from_layer is not None and from_mask is not None and int(from_layer) != from_mask:
        raise ValueError(
            f"attn_implementation='causalmix': the layer's sliding_window ({from_layer}) and the "
            f"mask's ({from_mask}) differ"
        )
    if from_layer is not None and from_mask is None:
        raise ValueError(
            f"attn_implementation='causalmix': the layer has sliding_window={from_layer} but "
            f"transformers built a full-attention mask for it"
        )
    return from_mask


# ======================================================================= the attention function

# Keywords transformers may pass that causalmix cannot honour: (name, what it is).
_REFUSED = (
    ("softcap", "logit soft-capping"),
    ("s_aux", "attention sinks"),
    ("sinks", "attention sinks"),
    ("position_bias", "an additive position bias"),
    ("seq_idx", "flattened sequence indices (pass position_ids instead)"),
)


def _check_call(module, query, attention_mask, dropout, kwargs) -> LayerMask:
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
    if query.shape[0] != attention_mask.batch_size or query.shape[2] != attention_mask.q_length:
        raise ValueError(
            f"attn_implementation='causalmix': queries [B={query.shape[0]}, T={query.shape[2]}] "
            f"do not match the mask's [B={attention_mask.batch_size}, "
            f"T={attention_mask.q_length}]"
        )
    return attention_mask


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


def _model_rule(module, mask: LayerMask, is_causal: bool | None) -> bool:
    """Whether the model's own rule for this layer is causal (else bidirectional)."""
    if mask.rule == "full":
        return False
    if is_causal is not None:  # the per-call keyword of transformers (False: bidirectional)
        return bool(is_causal)
    if getattr(module, "is_causal", True) is False:
        raise ValueError(
            "attn_implementation='causalmix': the layer is bidirectional (is_causal=False) but "
            "transformers built a causal mask for it"
        )
    return True


def causalmix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"causalmix"``.

    ``query: [B, Hq, Tq, D]``, ``key: [B, Hkv, Tk, D]``, ``value: [B, Hkv, Tk, Dv]`` (transformers'
    layout), ``attention_mask``: the :class:`LayerMask` of the layer type. Keywords read:
    ``visibility`` (a spec replacing the model's rule for this call), ``is_causal``,
    ``position_ids`` and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (packed sequences); the ones in
    ``_REFUSED``, ``output_attentions=True`` and dropout > 0 raise ``ValueError``.
    Returns ``([B, Tq, Hq, Dv], None)``.
    """
    mask = _check_call(module, query, attention_mask, dropout, kwargs)
    visibility = _call_visibility(module, kwargs)
    b = query.shape[0]
    if visibility is not None and visibility.batch_size not in (None, b):
        raise ValueError(
            f"visibility {visibility!r} is for batch size {visibility.batch_size} but the input "
            f"has batch size {b}"
        )
    if mask.kv_offset + mask.kv_length != mask.q_offset + mask.q_length:
        # A static cache hands over all its slots, written or not: keys past the last query.
        raise ValueError(
            f"attn_implementation='causalmix': keys end at position "
            f"{mask.kv_offset + mask.kv_length} but queries at {mask.q_offset + mask.q_length} "
            f"(a static cache?); use the default dynamic cache"
        )
    if key.shape[2] != mask.kv_length:
        raise ValueError(
            f"attn_implementation='causalmix': {key.shape[2]} keys but the mask describes "
            f"{mask.kv_length} (positions {mask.kv_offset} ..)"
        )
    causal = visibility is not None or _model_rule(module, mask, kwargs.get("is_causal"))
    spec = layer_visibility(
        mask, visibility=visibility, sliding_window=sliding_window, causal=causal,
        segments=packed_segments(mask, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"),
                                 kwargs.get("cu_seq_lens_k")),
    )
    out = softmax_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), spec,
        q_offset=mask.q_offset, k_offset=mask.kv_offset, scale=scaling,
    )
    return out, None
