"""``Window(left, right)``: a sliding window of ``left`` past and ``right`` future positions.

``Window(1, 1)`` on 5 positions (row = query i, column = key j)::

        j 0 1 2 3 4
    i 0   x x . . .
      1   x x x . .
      2   . x x x .
      3   . . x x x
      4   . . . x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import MAX_POSITION, check_int
from causalmix.visibility.base import KeyRange, Visibility, clamp_position


@dataclasses.dataclass(frozen=True)
class Window(Visibility):
    """``i - left <= j <= i + right``: a sliding window of ``left`` past and ``right`` future
    positions (plus the query's own). Widths beyond every position (up to ``sys.maxsize``) are
    exact: they are clamped to ``MAX_POSITION`` inside the arithmetic."""

    left: int
    right: int = 0

    def __post_init__(self):
        object.__setattr__(self, "left", check_int("left", self.left, 0))
        object.__setattr__(self, "right", check_int("right", self.right, 0))

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        left, right = clamp_position(self.left), clamp_position(self.right)
        return (j >= i - left) & (j <= i + right)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(i - clamp_position(self.left), i + clamp_position(self.right))

    @property
    def lookahead_frames(self) -> int:
        return min(self.right, MAX_POSITION - 1)

    @property
    def lookback_frames(self) -> int:
        return min(self.left, MAX_POSITION - 1)

    def __repr__(self) -> str:
        return f"Window(left={self.left}, right={self.right})"
