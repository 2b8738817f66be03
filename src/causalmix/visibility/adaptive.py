"""``AdaptiveLookahead(a)``: causal plus a per-query lookahead, chosen per frame by a model.

``AdaptiveLookahead(tensor([1, 0, 2, 0]))`` (row = query i, column = key j)::

        j 0 1 2 3
    i 0   x x . .
      1   x x . .
      2   x x x x
      3   x x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import MAX_POSITION
from causalmix.visibility.base import KeyRange
from causalmix.visibility.tensor_spec import PositionTensorSpec, snapshot, tensor_key


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptiveLookahead(PositionTensorSpec):
    """``j <= i + a[b, i]``: causal, plus a per-query lookahead ``a`` (in frames).

    ``a`` is an int ``[B, T]`` (or ``[T]``) tensor >= 0 (copied) indexed by **absolute** query
    position, so it must cover every query position an operation asks about
    (``covered_length = T``). Each query sees the range ``[0, i + a_i]``, so block maps are exact
    and ``impl="blocks"`` skips empty tiles; combine with ``&`` for more
    (``& Window(left, W)``). ``lookahead_frames`` is ``max(a)``. Compares and hashes by the
    content of ``a``; values beyond every position (up to int64's maximum) are clamped to
    ``MAX_POSITION`` in the copy, which sees the same keys. Made by
    :class:`causalmix.nn.adaptive.AdaptiveBlock`'s gates.
    """

    a: torch.Tensor

    def __post_init__(self):
        a = snapshot("a", self.a, (1, 2), "[T] or [B, T]")
        if a.numel() and int(a.min()) < 0:
            raise ValueError(f"a must be >= 0 (lookaheads), got min {int(a.min())}")
        object.__setattr__(self, "a", a.clamp_max_(MAX_POSITION))
        self._seal()

    def _tensor(self):
        return self.a

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        a = self.a.to(i.device)
        ai = a[i] if a.dim() == 1 else a[b, i]
        return j <= i + ai

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        self._check_unmodified()
        a = self.a.to(i.device)
        return KeyRange(None, i + (a[i] if a.dim() == 1 else a[:, i]))



    @property
    def lookahead_frames(self) -> int:
        return min(int(self.a.max()), MAX_POSITION - 1) if self.a.numel() else 0

    def _content(self):
        return tensor_key(self.a)

    def __repr__(self) -> str:
        return f"AdaptiveLookahead(a=<{list(self.a.shape)}, max {self.lookahead_frames}>)"
