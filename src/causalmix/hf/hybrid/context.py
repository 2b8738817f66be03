"""What a hybrid layer of an attached model is asked to do in one call: its spec, documents,
padding and absolute positions (:func:`layer_call`), and where they come from.

transformers hands the mixers of hybrid and state-space layers little: the 2-D padding mask
trimmed to the call (``create_recurrent_attention_mask``), the cache, and the keywords of the
call in ``**kwargs`` -- but never ``position_ids`` (the decoder layers consume them), and
``Mamba2ForCausalLM`` passes no keyword at all to its backbone. So an attached model keeps a
:class:`CallContext`: a forward pre-hook on each of its ``PreTrainedModel`` parts pushes the
keywords of the call (``visibility``, ``position_ids``, ``cu_seq_lens_q`` / ``_k``, inherited by
nested parts) and a forward hook that runs even when the forward raises pops them; a layer reads
its keyword first, then the context, then the model's default spec. The context holds nothing
between calls, per thread; ``copy.deepcopy`` and pickling give a fresh one. Under gradient
checkpointing a decoder layer runs again in the backward pass, when the context is empty: the
decoder layers above a served layer therefore also pass the keywords down in their own call
(:func:`carry_call`), which the recomputation repeats.

**Positions.** A linear-attention cache layer of transformers does not count tokens, so each
layer counts its own in the cache object (``causalmix_positions``: layer index -> tokens seen),
reset when transformers resets the layer (no previous state). A cache whose states were written
by the model's own code has no count: such a cache is accepted under ``Causal()`` only (the
other specs depend on absolute positions).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, NamedTuple

import torch

from causalmix.hf.attention import (
    CALL_KEYWORD,
    CONTEXT_ATTR,
    DEFAULT_ATTR,
    check_cache_is_exact,
    packed_segments,
)
from causalmix.hf.mask import LayerMask
from causalmix.ops.factor import Factorisation, factorise
from causalmix.visibility import And, Causal, Segments, ValidKeys, Visibility

__all__ = ["CALL_KEYWORD", "CONTEXT_ATTR", "CallContext", "LayerCall", "carry_call",
           "enter_call", "layer_call", "leave_call", "record_positions"]

#: Attribute of a transformers cache object: layer index -> tokens that layer has seen.
POSITIONS_ATTR = "causalmix_positions"

#: The keywords of a model call that the hybrid layers read.
KEYWORDS = ("visibility", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
#: Keywords transformers may hand a mixer that say nothing about its tokens' visibility.
HARMLESS = frozenset({"output_attentions", "output_hidden_states", "use_cache", "return_dict",
                      "max_length_q", "max_length_k", "position_ids", "position_embeddings",
                      "cache_position", "visibility", "cu_seq_lens_q", "cu_seq_lens_k",
                      "is_causal", "output_router_logits", CALL_KEYWORD})


class CallContext:
    """The keywords of the attached model's forwards in progress: a stack per thread."""

    def __init__(self):
        self.frames: dict[int, list[dict[str, Any]]] = {}

    def __deepcopy__(self, memo) -> CallContext:
        return CallContext()

    def __reduce__(self):
        return (CallContext, ())

    def top(self) -> dict[str, Any]:
        stack = self.frames.get(threading.get_ident())
        return stack[-1] if stack else {}

    def push(self, frame: dict[str, Any]) -> None:
        self.frames.setdefault(threading.get_ident(), []).append(frame)

    def pop(self) -> None:
        me = threading.get_ident()
        stack = self.frames.get(me)
        if stack:
            stack.pop()
            if not stack:
                del self.frames[me]


_POSITIONAL: dict[type, list[str]] = {}


