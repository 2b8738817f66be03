"""Tile geometry for the counting code: exact visible-pair counts per (query block, key block).

Every spec with a key range is counted analytically here (O(q_len * n_key_blocks)); the base
class falls back to dense masks one query block at a time for the rest. CPU, int64.
"""

from __future__ import annotations

import torch

#: Internal sentinels for unbounded range ends in the counting code (never seen outside).
NEG_INF = -(2**60)
POS_INF = 2**60


class Tiling:
    """Blocks of ``bq`` queries at ``q_off + [0, q_len)`` and ``bk`` keys at ``k_off + [0,
    k_len)``; the last block of each axis may be short."""

    def __init__(self, q_len: int, k_len: int, bq: int, bk: int, *, q_off: int, k_off: int):
        self.q_len, self.k_len, self.bq, self.bk = q_len, k_len, bq, bk
        self.q_off, self.k_off = q_off, k_off
        self.nq = -(-q_len // bq)
        self.nk = -(-k_len // bk)

    def q_positions(self) -> torch.Tensor:
        return torch.arange(self.q_off, self.q_off + self.q_len)

    def sizes(self) -> torch.Tensor:
        """Number of pairs in each tile, ``[nq, nk]``."""
        rq = torch.full((self.nq,), self.bq, dtype=torch.int64)
        rk = torch.full((self.nk,), self.bk, dtype=torch.int64)
        if self.nq:
            rq[-1] = self.q_len - (self.nq - 1) * self.bq
        if self.nk:
            rk[-1] = self.k_len - (self.nk - 1) * self.bk
        return rq[:, None] * rk[None, :]

    def unknown(self) -> torch.Tensor:
        """Counts of a spec that knows none of its tiles: ``-1`` everywhere, ``[1, nq, nk]``."""
        return torch.full((1, self.nq, self.nk), -1, dtype=torch.int64)

    def count_intervals(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Tile counts ``[B', nq, nk]`` when query r sees the keys ``[lo[r], hi[r]]``."""
        lo, hi = torch.broadcast_tensors(lo.to(torch.int64), hi.to(torch.int64))
        if lo.dim() == 1:
            lo, hi = lo[None], hi[None]
        b = lo.shape[0]
        starts = self.k_off + torch.arange(self.nk) * self.bk
        ends = torch.clamp(starts + self.bk, max=self.k_off + self.k_len) - 1
        out = torch.zeros(b, self.nq, self.nk, dtype=torch.int64)
        rows_per_step = max(1, (1 << 21) // max(1, self.nk * b * self.bq)) * self.bq
        for r0 in range(0, self.q_len, rows_per_step):
            r1 = min(self.q_len, r0 + rows_per_step)
            c = torch.minimum(hi[:, r0:r1, None], ends) - torch.maximum(lo[:, r0:r1, None], starts)
            c = (c + 1).clamp_min_(0)  # [b, rows, nk]
            pad = (-(r1 - r0)) % self.bq
            c = torch.nn.functional.pad(c, (0, 0, 0, pad))
            out[:, r0 // self.bq : r0 // self.bq + c.shape[1] // self.bq] = c.view(
                b, -1, self.bq, self.nk
            ).sum(2)
        return out
