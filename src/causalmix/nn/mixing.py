"""The mixing step every layer of :mod:`causalmix.nn` shares: :func:`mix` runs the named op
family, :class:`MixingLayer` is a layer around one such call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from causalmix.distributed.model import Sharding, sharded_mix
from causalmix.nn.config import AttentionConfig
from causalmix.ops.delta import delta_attention
from causalmix.ops.linear import linear_attention
from causalmix.ops.softmax import softmax_attention
from causalmix.visibility import Visibility

__all__ = ["MixingLayer", "mix"]


def mix(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
        *, q_offset: int = 0, k_offset: int = 0, sharding: Sharding | None = None,
        **kwargs: Any) -> torch.Tensor:
    """Run the op family ``op``: ``"softmax"`` (:func:`~causalmix.ops.softmax_attention`),
    ``"linear"`` (:func:`~causalmix.ops.linear_attention`) or ``"delta"``
    (:func:`~causalmix.ops.delta_attention`, with ``beta`` and the gates in ``kwargs``).
    ``q, k: [B, Tq|Tk, H, D]``, ``v: [B, Tk, Hkv, Dv]`` -> ``[B, Tq, H, Dv]``; ``kwargs`` are
    the layer's ``mixer_kwargs()`` (and ``impl``, per-frame gates). With ``sharding`` (a
    :class:`causalmix.distributed.Sharding`) the inputs are this rank's shard of a
    sequence-parallel call and the family's sharded op runs (offsets must be 0)."""
    if sharding is not None:
        if q_offset or k_offset:
            raise ValueError("mix: a sharded call covers the whole sequence (offsets 0), got "
                             f"q_offset={q_offset}, k_offset={k_offset}")
        return sharded_mix(op, sharding, q, k, v, visibility, **kwargs)
    if op == "softmax":
        return softmax_attention(q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                                 **kwargs)
    if op == "linear":
        return linear_attention(q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                                **kwargs)
    if op == "delta":
        return delta_attention(q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                               **kwargs)
    raise ValueError(f"op must be 'softmax', 'linear' or 'delta', got {op!r}")


class MixingLayer(nn.Module):
    """Base of the layers that mix over time with one op call (:class:`Attention`,
    :class:`~causalmix.nn.gated.GatedMixer`):
    ``forward(x) == out(mix(op, **qkv(x, pos), visibility=...), x)``.

    A subclass sets ``op`` (``"softmax"``, ``"linear"`` or ``"delta"``, the op family it mixes
    with) and
    ``cfg`` (its :class:`AttentionConfig`) and defines ``qkv(x, positions)`` -> the op's
    per-frame inputs by name (``{"q", "k", "v"}``, plus the gates ``"log_gate"`` and
    ``"reverse_log_gate"`` of a gated layer: the names of the op's and of its stream's
    arguments), ``mixer_kwargs()`` and ``out(mixed, x)``; ``qkv`` and ``out`` are pointwise in
    time.
    """

    op: str
    cfg: AttentionConfig

    def forward(self, x: torch.Tensor, *, visibility: Visibility, offset: int = 0,
                sharding: Sharding | None = None) -> torch.Tensor:
        """``x: [B, T, C]`` (already normalised) at positions ``offset + [0, T)`` under
        ``visibility`` -> ``[B, T, C]``; with ``sharding``, ``x`` is this rank's shard and sits
        at the layout's positions (:class:`causalmix.distributed.Sharding`)."""
        if sharding is None:
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        else:
            positions = sharding.positions(x.device)
        mixed = mix(self.op, visibility=visibility, q_offset=offset, k_offset=offset,
                    sharding=sharding, impl=self.cfg.impl, **self.mixer_kwargs(),
                    **self.qkv(x, positions))
        return self.out(mixed, x)
