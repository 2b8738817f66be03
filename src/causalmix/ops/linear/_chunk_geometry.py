"""Geometry and weights of the chunked linear scan (private to ``impl/chunk.py``).

A call of ``T`` positions is cut into ``N`` chunks of ``C`` positions. This module holds what
the scan stages read about them:

* :class:`Geometry`: masks and flags of the chunks (positions, segments, spec), independent of
  the gates, cached across calls with the same position arrays;
* :class:`Weights`: the gate-derived weights of every chunk, from the chunk-local cumulative
  sums ``fwd_cum`` (``b_r = g_0 + .. + g_r`` of ``log_gate``) and ``rev_cum`` (``e_r = r_0 +
  .. + r_{r-1}`` of ``reverse_log_gate``), kept in fp64;
* :class:`TileWeights`: the intra-chunk tile weights ``M`` (``exp(b_r - b_j)`` for keys j <= r
  of the same segment, ``exp(e_j - e_r)`` for reverse pairs j > r, 0 elsewhere).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.caching import LRUCache
from causalmix.ops.factor import PositionArrays

MINUS_INF = float("-inf")


def tile(x: torch.Tensor, a: int, c: int, cd) -> torch.Tensor:
    """Positions [a, a + c) of a ``[B, T, H, D]`` tensor as ``[B, H, c, D]`` in dtype cd."""
    return x[:, a:a + c].transpose(1, 2).to(cd)


def _by_chunk(x: torch.Tensor, n: int, c: int, fill) -> torch.Tensor:
    """``[B', T]`` -> ``[B', N, C]``, the tail padded with ``fill`` (``"edge"``: the last value)."""
    pad = n * c - x.shape[1]
    if fill == "edge":
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
    else:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(x.shape[0], n, c)


class ChunkMasks(NamedTuple):
    """Boolean geometry of one chunk (gate independent): ``fmask [B', cn, cn]`` (key j <= query
    r of the same segment), ``bmask [B', cn, cn]`` or None (reverse pairs j > r)."""

    a: int
    cn: int
    fmask: torch.Tensor
    bmask: torch.Tensor | None


class Flags(NamedTuple):
    """Per-position flags of every chunk, ``[B', 1, N, C]`` (chunk-level ones ``[B', 1, N]``):
    which queries read the carried state, which keys enter the next one, whether it carries."""

    read_f: torch.Tensor
    key_f: torch.Tensor
    carry_f: torch.Tensor
    read_r: torch.Tensor | None
    key_r: torch.Tensor | None
    carry_r: torch.Tensor | None


class Geometry:
    """Masks and flags of one call (positions, length, chunk size), independent of the gates.

    Chunks are grouped by their position arrays relative to the chunk start (all chunks without
    a segment start or region end inside share one mask, ``Chunked(s)`` repeats with period
    ``lcm(s, C) / C``); masks of groups with several chunks are cached, the others built on
    demand. A chunk is *dead* when no key of it nor of any later chunk enters the reverse scan
    (``Prefix`` past ``n``): its reverse read and update are skipped.
    """

    def __init__(self, arrays: PositionArrays, length: int, c: int, reverse: bool, device):
        self.t, self.c, self.reverse, self.arr = length, c, reverse, arrays
        self.n = n = -(-length // c)
        starts = (torch.arange(n, device=device) * c)[None, :, None]  # [1, N, 1]
        st = (_by_chunk(arrays.start, n, c, "edge") - starts).clamp_min(-1)  # [B', N, C]
        kinds = torch.zeros(n, dtype=torch.int64, device=device)  # 0 general, 2 dead
        feats = [st]
        r = torch.arange(c, device=device)
        st_last = st[:, :, -1:]
        read_r = key_r = carry_r = None
        if reverse:
            en = (_by_chunk(arrays.end, n, c, length) - starts).clamp_max(c)
            feats.append(en)
            key_r = r <= en[:, :, :1]
            if arrays.key_ok is not None:
                kok = _by_chunk(arrays.key_ok, n, c, False)
                feats.append(kok.to(torch.int64))
                key_r = key_r & kok
                none_ok = ~(kok.any(-1).any(0))  # no key enters here nor in a later chunk
                none_ok = none_ok.flip(0).to(torch.int64).cumprod(0).flip(0).bool()
                kinds = torch.where(none_ok, 2, kinds)
            read_r, carry_r = en >= c, en[:, :, 0] >= c
        self.flags = Flags(st < 0, r >= st_last, st_last[:, :, 0] < 0, read_r, key_r, carry_r)
        self.flags = Flags(*(None if x is None else x[:, None] for x in self.flags))
        sizes = torch.full((1, n, 1), c, dtype=torch.int64, device=device)
        sizes[0, -1, 0] = length - (n - 1) * c
        feats += [sizes, kinds.view(1, n, 1)]
        nb = max(f.shape[0] for f in feats)
        rows = torch.cat([f.expand(nb, n, -1) for f in feats], dim=-1).transpose(0, 1)
        _, group, counts = torch.unique(rows.reshape(n, -1), dim=0, return_inverse=True,
                                        return_counts=True)
        self.group = torch.where(counts[group] > 1, group, -1).tolist()
        self.rev_kind = kinds.tolist()
        self._cache: dict[int, ChunkMasks] = {}
        # constant gates (a decay): their weights and shared tile weights, by gate values
        self.memo: LRUCache[tuple] = LRUCache(4)

    def dead(self, n: int) -> bool:
        """No key of chunk n nor of any later chunk enters the reverse scan."""
        return self.reverse and self.rev_kind[n] == 2

    def chunk(self, n: int) -> ChunkMasks:
        key = self.group[n]
        if key >= 0 and key in self._cache:
            return self._cache[key]._replace(a=n * self.c)
        a = n * self.c
        cn = min(self.c, self.t - a)
        r = torch.arange(cn, device=self.arr.start.device)
        st = self.arr.start[:, a:a + cn] - a  # [B', cn], < 0: before the chunk
        low = r[None, None, :] <= r[None, :, None]  # [1, r, j]: j <= r
        fmask = low & (r[None, None, :] >= st[:, :, None])
        bmask = None
        if self.reverse and not self.dead(n):
            en = self.arr.end[:, a:a + cn] - a
            bmask = (~low) & (r[None, None, :] <= en[:, :, None])
            if self.arr.key_ok is not None:
                bmask = bmask & self.arr.key_ok[:, None, a:a + cn]
        out = ChunkMasks(a, cn, fmask, bmask)
        if key >= 0:
            self._cache[key] = out
        return out


GEOMETRIES: LRUCache[Geometry] = LRUCache(8)


def _content(x):
    return None if x is None else (tuple(x.shape), tuple(x.reshape(-1).tolist()))


def geometry(arrays: PositionArrays, length: int, c: int, reverse: bool) -> Geometry:
    """:class:`Geometry` of a call, reused across calls with the same position arrays, length
    and chunk size (a stream pushing equal-sized pieces, every training step of a model)."""
    key = (length, c, reverse, str(arrays.start.device), _content(arrays.start),
           _content(arrays.end), _content(arrays.key_ok))
    return GEOMETRIES.get_or_make(
        key, lambda: Geometry(arrays, length, c, reverse, arrays.start.device))


class Weights(NamedTuple):
    """Gate-derived weights of every chunk, ``[B'', H, N, C]`` (carries ``[B'', H, N]``), times
    the geometry's flags; reverse fields are None without a reverse scan:

    * ``fwd_cum`` ``b_r`` (fp64), ``read_f = exp(b_r)`` (query r reads the carried state S_n),
      ``key_f = exp(B - b_j)`` (key j enters S_{n+1}), ``carry_f = exp(B)`` (S_n carried);
    * ``rev_cum`` ``e_r`` (fp64), ``read_r = exp(E - e_r)`` (query r reads R_n), ``key_r =
      exp(e_j)`` (key j enters R_{n-1}), ``carry_r = exp(E)`` (R_n carried),

    with ``B = b_{C-1}`` and ``E`` the sum of the chunk's reverse log-gates."""

    fwd_cum: torch.Tensor
    read_f: torch.Tensor
    key_f: torch.Tensor
    carry_f: torch.Tensor
    rev_cum: torch.Tensor | None
    read_r: torch.Tensor | None
    key_r: torch.Tensor | None
    carry_r: torch.Tensor | None


def _exp(x: torch.Tensor, cd) -> torch.Tensor:
    """``exp`` of an fp64 difference, rounded to the compute dtype first."""
    return torch.exp(x.to(cd))


def chunk_weights(log_gate: torch.Tensor, reverse_log_gate: torch.Tensor, geo: Geometry,
                  cd: torch.dtype) -> Weights:
    """``log_gate, reverse_log_gate: [B', T, H]`` -> :class:`Weights`. The chunk-local
    cumulative sums are kept in fp64 so that their differences are exact to the compute dtype
    at any chunk size and gate strength; only those differences (all ``<= 0``) are
    exponentiated."""
    n, c, fl = geo.n, geo.c, geo.flags

    def local(x):  # [B', T, H] -> [B', H, N, C] fp64, zero gates past the end
        x = torch.nn.functional.pad(x.to(torch.float64), (0, 0, 0, n * c - x.shape[1]))
        return x.view(x.shape[0], n, c, -1).permute(0, 3, 1, 2)

    fwd_cum = local(log_gate).cumsum(-1)
    tot = fwd_cum[..., -1:]
    read_f, key_f = _exp(fwd_cum, cd) * fl.read_f, _exp(tot - fwd_cum, cd) * fl.key_f
    carry_f = _exp(tot[..., 0], cd) * fl.carry_f
    if not geo.reverse:
        return Weights(fwd_cum, read_f, key_f, carry_f, None, None, None, None)
    r = local(reverse_log_gate)
    rev_cum = torch.nn.functional.pad(r[..., :-1], (1, 0)).cumsum(-1)  # exclusive
    etot = rev_cum[..., -1:] + r[..., -1:]
    read_r, key_r = _exp(etot - rev_cum, cd) * fl.read_r, _exp(rev_cum, cd) * fl.key_r
    return Weights(fwd_cum, read_f, key_f, carry_f, rev_cum, read_r, key_r,
                   _exp(etot[..., 0], cd) * fl.carry_r)


def _block_masks(geo: Geometry, n0: int, n1: int, attr: str):
    """Masks of chunks ``[n0, n1)`` as ``[B', G, C, C]`` (one broadcast mask when they share
    one geometry), or None when no chunk has one."""
    keys = geo.group[n0:n1]
    if keys[0] >= 0 and all(kk == keys[0] for kk in keys) and geo.t - n0 * geo.c >= \
            (n1 - n0) * geo.c:
        mk = getattr(geo.chunk(n0), attr)
        return None if mk is None else mk[:, None]
    ms = [getattr(geo.chunk(n), attr) for n in range(n0, n1)]
    if all(mk is None for mk in ms):
        return None
    c, out = geo.c, []
    for n, mk in zip(range(n0, n1), ms, strict=True):
        cn = geo.chunk(n).cn
        if mk is None:
            mk = torch.zeros(1, cn, cn, dtype=torch.bool, device=geo.arr.start.device)
        out.append(torch.nn.functional.pad(mk, (0, c - cn, 0, c - cn), value=False))
    nb = max(x.shape[0] for x in out)
    return torch.stack([x.expand(nb, c, c) for x in out], dim=1)


class TileWeights:
    """``M [B'', H, cn, cn]`` of every chunk (exp of masked differences of the fp64 local sums;
    masked entries are 0), computed for blocks of ``G`` chunks at once (few large ops instead of
    many small ones; a block weighs at most ``[B, T, H, width]``, the output's size for
    ``width = Dv``). Blocks use ``G`` for a count of chunks, not a head group."""

    def __init__(self, w: Weights, geo: Geometry, cd: torch.dtype, width: int,
                 memo: dict | None = None) -> None:
        self.w, self.geo, self.cd, self.memo = w, geo, cd, memo
        self.g = max(1, min(16, geo.t * width // (geo.c * geo.c)))
        self._block, self._data = -1, None

    def __call__(self, n: int) -> torch.Tensor:
        """``memo`` (constant gates): tiles of chunks sharing a geometry are computed once."""
        key = self.geo.group[n]
        if self.memo is not None and key >= 0:
            hit = self.memo.get(key)
            if hit is None:
                hit = self.memo[key] = self._compute(n)
            return hit
        return self._compute(n)

    def _compute(self, n: int) -> torch.Tensor:
        blk = n // self.g
        if blk != self._block:
            self._block, self._data = blk, self._make(blk * self.g,
                                                      min(self.geo.n, (blk + 1) * self.g))
        cn = min(self.geo.c, self.geo.t - n * self.geo.c)
        return self._data[:, :, n - self._block * self.g, :cn, :cn]

    def _make(self, n0: int, n1: int) -> torch.Tensor:
        geo, w = self.geo, self.w
        b = w.fwd_cum[:, :, n0:n1]  # [B'', H, G, C] fp64
        fm = _block_masks(geo, n0, n1, "fmask")
        logits = (b[..., :, None] - b[..., None, :]).to(self.cd)
        bm = _block_masks(geo, n0, n1, "bmask") if geo.reverse else None
        if bm is not None:
            e = w.rev_cum[:, :, n0:n1]
            rev = (e[..., None, :] - e[..., :, None]).to(self.cd)
            logits = torch.where(bm[:, None], rev, logits)
            fm = fm | bm
        # fm may have more batch rows than the gates (per-row segments, one decay): broadcast
        return torch.where(fm[:, None], logits, MINUS_INF).exp_()


