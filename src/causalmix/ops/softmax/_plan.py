"""The tile plans of the ``blocks`` implementation (imported by ``impl/blocks.py`` only).

A plan is data: which (query rows x keys) rectangles a call computes, which of them need a mask,
and the masks themselves (0 / -inf, built once and cached with the plan). It depends only on the
spec, the call's :class:`Geometry` and a few sizes, so it is cached between calls, keyed by
``_call.SpecKey`` (a spec modified in place after a plan was made never finds that plan again,
and never poisons the cache for equal new specs). A plan holds no spec: masks it did not cache
are rebuilt from the call's own spec.

The spec's block map splits the (query, key) plane into tiles of ``rows`` queries x ``cols`` keys.
Each row block walks its non-empty key tiles in cache-sized *pieces* (at most ``PIECE_FLOATS``
scores over all heads); only the tiles that are partial for some example get mask work. Specs
whose key range is one shift-invariant band (``Window``: query ``i`` sees keys
``[i - left, i + right]``) plan their interior row blocks as one :class:`Band`, computed by
batched matmuls over a strided view of the keys with one mask for all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.caching import LRUCache
from causalmix.ops.softmax._call import SpecKey
from causalmix.visibility import EMPTY, FULL, Visibility

KEY_BLOCK = 64  # keys per tile of the block map
PIECE_FLOATS = 1 << 18  # scores of one piece over all heads (1 MiB fp32: stays in cache)
BAND_ROWS = 32  # rows per block on the band path (keys computed: rows + left + right)
_BIAS_FLOATS = 1 << 23  # cached mask floats per plan (32 MiB fp32); past it, masks are rebuilt
_ROW_CHOICES = (256, 128, 64, 32)
_ROW_EFFICIENCY = {256: 1.0, 128: 1.0, 64: 1.12, 32: 1.4}  # matmul slowdown of thinner blocks
_PIECE_OVERHEAD_FLOPS = 4e6  # Python + launch cost of one piece, in flop-equivalents
_PLANS: LRUCache = LRUCache(32)
_ROWS: LRUCache = LRUCache(32)


class Geometry(NamedTuple):
    """Where a call's queries and keys sit: local lengths and absolute offsets."""

    tq: int
    tk: int
    q_offset: int
    k_offset: int


class Heads(NamedTuple):
    """The sizes that set how much work one tile is: batch, query heads, head dim."""

    b: int
    hq: int
    d: int


class Rect(NamedTuple):
    """Local query rows ``[r0, r1)`` x local keys ``[m0, m1)``."""

    r0: int
    r1: int
    m0: int
    m1: int


class Piece(NamedTuple):
    c0: int  # local keys [c0, c1) computed together
    c1: int
    m0: int  # local keys [m0, m1) inside the piece that need the mask (m0 == m1: none)
    m1: int
    bias: torch.Tensor | None  # [B', rows, 1, m1 - m0] of 0 / -inf, or None (rebuilt)


class Block(NamedTuple):
    r0: int  # local query rows [r0, r1)
    r1: int
    pieces: tuple[Piece, ...]


class Band(NamedTuple):
    """Row blocks ``[n0, n1)`` of a shift-invariant band spec (each query sees keys
    ``[i - left, i + right]``, e.g. ``Window``), all computed by batched matmuls over a strided
    view of the keys (Longformer's sliding chunks): block ``n`` reads local keys
    ``[k0 + (n - n0) * rows, ... + width)``, and one mask serves every block."""

    n0: int
    n1: int
    k0: int
    width: int  # a multiple of rows
    bias: torch.Tensor  # [1, rows, 1, width] of 0 / -inf


class Plan(NamedTuple):
    rows: int
    blocks: tuple[Block, ...]  # row blocks outside the band
    piece_max: int  # widest piece
    geo: Geometry
    band: Band | None


