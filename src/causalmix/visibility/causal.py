"""``Causal()`` and ``Full()``: the two rules every mixer serves.

``Causal()`` on 4 positions (row = query i, column = key j)::

        j 0 1 2 3
    i 0   x . . .
      1   x x . .
      2   x x x .
      3   x x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.visibility.base import KeyRange, Visibility


@dataclasses.dataclass(frozen=True)
class Causal(Visibility):
    """``j <= i``: each query sees itself and the past."""

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return j <= i

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(None, i)

    @property
    def lookahead_frames(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "Causal()"


@dataclasses.dataclass(frozen=True)
class Full(Visibility):
    """Every query sees every key (bidirectional)."""

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i >= 0) & (j >= 0)  # positions are never negative

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(None, None)

    def __repr__(self) -> str:
        return "Full()"