def _positional_names(module: torch.nn.Module) -> list[str]:
    cls = type(module)
    if cls not in _POSITIONAL:
        params = inspect.signature(module.forward).parameters.values()
        _POSITIONAL[cls] = [p.name for p in params
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return _POSITIONAL[cls]


def enter_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attached model's parts: push this call's keywords (a nested part
    inherits those it is not given)."""
    ctx = module.__dict__.get(CONTEXT_ATTR)
    if ctx is None:
        return
    named = dict(zip(_positional_names(module), args, strict=False))
    named.update(kwargs)
    frame = dict(ctx.top())
    frame.update({k: named[k] for k in KEYWORDS if named.get(k) is not None})
    ctx.push(frame)


def leave_call(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook (``always_call``): pop what :func:`enter_call` pushed."""
    ctx = module.__dict__.get(CONTEXT_ATTR)
    if ctx is not None:
        ctx.pop()


def carry_call(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an attached hybrid model's (gradient-checkpointing) decoder layers:
    hand the model call's keywords down as ``causalmix_call=`` (to its hybrid and attention
    layers). A checkpointed layer is run again in the backward pass, after the model's forward
    has returned, with the keywords it was first called with: this one included, so the
    recomputation runs the same spec."""
    ctx = module.__dict__.get(CONTEXT_ATTR)
    if ctx is None or CALL_KEYWORD in kwargs:
        return None
    return args, {**kwargs, CALL_KEYWORD: dict(ctx.top())}


class LayerCall(NamedTuple):
    """One call of a hybrid layer, checked. ``spec``: what the scan runs (the rule & the
    documents; padding is not in it), ``factor`` its factorisation; ``valid``: ``[B, T]`` bool
    (False at padding) or None; ``segments``: ``[B or 1, 1 + T]`` document ids of the position
    before the call and of each position (None: one document), for the convolution;
    ``offset``: absolute position of the first token; ``conv_state`` / ``recurrent_state``:
    the cache's (None without a cache or before its first update)."""

    spec: Visibility
    factor: Factorisation
    valid: torch.Tensor | None
    segments: torch.Tensor | None
    offset: int
    conv_state: torch.Tensor | None
    recurrent_state: torch.Tensor | None


def _name(module: torch.nn.Module) -> str:
    kind = getattr(module, "layer_type", None)
    kind = f", layer type {kind!r}" if isinstance(kind, str) else ""
    return f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}{kind})"


def _check_keywords(module, kwargs: dict) -> None:
    if kwargs.get("seq_idx") is not None:
        raise ValueError(f"causalmix.hf: {_name(module)} got seq_idx=; pass packed documents "
                         f"as position_ids (or cu_seq_lens_q / cu_seq_lens_k) instead")
    if kwargs.get("is_causal") is False:
        raise ValueError(f"causalmix.hf: {_name(module)} got is_causal=False; pass "
                         f"visibility=Full() for a bidirectional model instead")
    unknown = sorted(k for k, v in kwargs.items() if k not in HARMLESS and v is not None)
    if unknown:
        raise ValueError(f"causalmix.hf: {_name(module)} cannot honour the keyword(s) {unknown}")


def _split_padding(spec: Visibility) -> tuple[Visibility | None, list[ValidKeys]]:
    """``spec`` without its ``ValidKeys`` leaves (joined by ``&``), and those leaves."""
    if isinstance(spec, ValidKeys):
        return None, [spec]
    if isinstance(spec, And):
        a, pa = _split_padding(spec.a)
        b, pb = _split_padding(spec.b)
        rest = a if b is None else b if a is None else a & b
        return rest, pa + pb
    return spec, []


def _valid(attention_mask, keys: list[ValidKeys], like: torch.Tensor, *, offset: int,
           name: str) -> torch.Tensor | None:
    """The ``[B, T]`` token mask of the call (``like``: its hidden states), from the padding
    mask and the spec's ``ValidKeys``; None when every position is a token."""
    b, t = like.shape[:2]
    valid = None
    if attention_mask is not None:
        if attention_mask.shape != (b, t):
            raise ValueError(f"causalmix.hf: {name} got an attention_mask of shape "
                             f"{list(attention_mask.shape)}, expected the 2-D [B={b}, T={t}]")
        valid = attention_mask.to(device=like.device, dtype=torch.bool)
    for vk in keys:
        if vk.valid.shape[0] != b or vk.valid.shape[1] < offset + t:
            raise ValueError(f"causalmix.hf: {name}: {vk!r} does not cover batch {b}, "
                             f"positions {offset}..{offset + t - 1}")
        part = vk.valid[:, offset:offset + t].to(like.device)
        valid = part if valid is None else valid & part
    return None if valid is None or bool(valid.all()) else valid