class Sizes(NamedTuple):
    """The tile sizes of a plan and the dtype / device its masks are built in."""

    rows: int
    cols: int
    piece: int
    dtype: torch.dtype
    device: torch.device


def piece_keys(heads: Heads, rows: int, cols: int) -> int:
    """Keys per piece: a multiple of ``cols`` whose scores over all heads fit ``PIECE_FLOATS``."""
    return max(cols, PIECE_FLOATS // max(1, heads.b * heads.hq * rows) // cols * cols)


def row_size(visibility: Visibility, geo: Geometry, heads: Heads, cols: int) -> int:
    """Rows per block: the one whose computed tiles (plus a per-piece overhead) cost least; thin
    blocks skip more masked work (a window, a block diagonal) but run slower matmuls."""
    key = (SpecKey(visibility), geo, heads, cols)
    return _ROWS.get_or_make(key, lambda: _best_rows(visibility, geo, heads, cols))


def band_reach(visibility: Visibility, geo: Geometry) -> tuple[int, int] | None:
    """``(left, right)`` if every query ``i`` sees exactly keys ``[i - left, i + right]`` (from
    the public ``key_range``) and enough rows are interior for the batched band path."""
    tq, tk = geo.tq, geo.tk
    if visibility.batch_size is not None or tq < 8 * BAND_ROWS:
        return None
    i = torch.arange(geo.q_offset, geo.q_offset + tq)
    kr = visibility.key_range(i)
    if kr is None or kr.lo is None or kr.hi is None:
        return None
    lo = torch.broadcast_to(kr.lo, (1, tq)) - i
    hi = torch.broadcast_to(kr.hi, (1, tq)) - i
    left, right = -int(lo[0, 0]), int(hi[0, 0])
    if not (bool((lo == -left).all()) and bool((hi == right).all())) or left + right < 0:
        return None
    if left + right + BAND_ROWS > tk // 2:
        return None  # hardly sparse: the general path does as well
    return left, right


def _best_rows(visibility: Visibility, geo: Geometry, heads: Heads, cols: int) -> int:
    if band_reach(visibility, geo) is not None:
        return BAND_ROWS
    best = None
    for r in dict.fromkeys(min(r, geo.tq) for r in _ROW_CHOICES):
        kinds = visibility.block_map(geo.tq, geo.tk, r, cols, q_offset=geo.q_offset,
                                     k_offset=geo.k_offset)
        tiles = (kinds != EMPTY).any(dim=0).sum(dim=1)  # per row block
        computed = float(tiles.sum()) * cols * r
        per = piece_keys(heads, r, cols)
        pieces = float((tiles * cols + per - 1).div(per, rounding_mode="floor").sum())
        cost = computed * 14 * heads.d * heads.hq * heads.b * _ROW_EFFICIENCY.get(r, 1.6) \
            + pieces * _PIECE_OVERHEAD_FLOPS
        if best is None or cost < best[0]:
            best = (cost, r)
    return best[1]


def plan(visibility: Visibility, geo: Geometry, sizes: Sizes) -> Plan:
    """The cached :class:`Plan` of a call."""
    key = (SpecKey(visibility), geo, sizes.rows, sizes.cols, sizes.piece, sizes.dtype,
           str(sizes.device))
    return _PLANS.get_or_make(key, lambda: _make_plan(visibility, geo, sizes))


def true_spans(flags) -> list[tuple[int, int]]:
    """Maximal spans ``[a, b)`` of consecutive true entries (runs of non-empty tiles)."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _make_plan(visibility: Visibility, geo: Geometry, sizes: Sizes) -> Plan:
    rows, cols = sizes.rows, sizes.cols
    kinds = visibility.block_map(geo.tq, geo.tk, rows, cols, q_offset=geo.q_offset,
                                 k_offset=geo.k_offset)
    # One plan for the whole batch: a tile is skipped only if empty for every example, and
    # mask-free only if full for every example.
    nonempty = (kinds != EMPTY).any(dim=0).tolist()
    full = (kinds == FULL).all(dim=0).tolist()
    budget = [_BIAS_FLOATS]
    blocks = []
    band = _make_band(visibility, geo, sizes)
    for r, (ne_row, full_row) in enumerate(zip(nonempty, full, strict=True)):
        if band is not None and band.n0 <= r < band.n1:
            continue
        r0, r1 = r * rows, min(geo.tq, (r + 1) * rows)
        pieces = tuple(_pieces(visibility, geo, sizes, (r0, r1, ne_row, full_row), budget))
        blocks.append(Block(r0, r1, pieces))
    widest = max((p.c1 - p.c0 for blk in blocks for p in blk.pieces), default=0)
    return Plan(rows, tuple(blocks), widest, geo, band)


def _pieces(visibility: Visibility, geo: Geometry, sizes: Sizes, row, budget: list[int]):
    """The pieces of one row block ``row = (r0, r1, nonempty tiles, full tiles)``; masks are
    built while ``budget`` (floats, shared by the plan) lasts."""
    r0, r1, ne_row, full_row = row
    cols, per = sizes.cols, max(1, sizes.piece // sizes.cols)
    for a, b in true_spans(ne_row):
        for t0 in range(a, b, per):
            t1 = min(b, t0 + per)
            part = [t for t in range(t0, t1) if not full_row[t]]
            c0, c1 = t0 * cols, min(geo.tk, t1 * cols)
            m0, m1 = (part[0] * cols, min(geo.tk, (part[-1] + 1) * cols)) if part else (c0, c0)
            mask = None
            if m1 > m0 and (r1 - r0) * (m1 - m0) * (visibility.batch_size or 1) <= budget[0]:
                mask = bias(visibility, geo, Rect(r0, r1, m0, m1), dtype=sizes.dtype,
                            device=sizes.device)
                budget[0] -= mask.numel()
            yield Piece(c0, c1, m0, m1, mask)


def _make_band(visibility: Visibility, geo: Geometry, sizes: Sizes) -> Band | None:
    reach = band_reach(visibility, geo)
    rows = sizes.rows
    if reach is None or rows != BAND_ROWS:
        return None
    left, right = reach
    width = -(-(rows + left + right) // rows) * rows
    shift = geo.q_offset - geo.k_offset - left  # block at local row a reads keys from a + shift
    n0 = max(0, -(shift // rows))  # first block with a + shift >= 0: ceil(-shift / rows)
    n1 = min(geo.tq // rows, (geo.tk - width - shift) // rows + 1)  # last full block in the keys
    if n1 - n0 < 2:
        return None
    k0 = n0 * rows + shift
    mask = bias(visibility, geo, Rect(n0 * rows, (n0 + 1) * rows, k0, k0 + width),
                dtype=sizes.dtype, device=sizes.device)
    return Band(n0, n1, k0, width, mask)


def bias(visibility: Visibility, geo: Geometry, rect: Rect, *, dtype: torch.dtype,
         device: torch.device) -> torch.Tensor:
    """``[B', r1 - r0, 1, m1 - m0]``: 0 where visible, -inf where not."""
    nb = visibility.batch_size or 1
    bi = torch.arange(nb, device=device).view(nb, 1, 1)
    i = torch.arange(geo.q_offset + rect.r0, geo.q_offset + rect.r1, device=device).view(1, -1, 1)
    j = torch.arange(geo.k_offset + rect.m0, geo.k_offset + rect.m1, device=device).view(1, 1, -1)
    vis = visibility.visible(bi, i, j).expand(nb, rect.r1 - rect.r0, rect.m1 - rect.m0)
    out = torch.zeros(nb, rect.r1 - rect.r0, rect.m1 - rect.m0, dtype=dtype, device=device)
    return out.masked_fill_(~vis, float("-inf"))[:, :, None, :]
