"""Input checks shared by the public mixer functions: raise clear errors at the boundary."""

from __future__ import annotations

import math
from typing import Any

import torch

from causalmix.visibility import ArgumentTypeError, Visibility, check_int

__all__ = [
    "ArgumentTypeError",
    "check_decay",
    "check_int",
    "check_qkv",
    "check_scale",
    "check_visibility",
    "compute_dtype",
]


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype every mixer computes in: fp64 for fp64 inputs, fp32 otherwise."""
    dt = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dt == torch.float64 else torch.float32


def check_scale(fn: str, scale: Any) -> float | None:
    """``scale``: ``None`` (the default ``1 / sqrt(D)``) or a finite real number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ArgumentTypeError(f"{fn}: scale must be a float or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale!r}")
    return float(scale)


def check_decay(fn: str, decay: Any, heads: int, device: torch.device) -> torch.Tensor | None:
    """``decay``: ``None`` or a floating ``[H]`` tensor on ``device`` with values in (0, 1]."""
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor):
        raise ArgumentTypeError(
            f"{fn}: decay must be a [H] float tensor or None, got {type(decay).__name__}")
    if not decay.dtype.is_floating_point:
        raise ValueError(f"{fn}: decay must be a floating tensor, got dtype {decay.dtype}")
    if tuple(decay.shape) != (heads,):
        raise ValueError(f"{fn}: decay must have shape [H] = [{heads}], got {list(decay.shape)}")
    if decay.device != device:
        raise ValueError(f"{fn}: decay must be on q's device {device}, got {decay.device}")
    dd = decay.detach()
    if not bool(((dd > 0) & (dd <= 1)).all()):
        raise ValueError(f"{fn}: decay values must lie in (0, 1], got min "
                         f"{float(dd.min()):.6g}, max {float(dd.max()):.6g}")
    return decay


def check_qkv(fn: str, q: Any, k: Any, v: Any, *, same_head_count: bool = False
              ) -> tuple[int, ...]:
    """Check ``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]``.

    Returns ``(B, Tq, Tk, Hq, Hkv, D, Dv)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(
                f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must be 4-D [batch, seq, heads, dim], got shape {list(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"{fn}: {name} must be a floating tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{fn}: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{fn}: q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}"
        )
    b, tq, hq, d = q.shape
    bk, tk, hkv, dk = k.shape
    bv, tv, hv, dv = v.shape
    if not (b == bk == bv):
        raise ValueError(f"{fn}: batch sizes differ: q {b}, k {bk}, v {bv}")
    if tk != tv:
        raise ValueError(f"{fn}: k and v must have the same length, got k {tk}, v {tv}")
    if hkv != hv:
        raise ValueError(f"{fn}: k and v must have the same heads, got k {hkv}, v {hv}")
    if d != dk:
        raise ValueError(f"{fn}: q and k head dims differ: q {d}, k {dk}")
    if same_head_count and hq != hkv:
        raise ValueError(f"{fn}: q, k, v must have the same heads, got q {hq}, k {hkv}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{fn}: q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA/MQA)"
        )
    return b, tq, tk, hq, hkv, d, dv


def check_visibility(
    fn: str, visibility: Any, batch: int, q_len: int, k_len: int, q_offset: int, k_offset: int
) -> None:
    if not isinstance(visibility, Visibility):
        raise ArgumentTypeError(
            f"{fn}: visibility must be a causalmix.visibility spec (Causal(), Window(...), ...), "
            f"got {type(visibility).__name__}"
        )
    check_int("q_offset", q_offset, 0)
    check_int("k_offset", k_offset, 0)
    vb = visibility.batch_size
    if vb is not None and vb != batch:
        raise ValueError(
            f"{fn}: visibility {visibility!r} is for batch size {vb} but the inputs have "
            f"batch size {batch}"
        )
    visibility.check_positions(q_len, k_len, q_offset, k_offset)
