"""Storage the streams share: a log indexed by output position, and a growable frame buffer."""

from __future__ import annotations

import array

import torch

__all__ = ["FrameBuffer", "PositionLog"]


class PositionLog:
    """Append-only log indexed by absolute output position, in a compact ``array`` (8 bytes per
    entry): ``"q"`` int64 (frames) or ``"d"`` float64 (seconds)."""

    def __init__(self, typecode: str = "q"):
        self._arr = array.array(typecode)
        self._dtype = torch.int64 if typecode == "q" else torch.float64

    def __len__(self) -> int:
        return len(self._arr)

    def append(self, values: list) -> None:
        self._arr.extend(values)

    def get(self, positions: list[int]) -> list:
        return [self._arr[p] for p in positions]

    def values(self) -> torch.Tensor:
        """``[n]``: every entry, in position order."""
        return torch.tensor(self._arr, dtype=self._dtype)


class FrameBuffer:
    """Frames ``[B, n, ...]`` at absolute positions ``[start, end)``, appended at the end and
    dropped from the front, in one preallocated storage (amortised O(1) per frame, capacity at
    most twice the largest live length plus one push)."""

    def __init__(self):
        self.storage: torch.Tensor | None = None
        self.lo = 0  # storage index of position `start`
        self.start = 0  # absolute position of the first live frame
        self.length = 0

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.shape[1]

    def nbytes(self) -> int:
        s = self.storage
        return 0 if s is None else s.numel() * s.element_size()

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        if self.storage is None:
            self.storage = x.new_empty((x.shape[0], max(2 * n, 16), *x.shape[2:]))
        if self.lo + self.length + n > self.capacity:
            live = self.storage[:, self.lo : self.lo + self.length]
            cap = self.capacity
            if self.length + n > cap // 2:
                cap = max(2 * (self.length + n), 16)
                new = x.new_empty((x.shape[0], cap, *x.shape[2:]))
                new[:, : self.length] = live
                self.storage = new
            elif self.lo >= self.length:  # source and destination do not overlap
                self.storage[:, : self.length] = live
            else:
                self.storage[:, : self.length] = live.clone()
            self.lo = 0
        self.storage[:, self.lo + self.length : self.lo + self.length + n] = x
        self.length += n

    def view(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Frames at absolute positions ``[start, end)`` (default: all live ones), a view."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not (self.start <= start <= end <= self.end):
            raise AssertionError(
                f"[{start}, {end}) outside the live range [{self.start}, {self.end})"
            )
        a = self.lo + start - self.start
        return self.storage[:, a : a + end - start]

    def drop_before(self, position: int) -> None:
        n = min(max(0, position - self.start), self.length)
        self.lo += n
        self.start += n
        self.length -= n
        if self.length == 0:
            self.lo = 0
            self.start = max(self.start, position)
