"""Tiles of the chunked delta scan: a *frame* (the call's positions in order, or flipped for a
reverse pass), its blocks of chunks gathered as ``[G, B, Hk, Gx, C, *F]`` tiles (chunk-major,
heads grouped, never repeated), and the region geometry of each block.

A frame position ``p`` is the call's position ``p`` (forward) or ``T - 1 - p`` (flipped).
Positions past an input's end (the last chunk's tail; queries past the last query) are zeros:
zero keys, values and beta, and zero log-gates, which change nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["BlockGeometry", "Frame", "Geometry"]


class Frame(NamedTuple):
    """``t`` positions cut into chunks of ``c``, ``g`` chunks a block, flipped or not; heads
    grouped by the ``hk`` key heads; tiles in ``cd``."""

    t: int
    c: int
    g: int
    flip: bool
    hk: int
    cd: torch.dtype

    @property
    def n(self) -> int:
        """Chunks."""
        return -(-self.t // self.c)

    def blocks(self, reverse: bool = False) -> list[tuple[int, int]]:
        """``(n0, n1)`` chunk ranges of the blocks, in scan order (or backwards)."""
        out = [(n0, min(n0 + self.g, self.n)) for n0 in range(0, self.n, self.g)]
        return out[::-1] if reverse else out

    def _span(self, n0: int, n1: int, length: int) -> tuple[int, int, int, slice]:
        """Block start ``a``, the valid frame positions ``[p0, p1)`` of an input of ``length``
        positions, and the slice of the input holding them."""
        a, e = n0 * self.c, n1 * self.c
        if self.flip:
            p0, p1 = max(a, self.t - length), min(e, self.t)
        else:
            p0, p1 = a, min(e, length)
        p0 = min(max(p0, a), e)
        p1 = min(max(p1, p0), e)
        sl = slice(self.t - p1, self.t - p0) if self.flip else slice(p0, p1)
        return a, p0, p1, sl

    def gather(self, x: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
        """Chunks ``[n0, n1)`` of ``x: [B, Tx, Hx, *F]`` as ``[G, B, Hk, Hx / Hk, C, *F]`` in
        ``cd`` (contiguous), zeros where x has no position."""
        a, p0, p1, sl = self._span(n0, n1, x.shape[1])
        piece = x[:, sl].to(self.cd)
        if self.flip:
            piece = piece.flip(1)
        before, after = p0 - a, (n1 - n0) * self.c - (p1 - a)
        if before or after:
            pad = [0, 0] * (x.dim() - 2) + [before, after]
            piece = torch.nn.functional.pad(piece, pad)
        b, hx, rest = x.shape[0], x.shape[2], x.shape[3:]
        piece = piece.view(b, n1 - n0, self.c, self.hk, hx // self.hk, *rest)
        return piece.permute(1, 0, 3, 4, 2, *range(5, piece.dim())).contiguous()

    def scatter(self, out: torch.Tensor, tile: torch.Tensor, n0: int, n1: int) -> None:
        """Write a ``[G, B, Hk, Gx, C, *F]`` tile into ``out: [B, Tx, Hx, *F]`` where out has
        positions (the inverse of :meth:`gather`)."""
        a, p0, p1, sl = self._span(n0, n1, out.shape[1])
        if p1 <= p0:
            return
        g, b, hk, gx, c = tile.shape[:5]
        rest = tile.shape[5:]
        rows = tile.permute(1, 0, 4, 2, 3, *range(5, tile.dim())).reshape(b, g * c, hk * gx,
                                                                           *rest)
        rows = rows[:, p0 - a:p1 - a]
        out[:, sl] = rows.flip(1) if self.flip else rows


class BlockGeometry(NamedTuple):
    """Regions inside a block of G chunks, broadcastable against ``[G, B, Hk, Gx, C, C]``
    (None: the plain case of that field). ``low [G, B', 1, 1, C, C]``: key j <= query r in
    the same region (None: the lower triangle); ``read [G, B', 1, 1, C]``: position r reads the
    incoming state (None: all); ``keyf [G, B', 1, 1, C]``: key j enters the outgoing state (None:
    all); ``carry [G, B', 1, 1]``: the incoming state carries to the outgoing one (None: all)."""

    low: torch.Tensor | None
    read: torch.Tensor | None
    keyf: torch.Tensor | None
    carry: torch.Tensor | None


_PLAIN = BlockGeometry(None, None, None, None)


class Geometry:
    """The region starts of a frame (``start [B', T]``, frame positions; ``-1``: the region
    began before the frame, so the carried state is read), read per block."""

    def __init__(self, start: torch.Tensor, frame: Frame) -> None:
        n, c = frame.n, frame.c
        pad = n * c - start.shape[1]
        start = torch.cat([start, start[:, -1:].expand(-1, pad)], 1) if pad else start
        first = (torch.arange(n, device=start.device) * c)[None, :, None]
        self.stl = (start.view(start.shape[0], n, c) - first).clamp_min(-1)  # [B', N, C]
        self.inner = (self.stl > 0).any(-1).any(0).tolist()  # a region starts inside chunk n
        self.fresh = self.stl[..., 0] == 0  # [B', N]: a region starts at chunk n's first position
        self.any_fresh = self.fresh.any(0).tolist()
        self.c = c

    def block(self, n0: int, n1: int) -> BlockGeometry:
        if not any(self.inner[n0:n1]):
            if not any(self.any_fresh[n0:n1]):
                return _PLAIN
            carry = (~self.fresh[:, n0:n1]).transpose(0, 1)[:, :, None, None]  # [G, B', 1, 1]
            return BlockGeometry(None, carry[..., None], None, carry)
        st = self.stl[:, n0:n1].transpose(0, 1)[:, :, None, None]  # [G, B', 1, 1, C]
        r = torch.arange(self.c, device=st.device)
        low = (r[None, :] <= r[:, None]) & (r[None, :] >= st[..., :, None])  # [.., r, j]
        return BlockGeometry(low, st < 0, r >= st[..., -1:], st[..., -1] < 0)
