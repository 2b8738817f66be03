"""Chunked linear attention (Lightning Attention-2 tiling), with a hand-written backward.

The sequence is cut into chunks of ``C`` positions. Inside a chunk the masked, decayed product is
computed exactly (a ``[C, C]`` tile); across chunks a ``[D, Dv]`` state is carried:

* forward state ``S_n`` (causal, anchored at the position before chunk n), reset at segment
  starts: ``S_{n+1} = lambda**C_n S_n + sum_j lambda**(C_n - 1 - j) k_j v_j^T``;
* reverse state ``R_n`` (anchored at the position after chunk n) for the future part of
  ``Full`` / ``Prefix`` / ``Chunked(s, 0)``, reset at the ends of the reverse regions;
* a band of width ``(L + 1) * s - 1`` for ``Chunked(s, L > 0)``.

Numerically safe decay: every weight is ``exp(log(lambda) * d)`` with a distance ``d >= 0``
inside one chunk (never ``lambda ** -i``), so no exponent is positive at any length.

Memory: forward saves q, k, v and one ``[B, H, D, Dv]`` state per chunk (``T / C`` states, no
per-token state, no ``[T, T]`` tensor); backward recomputes the chunk tiles and keeps one more
state per chunk for the reverse scan. With ``C >= Dv`` the saved states weigh at most one more
``[B, T, H, D]`` tensor (two when the decay is differentiated: states are then fp64, see
:func:`_state_dtype`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.autograd.function import once_differentiable

from causalmix.ops.linear.factor import Factorisation, PositionArrays


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile(x: torch.Tensor, a: int, c: int, cd) -> torch.Tensor:
    """Positions [a, a + c) of a ``[B, T, H, D]`` tensor as ``[B, H, c, D]`` in dtype cd."""
    return x[:, a:a + c].transpose(1, 2).to(cd)


class _Geometry:
    """Per-chunk masks and decay weights for one call.

    Chunks are grouped once by their position arrays relative to the chunk start (so all chunks
    without a segment start or region end inside share one geometry, and ``Chunked(s)`` repeats
    with period ``lcm(s, C) / C``); geometries of groups with several chunks are cached, the
    others built on demand. A chunk is *dead* when no key of it nor of any later chunk enters
    the reverse scan (``Prefix`` past ``n``): its reverse read and update are skipped.
    """

    def __init__(self, arrays: PositionArrays, length: int, c: int, g: torch.Tensor,
                 reverse: bool):
        self.t, self.c, self.g, self.reverse = length, c, g, reverse
        self.arr = arrays
        self.n = n = -(-length // c)
        dev, cd = g.device, g.dtype
        r = torch.arange(c, device=dev)
        self.dist = (r[:, None] - r[None, :]).abs().to(cd)  # [C, C]
        self._expd = torch.exp(g[:, None, None] * self.dist)  # [H, C, C], exponent <= 0
        pad = n * c - length
        starts = (torch.arange(n, device=dev) * c)[None, :]  # [1, N]

        def chunks(x, fill):
            return torch.nn.functional.pad(x, (0, pad), value=fill).view(x.shape[0], n, c)

        kinds = torch.zeros(n, dtype=torch.int64, device=dev)  # 0 general, 2 dead
        # A chunk's geometry depends only on its positions' arrays taken relative to the chunk
        # (a start before the chunk is "before", an end past it is "past"): group equal chunks.
        feats = [chunks(arrays.start, -1) - starts[..., None]]
        feats[0] = feats[0].clamp_min(-1)
        if reverse:
            ends = chunks(arrays.end, length) - starts[..., None]
            feats.append(ends.clamp_max(c))
            if arrays.key_ok is not None:
                kok = chunks(arrays.key_ok, False)
                feats.append(kok.to(torch.int64))
                # dead: no key enters in this chunk nor in any later one
                none_ok = ~(kok.any(-1).any(0))
                none_ok = none_ok.flip(0).to(torch.int64).cumprod(0).flip(0).bool()
                kinds = torch.where(none_ok, 2, kinds)
        sizes = torch.full((1, n, 1), c, dtype=torch.int64, device=dev)
        sizes[0, -1, 0] = length - (n - 1) * c
        feats += [sizes, kinds.view(1, n, 1)]
        nb = max(f.shape[0] for f in feats)
        rows = torch.cat([f.expand(nb, n, -1) for f in feats], dim=-1)  # [B', N, F]
        rows = rows.transpose(0, 1).reshape(n, -1)
        _, group, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
        shared = counts[group] > 1  # only geometries used by several chunks are kept
        self.group = torch.where(shared, group, -1).tolist()
        self.rev_kind = kinds.tolist()
        self._cache: dict[int, tuple] = {}

    def dead(self, n: int) -> bool:
        """No key of chunk n nor of any later chunk enters the reverse scan: the chunk's
        reverse state is 0 and its reverse work is skipped (``Prefix`` past ``n``)."""
        return self.reverse and self.rev_kind[n] == 2

    def chunk(self, n: int):
        """Returns ``(a, cn, M, wf, uf, cf, wr, ur, cr)`` for chunk n:

        M ``[B', H, cn, cn]`` masked decay of the tile; wf ``[B', H, cn]`` weight of the forward
        state read by query r; uf ``[B', H, cn]`` weight of key j in the next forward state;
        cf ``[B', H]`` carry of the forward state; wr, ur, cr the same for the reverse state.
        """
        a = n * self.c
        cn = min(self.c, self.t - a)
        rk = self.rev_kind[n] if self.reverse else 0
        key = self.group[n]
        if key >= 0 and key in self._cache:
            return (a, cn, *self._cache[key])
        g = self.g
        cd = g.dtype
        r = torch.arange(cn, device=g.device)
        st = self.arr.start[:, a:a + cn] - a  # [B', cn] local to the chunk, < 0: before it
        low = r[None, None, :] <= r[None, :, None]  # [1, r, j]: j <= r
        fmask = low & (r[None, None, :] >= st[:, :, None])
        expd = self._expd[:, :cn, :cn]
        read_f = (st < 0).to(cd)  # [B', cn]
        wf = torch.exp(g[:, None] * (r + 1).to(cd))[None] * read_f[:, None]
        st_last = st[:, -1]  # [B']
        key_f = (r[None, :] >= st_last[:, None]).to(cd)
        uf = torch.exp(g[:, None] * (cn - 1 - r).to(cd))[None] * key_f[:, None]
        cf = torch.exp(g * cn)[None] * (st_last < 0).to(cd)[:, None]
        wr = ur = cr = None
        mask = fmask
        if self.reverse and rk != 2:
            en = self.arr.end[:, a:a + cn] - a  # [B', cn]
            bmask = (~low) & (r[None, None, :] <= en[:, :, None])
            kok = None
            if self.arr.key_ok is not None:
                kok = self.arr.key_ok[:, a:a + cn]
                bmask = bmask & kok[:, None, :]
            mask = fmask | bmask
            wr = torch.exp(g[:, None] * (cn - r).to(cd))[None] * (en >= cn).to(cd)[:, None]
            key_r = (r[None, :] <= en[:, :1])
            if kok is not None:
                key_r = key_r & kok
            ur = torch.exp(g[:, None] * r.to(cd))[None] * key_r.to(cd)[:, None]
            cr = torch.exp(g * cn)[None] * (en[:, 0] >= cn).to(cd)[:, None]
        m = expd[None] * mask[:, None].to(cd)
        out = (m, wf, uf, cf, wr, ur, cr)
        if key >= 0:
            self._cache[key] = out
        return (a, cn, *out)


_GEOMETRIES: OrderedDict = OrderedDict()
_GEOMETRIES_SIZE = 8


def _geometry(arrays: PositionArrays, length: int, c: int, g: torch.Tensor,
              reverse: bool) -> _Geometry:
    """:class:`_Geometry` of a call, reused across calls with the same position arrays, length,
    chunk size and decay (a stream pushing equal-sized pieces, every training step of a model
    with fixed decay): building one costs about as much as the math of a few chunks."""

    def content(x):
        return None if x is None else (tuple(x.shape), tuple(x.reshape(-1).tolist()))

    key = (length, c, reverse, g.dtype, str(g.device), tuple(g.detach().reshape(-1).tolist()),
           content(arrays.start), content(arrays.end), content(arrays.key_ok))
    geo = _GEOMETRIES.get(key)
    if geo is None:
        geo = _Geometry(arrays, length, c, g.detach(), reverse)
        _GEOMETRIES[key] = geo
        if len(_GEOMETRIES) > _GEOMETRIES_SIZE:
            _GEOMETRIES.popitem(last=False)
    else:
        _GEOMETRIES.move_to_end(key)
    return geo


def _state_dtype(cd: torch.dtype, decay_grad: bool) -> torch.dtype:
    """Carried states are fp64 when the decay is differentiated: its gradient sums products of
    long-carried states (``<dL/dS_{n+1}, S_n>``), whose fp32 rounding would dominate it at
    long T with lambda near 1. Tiles and matmuls on tokens stay in the compute dtype."""
    return torch.float64 if decay_grad else cd


def _outer(x: torch.Tensor, y: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """``x^T y`` over the chunk's positions (a state update), accumulated in ``sd``."""
    return x.to(sd).transpose(-1, -2) @ y.to(sd)


class ScanFunction(torch.autograd.Function):
    """Forward (+ optional reverse) chunked scan. Returns ``(o [B, T, H, Dv], S_final)`` in the
    compute dtype."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, arrays: PositionArrays, c: int, reverse: bool):
        b, t, h, _ = q.shape
        dv = v.shape[-1]
        d = q.shape[-1]
        cd = g.dtype
        sd = _state_dtype(cd, ctx.needs_input_grad[3])
        geo = _geometry(arrays, t, c, g, reverse)
        n_chunks = geo.n
        o = torch.empty(b, t, h, dv, dtype=cd, device=q.device)
        # reverse states R_n (anchored after chunk n), built from the end
        rstates: list = [None] * n_chunks
        if reverse:
            rs = q.new_zeros(b, h, d, dv, dtype=sd)
            for n in range(n_chunks - 1, -1, -1):
                rstates[n] = rs
                if geo.dead(n):
                    continue
                a, cn, _m, _wf, _uf, _cf, _wr, ur, cr = geo.chunk(n)
                kt, vt = _tile(k, a, cn, cd), _tile(v, a, cn, cd)
                rs = cr[..., None, None] * rs + _outer(kt * ur[..., None], vt, sd)
        s = q.new_zeros(b, h, d, dv, dtype=sd) if s0 is None else s0.to(sd)
        states = []
        for n in range(n_chunks):
            states.append(s)
            a, cn, m, wf, uf, cf, wr, _ur, _cr = geo.chunk(n)
            qt, kt, vt = _tile(q, a, cn, cd), _tile(k, a, cn, cd), _tile(v, a, cn, cd)
            att = (qt @ kt.transpose(-1, -2)) * m
            out = att @ vt + (qt * wf[..., None]) @ s.to(cd)
            if reverse and not geo.dead(n):
                out = out + (qt * wr[..., None]) @ rstates[n].to(cd)
            o[:, a:a + cn] = out.transpose(1, 2)
            s = cf[..., None, None] * s + _outer(kt * uf[..., None], vt, sd)
        del rstates
        ctx.save_for_backward(q, k, v, g)
        ctx.states = states
        ctx.arrays, ctx.c, ctx.reverse, ctx.has_s0 = arrays, c, reverse, s0 is not None
        return o, s.to(cd)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, ds_final):
        q, k, v, g = ctx.saved_tensors
        states = ctx.states
        b, t, h, d = q.shape
        dv = v.shape[-1]
        cd = g.dtype
        sd = states[0].dtype if states else cd
        reverse = ctx.reverse
        geo = _geometry(ctx.arrays, t, ctx.c, g, reverse)
        n_chunks = geo.n
        do = do.to(cd) if do is not None else torch.zeros(b, t, h, dv, dtype=cd, device=q.device)
        dq = torch.empty(b, t, h, d, dtype=cd, device=q.device)
        dk = torch.empty(b, t, h, d, dtype=cd, device=q.device)
        dvv = torch.empty(b, t, h, dv, dtype=cd, device=q.device)
        dg = torch.zeros(h, dtype=torch.float64, device=q.device)  # [H] sums of many chunks
        want_g = ctx.needs_input_grad[3]

        # dL/dR_n (forward order): H_n = (wr Q_n)^T dO_n + cr_n H_{n-1}
        hstates: list = [None] * n_chunks
        if reverse:
            hs = q.new_zeros(b, h, d, dv, dtype=sd)
            for n in range(n_chunks):
                if geo.dead(n):
                    break  # later chunks are dead too; nothing reads their H
                a, cn, _m, _wf, _uf, _cf, wr, _ur, cr = geo.chunk(n)
                qt, dot = _tile(q, a, cn, cd), _tile(do, a, cn, cd)
                hs = _outer(qt * wr[..., None], dot, sd) + cr[..., None, None] * hs
                hstates[n] = hs

        gs = q.new_zeros(b, h, d, dv, dtype=sd) if ds_final is None else ds_final.to(sd)
        rs = q.new_zeros(b, h, d, dv, dtype=sd)  # R_{N-1} = 0
        for n in range(n_chunks - 1, -1, -1):
            a, cn, m, wf, uf, cf, wr, ur, cr = geo.chunk(n)
            qt, kt, vt = _tile(q, a, cn, cd), _tile(k, a, cn, cd), _tile(v, a, cn, cd)
            dot = _tile(do, a, cn, cd)
            s = states[n]
            pos = torch.arange(cn, device=q.device).to(cd)
            # intra-chunk tile
            att = (qt @ kt.transpose(-1, -2)) * m
            datt = dot @ vt.transpose(-1, -2)
            dp = datt * m
            dqt = dp @ kt
            dkt = dp.transpose(-1, -2) @ qt
            dvt = att.transpose(-1, -2) @ dot
            if want_g:
                dg += (datt * att * geo.dist[:cn, :cn]).sum(dim=(0, 2, 3))
            # forward state read: O += diag(wf) Q S_n
            x = dot @ s.to(cd).transpose(-1, -2)  # [B, H, cn, D]
            dqt = dqt + x * wf[..., None]
            if want_g:
                dg += ((qt * x).sum(-1) * wf * (pos + 1)).sum(dim=(0, 2))
            # forward state update: S_{n+1} = cf S_n + (uf K)^T V; gs = dL/dS_{n+1}
            gsc = gs.to(cd)
            y = vt @ gsc.transpose(-1, -2)  # [B, H, cn, D]
            dkt = dkt + y * uf[..., None]
            dvt = dvt + (kt @ gsc) * uf[..., None]
            if want_g:
                dg += ((kt * y).sum(-1) * uf * (cn - 1 - pos)).sum(dim=(0, 2))
                dg += cn * (cf * (gs * s).sum(dim=(-1, -2))).sum(0)
            gs = _outer(qt * wf[..., None], dot, sd) + cf[..., None, None] * gs
            if reverse and not geo.dead(n):
                # reverse state read: O += diag(wr) Q R_n
                xr = dot @ rs.to(cd).transpose(-1, -2)
                dqt = dqt + xr * wr[..., None]
                if want_g:
                    dg += ((qt * xr).sum(-1) * wr * (cn - pos)).sum(dim=(0, 2))
                if n > 0:
                    # R_{n-1} = cr R_n + (ur K)^T V; dL/dR_{n-1} = H_{n-1}
                    hm = hstates[n - 1]
                    hmc = hm.to(cd)
                    yr = vt @ hmc.transpose(-1, -2)
                    dkt = dkt + yr * ur[..., None]
                    dvt = dvt + (kt @ hmc) * ur[..., None]
                    if want_g:
                        dg += ((kt * yr).sum(-1) * ur * pos).sum(dim=(0, 2))
                        dg += cn * (cr * (hm * rs).sum(dim=(-1, -2))).sum(0)
                rs = cr[..., None, None] * rs + _outer(kt * ur[..., None], vt, sd)
            dq[:, a:a + cn] = dqt.transpose(1, 2)
            dk[:, a:a + cn] = dkt.transpose(1, 2)
            dvv[:, a:a + cn] = dvt.transpose(1, 2)
        ds0 = gs.to(cd) if ctx.has_s0 else None
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dg.to(cd) if want_g else None,
                ds0, None, None, None)


class BandFunction(torch.autograd.Function):
    """Future band of ``Chunked(s, L > 0)``: for query i, keys ``j`` in ``(i, i + width]`` that the
    spec shows it, weight ``lambda ** (j - i)``. Exact dense tiles of ``[C, C + width]``, recomputed
    in backward (nothing but the inputs is saved). Returns ``o [B, T, H, Dv]`` (compute dtype)."""

    @staticmethod
    def forward(ctx, q, k, v, g, spec, offset: int, width: int, c: int):
        b, t, h, _ = q.shape
        cd = g.dtype
        o = torch.empty(b, t, h, v.shape[-1], dtype=cd, device=q.device)
        for a, cn, kend, m in _band_tiles(spec, t, k.shape[1], offset, width, c, g):
            qt = _tile(q, a, cn, cd)
            kt, vt = _tile(k, a, kend - a, cd), _tile(v, a, kend - a, cd)
            o[:, a:a + cn] = (((qt @ kt.transpose(-1, -2)) * m) @ vt).transpose(1, 2)
        ctx.save_for_backward(q, k, v, g)
        ctx.spec, ctx.offset, ctx.width, ctx.c = spec, offset, width, c
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, g = ctx.saved_tensors
        b, t, h, d = q.shape
        tk = k.shape[1]
        cd = g.dtype
        do = do.to(cd)
        dq = torch.zeros(b, t, h, d, dtype=cd, device=q.device)
        dk = torch.zeros(b, tk, h, d, dtype=cd, device=q.device)
        dvv = torch.zeros(b, tk, h, v.shape[-1], dtype=cd, device=q.device)
        dg = torch.zeros(h, dtype=torch.float64, device=q.device)  # [H] sums of many chunks
        want_g = ctx.needs_input_grad[3]
        for a, cn, kend, m in _band_tiles(ctx.spec, t, tk, ctx.offset, ctx.width, ctx.c, g):
            qt, dot = _tile(q, a, cn, cd), _tile(do, a, cn, cd)
            kt, vt = _tile(k, a, kend - a, cd), _tile(v, a, kend - a, cd)
            att = (qt @ kt.transpose(-1, -2)) * m
            datt = dot @ vt.transpose(-1, -2)
            dp = datt * m
            dq[:, a:a + cn] += (dp @ kt).transpose(1, 2)
            dk[:, a:kend] += (dp.transpose(-1, -2) @ qt).transpose(1, 2)
            dvv[:, a:kend] += (att.transpose(-1, -2) @ dot).transpose(1, 2)
            if want_g:
                i = torch.arange(a, a + cn, device=q.device)
                j = torch.arange(a, kend, device=q.device)
                dist = (j[None, :] - i[:, None]).clamp_min(0).to(cd)
                dg += (datt * att * dist).sum(dim=(0, 2, 3))
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dg.to(cd) if want_g else None,
                None, None, None, None)


def _band_tiles(spec, t: int, tk: int, offset: int, width: int, c: int, g: torch.Tensor):
    """Tiles of the band: queries ``[a, a + cn)`` of ``t``, keys ``[a, kend)`` of ``tk >= t``."""
    dev, cd = g.device, g.dtype
    nb = spec.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1, 1)
    for a in range(0, t, c):
        cn = min(c, t - a)
        kend = min(tk, a + cn + width)
        i = torch.arange(a, a + cn, device=dev)
        j = torch.arange(a, kend, device=dev)
        rel = j[None, :] - i[:, None]  # [cn, kn]
        vis = spec.visible(bidx, (i + offset).view(1, -1, 1), (j + offset).view(1, 1, -1))
        vis = vis & (rel > 0)[None]
        m = torch.exp(g[:, None, None] * rel.clamp_min(0).to(cd))[None] * vis[:, None].to(cd)
        yield a, cn, kend, m


def linear_attention(q, k, v, f: Factorisation, *, decay, offset: int, initial_state,
                     chunk_size: int):
    """``q: [B, T, H, D]``, ``k: [B, Tk, H, D]``, ``v: [B, Tk, H, Dv]`` with ``Tk >= T`` ->
    ``(o [B, T, H, Dv] q.dtype, S at query T - 1)``. Keys past the last query (``Tk > T``) reach
    the queries only through the band, so specs with a reverse scan need ``Tk == T`` (the API
    checks)."""
    t = q.shape[1]
    cd = compute_dtype(q)
    h = q.shape[2]
    g = torch.zeros(h, dtype=cd, device=q.device) if decay is None else torch.log(decay.to(cd))
    arrays = f.arrays(t, offset, q.device)
    ks, vs = (k, v) if k.shape[1] == t else (k[:, :t], v[:, :t])
    o, s = ScanFunction.apply(q, ks, vs, g, initial_state, arrays, chunk_size, f.has_reverse)
    if f.band:
        o = o + BandFunction.apply(q, k, v, g, f.spec, offset, f.band, chunk_size)
    return o.to(q.dtype), s