def _offset(module, cache, conv_state, spec: Visibility, name: str) -> int:
    """Absolute position of the call's first token, from the cache's count."""
    if cache is None or conv_state is None:
        return 0
    if cache.is_recording_past(module.layer_idx):
        raise ValueError(f"causalmix.hf: {name}: the cache records past states (assisted or "
                         f"speculative decoding), which causalmix's hybrid layers do not support")
    seen = getattr(cache, POSITIONS_ATTR, {}).get(module.layer_idx)
    if seen is None:
        if spec != Causal():
            raise ValueError(
                f"causalmix.hf: {name}: the cache holds states that causalmix did not write "
                f"(computed before causalmix.hf.attach), so the positions of this call are "
                f"unknown; {spec!r} depends on them. Start from a fresh cache")
        return 0
    return int(seen)


def record_positions(module: torch.nn.Module, cache, call: LayerCall, t: int) -> None:
    """After a call that wrote the cache: the layer has seen ``offset + t`` tokens."""
    counts = cache.__dict__.setdefault(POSITIONS_ATTR, {})
    counts[module.layer_idx] = call.offset + t


def _segment_ids(factor: Factorisation, offset: int, t: int, name: str):
    seg = factor.segments
    if seg is None:
        return None
    ids = seg.ids if seg.ids.dim() == 2 else seg.ids[None]
    if ids.shape[1] < offset + t:
        raise ValueError(f"causalmix.hf: {name}: {seg!r} covers {ids.shape[1]} positions, the "
                         f"call reaches position {offset + t - 1}")
    before = ids[:, offset - 1:offset] if offset > 0 else ids[:, :1]
    return torch.cat([before, ids[:, offset:offset + t]], dim=1)


def _visibility(module, kwargs: dict, frame: dict) -> Visibility | None:
    spec = kwargs.get("visibility")
    spec = frame.get("visibility") if spec is None else spec
    spec = getattr(module, DEFAULT_ATTR, None) if spec is None else spec
    if spec is not None and not isinstance(spec, Visibility):
        raise ValueError(f"visibility must be a causalmix spec (Causal(), Prefix(n), Full(), "
                         f"...), got {type(spec).__name__}")
    if spec is not None and kwargs.get("is_causal") is not None:
        raise ValueError(f"got is_causal={kwargs['is_causal']} and visibility {spec!r}: pass "
                         f"one of them")
    return spec


def layer_call(module: torch.nn.Module, hidden_states: torch.Tensor, cache, attention_mask,
               kwargs: dict, *, kind: str) -> LayerCall:
    """Check one call of the hybrid layer ``module`` (``kind`` names its family in errors,
    e.g. ``"a Mamba-2 layer"``) and say what it runs: the call's spec (``visibility=``, else
    the context's, else the model's default, else ``Causal()``) & the packed documents, the
    padding, its positions; refused with ``ValueError`` naming the layer when the family cannot
    serve the spec or the cache would be stale."""
    name = f"{_name(module)}, {kind}"
    _check_keywords(module, kwargs)
    ctx = module.__dict__.get(CONTEXT_ATTR)
    frame = kwargs.get(CALL_KEYWORD)
    frame = (ctx.top() if ctx is not None else {}) if frame is None else frame
    visibility = _visibility(module, kwargs, frame)
    rule, padding = _split_padding(visibility) if visibility is not None else (None, [])
    b, t = hidden_states.shape[:2]
    conv_state = recurrent_state = None
    if cache is not None:
        conv_state = cache.get_conv_state(module.layer_idx)
        recurrent_state = cache.get_recurrent_state(module.layer_idx)
    offset = _offset(module, cache, conv_state, rule or Causal(), name)
    mask = LayerMask(rule="causal", window=None, padding=None, batch_size=b, q_length=t,
                     kv_length=t, q_offset=offset, kv_offset=offset)
    docs: Segments | None = packed_segments(
        mask, frame.get("position_ids"),
        cu_seq_lens_q=kwargs.get("cu_seq_lens_q", frame.get("cu_seq_lens_q")),
        cu_seq_lens_k=kwargs.get("cu_seq_lens_k", frame.get("cu_seq_lens_k")))
    spec = rule or Causal()
    spec = spec if docs is None else spec & docs
    factor = factorise(spec, mixer=name)
    shown = repr(visibility) if visibility is not None else "the model's causal rule"
    check_cache_is_exact(spec, mask, shown)
    valid = _valid(attention_mask, padding, hidden_states, offset=offset, name=name)
    return LayerCall(spec, factor, valid, _segment_ids(factor, offset, t, name), offset,
                     conv_state, recurrent_state)
