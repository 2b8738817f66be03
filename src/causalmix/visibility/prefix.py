"""``Prefix(n)``: the first ``n`` positions see each other, the rest are causal (prefix-LM).

``Prefix(2)`` on 4 positions (row = query i, column = key j)::

        j 0 1 2 3
    i 0   x x . .
      1   x x . .
      2   x x x .
      3   x x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import MAX_POSITION, check_int
from causalmix.visibility.base import KeyRange
from causalmix.visibility.tensor_spec import TensorSpec, snapshot, tensor_key


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix(TensorSpec):
    """``j <= i or j < n``: the first ``n`` positions see each other, the rest are causal
    (prefix-LM). ``n`` is an int, or an int ``[B]`` tensor of per-example prefix lengths (copied).

    ``lookahead_frames`` is ``n - 1`` (query 0 may see key ``n - 1``): a stream waits for the
    whole prefix, then runs causally. Any ``n >= 0`` is exact (lengths beyond every position are
    clamped to ``MAX_POSITION`` inside the arithmetic).
    """

    n: int | torch.Tensor

    def __post_init__(self):
        n = self.n
        if isinstance(n, torch.Tensor) and n.dim() != 0:
            n = snapshot("n", n, (1,), "int or [B]")
            if n.numel() and int(n.min()) < 0:
                raise ValueError(f"n must be >= 0, got min {int(n.min())}")
            object.__setattr__(self, "n", n)
            self._seal()
        else:
            object.__setattr__(self, "n", check_int("n", n, 0))

    def _tensor(self):
        return self.n if isinstance(self.n, torch.Tensor) else torch.empty(0)

    def _check_unmodified(self) -> None:
        if isinstance(self.n, torch.Tensor):
            super()._check_unmodified()

    def _n(self, device) -> int | torch.Tensor:
        if isinstance(self.n, torch.Tensor):
            return self.n.to(device).clamp_max(MAX_POSITION)
        return min(self.n, MAX_POSITION)

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        n = self._n(i.device)
        n = n[b] if isinstance(n, torch.Tensor) else n
        return (j <= i) | (j < n)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        self._check_unmodified()
        n = self._n(i.device)
        if isinstance(n, torch.Tensor):
            return KeyRange(None, torch.maximum(i[None, :], n[:, None] - 1))
        return KeyRange(None, torch.clamp(i, min=n - 1))

    @property
    def batch_size(self) -> int | None:
        return self.n.shape[0] if isinstance(self.n, torch.Tensor) else None

    @property
    def lookahead_frames(self) -> int:
        if isinstance(self.n, torch.Tensor):
            nmax = int(self.n.max()) if self.n.numel() else 0
        else:
            nmax = self.n
        return min(max(nmax - 1, 0), MAX_POSITION - 1)

    def _content(self):
        return ("tensor", tensor_key(self.n)) if isinstance(self.n, torch.Tensor) \
            else ("int", self.n)

    def __repr__(self) -> str:
        if isinstance(self.n, torch.Tensor):
            vals = self.n.tolist()
            shown = vals if len(vals) <= 8 else vals[:8] + ["..."]
            return f"Prefix(n={shown})"
        return f"Prefix({self.n})"
