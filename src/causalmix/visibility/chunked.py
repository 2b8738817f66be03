"""``Chunked(size, lookahead)``: block-causal over chunks, each seeing ``lookahead`` chunks ahead.

``Chunked(2, lookahead=1)`` on 6 positions (row = query i, column = key j)::

        j 0 1 2 3 4 5
    i 0   x x x x . .
      1   x x x x . .
      2   x x x x x x
      3   x x x x x x
      4   x x x x x x
      5   x x x x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import MAX_POSITION, check_int
from causalmix.visibility.base import KeyRange, Visibility


@dataclasses.dataclass(frozen=True)
class Chunked(Visibility):
    """``j // size <= i // size + lookahead``: block-causal over chunks of ``size`` positions
    (chunk boundaries at multiples of ``size`` from position 0), each chunk also seeing
    ``lookahead`` chunks ahead (``lookahead`` counts **chunks**; the frame-valued
    :attr:`lookahead_frames`, the largest ``j - i`` as for every spec, is
    ``(lookahead + 1) * size - 1``, at most ``MAX_POSITION - 1``). Any size or lookahead is
    exact: values beyond every position are clamped inside the arithmetic."""

    size: int
    lookahead: int = 0

    def __post_init__(self):
        object.__setattr__(self, "size", check_int("size", self.size, 1))
        object.__setattr__(self, "lookahead", check_int("lookahead", self.lookahead, 0))

    def _ahead(self) -> tuple[int, int]:
        """``(size, lookahead)`` clamped so that ``(i // size + lookahead + 1) * size`` stays
        within ``[0, 4 * MAX_POSITION]`` for every position: same visibility, no overflow."""
        size = min(self.size, MAX_POSITION)
        return size, min(self.lookahead, MAX_POSITION // size + 1)

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        size, ahead = self._ahead()
        return (j // size) <= (i // size) + ahead

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        size, ahead = self._ahead()
        return KeyRange(None, (i // size + ahead + 1) * size - 1)

    @property
    def lookahead_frames(self) -> int:
        return min((self.lookahead + 1) * self.size - 1, MAX_POSITION - 1)

    def __repr__(self) -> str:
        return f"Chunked(size={self.size}, lookahead={self.lookahead})"
