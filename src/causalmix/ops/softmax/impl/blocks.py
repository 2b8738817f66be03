"""Block-sparse softmax attention in plain PyTorch, forward and backward, CPU (and GPU: untested).

The spec's block map splits the (query, key) plane into tiles (``rows`` queries x 64 keys). Each
block of query rows walks its non-empty key tiles in cache-sized *pieces* (at most
``_PIECE_FLOATS`` scores over all heads): full tiles see no mask work, *partial* tiles get an
additive 0 / -inf mask (built once per plan and cached with it), empty tiles no work at all.

Forward (stages ``_scores`` -> ``_row_block_one`` or ``_row_block_online``): a row block whose
keys fit one piece takes an exact softmax; longer rows merge their pieces online
(FlashAttention's running max ``m``, sum ``l`` and rescaled accumulator). Backward
(``_backward_block``) recomputes each piece (FlashAttention-2): with ``P = exp(S - lse)``,
``dV += P^T dO``, ``dS = P * (dO V^T - delta + dlse)`` where ``delta = rowsum(dO * O)``,
``dQ = scale * dS K``, ``dK += scale * dS^T Q``. Memory is O(T * D) plus one piece of scores.

Specs whose key range is one shift-invariant band (``Window``: query ``i`` sees keys
``[i - left, i + right]``) compute their interior row blocks as a few batched matmuls over a
strided view of the key band (``_band_forward`` / ``_band_backward``), one mask for all.

On a multi-threaded CPU the (batch, kv head) axis is split into slices computed by worker
threads, each with single-threaded ops (``_run_units``): one fork/join per call rather than one
per small op, which matters most on a loaded machine.

Scores are kept in base 2 (``q`` is scaled by ``scale * log2(e)`` once, so exponentials are
``exp2``, several times cheaper than ``exp`` on CPU); the lse is returned in natural log. Math is
fp32 inside (fp64 for fp64 inputs); results are cast back to the input dtype. A ``+inf`` or NaN
score makes its row NaN, as in the reference; a row that sees no key gets 0 and lse ``-inf``.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from causalmix.caching import LRUCache
from causalmix.checks import compute_dtype
from causalmix.ops.softmax._call import Call
from causalmix.visibility import EMPTY, FULL, Visibility

_KEY_BLOCK = 64  # keys per tile of the block map
_PIECE_FLOATS = 1 << 18  # scores of one piece over all heads (1 MiB fp32: stays in cache)
_BIAS_FLOATS = 1 << 23  # cached mask floats per plan (32 MiB fp32); past it, masks are rebuilt
_ROW_CHOICES = (256, 128, 64, 32)
_BAND_ROWS = 32  # rows per block on the band path (keys computed: rows + left + right)
_ROW_EFFICIENCY = {256: 1.0, 128: 1.0, 64: 1.12, 32: 1.4}  # matmul slowdown of thinner blocks
_PIECE_OVERHEAD_FLOPS = 4e6  # Python + launch cost of one piece, in flop-equivalents
_LOG2E = 1.0 / math.log(2.0)
_PLANS: LRUCache = LRUCache(32)
_ROWS: LRUCache = LRUCache(32)


def can_serve(call: Call) -> str | None:
    return None


class _Piece(NamedTuple):
    c0: int  # local keys [c0, c1) computed together
    c1: int
    m0: int  # local keys [m0, m1) inside the piece that need the mask (m0 == m1: none)
    m1: int
    bias: torch.Tensor | None  # [B', 1, rows, 1, m1 - m0] of 0 / -inf, or None (rebuilt)


class _Block(NamedTuple):
    r0: int  # local query rows [r0, r1)
    r1: int
    pieces: tuple[_Piece, ...]


class _Band(NamedTuple):
    """Row blocks ``[n0, n1)`` of a shift-invariant band spec (each query sees keys
    ``[i - left, i + right]``, e.g. ``Window``), all computed by batched matmuls over a strided
    view of the keys (Longformer's sliding chunks): block ``n`` reads local keys
    ``[k0 + (n - n0) * rows, ... + width)``, and one mask serves every block."""

    n0: int
    n1: int
    k0: int
    width: int  # a multiple of rows
    bias: torch.Tensor  # [1, rows, 1, width] of 0 / -inf


class _Plan(NamedTuple):
    rows: int
    blocks: tuple[_Block, ...]  # row blocks outside the band
    piece_max: int  # widest piece
    visibility: Visibility
    q_offset: int
    k_offset: int
    band: _Band | None


def _piece_keys(b, hq, rows, cols) -> int:
    return max(cols, _PIECE_FLOATS // max(1, b * hq * rows) // cols * cols)


def _row_size(visibility, b, hq, d, tq, tk, q_offset, k_offset, cols) -> int:
    """Rows per block: the one whose computed tiles (plus a per-piece overhead) cost least; thin
    blocks skip more masked work (a window, a block diagonal) but run slower matmuls."""
    key = (visibility, b, hq, d, tq, tk, q_offset, k_offset, cols)
    return _ROWS.get_or_make(key, lambda: _best_rows(visibility, b, hq, d, tq, tk, q_offset,
                                                    k_offset, cols))


def _band_reach(visibility, tq, tk, q_offset, k_offset) -> tuple[int, int] | None:
    """``(left, right)`` if every query ``i`` sees exactly keys ``[i - left, i + right]`` (from
    the public ``key_range``) and enough rows are interior for the batched band path."""
    if visibility.batch_size is not None or tq < 8 * _BAND_ROWS:
        return None
    i = torch.arange(q_offset, q_offset + tq)
    kr = visibility.key_range(i)
    if kr is None or kr.lo is None or kr.hi is None:
        return None
    lo = torch.broadcast_to(kr.lo, (1, tq)) - i
    hi = torch.broadcast_to(kr.hi, (1, tq)) - i
    left, right = -int(lo[0, 0]), int(hi[0, 0])
    if not (bool((lo == -left).all()) and bool((hi == right).all())) or left + right < 0:
        return None
    if left + right + _BAND_ROWS > tk // 2:
        return None  # hardly sparse: the general path does as well
    return left, right


def _best_rows(visibility, b, hq, d, tq, tk, q_offset, k_offset, cols) -> int:
    if _band_reach(visibility, tq, tk, q_offset, k_offset) is not None:
        return _BAND_ROWS
    best = None
    for r in dict.fromkeys(min(r, tq) for r in _ROW_CHOICES):
        kinds = visibility.block_map(tq, tk, r, cols, q_offset=q_offset, k_offset=k_offset)
        tiles = (kinds != EMPTY).any(dim=0).sum(dim=1)  # per row block
        computed = float(tiles.sum()) * cols * r
        pieces = float((tiles * cols + _piece_keys(b, hq, r, cols) - 1).div(
            _piece_keys(b, hq, r, cols), rounding_mode="floor").sum())
        cost = computed * 14 * d * hq * b * _ROW_EFFICIENCY.get(r, 1.6) \
            + pieces * _PIECE_OVERHEAD_FLOPS
        if best is None or cost < best[0]:
            best = (cost, r)
    return best[1]


def _plan(visibility, tq, tk, q_offset, k_offset, rows, cols, piece, dtype, device) -> _Plan:
    key = (visibility, tq, tk, q_offset, k_offset, rows, cols, piece, dtype, str(device))
    return _PLANS.get_or_make(key, lambda: _make_plan(
        visibility, tq, tk, q_offset, k_offset, rows, cols, piece, dtype, device))


def _runs(flags) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of true entries."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _make_plan(visibility, tq, tk, q_offset, k_offset, rows, cols, piece, dtype, device):
    kinds = visibility.block_map(tq, tk, rows, cols, q_offset=q_offset, k_offset=k_offset)
    # One plan for the whole batch: a tile is skipped only if empty for every example, and
    # mask-free only if full for every example.
    nonempty = (kinds != EMPTY).any(dim=0).tolist()
    full = (kinds == FULL).all(dim=0).tolist()
    per = max(1, piece // cols)
    budget = _BIAS_FLOATS
    blocks = []
    band = _make_band(visibility, tq, tk, q_offset, k_offset, rows, dtype, device)
    for r, (ne_row, full_row) in enumerate(zip(nonempty, full, strict=True)):
        if band is not None and band.n0 <= r < band.n1:
            continue
        r0, r1 = r * rows, min(tq, (r + 1) * rows)
        pieces = []
        for a, b in _runs(ne_row):
            for t0 in range(a, b, per):
                t1 = min(b, t0 + per)
                part = [t for t in range(t0, t1) if not full_row[t]]
                c0, c1 = t0 * cols, min(tk, t1 * cols)
                m0, m1 = (part[0] * cols, min(tk, (part[-1] + 1) * cols)) if part else (c0, c0)
                bias = None
                if m1 > m0 and (r1 - r0) * (m1 - m0) * (visibility.batch_size or 1) <= budget:
                    bias = _bias(visibility, r0, r1, m0, m1, q_offset, k_offset, dtype, device)
                    budget -= bias.numel()
                pieces.append(_Piece(c0, c1, m0, m1, bias))
        blocks.append(_Block(r0, r1, tuple(pieces)))
    widest = max((p.c1 - p.c0 for blk in blocks for p in blk.pieces), default=0)
    return _Plan(rows, tuple(blocks), widest, visibility, q_offset, k_offset, band)


def _make_band(visibility, tq, tk, q_offset, k_offset, rows, dtype, device) -> _Band | None:
    reach = _band_reach(visibility, tq, tk, q_offset, k_offset)
    if reach is None or rows != _BAND_ROWS:
        return None
    left, right = reach
    width = -(-(rows + left + right) // rows) * rows
    shift = q_offset - k_offset - left  # block at local row a reads local keys from a + shift
    n0 = max(0, -(shift // rows))  # first block with a + shift >= 0: ceil(-shift / rows)
    n1 = min(tq // rows, (tk - width - shift) // rows + 1)  # last full block in the keys
    if n1 - n0 < 2:
        return None
    k0 = n0 * rows + shift
    bias = _bias(visibility, n0 * rows, (n0 + 1) * rows, k0, k0 + width, q_offset, k_offset,
                 dtype, device)
    return _Band(n0, n1, k0, width, bias)


def _bias(visibility, r0, r1, m0, m1, q_offset, k_offset, dtype, device) -> torch.Tensor:
    """``[B', r1 - r0, 1, m1 - m0]``: 0 where visible, -inf where not."""
    nb = visibility.batch_size or 1
    bi = torch.arange(nb, device=device).view(nb, 1, 1)
    i = torch.arange(q_offset + r0, q_offset + r1, device=device).view(1, -1, 1)
    j = torch.arange(k_offset + m0, k_offset + m1, device=device).view(1, 1, -1)
    vis = visibility.visible(bi, i, j).expand(nb, r1 - r0, m1 - m0)
    bias = torch.zeros(nb, r1 - r0, m1 - m0, dtype=dtype, device=device)
    return bias.masked_fill_(~vis, float("-inf"))[:, :, None, :]


class _Unit(NamedTuple):
    """A slice ``[u0, u1)`` of the flattened (batch, kv head) axis that one worker computes;
    ``b`` is its example's index in the spec's masks (0 when the spec has no batch)."""

    u0: int
    u1: int
    b: int


def _mask(s: torch.Tensor, plan: _Plan, blk: _Block, pc: _Piece, unit: _Unit) -> None:
    """Add the piece's mask to its scores ``s: [units, rows * G, c1 - c0]`` in place."""
    if pc.m1 == pc.m0:
        return
    bias = pc.bias
    if bias is None:
        bias = _bias(plan.visibility, blk.r0, blk.r1, pc.m0, pc.m1, plan.q_offset,
                     plan.k_offset, s.dtype, s.device)
    s4 = s.view(s.shape[0], blk.r1 - blk.r0, -1, pc.c1 - pc.c0)
    s4[..., pc.m0 - pc.c0 : pc.m1 - pc.c0].add_(bias[unit.b])


def _scores(qb, kf, plan, blk, pc, work, unit) -> torch.Tensor:
    """Base-2 scores of one piece, masked: ``[units, rows * G, c1 - c0]`` in ``work``."""
    bh, n, _ = qb.shape
    w = pc.c1 - pc.c0
    s = work[: bh * n * w].view(bh, n, w)
    torch.bmm(qb, kf[:, pc.c0 : pc.c1].transpose(1, 2), out=s)
    _mask(s, plan, blk, pc, unit)
    return s


def _row_block_one(qb, kf, vf, ob, plan, blk, work, unit) -> torch.Tensor:
    """Keys in one piece: exact softmax. Writes ``ob: [units, n, Dv]``; returns lse2 ``[., n, 1]``.
    """
    pc = blk.pieces[0]
    s = _scores(qb, kf, plan, blk, pc, work, unit)
    # Rows that see nothing have max -inf: clamp it to the lowest finite value, so that
    # exp2(-inf - m) = 0 (not NaN) while a +inf or NaN score still makes the row NaN.
    m = s.amax(dim=-1, keepdim=True).clamp_min_(-torch.finfo(s.dtype).max)
    s.sub_(m).exp2_()
    l = s.sum(dim=-1, keepdim=True)
    torch.bmm(s, vf[:, pc.c0 : pc.c1], out=ob)
    ob.div_(l.clamp_min(torch.finfo(s.dtype).tiny))  # empty rows: 0 / tiny = 0
    return m + l.log2()  # -inf where l = 0


def _row_block_online(qb, kf, vf, ob, plan, blk, work, unit) -> torch.Tensor:
    """Keys in several pieces: running max ``m``, running sum ``l``, rescaled accumulator."""
    m = l = None
    for pc in blk.pieces:
        s = _scores(qb, kf, plan, blk, pc, work, unit)
        mp = s.amax(dim=-1, keepdim=True)
        if m is None:
            m = mp.clamp_min_(-torch.finfo(s.dtype).max)
            s.sub_(m).exp2_()
            l = s.sum(dim=-1, keepdim=True)
            torch.bmm(s, vf[:, pc.c0 : pc.c1], out=ob)
            continue
        m_new = torch.maximum(m, mp)
        alpha = (m - m_new).exp2_()
        s.sub_(m_new).exp2_()
        l.mul_(alpha).add_(s.sum(dim=-1, keepdim=True))
        ob.mul_(alpha).baddbmm_(s, vf[:, pc.c0 : pc.c1])
        m = m_new
    ob.div_(l.clamp_min(torch.finfo(ob.dtype).tiny))
    return m + l.log2()


class _Fwd(NamedTuple):
    q: torch.Tensor  # [BH, Tq, G, D]: base-2 scaled queries
    k: torch.Tensor  # [BH, Tk, D]
    v: torch.Tensor  # [BH, Tk, Dv]
    out: torch.Tensor  # [BH, Tq, G, Dv], written
    lse2: torch.Tensor  # [BH, Tq, G], written


def _forward_unit(t: _Fwd, plan: _Plan, unit: _Unit) -> None:
    """Every row block of one unit (a slice of the flattened batch x kv-head axis)."""
    sl = slice(unit.u0, unit.u1)
    q, kf, vf, out, lse2 = t.q[sl], t.k[sl], t.v[sl], t.out[sl], t.lse2[sl]
    nu, _, g, d = q.shape
    dv = vf.shape[-1]
    work = torch.empty(nu * plan.rows * g * plan.piece_max, dtype=q.dtype, device=q.device)
    for blk in plan.blocks:
        if not blk.pieces:  # rows that see no key
            out[:, blk.r0 : blk.r1] = 0.0
            lse2[:, blk.r0 : blk.r1] = float("-inf")
            continue
        n = (blk.r1 - blk.r0) * g
        qb = q[:, blk.r0 : blk.r1].reshape(nu, n, d)
        ob = out[:, blk.r0 : blk.r1].view(nu, n, dv)
        run = _row_block_one if len(blk.pieces) == 1 else _row_block_online
        ls = run(qb, kf, vf, ob, plan, blk, work, unit)
        lse2[:, blk.r0 : blk.r1] = ls.view(nu, blk.r1 - blk.r0, g)
    if plan.band is not None:
        _band_forward(q, kf, vf, out, lse2, plan)


def _band_keys(x: torch.Tensor, k0: int, nblk: int, rows: int, width: int, cols: int):
    """``x: [Tk, C]`` (a row-contiguous view) -> overlapping ``[nblk, width, cols]`` view: block
    ``n`` holds rows ``[k0 + n * rows, k0 + n * rows + width)``."""
    st = x.stride(0)
    return x.as_strided((nblk, width, cols), (rows * st, st, 1), x.storage_offset() + k0 * st)


def _band_chunks(band: _Band, rows: int, g: int):
    """Groups of band blocks ``(n, count)`` whose scores fit one piece."""
    per = max(1, _PIECE_FLOATS // (rows * g * band.width))
    for n in range(band.n0, band.n1, per):
        yield n, min(per, band.n1 - n)


def _band_forward(q, kf, vf, out, lse2, plan: _Plan) -> None:
    """Band blocks of one unit: ``q: [nu, Tq, G, D]``, ``kf``/``vf``: ``[nu, Tk, .]``."""
    band, rows = plan.band, plan.rows
    nu, _, g, d = q.shape
    dv, w = vf.shape[-1], band.width
    work = torch.empty(max(1, _PIECE_FLOATS // (rows * g * w)) * rows * g * w, dtype=q.dtype,
                       device=q.device)
    for u in range(nu):
        for n, c in _band_chunks(band, rows, g):
            r0, k0 = n * rows, band.k0 + (n - band.n0) * rows
            qb = q[u, r0 : r0 + c * rows].reshape(c, rows * g, d)
            s = work[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(qb, _band_keys(kf[u], k0, c, rows, w, d).transpose(1, 2), out=s)
            s.view(c, rows, g, w).add_(band.bias[0])
            m = s.amax(dim=-1, keepdim=True).clamp_min_(-torch.finfo(s.dtype).max)
            s.sub_(m).exp2_()
            l = s.sum(dim=-1, keepdim=True)
            ob = out[u, r0 : r0 + c * rows].view(c, rows * g, dv)
            torch.bmm(s, _band_keys(vf[u], k0, c, rows, w, dv), out=ob)
            ob.div_(l.clamp_min(torch.finfo(s.dtype).tiny))
            lse2[u, r0 : r0 + c * rows] = (m + l.log2()).view(c * rows, g)


def _band_backward(t, sl, plan: _Plan) -> None:
    """Band blocks of one unit: dq rows are written once; dk/dv fold each block's ``width``
    keys back onto the key axis, ``rows`` at a time."""
    band, rows = plan.band, plan.rows
    q_aug, do_aug, k_aug, v_aug = t.q_aug[sl], t.do_aug[sl], t.k_aug[sl], t.v_aug[sl]
    nu, _, g, d1 = q_aug.shape
    dv1, w = do_aug.shape[-1], band.width
    size = max(1, _PIECE_FLOATS // (rows * g * w)) * rows * g * w
    work_p = torch.empty(size, dtype=q_aug.dtype, device=q_aug.device)
    work_d = torch.empty_like(work_p)
    for u in range(nu):
        dq, dk, dv = t.dq[sl][u], t.dk[sl][u], t.dv[sl][u]
        for n, c in _band_chunks(band, rows, g):
            r0, k0 = n * rows, band.k0 + (n - band.n0) * rows
            qa = q_aug[u, r0 : r0 + c * rows].reshape(c, rows * g, d1)
            doa = do_aug[u, r0 : r0 + c * rows].reshape(c, rows * g, dv1)
            ka = _band_keys(k_aug[u], k0, c, rows, w, d1)
            va = _band_keys(v_aug[u], k0, c, rows, w, dv1)
            p = work_p[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(qa, ka.transpose(1, 2), out=p)  # s - lse, base 2
            p.view(c, rows, g, w).add_(band.bias[0])
            p.exp2_()
            ds = work_d[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(doa, va.transpose(1, 2), out=ds)  # dO v^T - delta
            ds.mul_(p)
            torch.bmm(ds, ka[..., : d1 - 1], out=dq[r0 : r0 + c * rows].view(c, rows * g, -1))
            dk_band = torch.bmm(ds.transpose(1, 2), qa[..., : d1 - 1])  # [c, w, D]
            dv_band = torch.bmm(p.transpose(1, 2), doa[..., : dv1 - 1])  # [c, w, Dv]
            for j in range(0, w, rows):
                dst = slice(k0 + j, k0 + j + c * rows)
                dk[dst].view(c, rows, -1).add_(dk_band[:, j : j + rows])
                dv[dst].view(c, rows, -1).add_(dv_band[:, j : j + rows])


class _Bwd(NamedTuple):
    q_aug: torch.Tensor  # [BH, Tq, G, D+1]: [q scaled, -lse2]
    do_aug: torch.Tensor  # [BH, Tq, G, Dv+1]: [dO, -delta]
    k_aug: torch.Tensor  # [BH, Tk, D+1]: [k, 1]
    v_aug: torch.Tensor  # [BH, Tk, Dv+1]: [v, 1]
    dq: torch.Tensor  # [BH, Tq, G, D], accumulated
    dk: torch.Tensor  # [BH, Tk, D], accumulated
    dv: torch.Tensor  # [BH, Tk, Dv], accumulated


def _backward_unit(t: _Bwd, plan: _Plan, unit: _Unit) -> None:
    sl = slice(unit.u0, unit.u1)
    nu, _, g, d1 = t.q_aug[sl].shape
    size = nu * plan.rows * g * plan.piece_max
    work = (torch.empty(size, device=t.dq.device, dtype=t.dq.dtype),
            torch.empty(size, device=t.dq.device, dtype=t.dq.dtype))
    for blk in plan.blocks:
        _backward_block(blk, plan, t, sl, work, unit)
    if plan.band is not None:
        _band_backward(t, sl, plan)


def _backward_block(blk, plan, t: _Bwd, sl, work, unit) -> None:
    """Accumulate one row block's contributions to dq, dk, dv (every update in place)."""
    q_aug, do_aug, k_aug, v_aug = t.q_aug[sl], t.do_aug[sl], t.k_aug[sl], t.v_aug[sl]
    nu, _, g, d1 = q_aug.shape
    d, dv = d1 - 1, do_aug.shape[-1] - 1
    n = (blk.r1 - blk.r0) * g
    rows = slice(blk.r0, blk.r1)
    qa = q_aug[:, rows].reshape(nu, n, d + 1)
    doa = do_aug[:, rows].reshape(nu, n, dv + 1)
    qb, dob = qa[..., :d], doa[..., :dv]
    dq_blk = t.dq[sl][:, rows].view(nu, n, d)
    dk, dvv = t.dk[sl], t.dv[sl]
    work_p, work_d = work
    for pc in blk.pieces:
        p = _scores(qa, k_aug, plan, blk, pc, work_p, unit)  # s - lse, base 2
        p.exp2_()
        w = pc.c1 - pc.c0
        ds = work_d[: nu * n * w].view(nu, n, w)
        torch.bmm(doa, v_aug[:, pc.c0 : pc.c1].transpose(1, 2), out=ds)  # dO v^T - delta
        ds.mul_(p)
        dq_blk.baddbmm_(ds, k_aug[:, pc.c0 : pc.c1, :d])
        dvv[:, pc.c0 : pc.c1].baddbmm_(p.transpose(1, 2), dob)
        dk[:, pc.c0 : pc.c1].baddbmm_(ds.transpose(1, 2), qb)


_POOL: list = []  # [threads, pid, ThreadPoolExecutor] once made


def _units(bh: int, hkv: int, per_example: bool, workers: int) -> list[_Unit]:
    """Split the flattened (batch, kv head) axis into about ``workers`` slices; a spec with a
    batch (per-example masks) gets slices within one example each."""
    if not per_example:
        step = -(-bh // max(1, workers))
        return [_Unit(u, min(bh, u + step), 0) for u in range(0, bh, step)]
    nb = bh // hkv
    step = -(-hkv // max(1, -(-workers // nb)))
    return [_Unit(b * hkv + h, b * hkv + min(hkv, h + step), b)
            for b in range(nb) for h in range(0, hkv, step)]


def _run_units(fn, t, plan: _Plan, bh: int, hkv: int, device) -> None:
    """Run ``fn(t, plan, unit)`` over the units. On a multi-threaded CPU, the units run in
    parallel Python threads with torch's intra-op threads set to 1 for the duration: one fork and
    join per call instead of one per small op, which on a loaded machine (a thread descheduled at
    every barrier) is the difference between 1x and 10x slower than a fused kernel.
    ``torch.set_num_threads`` is process-wide: torch ops that other threads of the process run
    during the call run single-threaded until it returns."""
    per_example = plan.visibility.batch_size is not None
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or bh < 2:
        for unit in _units(bh, hkv, per_example, 1):
            fn(t, plan, unit)
        return
    units = _units(bh, hkv, per_example, threads)
    if not _POOL or _POOL[:2] != [threads, os.getpid()]:  # a forked child has no workers
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [threads, os.getpid(),
                    ThreadPoolExecutor(threads, thread_name_prefix="causalmix-blocks")]
    torch.set_num_threads(1)
    try:
        for f in [_POOL[2].submit(fn, t, plan, unit) for unit in units]:
            f.result()
    finally:
        torch.set_num_threads(threads)


def _augmented(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``[..., D]`` -> a new ``[..., D + 1]`` buffer holding ``x`` (times ``scale``) and a last
    column of ones (the backward's row-shift trick); the caller reads ``[..., :D]``."""
    out = torch.empty(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    if scale is None:
        out[..., :-1].copy_(x)
    else:
        torch.mul(x, scale, out=out[..., :-1])
    out[..., -1] = 1.0
    return out


def _head_major(q, k, v, scale, cd):
    """fp32/fp64 head-major augmented copies: ``q_aug [B, Hkv, Tq, G, D+1]`` (q scaled to base-2
    scores; query rows carry their head group innermost so that a row block of all group heads
    is one contiguous-row ``[rows * G, D]`` matrix per kv head), ``k_aug [B*Hkv, Tk, D+1]``,
    ``v_aug [B*Hkv, Tk, Dv+1]``."""
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    qv = q.view(b, tq, hkv, hq // hkv, d).permute(0, 2, 1, 3, 4)
    q_aug = _augmented(qv.to(cd), scale * _LOG2E)
    k_aug = _augmented(k.transpose(1, 2).to(cd)).view(b * hkv, tk, d + 1)
    v_aug = _augmented(v.transpose(1, 2).to(cd)).view(b * hkv, tk, dv + 1)
    return q_aug, k_aug, v_aug


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, visibility, q_offset, k_offset, scale):
        b, tq, hq, d = q.shape
        tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        group = hq // hkv
        cd = compute_dtype(q)
        cols = max(1, min(_KEY_BLOCK, tk))
        rows = _row_size(visibility, b, hq, d, tq, tk, q_offset, k_offset, cols)
        piece = _piece_keys(b, hq, rows, cols)
        plan = _plan(visibility, tq, tk, q_offset, k_offset, rows, cols, piece, cd, q.device)
        q_aug, k_aug, v_aug = _head_major(q, k, v, scale, cd)
        bh = b * hkv
        qa = q_aug.view(bh, tq, group, d + 1)
        out = torch.empty(bh, tq, group, dv, dtype=cd, device=q.device)
        lse2 = torch.empty(bh, tq, group, dtype=cd, device=q.device)
        fwd = _Fwd(qa[..., :d], k_aug[..., :d], v_aug[..., :dv], out, lse2)
        _run_units(_forward_unit, fwd, plan, bh, hkv, q.device)
        # The backward's row shift (see there); rows that see nothing are shifted by -inf so
        # that exp2(s - lse2) = 0 for them.
        qa[..., -1] = torch.where(torch.isneginf(lse2), float("-inf"), -lse2)
        ctx.save_for_backward(qa, k_aug, v_aug, out, lse2)
        ctx.plan, ctx.scale, ctx.shape = plan, scale, (b, hkv, group)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        o = out.view(b, hkv, tq, group, dv).permute(0, 2, 1, 3, 4).reshape(b, tq, hq, dv)
        ls = torch.empty(b, tq, hkv, group, dtype=cd, device=q.device)
        torch.mul(lse2.view(b, hkv, tq, group).permute(0, 2, 1, 3), math.log(2.0), out=ls)
        return o.to(q.dtype), ls.view(b, tq, hq)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q_aug, k_aug, v_aug, out, lse2 = ctx.saved_tensors
        plan, scale, shape = ctx.plan, ctx.scale, ctx.shape
        b, hkv, g = shape
        bh, tq, _, d1 = q_aug.shape
        tk, dv = k_aug.shape[1], v_aug.shape[-1] - 1
        cd, dev = q_aug.dtype, q_aug.device
        if d_out is None:
            d_out = torch.zeros(b, tq, hkv * g, dv, device=dev, dtype=cd)
        # Fold the row shifts into the matmuls with the extra column (q's is set by forward):
        #   [q, -lse2] . [k, 1] = s - lse2        (then exp2 gives P directly)
        #   [dO, -delta] . [v, 1] = dO v - delta  (then times P gives dS)
        do = d_out.to(cd).view(b, tq, hkv, g, dv).permute(0, 2, 1, 3, 4)
        do_aug = _augmented(do).view(bh, tq, g, dv + 1)
        delta = torch.linalg.vecdot(do_aug[..., :dv], out)  # [BH, Tq, G]
        if d_lse is not None:
            delta = delta - d_lse.to(cd).view(b, tq, hkv, g).permute(0, 2, 1, 3).reshape(
                bh, tq, g)
        do_aug[..., -1] = -delta
        t = _Bwd(q_aug, do_aug, k_aug, v_aug,
                 torch.zeros(bh, tq, g, d1 - 1, dtype=cd, device=dev),
                 torch.zeros(bh, tk, d1 - 1, dtype=cd, device=dev),
                 torch.zeros(bh, tk, dv, dtype=cd, device=dev))
        _run_units(_backward_unit, t, plan, bh, hkv, dev)
        grads = _Grads(t.dq.view(b, hkv, tq, g, d1 - 1), t.dk, t.dv)
        return (*_input_grads(grads, scale, shape, ctx.dtypes), None, None, None, None)


class _Grads(NamedTuple):
    dq: torch.Tensor  # [B, Hkv, Tq, G, D]
    dk: torch.Tensor  # [B*Hkv, Tk, D]
    dv: torch.Tensor  # [B*Hkv, Tk, Dv]


def _input_grads(grads: _Grads, scale: float, shape, dtypes):
    """Back to ``[B, T, H, D]`` layouts and dtypes. The scores were ``scale * log2(e) * q.k``:
    dq = scale * dS k, dk = ln 2 * dS^T (q scaled)."""
    b, hkv, g = shape
    _, _, tq, _, d = grads.dq.shape
    tk, dv = grads.dv.shape[1], grads.dv.shape[2]
    cd = grads.dq.dtype
    dq = torch.empty(b, tq, hkv, g, d, dtype=cd, device=grads.dq.device)
    torch.mul(grads.dq.permute(0, 2, 1, 3, 4), scale, out=dq)
    dk = torch.empty(b, tk, hkv, d, dtype=cd, device=dq.device)
    torch.mul(grads.dk.view(b, hkv, tk, d).transpose(1, 2), math.log(2.0), out=dk)
    dvv = grads.dv.view(b, hkv, tk, dv).transpose(1, 2)
    return (dq.view(b, tq, hkv * g, d).to(dtypes[0]), dk.to(dtypes[1]), dvv.to(dtypes[2]))


def _apply(q, k, v, visibility, q_offset, k_offset, scale):
    return _BlockAttention.apply(q, k, v, visibility, q_offset, k_offset, scale)


_EAGER_ONLY = None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]`` ->
    ``(out [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] in the compute dtype)``.

    Under ``torch.compile`` the block loop runs eagerly (its plan is data, not a graph); the
    ``torch.compiler.disable`` wrapper is made on first use so that importing causalmix does not
    import torch's compiler stack (about a second)."""
    args = (call.q, call.k, call.v, call.visibility, call.q_offset, call.k_offset, call.scale)
    if torch.compiler.is_compiling():
        return _eager_only()(*args)
    return _apply(*args)


def _eager_only():
    global _EAGER_ONLY
    if _EAGER_ONLY is None:
        _EAGER_ONLY = torch.compiler.disable(_apply)
    return _EAGER_ONLY
