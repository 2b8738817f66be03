"""``a & b`` and ``a | b``: specs combined, with derived key ranges, counts and frames.

``Causal() & Window(1)`` and ``Prefix(2) | Window(0, 1)`` on 4 positions (row = query i,
column = key j)::

        j 0 1 2 3              j 0 1 2 3
    i 0   x . . .          i 0   x x . .
      1   x x . .            1   x x x .
      2   . x x .            2   x x x x
      3   . . x x            3   x x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import UnboundedHorizonError
from causalmix.visibility.base import (
    KeyRange,
    Visibility,
    bounds,
    check_spec,
    frames_max,
    frames_min,
    merge_batch,
    tighter_hi,
    tighter_lo,
)
from causalmix.visibility.tiling import Tiling


class _Combined(Visibility):
    """Shared by ``&`` and ``|``: argument checks, batch size, covered length."""

    __slots__ = ()
    _symbol = "?"
    #: how the two sides' frame counts combine (``&``: min, an upper bound; ``|``: max)
    _frames = staticmethod(frames_max)

    def __post_init__(self):
        check_spec("a", self.a)
        check_spec("b", self.b)
        merge_batch(self.a.batch_size, self.b.batch_size, repr(self))

    @property
    def batch_size(self) -> int | None:
        return merge_batch(self.a.batch_size, self.b.batch_size, self._symbol)

    @property
    def covered_length(self) -> int | None:
        return frames_min(self.a.covered_length, self.b.covered_length)

    @property
    def lookahead_frames(self) -> int | None:
        return self._frames(self.a.lookahead_frames, self.b.lookahead_frames)

    @property
    def lookback_frames(self) -> int | None:
        return self._frames(self.a.lookback_frames, self.b.lookback_frames)

    def check_unmodified(self) -> None:
        self.a.check_unmodified()
        self.b.check_unmodified()

    def _side_counts(self, t: Tiling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each side's tile counts (-1 where unknown), broadcast, and the tile sizes."""
        ca, cb = self.a._counts(t), self.b._counts(t)
        ca, cb = torch.broadcast_tensors(t.unknown() if ca is None else ca,
                                         t.unknown() if cb is None else cb)
        return ca, cb, t.sizes()

    def __repr__(self) -> str:
        return f"({self.a!r} {self._symbol} {self.b!r})"


def _horizon_or_none(spec: Visibility, positions: torch.Tensor) -> torch.Tensor | None:
    try:
        return spec._horizon(positions)
    except UnboundedHorizonError:
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class And(_Combined):
    """Visible under both ``a`` and ``b``. Written ``a & b``."""

    a: Visibility
    b: Visibility
    _symbol = "&"
    _frames = staticmethod(frames_min)

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.a.visible(b, i, j) & self.b.visible(b, i, j)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        ka, kb = self.a.key_range(i), self.b.key_range(i)
        if ka is None or kb is None:
            return None
        return KeyRange(tighter_lo(ka.lo, kb.lo), tighter_hi(ka.hi, kb.hi))

    def _horizon(self, positions):
        if self.key_range(positions) is not None:
            return super()._horizon(positions)
        ha, hb = _horizon_or_none(self.a, positions), _horizon_or_none(self.b, positions)
        if ha is None and hb is None:
            return super()._horizon(positions)
        return tighter_hi(ha, hb)

    def _counts(self, t):
        exact = super()._counts(t)
        if exact is not None:
            return exact
        ca, cb, size = self._side_counts(t)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == size, cb, out)
        out = torch.where(cb == size, ca, out)
        return torch.where((ca == 0) | (cb == 0), torch.zeros_like(out), out)



@dataclasses.dataclass(frozen=True, repr=False)
class Or(_Combined):
    """Visible under ``a`` or ``b``. Written ``a | b``, e.g. ``Chunked(64) | Window(16)``: chunked
    attention whose first frames still see the end of the previous chunk."""

    a: Visibility
    b: Visibility
    _symbol = "|"

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.a.visible(b, i, j) | self.b.visible(b, i, j)

    def _horizon(self, positions):
        return torch.maximum(self.a._horizon(positions), self.b._horizon(positions))

    def _counts(self, t):
        ia, ib = bounds(self.a, t.q_positions()), bounds(self.b, t.q_positions())
        if ia is not None and ib is not None:
            both = t.count_intervals(torch.maximum(ia[0], ib[0]), torch.minimum(ia[1], ib[1]))
            return t.count_intervals(*ia) + t.count_intervals(*ib) - both
        ca, cb, size = self._side_counts(t)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == 0, cb, out)
        out = torch.where(cb == 0, ca, out)
        return torch.where((ca == size) | (cb == size), size.expand_as(out), out)

