"""Chunked linear attention (Lightning Attention-2 / GLA / SSD tiling), hand-written backward.

Per-position log-gates ``g_t`` (forward) and ``r_t`` (reverse), ``[B', T, H]``, ``<= 0``; a
constant decay is ``g_t = r_t = log(lambda)``. The sequence is cut into chunks of ``C``
positions. Inside chunk n (local positions ``0..cn-1``), with the *chunk-local* cumulative sums
``b_r = g_0 + .. + g_r`` and ``e_r = r_0 + .. + r_{r-1}`` (``B = b_{cn-1}``, ``E`` the sum of all
``r`` of the chunk)::

    tile     M_rj = exp(b_r - b_j) (j <= r, same segment),  exp(e_j - e_r) (j > r, reverse)
    forward  S_{n+1} = exp(B) S_n + sum_j exp(B - b_j) k_j v_j^T,   read: exp(b_r) q_r S_n
    reverse  R_{n-1} = exp(E) R_n + sum_j exp(e_j) k_j v_j^T,       read: exp(E - e_r) q_r R_n

``S_n`` is anchored at the position before chunk n (reset at segment starts), ``R_n`` after it
(reset at the ends of the reverse regions); ``Chunked(s, L > 0)`` adds a band of width
``(L + 1) * s - 1`` (:class:`BandFunction`). Every exponent is a difference of chunk-local
cumulative log-gates, ``<= 0``: nothing overflows at any length or gate strength.

Stages: forward ``_reverse_scan`` -> ``_forward_scan``; backward ``_reverse_grad_scan`` (dL/dR)
-> ``_backward_scan`` (per chunk ``_tile_grads``, ``_forward_state_grads``,
``_reverse_state_grads``) -> ``_gate_grads`` (chunk-local reverse cumulative sums).

Memory: forward saves q, k, v, the gates and one ``[B, H, D, Dv]`` state per chunk (``T / C``
states, no per-token state, no ``[T, T]`` tensor); backward recomputes the tiles and keeps one
more state per chunk for the reverse scan. States are fp64 when a constant decay is
differentiated (see :func:`linear_attention`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from causalmix.caching import LRUCache
from causalmix.checks import compute_dtype
from causalmix.ops.factor import Factorisation, PositionArrays

if TYPE_CHECKING:
    from causalmix.visibility import Visibility

_MINUS_INF = float("-inf")


def _tile(x: torch.Tensor, a: int, c: int, cd) -> torch.Tensor:
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


class _Geometry:
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


_GEOMETRIES: LRUCache[_Geometry] = LRUCache(8)


def _content(x):
    return None if x is None else (tuple(x.shape), tuple(x.reshape(-1).tolist()))


def _geometry(arrays: PositionArrays, length: int, c: int, reverse: bool) -> _Geometry:
    """:class:`_Geometry` of a call, reused across calls with the same position arrays, length
    and chunk size (a stream pushing equal-sized pieces, every training step of a model)."""
    key = (length, c, reverse, str(arrays.start.device), _content(arrays.start),
           _content(arrays.end), _content(arrays.key_ok))
    return _GEOMETRIES.get_or_make(
        key, lambda: _Geometry(arrays, length, c, reverse, arrays.start.device))


class Weights(NamedTuple):
    """Gate-derived weights of every chunk, ``[B'', H, N, C]`` (carries ``[B'', H, N]``):
    ``b``/``e`` the chunk-local cumulative log-gates, the others as in the module docstring,
    times the geometry's flags. Reverse fields are None without a reverse scan."""

    b: torch.Tensor
    wf: torch.Tensor
    uf: torch.Tensor
    cf: torch.Tensor
    e: torch.Tensor | None
    wr: torch.Tensor | None
    ur: torch.Tensor | None
    cr: torch.Tensor | None


def _exp(x: torch.Tensor, cd) -> torch.Tensor:
    """``exp`` of an fp64 difference, rounded to the compute dtype first."""
    return torch.exp(x.to(cd))


