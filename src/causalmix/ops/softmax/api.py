"""Public entry point of the softmax family: validation and explicit dispatch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from causalmix.ops._validate import check_qkv, check_visibility
from causalmix.ops.softmax.impl import blocks, flex, reference, sdpa
from causalmix.visibility import Visibility

IMPLS = {"reference": reference, "sdpa": sdpa, "blocks": blocks, "flex": flex}


class AttentionOutput(NamedTuple):
    output: torch.Tensor  # [B, Tq, Hq, Dv], q's dtype
    lse: torch.Tensor  # [B, Tq, Hq], fp32, natural log; -inf where a query sees no key


def available_impls(
    q, k, v, visibility: Visibility, *, q_offset: int = 0, k_offset: int = 0,
    return_lse: bool = False,
) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot."""
    return {
        name: mod.can_serve(q, k, v, visibility, q_offset, k_offset, return_lse)
        for name, mod in IMPLS.items()
    }


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    q_offset: int = 0,
    k_offset: int = 0,
    scale: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
):
    """Softmax attention under any visibility spec.

    Args:
        q: ``[B, Tq, Hq, D]`` queries at absolute positions ``q_offset + [0, Tq)``.
        k: ``[B, Tk, Hkv, D]`` keys at absolute positions ``k_offset + [0, Tk)``.
        v: ``[B, Tk, Hkv, Dv]`` values. ``Hq % Hkv == 0``: query head ``h`` reads key/value head
            ``h // (Hq // Hkv)`` (GQA; ``Hkv == 1`` is MQA). q, k, v share dtype and device.
        visibility: who may see whom, e.g. ``Causal()``, ``Chunked(64, lookahead=1)``,
            ``Segments(doc_ids) & Causal()``.
        scale: score scale, default ``1 / sqrt(D)``.
        impl: ``"auto"`` (``sdpa`` where it is exact and no lse is asked, else ``blocks``),
            ``"reference"`` (dense, fp32: the definition), ``"sdpa"`` (``Causal()``/``Full()``
            only), ``"blocks"`` (block-sparse over the spec's block map, any spec, differentiable,
            CPU and GPU) or ``"flex"`` (FlexAttention; on CPU inference only). An explicit impl
            that cannot serve the call raises ``ValueError`` listing those that can.
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        ``[B, Tq, Hq, Dv]`` in q's dtype, or ``AttentionOutput(output, lse)`` with
        ``lse: [B, Tq, Hq]`` fp32 when ``return_lse``. A query that sees no key gets output 0 and
        lse ``-inf`` (never NaN, forward or backward).

    Decode with a cache (one query after 99 cached keys, ``Causal()``)::

        keys  0 1 2 ... 98 99
        q=99  x x x ... x  x        softmax_attention(q1, k100, v100, Causal(), q_offset=99)
    """
    fn = "softmax_attention"
    b, tq, tk, hq, hkv, d, dv = check_qkv(fn, q, k, v)
    check_visibility(fn, visibility, b, tq, tk, q_offset, k_offset)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{fn}: scale must be a float or None, got {scale!r}")
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {['auto', *IMPLS]}, got {impl!r}")

    if tq == 0 or tk == 0:
        # No query or no key: every output is 0 (and every lse -inf); keep the graph connected.
        zero = (q.sum() + k.sum() + v.sum()) * 0
        out = q.new_zeros(b, tq, hq, dv) + zero
        lse = torch.full((b, tq, hq), float("-inf"), device=q.device)
        return AttentionOutput(out, lse) if return_lse else out

    if impl == "auto":
        impl = "sdpa" if sdpa.can_serve(q, k, v, visibility, q_offset, k_offset, return_lse) \
            is None else "blocks"
    else:
        reason = IMPLS[impl].can_serve(q, k, v, visibility, q_offset, k_offset, return_lse)
        if reason is not None:
            ok = [
                name for name, why in available_impls(
                    q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                    return_lse=return_lse,
                ).items() if why is None
            ]
            raise ValueError(f"{fn}: impl={impl!r} cannot serve this call: {reason}; "
                             f"implementations that can: {ok}")
    out, lse = IMPLS[impl].attention(
        q, k, v, visibility, q_offset=q_offset, k_offset=k_offset, scale=float(scale)
    )
    return AttentionOutput(out, lse) if return_lse else out
