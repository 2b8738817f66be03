"""torch's ``scaled_dot_product_attention`` where it is exact: ``Causal()`` with aligned offsets
(``is_causal``), ``Causal()`` whose queries all follow every key, and ``Full()``. It never sees a
boolean mask (that would compute every tile) and it returns no log-sum-exp. It computes in the
inputs' dtype (fp64 in fp64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from causalmix.ops.softmax._call import Call, overflow_reason
from causalmix.visibility import Causal, Full


def _mode(visibility, q_len, k_len, q_offset, k_offset):
    if type(visibility) is Full:
        return "full"
    if type(visibility) is Causal:
        if q_offset >= k_offset + k_len - 1:
            return "full"  # every query follows every key (decode)
        if q_offset == k_offset:
            return "causal"  # top-left aligned: exactly SDPA's is_causal
    return None


def can_serve(call: Call) -> str | None:
    q, k, visibility, q_offset, k_offset = call.q, call.k, call.visibility, call.q_offset, \
        call.k_offset
    if call.needs_lse:
        return "sdpa returns no log-sum-exp (return_lse=True)"
    if type(visibility) not in (Causal, Full):
        return f"sdpa is exact only for Causal() and Full(), not {visibility!r}"
    if _mode(visibility, q.shape[1], k.shape[1], q_offset, k_offset) is None:
        return (
            f"sdpa serves Causal() only with q_offset == k_offset or with every query after "
            f"every key (got q_offset={q_offset}, k_offset={k_offset}, k_len={k.shape[1]})"
        )
    # SDPA on CPU gives NaN for scale <= 0 and its own answer for scores that overflow
    return overflow_reason(call, "sdpa")


def run(call: Call) -> tuple[torch.Tensor, None]:
    """``(out [B, Tq, Hq, Dv] in q.dtype, None)``: SDPA without a mask."""
    q, k, v, scale = call.q, call.k, call.v, call.scale
    mode = _mode(call.visibility, q.shape[1], k.shape[1], call.q_offset, call.k_offset)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=mode == "causal",
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2), None