def _weights(gf, gr, geo: _Geometry, cd) -> Weights:
    """``gf, gr: [B', T, H]`` -> :class:`Weights`. The chunk-local cumulative sums are kept in
    fp64 so that their differences are exact to the compute dtype at any chunk size and gate
    strength; only those differences (all ``<= 0``) are exponentiated."""
    n, c, fl = geo.n, geo.c, geo.flags

    def local(x):  # [B', T, H] -> [B', H, N, C] fp64, zero gates past the end
        x = torch.nn.functional.pad(x.to(torch.float64), (0, 0, 0, n * c - x.shape[1]))
        return x.view(x.shape[0], n, c, -1).permute(0, 3, 1, 2)

    b = local(gf).cumsum(-1)
    tot = b[..., -1:]
    wf, uf = _exp(b, cd) * fl.read_f, _exp(tot - b, cd) * fl.key_f
    cf = _exp(tot[..., 0], cd) * fl.carry_f
    if not geo.reverse:
        return Weights(b, wf, uf, cf, None, None, None, None)
    r = local(gr)
    e = torch.nn.functional.pad(r[..., :-1], (1, 0)).cumsum(-1)  # exclusive
    etot = e[..., -1:] + r[..., -1:]
    wr, ur = _exp(etot - e, cd) * fl.read_r, _exp(e, cd) * fl.key_r
    return Weights(b, wf, uf, cf, e, wr, ur, _exp(etot[..., 0], cd) * fl.carry_r)


def _block_masks(geo: _Geometry, n0: int, n1: int, attr: str):
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
    many small ones; a block weighs at most one ``[B, T, H, D]`` input)."""

    def __init__(self, w: Weights, geo: _Geometry, cd: torch.dtype, width: int,
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
        b = w.b[:, :, n0:n1]  # [B'', H, G, C] fp64
        fm = _block_masks(geo, n0, n1, "fmask")
        logits = (b[..., :, None] - b[..., None, :]).to(self.cd)
        bm = _block_masks(geo, n0, n1, "bmask") if geo.reverse else None
        if bm is not None:
            e = w.e[:, :, n0:n1]
            rev = (e[..., None, :] - e[..., :, None]).to(self.cd)
            logits = torch.where(bm[:, None], rev, logits)
            fm = fm | bm
        return logits.masked_fill_(~fm[:, None], _MINUS_INF).exp_()


def _outer(x: torch.Tensor, y: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """``x^T y`` over the chunk's positions (a state update), accumulated in ``sd``."""
    return x.to(sd).transpose(-1, -2) @ y.to(sd)


def _col(x: torch.Tensor, n: int, cn: int) -> torch.Tensor:
    """Weights of chunk n as a column ``[B'', H, cn, 1]``."""
    return x[:, :, n, :cn, None]


def _carry(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, :, n, None, None]


