"""PyTorch FlexAttention, compiled, with the spec as its ``mask_mod`` and block mask.

Where it runs: on CUDA forward and backward (with log-sum-exp); on CPU, inference only and
without log-sum-exp (torch's CPU lowering supports nothing more). Each new shape compiles once
(11-25 s on a 2-core CPU), so ``auto`` never picks it on CPU.
"""

from __future__ import annotations

import torch

from causalmix.caching import LRUCache
from causalmix.ops.softmax._call import Call, SpecKey, overflow_reason

_COMPILED = None
_MASKS: LRUCache = LRUCache(16)


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return None
    return fa


def can_serve(call: Call) -> str | None:
    q, k, v, needs_lse = call.q, call.k, call.v, call.needs_lse
    if _flex_module() is None:
        return "FlexAttention is not available in this torch build"
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "FlexAttention has no backward on CPU (inputs require grad)"
        if needs_lse:
            return "FlexAttention on CPU cannot return the log-sum-exp"
    elif q.device.type != "cuda":
        return f"FlexAttention does not run on {q.device.type}"
    return overflow_reason(call, "flex")


def _block_mask(fa, call: Call):
    """The call's (cached) FlexAttention block mask. Its ``mask_mod`` reads the spec it was made
    for, which the :class:`SpecKey` finds again only while that spec is unmodified."""
    visibility, q_offset, k_offset = call.visibility, call.q_offset, call.k_offset
    q_len, k_len, device = call.q.shape[1], call.k.shape[1], call.q.device
    key = (SpecKey(visibility), q_len, k_len, q_offset, k_offset, str(device))

    def mask_mod(b, h, q_idx, kv_idx):
        return visibility.visible(b, q_idx + q_offset, kv_idx + k_offset)

    return _MASKS.get_or_make(key, lambda: fa.create_block_mask(
        mask_mod, visibility.batch_size, None, q_len, k_len, device=device))


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Tq, Hq, Dv], lse [B, Tq, Hq] fp32 or None on CPU)``."""
    global _COMPILED
    q, k, v, scale = call.q, call.k, call.v, call.scale
    fa = _flex_module()
    if _COMPILED is None:
        _COMPILED = torch.compile(fa.flex_attention, dynamic=False)
    bm = _block_mask(fa, call)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    gqa = q.shape[2] != k.shape[2]
    if q.device.type == "cpu":
        # can_serve made sure no graph is needed; torch refuses inputs that merely require grad
        args = tuple(a.detach() for a in args)
        out = _COMPILED(*args, block_mask=bm, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2), None
    out, aux = _COMPILED(
        *args, block_mask=bm, scale=scale, enable_gqa=gqa, return_aux=fa.AuxRequest(lse=True)
    )
    return out.transpose(1, 2), aux.lse.transpose(1, 2).float()
