"""``ValidKeys``: a key-validity spec (the 2-D padding mask of transformers) in O(T) memory.

Only torch and the public spec protocol are used here, so the class can move into
``causalmix.visibility`` unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.visibility import KeyRange, Visibility

__all__ = ["ValidKeys"]


@dataclasses.dataclass(frozen=True, eq=False)
class ValidKeys(Visibility):
    """``valid[b, j]``: every query may see key ``j`` of example ``b`` iff it is not padding.

    ``valid`` is a bool ``[B, T]`` tensor (copied) indexed by **absolute** key position
    (transformers' 2-D ``attention_mask``, 1 = token, 0 = padding), so it must cover every
    position an operation asks about. Combine it with the rule: ``Causal() & ValidKeys(mask)``
    is transformers' causal mask with padding. A query whose row sees no key (a left-padding
    query) gets output 0.

    Rows whose valid keys form one run (left or right padding) give every query one key range,
    so block maps are counted analytically; other rows fall back to the dense mask one block of
    queries at a time.

    Example, ``Causal() & ValidKeys(tensor([[0, 0, 1, 1, 1]]))`` (row = query, column = key)::

            j 0 1 2 3 4
        i 0   . . . . .
          1   . . . . .
          2   . . x . .
          3   . . x x .
          4   . . x x x
    """

    valid: torch.Tensor

    def __post_init__(self):
        valid = self.valid
        if not isinstance(valid, torch.Tensor):
            raise ValueError(f"valid must be a bool [B, T] tensor, got {type(valid).__name__}")
        if valid.dim() != 2:
            raise ValueError(f"valid must be [B, T], got shape {list(valid.shape)}")
        if valid.dtype.is_floating_point or valid.dtype.is_complex:
            raise ValueError(f"valid must be a bool or 0/1 integer tensor, got dtype {valid.dtype}")
        if valid.dtype != torch.bool:
            if valid.numel() and not bool(((valid == 0) | (valid == 1)).all()):
                raise ValueError("valid must hold only 0 and 1")
            valid = valid != 0
        # Our own copy: refilling the caller's buffer later changes nothing.
        object.__setattr__(self, "valid", valid.detach().to(torch.bool, copy=True))

    # ------------------------------------------------------------------ the protocol
    def visible(self, b, i, j):
        valid = self.valid.to(j.device)
        return valid[b, j] & (i >= 0)

    def _runs(self):
        cached = self.__dict__.get("_cached_runs")
        if cached is None:
            valid = self.valid.cpu()
            n = valid.shape[1]
            pos = torch.arange(n)
            count = valid.sum(1)
            first = torch.where(valid, pos, n).min(1).values if n else count
            last = torch.where(valid, pos, -1).max(1).values if n else count - 1
            one_run = bool(((last - first + 1 == count) | (count == 0)).all())
            # An empty row gets the empty range [n, n - 1].
            first = torch.where(count == 0, n, first)
            last = torch.where(count == 0, n - 1, last)
            cached = (first, last, one_run)
            object.__setattr__(self, "_cached_runs", cached)
        return cached

    def key_range(self, i):
        first, last, one_run = self._runs()
        if not one_run:
            return None
        shape = (first.shape[0], i.shape[-1])
        lo = first.to(i.device)[:, None].expand(shape)
        hi = last.to(i.device)[:, None].expand(shape)
        return KeyRange(lo, hi)

    @property
    def covered_length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def lookahead_frames(self) -> None:
        return None

    @property
    def lookback_frames(self) -> None:
        return None

    # ------------------------------------------------------------------ value semantics
    def _key(self):
        cached = self.__dict__.get("_cached_key")
        if cached is None:
            cached = (tuple(self.valid.shape), tuple(self.valid.reshape(-1).tolist()))
            object.__setattr__(self, "_cached_key", cached)
        return cached

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash(("ValidKeys", self._key()))

    def __repr__(self) -> str:
        pads = (~self.valid).sum(1).tolist()
        shown = pads if len(pads) <= 8 else pads[:8] + ["..."]
        return f"ValidKeys(<{list(self.valid.shape)}, padding per row {shown}>)"
