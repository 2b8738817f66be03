"""``Segments(ids)``: documents packed in one sequence (and hash buckets, modalities).

``Segments(tensor([0, 0, 1, 1, 1])) & Causal()`` (row = query i, column = key j)::

        j 0 1 2 3 4
    i 0   x . . . .
      1   x x . . .
      2   . . x . .
      3   . . x x .
      4   . . x x x
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from causalmix.visibility.base import KeyRange
from causalmix.visibility.tensor_spec import PositionTensorSpec, int_vector, snapshot, tensor_key


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(PositionTensorSpec):
    """``ids[i] == ids[j]``: documents packed in one sequence, hash buckets, modalities.

    ``ids`` is an integer ``[T]`` or ``[B, T]`` tensor (copied) indexed by **absolute** position,
    so it must cover every position an operation asks about. Usually combined:
    ``Segments(ids) & Causal()`` is per-document causal attention. Ids need not be contiguous runs
    (hash buckets are fine); contiguous runs are counted faster. Packed batches without a
    ``T x T`` tensor: :meth:`from_lengths`, :meth:`from_cu_seqlens`, :meth:`from_position_ids`.
    """

    ids: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "ids", snapshot("ids", self.ids, (1, 2), "[T] or [B, T]"))
        self._seal()

    # ------------------------------------------------------------ packed-batch constructors
    @classmethod
    def from_lengths(cls, lengths: Any) -> Segments:
        """Documents of the given lengths packed back to back: ``lengths: [N]`` ints >= 0 (a
        tensor or a sequence) -> ids ``[sum(lengths)]`` (document ``d`` has id ``d``)."""
        lengths = int_vector("lengths", lengths, "[N]")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got min {int(lengths.min())}")
        return cls(torch.repeat_interleave(torch.arange(lengths.numel()), lengths))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Any) -> Segments:
        """The varlen-kernel convention: ``cu_seqlens: [N + 1]`` cumulative lengths starting at 0,
        non-decreasing (``[0, 3, 7]``: documents ``[0, 3)`` and ``[3, 7)``)."""
        cu = int_vector("cu_seqlens", cu_seqlens, "[N + 1]")
        if cu.numel() == 0 or int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start with 0, got {cu.tolist()[:8]}")
        lengths = cu[1:] - cu[:-1]
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        return cls.from_lengths(lengths)

    @classmethod
    def from_position_ids(cls, position_ids: Any) -> Segments:
        """Packed sequences as transformers marks them: ``position_ids: [T]`` or ``[B, T]``
        integer tensor; a new document starts wherever ``position_ids[t] !=
        position_ids[t - 1] + 1`` (e.g. a restart at 0). Returns ids of the same shape."""
        p = snapshot("position_ids", position_ids, (1, 2), "[T] or [B, T]")
        new = torch.ones_like(p, dtype=torch.bool)
        new[..., 1:] = p[..., 1:] != p[..., :-1] + 1
        return cls(new.to(torch.int64).cumsum(-1) - 1)

    # ------------------------------------------------------------ protocol
    def _tensor(self):
        return self.ids

    def _rows(self, device) -> torch.Tensor:
        ids = self.ids if self.ids.dim() == 2 else self.ids[None]
        return ids.to(device)

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        ids = self.ids.to(i.device)
        if ids.dim() == 1:
            return ids[i] == ids[j]
        return ids[b, i] == ids[b, j]

    def _make_spans(self):
        """Per position: first and last position of its run, and whether every id forms one
        contiguous run."""
        ids = self._rows("cpu")
        b, n = ids.shape
        pos = torch.arange(n).expand(b, n)
        new = torch.ones(b, n, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]
        start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
        last = torch.ones(b, n, dtype=torch.bool)
        last[:, :-1] = new[:, 1:]
        end = torch.where(last, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values
        end = end.flip(1)
        contiguous = all(
            int(new[r].sum()) == int(torch.unique(ids[r]).numel()) for r in range(b)
        )
        return start, end, contiguous

    def spans(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(start, end, contiguous)``: for every position (``[B', T]`` int64, CPU) the first
        and last position of its run of equal ids, and whether each id forms one run (then a
        run is a document: linear mixers reset their state at its start)."""
        return self._cached("_cached_spans", self._make_spans)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        start, end, contiguous = self.spans()
        if not contiguous:
            return None
        dev = i.device
        i = i.cpu()
        lo, hi = start[:, i].to(dev), end[:, i].to(dev)
        return KeyRange(lo, hi) if self.ids.dim() == 2 else KeyRange(lo[0], hi[0])



    def _content(self):
        return tensor_key(self.ids)

    def __repr__(self) -> str:
        n_runs = sum(int((r[1:] != r[:-1]).sum()) + 1 for r in self._rows("cpu") if r.numel())
        return f"Segments(ids=<{list(self.ids.shape)}, {n_runs} runs>)"
