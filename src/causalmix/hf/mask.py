"""The mask function registered as ``"causalmix"``: what transformers would mask, as a
:class:`LayerMask` (O(B * T) memory, never a T x T tensor).

transformers builds one mask per layer type (``create_causal_mask``,
``create_sliding_window_causal_mask``, ``create_bidirectional_mask``,
``create_bidirectional_sliding_window_mask``) and hands it to every layer of that type. Its
``mask_function`` is a black box; the rule is read off it by asking it about a few diagonals
(a query and itself, the next key, the keys just inside and outside the window), so an overlay
that changes the pattern (image-token blocks, ``block_sequence_ids``, a custom rule) is refused
instead of being mistaken for the plain rule. (The probe is O(B * T): a custom rule that differs
only off those diagonals is not seen; transformers' own overlays all change the next-key
diagonal, and ``or_mask_function`` / ``and_mask_function`` are refused outright.)::

    rule "causal", no window      j <= i                       -> Causal()
    rule "causal", window w       i - w < j <= i               -> Window(w - 1)
    rule "full",   no window      every key                    -> Full()
    rule "full",   window w       |i - j| <= w                 -> Window(w, w)   (ModernBERT)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import torch
from transformers.masking_utils import bidirectional_mask_function

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["LayerMask", "causalmix_mask"]


@dataclasses.dataclass(frozen=True)
class LayerMask:
    """What the mask function learned for one layer type; O(T) memory.

    ``rule`` is ``"causal"`` or ``"full"`` (transformers' rule for the layer type); ``window`` is
    its ``local_size`` or ``None``: under ``"causal"`` a query at ``i`` sees keys
    ``j > i - window`` (transformers' sliding window), under ``"full"`` keys ``|i - j| <= window``
    (the bidirectional sliding window). ``padding`` is the bool ``[B, kv_offset + kv_length]`` key
    validity, or ``None`` when nothing is padded. Queries sit at absolute positions
    ``q_offset + [0, q_length)``, keys at ``kv_offset + [0, kv_length)``. ``model_rule_only``
    marks the bidirectional masks of an encoder-decoder model (its encoder's self-attention and
    the decoder's cross-attention), where ``visibility=`` does not apply: the model's rule does.
    """

    rule: str
    window: int | None
    padding: torch.Tensor | None
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    model_rule_only: bool = False

    @property
    def single_position(self) -> bool:
        """One position in all (a one-token input without a cache): every rule and window give
        the same, and the probe cannot tell them apart."""
        return max(self.q_offset + self.q_length, self.kv_offset + self.kv_length) == 1

    @property
    def ndim(self) -> NoReturn:
        # transformers asks a mask it is handed back for its ndim (generate() with a static,
        # compileable cache prepares the masks ahead and passes them to forward): refuse clearly.
        raise ValueError(
            "attn_implementation='causalmix' does not support masks prepared ahead by generate() "
            "for static (compileable) caches; use the default dynamic cache"
        )


def causalmix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    *,
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
    """The mask function registered as ``"causalmix"`` (``sdpa_mask``'s parameters; transformers
    passes them all by keyword).

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
    window = None if local_size is None else int(local_size)
    if window is not None and window < 1:
        raise ValueError(f"attn_implementation='causalmix': a sliding window of {window} keys")
    total = max(q_offset + q_length, kv_offset + kv_length)
    probe = _Probe(mask_function, batch_size, lo=max(0, q_offset - 2 - (window or 0)),
                   total=total, device=device)
    rule = probe.rule(window)
    return LayerMask(
        rule=rule,
        window=window,
        padding=_padding(attention_mask, kv_offset + kv_length),
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        model_rule_only=rule == "full" and _has_cross_attention(config),
    )


def _has_cross_attention(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False)
                or getattr(config, "add_cross_attention", False))


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


@dataclasses.dataclass(frozen=True)
class _Probe:
    """Asks transformers' ``mask_function`` (absolute positions, padding not included) about
    the pairs ``(i, i + d)`` for queries ``i`` in ``[lo, total)`` whose key ``i + d`` lies in
    ``[0, total)``: O(B * T) evaluations per diagonal, positions every index-based overlay of
    the call covers."""

    mask_function: Callable | None
    batch_size: int
    lo: int
    total: int
    device: torch.device | str

    def sees(self, d: int) -> torch.Tensor:
        """bool ``[B, N]``: whether each probed query sees the key ``d`` positions away."""
        start, stop = max(self.lo, -d), min(self.total, self.total - d)
        i = torch.arange(start, max(start, stop), device=self.device)[None, :]
        b = torch.arange(self.batch_size, device=self.device)[:, None]
        h = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        seen = torch.as_tensor(self.mask_function(b, h, i, i + d), device=self.device)
        return seen.to(torch.bool).expand(self.batch_size, i.shape[1])

    def rule(self, window: int | None) -> str:
        """``"causal"`` or ``"full"``, checked against the window; ``ValueError`` for anything
        else."""
        if self.mask_function is None:
            return "causal"
        if not bool(self.sees(0).all()):
            self.refuse("a query does not see itself")
        nxt = self.sees(1)
        if nxt.numel() == 0:  # one position: every rule gives the same (LayerMask.single_position)
            rule = "full" if self.mask_function is bidirectional_mask_function else "causal"
        elif bool(nxt.all()):
            rule = "full"
        elif not bool(nxt.any()):
            rule = "causal"
        else:
            self.refuse("some queries see the next key and some do not")
        if window is not None and rule == "causal" and bool(self.sees(-window).any()):
            # inside the window nothing is probed: packed documents hide some of those keys
            self.refuse(f"a query sees the key {window} positions back, outside its window")
        if window is not None and rule == "full":
            for d in (window, -window):
                if not bool(self.sees(d).all()):
                    self.refuse(f"a query does not see the key {d:+d} away, inside its window")
            for d in (window + 1, -window - 1):
                if bool(self.sees(d).any()):
                    self.refuse(f"a query sees the key {d:+d} away, outside its window")
        return rule

    def refuse(self, what: str) -> NoReturn:
        raise ValueError(
            f"attn_implementation='causalmix': the mask transformers built for this model is not "
            f"a plain causal or bidirectional rule with a sliding window ({what}): an overlay "
            f"such as image-token blocks or block_sequence_ids, which causalmix cannot express; "
            f"pass visibility= with a spec for it instead"
        )