class Ctx(NamedTuple):
    """What every stage needs: inputs, geometry, weights, tile weights and dtypes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geo: _Geometry
    w: Weights
    tiles: TileWeights
    cd: torch.dtype
    sd: torch.dtype


def _reverse_scan(x: Ctx) -> list:
    """Reverse states ``R_n`` (anchored after chunk n), built from the end."""
    b, _t, h, d = x.q.shape
    rstates: list = [None] * x.geo.n
    rs = x.q.new_zeros(b, h, d, x.v.shape[-1], dtype=x.sd)
    for n in range(x.geo.n - 1, -1, -1):
        rstates[n] = rs
        if x.geo.dead(n):
            continue
        a, cn = n * x.geo.c, min(x.geo.c, x.geo.t - n * x.geo.c)
        kt, vt = _tile(x.k, a, cn, x.cd), _tile(x.v, a, cn, x.cd)
        rs = _carry(x.w.cr, n) * rs + _outer(kt * _col(x.w.ur, n, cn), vt, x.sd)
    return rstates


def _forward_scan(x: Ctx, s0, rstates):
    """Outputs ``[B, T, H, Dv]``, the forward states ``S_n`` and the final state."""
    b, t, h, d = x.q.shape
    o = torch.empty(b, t, h, x.v.shape[-1], dtype=x.cd, device=x.q.device)
    s = x.q.new_zeros(b, h, d, x.v.shape[-1], dtype=x.sd) if s0 is None else s0.to(x.sd)
    states = []
    for n in range(x.geo.n):
        states.append(s)
        m = x.geo.chunk(n)
        a, cn = m.a, m.cn
        qt, kt, vt = _tile(x.q, a, cn, x.cd), _tile(x.k, a, cn, x.cd), _tile(x.v, a, cn, x.cd)
        att = (qt @ kt.transpose(-1, -2)) * x.tiles(n)
        out = att @ vt + (qt * _col(x.w.wf, n, cn)) @ s.to(x.cd)
        if rstates[n] is not None and not x.geo.dead(n):
            out = out + (qt * _col(x.w.wr, n, cn)) @ rstates[n].to(x.cd)
        o[:, a:a + cn] = out.transpose(1, 2)
        s = _carry(x.w.cf, n) * s + _outer(kt * _col(x.w.uf, n, cn), vt, x.sd)
    return o, states, s


def _prepare(q, k, v, gf, gr, arrays, c, reverse, sd, constant: bool) -> Ctx:
    """Geometry and weights of a call. ``constant``: the gates are constant in time (a decay,
    ``[1, T, H]`` broadcast): weights and shared tiles are reused across calls, as they depend
    only on the geometry and the H decay values."""
    cd = compute_dtype(q)
    geo = _geometry(arrays, q.shape[1], c, reverse)
    width = max(q.shape[-1], v.shape[-1])
    if not constant:
        w = _weights(gf, gr, geo, cd)
        return Ctx(q, k, v, geo, w, TileWeights(w, geo, cd, width), cd, sd)
    key = (cd, tuple(gf[0, 0].tolist()), tuple(gr[0, 0].tolist()))
    w, tiles = geo.memo.get_or_make(key, lambda: (_weights(gf, gr, geo, cd), {}))
    return Ctx(q, k, v, geo, w, TileWeights(w, geo, cd, width, tiles), cd, sd)


class ScanFunction(torch.autograd.Function):
    """Forward (+ optional reverse) chunked scan. ``q, k: [B, T, H, D]``, ``v: [B, T, H, Dv]``,
    ``gf, gr: [B', T, H]`` (``gr`` ignored without a reverse scan), ``s0: [B, H, D, Dv]`` or
    None -> ``(o [B, T, H, Dv], S_final)`` in the compute dtype."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor,
                gr: torch.Tensor, s0: torch.Tensor | None, arrays: PositionArrays, c: int,
                reverse: bool, sd: torch.dtype, constant: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = _prepare(q, k, v, gf, gr, arrays, c, reverse, sd, constant)
        rstates = _reverse_scan(x) if reverse else [None] * x.geo.n
        o, states, s = _forward_scan(x, s0, rstates)
        ctx.save_for_backward(q, k, v, gf, gr)
        ctx.states, ctx.ctx = [*states, s], x._replace(q=None, k=None, v=None)  # no recompute
        ctx.reverse, ctx.has_s0 = reverse, s0 is not None
        return o, s.to(x.cd)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor | None, ds_final: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, gf, gr = ctx.saved_tensors
        x = ctx.ctx._replace(q=q, k=k, v=v)
        b, t, h, _d = q.shape
        if do is None:
            do = torch.zeros(b, t, h, v.shape[-1], dtype=x.cd, device=q.device)
        want_g = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        hstates = _reverse_grad_scan(x, do) if ctx.reverse else None
        grads = _backward_scan(x, do.to(x.cd), ds_final, ctx.states, hstates, want_g)
        dgf = dgr = None
        if want_g:
            dgf, dgr = _gate_grads(x, grads, gf, gr)
        ds0 = grads.gs.to(x.cd) if ctx.has_s0 else None
        return (grads.dq.to(q.dtype), grads.dk.to(k.dtype), grads.dv.to(v.dtype), dgf,
                dgr if ctx.reverse else None, ds0, None, None, None, None, None)


def _reverse_grad_scan(x: Ctx, do) -> list:
    """``H_n = dL/dR_n`` in forward order: ``H_n = (wr Q_n)^T dO_n + exp(E_n) H_{n-1}``."""
    b, _t, h, d = x.q.shape
    hstates: list = [None] * x.geo.n
    hs = x.q.new_zeros(b, h, d, x.v.shape[-1], dtype=x.sd)
    for n in range(x.geo.n):
        if x.geo.dead(n):
            break  # later chunks are dead too; nothing reads their H
        a, cn = n * x.geo.c, min(x.geo.c, x.geo.t - n * x.geo.c)
        qt, dot = _tile(x.q, a, cn, x.cd), _tile(do, a, cn, x.cd)
        hs = _outer(qt * _col(x.w.wr, n, cn), dot, x.sd) + _carry(x.w.cr, n) * hs
        hstates[n] = hs
    return hstates


class GateAcc(NamedTuple):
    """Gate-gradient terms the backward scan accumulates: ``dbt, det: [B, H, N]`` w.r.t. the
    chunk totals ``B``, ``E``; ``de: [B, H, N, C]`` w.r.t. the reverse local sums ``e`` (None
    without a reverse scan); ``db: [B, H, N, C]`` w.r.t. the forward local sums ``b``, only with
    wide (fp64) states -- a differentiated constant decay, whose gradient sums these terms over
    all T: there the pair and state terms are accumulated one by one in fp64 (``q . dq - k . dk``
    in fp32 would cancel ~C/2-fold); otherwise ``db`` comes from dq, dk after the scan."""

    dbt: torch.Tensor
    de: torch.Tensor | None
    det: torch.Tensor | None
    db: torch.Tensor | None


class Grads(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    gs: torch.Tensor  # dL/dS_0, the initial state's gradient
    acc: GateAcc | None


class TileGrad(NamedTuple):
    """Gradients of one chunk, ``[B, H, cn, D|Dv]``."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _tile_grads(x: Ctx, m: ChunkMasks, n, qt, kt, vt, dot, acc) -> TileGrad:
    """Intra-chunk tile ``O = (Q K^T * M) V``; reverse pairs' gate terms into ``acc``."""
    tw = x.tiles(n)
    att = (qt @ kt.transpose(-1, -2)) * tw
    datt = dot @ vt.transpose(-1, -2)
    dp = datt * tw
    if acc is not None and acc.db is not None:  # wide: pair terms one by one, in fp64
        p = (datt * att).to(x.sd)
        pf = p if m.bmask is None else p * m.fmask[:, None]
        acc.db[:, :, n, :m.cn] += pf.sum(-1) - pf.sum(-2)  # M = exp(b_r - b_j)
        if m.bmask is not None:
            pr = p - pf
            acc.de[:, :, n, :m.cn] += pr.sum(-2) - pr.sum(-1)
    elif acc is not None and m.bmask is not None:
        pr = (datt * att * m.bmask[:, None]).to(x.sd)  # dL/d(e_j - e_r) of reverse pairs
        acc.de[:, :, n, :m.cn] += pr.sum(-2) - pr.sum(-1)
    return TileGrad(dp @ kt, dp.transpose(-1, -2) @ qt, att.transpose(-1, -2) @ dot)


def _forward_state_grads(x: Ctx, n, cn, qt, kt, vt, dot, s, s_next, gs, g: TileGrad, acc):
    """State read ``O += diag(wf) Q S_n`` and update ``S_{n+1} = cf S_n + (uf K)^T V`` (``gs``:
    dL/dS_{n+1}). ``S_{n+1}`` is ``exp(B)`` times what the chunk-local sums give, so
    ``dL/dB = <dL/dS_{n+1}, S_{n+1}>``. Returns the tile gradients and dL/dS_n."""
    wf, uf, cf = _col(x.w.wf, n, cn), _col(x.w.uf, n, cn), _carry(x.w.cf, n)
    xs = dot @ s.to(x.cd).transpose(-1, -2)  # [B, H, cn, D]
    gsc = gs.to(x.cd)
    y = vt @ gsc.transpose(-1, -2)  # [B, H, cn, D]
    if acc is not None:
        acc.dbt[:, :, n] += (gs * s_next).sum((-1, -2))
        if acc.db is not None:  # exp(b_r) read, exp(B - b_j) update
            read = ((qt * xs).sum(-1, keepdim=True) * wf)[..., 0].to(x.sd)
            upd = ((kt * y).sum(-1, keepdim=True) * uf)[..., 0].to(x.sd)
            acc.db[:, :, n, :cn] += read - upd
    g = TileGrad(g.dq + xs * wf, g.dk + y * uf, g.dv + (kt @ gsc) * uf)
    return g, _outer(qt * wf, dot, x.sd) + cf * gs


def _reverse_state_grads(x: Ctx, n, cn, qt, kt, vt, dot, rs, hn, hm, g: TileGrad,
                         acc) -> TileGrad:
    """Reverse read ``O += diag(wr) Q R_n`` and update ``R_{n-1} = cr R_n + (ur K)^T V`` (``hn,
    hm``: dL/dR_n, dL/dR_{n-1}, the latter None for the first chunk). ``dL/dE = <H_n, R_n>``."""
    wr, ur = _col(x.w.wr, n, cn), _col(x.w.ur, n, cn)
    xr = dot @ rs.to(x.cd).transpose(-1, -2)
    dq, dk, dv = g.dq + xr * wr, g.dk, g.dv
    if acc is not None:
        acc.de[:, :, n, :cn] -= ((qt * xr).sum(-1, keepdim=True) * wr)[..., 0].to(x.sd)
        acc.det[:, :, n] += (hn * rs).sum((-1, -2))
    if hm is not None:
        hmc = hm.to(x.cd)
        yr = vt @ hmc.transpose(-1, -2)
        dk, dv = dk + yr * ur, dv + (kt @ hmc) * ur
        if acc is not None:
            acc.de[:, :, n, :cn] += ((kt * yr).sum(-1, keepdim=True) * ur)[..., 0].to(x.sd)
    return TileGrad(dq, dk, dv)


def _backward_scan(x: Ctx, do, ds_final, states, hstates, want_g) -> Grads:
    """Chunks from the last to the first: dq, dk, dv, dL/dS_0 and the gate accumulators.
    ``states``: ``S_0 .. S_N`` (the last one the final state)."""
    b, t, h, d = x.q.shape
    dev, n_chunks, rev = x.q.device, x.geo.n, x.geo.reverse
    dq = torch.empty(b, t, h, d, dtype=x.cd, device=dev)
    dk = torch.empty(b, t, h, d, dtype=x.cd, device=dev)
    dv = torch.empty(b, t, h, x.v.shape[-1], dtype=x.cd, device=dev)
    acc = None
    if want_g:
        wide = x.sd == torch.float64 and x.cd != torch.float64
        acc = GateAcc(torch.zeros(b, h, n_chunks, dtype=x.sd, device=dev),
                      torch.zeros(b, h, n_chunks, x.geo.c, dtype=x.sd, device=dev)
                      if rev else None,
                      torch.zeros(b, h, n_chunks, dtype=x.sd, device=dev) if rev else None,
                      torch.zeros(b, h, n_chunks, x.geo.c, dtype=x.sd, device=dev)
                      if wide else None)
    gs = x.q.new_zeros(b, h, d, x.v.shape[-1], dtype=x.sd) if ds_final is None \
        else ds_final.to(x.sd)
    rs = x.q.new_zeros(b, h, d, x.v.shape[-1], dtype=x.sd)  # R_{N-1} = 0
    for n in range(n_chunks - 1, -1, -1):
        m = x.geo.chunk(n)
        a, cn = m.a, m.cn
        qt, kt, vt = _tile(x.q, a, cn, x.cd), _tile(x.k, a, cn, x.cd), _tile(x.v, a, cn, x.cd)
        dot = _tile(do, a, cn, x.cd)
        g = _tile_grads(x, m, n, qt, kt, vt, dot, acc)
        g, gs = _forward_state_grads(x, n, cn, qt, kt, vt, dot, states[n], states[n + 1], gs,
                                     g, acc)
        if rev and not x.geo.dead(n):
            hm = hstates[n - 1] if n > 0 else None
            g = _reverse_state_grads(x, n, cn, qt, kt, vt, dot, rs, hstates[n], hm, g, acc)
            rs = _carry(x.w.cr, n) * rs + _outer(kt * _col(x.w.ur, n, cn), vt, x.sd)
        dq[:, a:a + cn] = g.dq.transpose(1, 2)
        dk[:, a:a + cn] = g.dk.transpose(1, 2)
        dv[:, a:a + cn] = g.dv.transpose(1, 2)
    return Grads(dq, dk, dv, gs, acc)


def _gate_grads(x: Ctx, grads: Grads, gf, gr):
    """Chain rule to the gates. Every pair (query r, key j) of the forward part adds its
    ``dL/dlog w`` to ``b_r`` and subtracts it from ``b_j``, so ``dL/db = q . dq - k . dk``
    (forward parts; the reverse parts enter with the opposite sign: ``dL/de = k . dk_rev -
    q . dq_rev``, accumulated in the scan). With ``b_r = sum_{s <= r} g_s`` and ``B = b_{cn-1}``:
    ``dg_s = sum_{r >= s} db_r + dB``; with ``e_r = sum_{s < r} r_s``, ``E = sum r``:
    ``dr_s = sum_{r > s} de_r + dE``. All sums are chunk-local. Returns ``[B', T, H]`` each."""
    geo, acc, sd = x.geo, grads.acc, x.sd
    n, c, t = geo.n, geo.c, geo.t

    def local(y):  # [B, T, H] -> [B, H, N, C]
        y = torch.nn.functional.pad(y, (0, 0, 0, n * c - t))
        return y.view(y.shape[0], n, c, -1).permute(0, 3, 1, 2)

    def to_gate(dl, like):  # [B, H, N, C] -> [B', T, H] summed over a broadcast batch
        y = dl.permute(0, 2, 3, 1).reshape(dl.shape[0], -1, dl.shape[1])[:, :t]
        if like.shape[0] == 1 and y.shape[0] != 1:
            y = y.sum(0, keepdim=True)
        return y.to(like.dtype)

    if acc.db is not None:
        db = acc.db
    else:
        # row-wise dot products without a [B, T, H, D] temporary (einsum -> batched matmul)
        both = torch.einsum("bthd,bthd->bth", x.q.to(x.cd), grads.dq).to(sd) \
            - torch.einsum("bthd,bthd->bth", x.k.to(x.cd), grads.dk).to(sd)
        db = local(both)  # [B, H, N, C]: dL/db - dL/de
        if acc.de is not None:
            db = db + acc.de
    dgf = to_gate(db.flip(-1).cumsum(-1).flip(-1) + acc.dbt[..., None], gf)
    if acc.de is None:
        return dgf, None
    de = acc.de.flip(-1).cumsum(-1).flip(-1) - acc.de  # sum_{r > s} de_r
    return dgf, to_gate(de + acc.det[..., None], gr)


class BandFunction(torch.autograd.Function):
    """Future band of ``Chunked(s, L > 0)``: for query i, keys ``j`` in ``(i, i + width]`` that the
    spec shows it, weight ``exp(E_j - E_i)`` (``E``: cumulative reverse log-gates, local to the
    tile). Exact dense tiles of ``[C, C + width]``, recomputed in backward. ``gr: [B', Tk, H]``.
    Returns ``o [B, T, H, Dv]`` (compute dtype)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gr: torch.Tensor,
                spec: Visibility, offset: int, width: int, c: int) -> torch.Tensor:
        b, t, h, _ = q.shape
        cd = compute_dtype(q)
        o = torch.empty(b, t, h, v.shape[-1], dtype=cd, device=q.device)
        for a, cn, kend, m in _band_tiles(spec, t, k.shape[1], offset, width, c, gr, cd):
            qt = _tile(q, a, cn, cd)
            kt, vt = _tile(k, a, kend - a, cd), _tile(v, a, kend - a, cd)
            o[:, a:a + cn] = (((qt @ kt.transpose(-1, -2)) * m) @ vt).transpose(1, 2)
        ctx.save_for_backward(q, k, v, gr)
        ctx.spec, ctx.offset, ctx.width, ctx.c = spec, offset, width, c
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, gr = ctx.saved_tensors
        b, t, h, d = q.shape
        tk = k.shape[1]
        cd = compute_dtype(q)
        do = do.to(cd)
        dq = torch.zeros(b, t, h, d, dtype=cd, device=q.device)
        dk = torch.zeros(b, tk, h, d, dtype=cd, device=q.device)
        dvv = torch.zeros(b, tk, h, v.shape[-1], dtype=cd, device=q.device)
        want_g = ctx.needs_input_grad[3]
        dg = torch.zeros(b, tk, h, dtype=cd, device=q.device) if want_g else None
        for a, cn, kend, m in _band_tiles(ctx.spec, t, tk, ctx.offset, ctx.width, ctx.c, gr, cd):
            qt, dot = _tile(q, a, cn, cd), _tile(do, a, cn, cd)
            kt, vt = _tile(k, a, kend - a, cd), _tile(v, a, kend - a, cd)
            att = (qt @ kt.transpose(-1, -2)) * m
            datt = dot @ vt.transpose(-1, -2)
            dp = datt * m
            dq[:, a:a + cn] += (dp @ kt).transpose(1, 2)
            dk[:, a:kend] += (dp.transpose(-1, -2) @ qt).transpose(1, 2)
            dvv[:, a:kend] += (att.transpose(-1, -2) @ dot).transpose(1, 2)
            if want_g:
                p = datt * att  # d/d(E_j - E_i)
                de = p.sum(-2)  # [B, H, kn]
                de[..., :cn] -= p.sum(-1)
                de = de.flip(-1).cumsum(-1).flip(-1) - de  # dE_s: sum over p > s
                dg[:, a:kend] += de.transpose(1, 2)
        if want_g:
            dg = dg.sum(0, keepdim=True) if gr.shape[0] == 1 else dg
            dg = dg.to(gr.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dg, None, None, None, None)


def _band_tiles(spec, t: int, tk: int, offset: int, width: int, c: int, gr, cd):
    """Tiles of the band: queries ``[a, a + cn)`` of ``t``, keys ``[a, kend)`` of ``tk >= t``,
    and their weights ``[B'', H, cn, kn]``."""
    dev = gr.device
    nb = spec.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1, 1)
    for a in range(0, t, c):
        cn = min(c, t - a)
        kend = min(tk, a + cn + width)
        i = torch.arange(a, a + cn, device=dev)
        j = torch.arange(a, kend, device=dev)
        vis = spec.visible(bidx, (i + offset).view(1, -1, 1), (j + offset).view(1, 1, -1))
        vis = vis & (j[None, :] > i[:, None])[None]
        r = gr[:, a:kend].to(torch.float64).transpose(1, 2)  # [B', H, kn]
        e = torch.nn.functional.pad(r[..., :-1], (1, 0)).cumsum(-1)  # fp64: exact differences
        logits = torch.where(vis[:, None], (e[..., None, :] - e[..., :cn, None]).to(cd),
                             _MINUS_INF)
        yield a, cn, kend, torch.exp(logits)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: Factorisation, *,
                     log_gate: torch.Tensor, reverse_log_gate: torch.Tensor, offset: int,
                     initial_state: torch.Tensor | None, chunk_size: int,
                     wide_states: bool = False,
                     constant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, T, H, D]``, ``k: [B, Tk, H, D]``, ``v: [B, Tk, H, Dv]`` with ``Tk >= T``,
    ``log_gate, reverse_log_gate: [B', Tk, H]`` (``B'`` 1 or B) -> ``(o [B, T, H, Dv] q.dtype,
    S at query T - 1)``. Keys past the last query (``Tk > T``) reach the queries only through
    the band, so specs with a reverse scan need ``Tk == T`` (the API checks). The chunk size is
    clamped to T (same numbers, no allocation by ``chunk_size``). ``wide_states``: carry the
    states in fp64 (a differentiated constant decay: its gradient sums products of
    long-carried states, whose fp32 rounding would dominate it at long T with lambda near 1).
    ``constant``: the gates are ``[1, Tk, H]`` constant in time (a decay; weights reused)."""
    t = q.shape[1]
    c = max(1, min(chunk_size, t))
    cd = compute_dtype(q)
    arrays = f.arrays(t, offset, q.device)
    ks, vs = (k, v) if k.shape[1] == t else (k[:, :t], v[:, :t])
    gf, gr = log_gate[:, :t], reverse_log_gate[:, :t]
    sd = torch.float64 if wide_states else cd
    o, s = ScanFunction.apply(q, ks, vs, gf, gr, initial_state, arrays, c, f.has_reverse, sd,
                              constant)
    if f.band:
        o = o + BandFunction.apply(q, k, v, reverse_log_gate, f.spec, offset, f.band, c)
    return o.to(q.dtype), s
