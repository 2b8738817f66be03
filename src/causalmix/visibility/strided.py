"""``Strided(inner, ...)``: a spec seen through local indices of a strided shard (the striped
sequence-parallel layout of :mod:`causalmix.distributed`)."""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import MAX_POSITION, check_int
from causalmix.visibility.base import KeyRange, Visibility, check_spec


@dataclasses.dataclass(frozen=True)
class Strided(Visibility):
    """``inner`` seen through local indices: ``visible(i, j) = inner.visible(q_start +
    q_stride * i, k_start + k_stride * j)`` (a strided shard of a sequence, e.g. the striped
    sequence-parallel layout). Where ``inner`` sees one range of keys per query, so does the
    wrapper (a range of absolute keys holds a range of every arithmetic progression). Starts and
    strides are ints below ``MAX_POSITION``, and every local position asked about must map below
    it (checked by :meth:`check_positions`)."""

    inner: Visibility
    q_start: int
    q_stride: int
    k_start: int
    k_stride: int

    def __post_init__(self):
        check_spec("inner", self.inner)
        for name, minimum in (("q_start", 0), ("q_stride", 1), ("k_start", 0), ("k_stride", 1)):
            value = check_int(name, getattr(self, name), minimum, MAX_POSITION - 1)
            object.__setattr__(self, name, value)

    def check_positions(self, q_len: int, k_len: int, q_offset: int = 0,
                        k_offset: int = 0) -> None:
        super().check_positions(q_len, k_len, q_offset, k_offset)
        for what, start, stride, off, n in (("q", self.q_start, self.q_stride, q_offset, q_len),
                                            ("k", self.k_start, self.k_stride, k_offset, k_len)):
            if n and start + stride * (off + n - 1) >= MAX_POSITION:
                raise ValueError(f"{self!r}: local {what} positions up to {off + n - 1} map past "
                                 f"MAX_POSITION ({MAX_POSITION})")

    def check_unmodified(self) -> None:
        self.inner.check_unmodified()

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.inner.visible(b, self.q_start + self.q_stride * i,
                                  self.k_start + self.k_stride * j)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        kr = self.inner.key_range(self.q_start + self.q_stride * i)
        if kr is None:
            return None
        s, k0 = self.k_stride, self.k_start
        # smallest j with k0 + s*j >= lo, largest j with k0 + s*j <= hi
        lo = None if kr.lo is None else -((k0 - kr.lo) // s)
        hi = None if kr.hi is None else (kr.hi - k0) // s
        return KeyRange(lo, hi)

    @property
    def batch_size(self) -> int | None:
        return self.inner.batch_size

    def __repr__(self) -> str:
        return (f"Strided({self.inner!r}, q={self.q_start}+{self.q_stride}*i, "
                f"k={self.k_start}+{self.k_stride}*j)")
