"""Head grouping of the linear-state families (linear, gated linear, delta), told apart by shapes.

Two groupings are served, and the shapes of ``q, k: [B, T, Hq | Hk, D]`` and ``v: [B, T, Hv,
Dv]`` say which one is meant:

* **GQA** (grouped queries): ``k`` and ``v`` share ``Hk == Hv`` heads, ``q`` has ``Hq`` heads
  with ``Hq % Hk == 0``; the output (and every state, gate and beta) has ``Hq`` heads and query
  head ``h`` reads key / value head ``h // (Hq / Hk)``.
* **Value grouping** (Mamba-2, Gated DeltaNet: Qwen3-Next has 16 key heads and 32 value heads):
  ``q`` and ``k`` share ``Hq == Hk`` heads, ``v`` has ``Hv`` heads with ``Hv % Hk == 0``; the
  output (and every state, gate and beta) has ``Hv`` heads and value head ``h`` reads query /
  key head ``h // (Hv / Hk)``.

With ``Hq == Hk == Hv`` both read the same. Fast paths never materialise repeated heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Heads", "head_layout"]


class Heads(NamedTuple):
    """Head counts of one call: ``out`` heads of the output / states / gates / beta, and the
    heads of ``q``, ``k`` and ``v`` (each divides ``out``). Output head ``h`` reads q head
    ``h // (out // q)``, k head ``h // (out // k)`` and v head ``h // (out // v)``."""

    out: int
    q: int
    k: int
    v: int

    @property
    def grouped(self) -> bool:
        """Whether some input has fewer heads than the output."""
        return not (self.q == self.k == self.v == self.out)

    def index(self, which: str, device: torch.device | str | None = None) -> torch.Tensor:
        """``[out]`` int64: the head of ``which`` (``"q"``, ``"k"`` or ``"v"``) that each output
        head reads (for references and tests; fast paths use views instead)."""
        n = getattr(self, which)
        return torch.arange(self.out, device=device) // (self.out // n)


def head_layout(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Heads:
    """The :class:`Heads` of ``q: [B, T, Hq, D]``, ``k: [B, Tk, Hk, D]``, ``v: [B, Tk, Hv, Dv]``
    (already checked to be 4-D tensors), or ``ValueError`` naming the shapes and the two
    groupings served."""
    hq, hk, hv = q.shape[2], k.shape[2], v.shape[2]
    if hk >= 1 and hk == hv and hq % hk == 0:
        return Heads(hq, hq, hk, hv)
    if hq >= 1 and hq == hk and hv % hk == 0:
        return Heads(hv, hq, hk, hv)
    raise ValueError(
        f"{fn}: heads q {hq}, k {hk}, v {hv} form no served grouping: GQA needs k and v with the "
        f"same heads dividing q's (q {hq} = k {hk} * g), value grouping (Mamba-2 / Gated "
        f"DeltaNet) needs q and k with the same heads dividing v's (v {hv} = k {hk} * g)")
