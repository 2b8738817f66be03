"""``ValidKeys(valid)``: padding as a spec, in O(B * T) instead of a ``T x T`` mask.

``Causal() & ValidKeys(tensor([[0, 0, 1, 1, 1]]))`` (row = query i, column = key j)::

        j 0 1 2 3 4
    i 0   . . . . .
      1   . . . . .
      2   . . x . .
      3   . . x x .
      4   . . x x x
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.visibility.base import KeyRange
from causalmix.visibility.tensor_spec import PositionTensorSpec, tensor_key


@dataclasses.dataclass(frozen=True, eq=False)
class ValidKeys(PositionTensorSpec):
    """``valid[b, j]``: a query may see key ``j`` of example ``b`` iff it is not padding.

    ``valid`` is a bool (or 0/1 integer) ``[B, T]`` tensor (copied) indexed by **absolute** key
    position -- transformers' 2-D ``attention_mask``, 1 = token, 0 = padding -- so it must cover
    every position an operation asks about. Combined with a rule, ``Causal() & ValidKeys(mask)``
    is the causal mask with padding in O(B * T) memory; a query whose row sees no key (a
    left-padding query) gets output 0. Rows whose tokens form one run (left or right padding)
    give each query one key range (block maps counted analytically); rows with holes fall back
    to the dense mask one block of queries at a time.
    """

    valid: torch.Tensor

    def __post_init__(self):
        v = self.valid
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"valid must be a bool [B, T] tensor, got {type(v).__name__}")
        if v.dtype.is_floating_point or v.dtype.is_complex:
            raise ValueError(f"valid must be a bool or 0/1 integer tensor, got dtype {v.dtype}")
        if v.dim() != 2:
            raise ValueError(f"valid must be [B, T], got shape {list(v.shape)}")
        if v.device.type == "meta":
            raise ValueError("valid must hold values (a cpu or accelerator tensor), got a meta "
                             "tensor")
        if v.dtype != torch.bool and v.numel() and not bool(((v == 0) | (v == 1)).all()):
            raise ValueError("valid must hold only 0 and 1")
        object.__setattr__(self, "valid", v.detach().to(torch.bool, copy=True))
        self._seal()

    def _tensor(self) -> torch.Tensor:
        return self.valid

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.valid.to(j.device)[b, j] & (i >= 0)

    def _make_token_span(self):
        """Per row: first and last valid key, and whether every row's tokens form one run."""
        valid = self.valid
        n = valid.shape[1]
        pos = torch.arange(n)
        count = valid.sum(1)
        first = torch.where(valid, pos, n).amin(1) if n else count
        last = torch.where(valid, pos, -1).amax(1) if n else count - 1
        one_run = bool(((last - first + 1 == count) | (count == 0)).all())
        empty = count == 0  # an empty row gets the empty range [n, n - 1]
        return torch.where(empty, n, first), torch.where(empty, n - 1, last), one_run

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        first, last, one_run = self._cached("_cached_token_span", self._make_token_span)
        if not one_run:
            return None
        shape = (first.shape[0], i.shape[-1])
        return KeyRange(first.to(i.device)[:, None].expand(shape),
                        last.to(i.device)[:, None].expand(shape))



    def _content(self):
        return tensor_key(self.valid)

    def __repr__(self) -> str:
        pads = (~self.valid).sum(1).tolist()
        shown = pads if len(pads) <= 8 else pads[:8] + ["..."]
        return f"ValidKeys(<{list(self.valid.shape)}, padding per row {shown}>)"
