"""Chunked scan with per key dimension gates (GLA), private to ``impl/chunk.py``.

Gates ``g, r: [B', T, H, D]`` (``<= 0``). Inside chunk n, with the chunk-local cumulative sums
``b_r = g_0 + .. + g_r`` and ``e_r = r_0 + .. + r_{r-1}`` (per key dimension d, fp64)::

    tile     A_rj = sum_d q_rd k_jd exp(b_rd - b_jd)   (j <= r, same segment)
                    sum_d q_rd k_jd exp(e_jd - e_rd)   (j > r, reverse pairs)
    forward  S_{n+1} = diag(exp(B)) S_n + sum_j (k_j * exp(B - b_j)) v_j^T
             read    (q_r * exp(b_r)) S_n
    reverse  R_{n-1} = diag(exp(E)) R_n + sum_j (k_j * exp(e_j)) v_j^T
             read    (q_r * exp(E - e_r)) R_n

The tile is not a matrix product of ``q`` and ``k`` scaled by one factor per pair; :func:`_lower`
builds it. Where a chunk decays by at most :data:`LIMIT` (``max_d -b_{C-1,d}``, the usual case)
it is one product of ``q * exp(b)`` and ``k * exp(-b)``: every factor lies within
``exp(+-LIMIT)``, so nothing overflows or underflows and each term keeps its relative precision.
Stronger chunks use GLA's secondary chunking: sub-chunks of ``SUB`` positions; a pair of
sub-chunks I > J is a matrix product of ``q * exp(b - b_first(I))`` and ``k * exp(b_last(J) -
b)`` with ``exp(b_first(I) - b_last(J))`` between them (exponents ``<= 0``), the diagonal
sub-chunks are products again where they decay by at most LIMIT, else computed per dimension
(``[SUB, SUB, D]``, exponents ``<= 0``). Nothing overflows at any gate strength.

Execution: blocks of chunks (about :data:`BLOCK` positions) are the unit. Forward (no graph):
the reverse states at the block boundaries, then the blocks in order, keeping the forward state
at each block start (``T / BLOCK`` states). Backward: dL/dR at the block boundaries in forward
order (a closed recurrence), then the blocks from the last to the first, each recomputed under
autograd from its saved incoming states and differentiated with the gradients flowing in from
its neighbours: memory linear in T, one block's graph alive at a time, every gradient (q, k, v,
both gates, initial state) exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from causalmix.ops.heads import Heads
from causalmix.ops.linear._chunk_geometry import Geometry, _block_masks

#: sub-chunk length of the tile (secondary chunking)
SUB = 16
#: positions per block of chunks (the unit recomputed in backward)
BLOCK = 256
#: largest decay (sum of -log-gates) a stretch may have for its tile to be one matrix product
#: of ``q * exp(b - b_0)`` and ``k * exp(b_0 - b)``: ``exp(+-40)`` is far inside fp32's range
LIMIT = 40.0


class VectorPlan(NamedTuple):
    """Geometry of the call, compute dtype, head layout."""

    geo: Geometry
    cd: torch.dtype
    heads: Heads


class Block(NamedTuple):
    """Chunks ``[n0, n1)``, positions ``[a0, a1)`` of the call."""

    n0: int
    n1: int
    a0: int
    a1: int


def _blocks(geo: Geometry) -> list[Block]:
    per = max(1, BLOCK // geo.c)
    out = []
    for n0 in range(0, geo.n, per):
        n1 = min(geo.n, n0 + per)
        out.append(Block(n0, n1, n0 * geo.c, min(geo.t, n1 * geo.c)))
    return out


def _chunks(x: torch.Tensor, blk: Block, geo: Geometry, heads: Heads, dtype) -> torch.Tensor:
    """``[B, a1 - a0, Hx, D]`` -> ``[B, K, Hx / K, nb, C, D]`` in ``dtype`` (zero padded)."""
    nb = blk.n1 - blk.n0
    x = x.to(dtype)
    if nb * geo.c != x.shape[1]:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * geo.c - x.shape[1]))
    x = x.view(x.shape[0], nb, geo.c, x.shape[2], x.shape[3]).permute(0, 3, 1, 2, 4)
    return x.unflatten(1, (heads.k, x.shape[1] // heads.k))


def _flag(x: torch.Tensor | None, blk: Block, per_position: bool) -> torch.Tensor | None:
    """A geometry flag ``[B', 1, N, C]`` (or ``[B', 1, N]``) of the block, broadcastable against
    ``[B, K, G, nb, C, D]`` (or the per-chunk ``[B, K, G, nb, D]``)."""
    if x is None:
        return None
    x = x[:, :, blk.n0:blk.n1]
    return x[:, :, None, :, :, None] if per_position else x[:, :, None, :, None]


def _masks(geo: Geometry, blk: Block, attr: str) -> torch.Tensor | None:
    m = _block_masks(geo, blk.n0, blk.n1, attr)  # [B', nb | 1, C, C] or None
    return None if m is None else m[:, None, None]


def _exp(x: torch.Tensor, cd, flag: torch.Tensor | None) -> torch.Tensor:
    """``exp`` of an fp64 difference (``<= 0``) in ``cd``, 0 where ``flag`` is False."""
    y = torch.exp(x.to(cd))
    return y if flag is None else torch.where(flag, y, torch.zeros((), dtype=cd, device=y.device))


def _span(b: torch.Tensor, first: torch.Tensor) -> float:
    """The largest decay ``first - b`` (``>= 0``) over a stretch; NaN counts as unbounded."""
    span = float((first - b).detach().max()) if b.numel() else 0.0
    return span if span == span else float("inf")


def _factored(x, y, b, ref, cd) -> torch.Tensor:
    """``(x * exp(b - ref)) (y * exp(ref - b))^T``: exact where ``|b - ref| <= LIMIT``."""
    return (x * torch.exp((b - ref).to(cd))) @ (y * torch.exp((ref - b).to(cd))).transpose(-1, -2)


def _lower(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, cd) -> torch.Tensor:
    """``L_rj = sum_d x_rd y_jd exp(b_rd - b_jd)`` for ``j <= r`` (anything finite above the
    diagonal): ``x, y: [..., C, D]``, ``b: [..., C, D]`` fp64 cumulative sums (non-increasing
    along C) -> ``[..., C, C]``.

    When the whole stretch decays by at most :data:`LIMIT` in every dimension, one matrix
    product ``(x * exp(b - b_0)) (y * exp(b_0 - b))^T`` (every factor within ``exp(+-LIMIT)``:
    no overflow, no underflow); otherwise secondary chunking (module docstring)."""
    c = x.shape[-2]
    ref = b[..., :1, :]
    if _span(b, ref) <= LIMIT:
        return _factored(x, y, b, ref, cd)
    sub = min(SUB, c)
    m = -(-c // sub)
    pad = m * sub - c
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        y = torch.nn.functional.pad(y, (0, 0, 0, pad))
        b = torch.cat([b, b[..., -1:, :].expand(*b.shape[:-2], pad, b.shape[-1])], dim=-2)
    x, y, b = (z.unflatten(-2, (m, sub)) for z in (x, y, b))  # [..., m, sub, D]
    first, last = b[..., :, :1, :], b[..., :, -1:, :]
    minus_inf = torch.tensor(float("-inf"), dtype=cd, device=x.device)
    if _span(b, first) <= LIMIT:  # diagonal sub-chunks as products too
        diag = _factored(x, y, b, first, cd)
    else:  # per dimension: [..., m, sub, sub, D]
        low = torch.ones(sub, sub, dtype=torch.bool, device=x.device).tril()
        logits = torch.where(low[..., None], (b[..., :, None, :] - b[..., None, :, :]).to(cd),
                             minus_inf)
        diag = torch.einsum("...rd,...jd,...rjd->...rj", x, y, torch.exp(logits))
    if m == 1:
        return diag[..., 0, :c, :c]
    xq = x * torch.exp((b - first).to(cd))  # [..., m, sub, D]
    yk = y * torch.exp((last - b).to(cd))
    before = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # I > J
    mid = torch.where(before[..., None], (first[..., :, None, 0, :] - last[..., None, :, 0, :])
                      .to(cd), minus_inf).exp()  # [..., m(I), m(J), D]
    off = (xq[..., :, None, :, :] * mid[..., :, :, None, :]) @ yk[..., None, :, :, :].transpose(
        -1, -2)  # [..., I, J, sub, sub]
    eye = torch.eye(m, dtype=torch.bool, device=x.device)[:, :, None, None]
    full = torch.where(eye, diag[..., :, None, :, :], off)  # [..., I, J, r, j]
    full = full.transpose(-3, -2).reshape(*full.shape[:-4], m * sub, m * sub)
    return full[..., :c, :c]


class Side(NamedTuple):
    """One direction's weights of a block's chunks, ``[B', K, G, nb, C, D]`` (totals ``[B', K,
    G, nb, D]``): forward ``read = exp(b)``, ``key = exp(B - b)``, ``carry = exp(B)``; reverse
    ``read = exp(E - e)``, ``key = exp(e)``, ``carry = exp(E)``. ``cum``: the local cumulative
    sums (fp64, for the tile's secondary chunking); ``inv``: ``exp(-B)`` (or ``exp(-E)``) when
    every chunk of the block decays by at most :data:`LIMIT` (the tile is then ``(q * read *
    inv) (k * key)^T``), else None. ``read`` and ``key`` are not masked by the geometry's
    flags (the tile uses them too), ``carry`` is."""

    cum: torch.Tensor
    read: torch.Tensor
    key: torch.Tensor
    carry: torch.Tensor
    inv: torch.Tensor | None


def _side(cum: torch.Tensor, tot: torch.Tensor, cd, carry_flag) -> Side:
    """The forward :class:`Side` from the local sums ``b`` (``cum``, fp64) and the chunk totals
    ``B`` (``tot``, ``[..., 1, D]`` fp64)."""
    span = _span(tot, torch.zeros((), dtype=tot.dtype, device=tot.device))
    c32, t32 = cum.to(cd), tot.to(cd)
    carry = _exp(tot[..., 0, :], cd, carry_flag)
    return Side(cum, torch.exp(c32), torch.exp(t32 - c32), carry,
                torch.exp(-t32) if span <= LIMIT else None)


def _gates(plan: VectorPlan, blk: Block, g: torch.Tensor, r: torch.Tensor | None):
    """The forward and reverse :class:`Side` of a block (reverse None without a reverse
    scan)."""
    geo, cd, fl = plan.geo, plan.cd, plan.geo.flags
    b = _chunks(g, blk, geo, plan.heads, torch.float64).cumsum(-2)
    fwd = _side(b, b[..., -1:, :], cd, _flag(fl.carry_f, blk, False))
    if r is None:
        return fwd, None
    rr = _chunks(r, blk, geo, plan.heads, torch.float64)
    e = torch.cat([torch.zeros_like(rr[..., :1, :]), rr[..., :-1, :]], dim=-2).cumsum(-2)
    etot = e[..., -1:, :] + rr[..., -1:, :]
    # reverse: read exp(E - e), key exp(e), carry exp(E) (exponents <= 0: e is non-increasing
    # from 0, E <= e)
    span = _span(etot, torch.zeros((), dtype=etot.dtype, device=etot.device))
    e32, et32 = e.to(cd), etot.to(cd)
    rev = Side(e, torch.exp(et32 - e32), torch.exp(e32), _exp(etot[..., 0, :], cd,
               _flag(fl.carry_r, blk, False)), torch.exp(-et32) if span <= LIMIT else None)
    return fwd, rev


def _masked(x: torch.Tensor, flag: torch.Tensor | None) -> torch.Tensor:
    return x if flag is None else torch.where(flag, x, torch.zeros((), dtype=x.dtype,
                                                                   device=x.device))


def _scan(carry: torch.Tensor, upd: torch.Tensor, s: torch.Tensor, backwards: bool):
    """States ``s_n`` entering each chunk of ``S_{n+1} = diag(carry_n) S_n + upd_n`` (the
    reverse order when ``backwards``), stacked ``[B, K, G, nb, D, Dv]``, and the last one."""
    nb = upd.shape[3]
    order = range(nb - 1, -1, -1) if backwards else range(nb)
    ins: list = [None] * nb
    for n in order:
        ins[n] = s
        s = carry[..., n, :, None] * s + upd[..., n, :, :]
    return torch.stack(ins, dim=3), s


class BlockIn(NamedTuple):
    """One block's inputs: tiles ``[B, a1 - a0, Hx, D]`` of q, k, v, gates, and the forward
    state entering it / the reverse state entering it from the right (``[B, K, G, D, Dv]``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    r: torch.Tensor | None
    s: torch.Tensor
    rs: torch.Tensor | None


def _block(plan: VectorPlan, blk: Block, x: BlockIn):
    """A block's output ``[B, a1 - a0, H, Dv]``, the forward state leaving it and the reverse
    state leaving it to the left (differentiable)."""
    geo, cd, heads, fl = plan.geo, plan.cd, plan.heads, plan.geo.flags
    q, k, v = (_chunks(t, blk, geo, heads, cd) for t in (x.q, x.k, x.v))
    fwd, rev = _gates(plan, blk, x.g, x.r)
    qf, kf = q * fwd.read, k * fwd.key  # [B, K, G, nb, C, D]
    # tile, forward pairs (j <= r): exp(b_r - b_j) = read_r * exp(-B) * key_j
    tile = (qf * fwd.inv) @ kf.transpose(-1, -2) if fwd.inv is not None \
        else _lower(q, k, fwd.cum, cd)
    att = _masked(tile, _masks(geo, blk, "fmask"))
    upd = _masked(kf, _flag(fl.key_f, blk, True)).transpose(-1, -2) @ v  # [B, K, G, nb, D, Dv]
    s_in, s_out = _scan(fwd.carry, upd, x.s, False)
    out = _masked(qf @ s_in, _flag(fl.read_f, blk, True))  # [B, K, G, nb, C, Dv]
    rs_out = None
    if rev is not None:
        qr, kr = q * rev.read, k * rev.key
        bmask = _masks(geo, blk, "bmask")
        if bmask is not None:  # reverse pairs (j > r): exp(e_j - e_r) = read_r exp(-E) key_j
            tile = (qr * rev.inv) @ kr.transpose(-1, -2) if rev.inv is not None \
                else _lower(k, q, rev.cum, cd).transpose(-1, -2)
            att = torch.where(bmask, tile, att)
        upd_r = _masked(kr, _flag(fl.key_r, blk, True)).transpose(-1, -2) @ v
        r_in, rs_out = _scan(rev.carry, upd_r, x.rs, True)
        out = out + _masked(qr @ r_in, _flag(fl.read_r, blk, True))
    out = out + att @ v  # [B, K, G, nb, C, Dv]
    out = out.flatten(1, 2).permute(0, 2, 3, 1, 4).flatten(1, 2)  # [B, nb * C, H, Dv]
    return out[:, :blk.a1 - blk.a0], s_out, rs_out


def _tiles(t: torch.Tensor | None, blk: Block) -> torch.Tensor | None:
    return None if t is None else t[:, blk.a0:blk.a1]


def _reverse_states(plan: VectorPlan, blocks: list, inputs: tuple, zero) -> list:
    """The reverse state entering each block from the right (``R`` after its last chunk)."""
    q, k, v, g, r = inputs
    out: list = [None] * len(blocks)
    rs = zero
    for i in range(len(blocks) - 1, -1, -1):
        blk = blocks[i]
        out[i] = rs
        _, rev = _gates(plan, blk, _tiles(g, blk), _tiles(r, blk))
        kt, vt = (_chunks(_tiles(t, blk), blk, plan.geo, plan.heads, plan.cd) for t in (k, v))
        kr = _masked(kt * rev.key, _flag(plan.geo.flags.key_r, blk, True))
        _, rs = _scan(rev.carry, kr.transpose(-1, -2) @ vt, rs, True)
    return out


def _reverse_grads(plan: VectorPlan, blocks: list, inputs: tuple, do, zero) -> list:
    """``dL/dR`` of the reverse state leaving each block to the left (read by the chunks before
    it): ``H_n = (q_n * read_r)^T dO_n + diag(carry_r) H_{n-1}``, in forward order."""
    q, g, r = inputs
    out: list = [None] * len(blocks)
    h = zero
    for i, blk in enumerate(blocks):
        out[i] = h
        _, rev = _gates(plan, blk, _tiles(g, blk), _tiles(r, blk))
        qt, dot = (_chunks(_tiles(t, blk), blk, plan.geo, plan.heads, plan.cd) for t in (q, do))
        dot = _masked(dot, _flag(plan.geo.flags.read_r, blk, True))
        p = (qt * rev.read).transpose(-1, -2) @ dot  # [B, K, G, nb, D, Dv]
        for n in range(blk.n1 - blk.n0):
            h = p[..., n, :, :] + rev.carry[..., n, :, None] * h
    return out


class VectorScanFunction(torch.autograd.Function):
    """``apply(plan, q, k, v, log_gate, reverse_log_gate, initial_state)``: ``q, k: [B, T, Hx,
    D]``, ``v: [B, T, Hx, Dv]``, gates ``[B', T, H, D]`` (``reverse_log_gate`` None without a
    reverse scan), ``initial_state: [B, H, D, Dv]`` or None -> ``(o [B, T, H, Dv], final state
    [B, H, D, Dv])`` in the compute dtype."""

    @staticmethod
    def forward(plan: VectorPlan, *tensors: torch.Tensor | None):
        q, k, v, g, r, s0 = tensors
        blocks = _blocks(plan.geo)
        zero = _zero_state(plan, q, v)
        s = zero if s0 is None else s0.to(plan.cd).unflatten(1, (plan.heads.k, -1))
        rss = _reverse_states(plan, blocks, (q, k, v, g, r), zero) if r is not None \
            else [None] * len(blocks)
        outs, starts = [], []
        for blk, rs in zip(blocks, rss, strict=True):
            starts.append(s)
            o, s, _ = _block(plan, blk, BlockIn(*(_tiles(t, blk) for t in (q, k, v, g, r)),
                                                s, rs))
            outs.append(o)
        return torch.cat(outs, dim=1), s.flatten(1, 2), torch.stack(starts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        plan, q, k, v, g, r, s0 = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(q, k, v, g, r, output[2])
        ctx.plan, ctx.has_initial_state = plan, s0 is not None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do, ds_final, _dstarts):
        q, k, v, g, r, starts = ctx.saved_tensors
        plan = ctx.plan
        blocks = _blocks(plan.geo)
        zero = _zero_state(plan, q, v)
        do = torch.zeros(*q.shape[:2], plan.heads.out, v.shape[-1], dtype=plan.cd,
                         device=q.device) if do is None else do.to(plan.cd)
        hs = _reverse_grads(plan, blocks, (q, g, r), do, zero) if r is not None \
            else [None] * len(blocks)
        need = ctx.needs_input_grad[1:6]
        grads = [torch.zeros(t.shape, dtype=plan.cd, device=q.device) if t is not None and
                 want else None for t, want in zip((q, k, v, g, r), need, strict=True)]
        ds = zero if ds_final is None else ds_final.to(plan.cd).unflatten(1, (plan.heads.k, -1))
        rs = zero if r is not None else None
        # imported here: that module builds on this one's stages
        from causalmix.ops.linear._chunk_vector_grad import fast_block_grads

        for i in range(len(blocks) - 1, -1, -1):
            saved, flowing = (q, k, v, g, r, starts[i], rs), (do, ds, hs[i])
            fast = fast_block_grads(plan, blocks[i], saved, flowing, grads)
            if fast is not None:  # hand-written (forward scan only, every chunk within LIMIT)
                ds = fast
            else:  # recomputed under autograd
                ds, rs = _block_grads(plan, blocks[i], saved, flowing, grads)
        dq, dk, dv, dg, dr = (None if x is None else x.to(t.dtype)
                              for x, t in zip(grads, (q, k, v, g, r), strict=False))
        return None, dq, dk, dv, dg, dr, ds.flatten(1, 2) if ctx.has_initial_state else None


def _zero_state(plan: VectorPlan, q, v) -> torch.Tensor:
    h = plan.heads
    return torch.zeros(q.shape[0], h.k, h.out // h.k, q.shape[-1], v.shape[-1], dtype=plan.cd,
                       device=q.device)


def _block_grads(plan: VectorPlan, blk: Block, saved: tuple, flowing: tuple, grads: list):
    """Recompute block ``blk`` under autograd and differentiate it: ``saved`` its inputs (whole
    q, k, v, gates, the state entering it and the reverse state from its right), ``flowing``
    ``(dO, dL/dS leaving it, dL/dR leaving it to the left)``; accumulates into ``grads`` (q, k,
    v, gates). Returns dL/dS entering it and the reverse state leaving it to the left."""
    *whole, s, rs = saved
    do, ds, h = flowing
    with torch.enable_grad():
        tiles = [None if t is None else _tiles(t, blk).detach().requires_grad_(gr is not None)
                 for t, gr in zip(whole, grads, strict=True)]
        s = s.detach().requires_grad_()
        o, s_out, rs_out = _block(plan, blk, BlockIn(*tiles, s, rs))
        outs, gouts = [o, s_out], [_tiles(do, blk), ds]
        if rs_out is not None:
            outs.append(rs_out)
            gouts.append(h)
        wrt = [s] + [t for t, gr in zip(tiles, grads, strict=True) if gr is not None]
        got = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
    it = iter(got[1:])
    for gr in grads:
        if gr is not None:
            x = next(it)
            if x is not None:
                gr[:, blk.a0:blk.a1] += x
    ds_in = got[0] if got[0] is not None else torch.zeros_like(s)
    return ds_in.detach(), None if rs_out is None else rs_out.detach()


# ------------------------------------------------------------------ the band of Chunked(s, L > 0)


class VectorBandPlan(NamedTuple):
    """The band of one call (as :class:`~causalmix.ops.linear._chunk_band.BandPlan`)."""

    spec: Any
    offset: int
    width: int
    chunk: int
    heads: Heads
    cd: torch.dtype


def _band_tiles(plan: VectorBandPlan, t: int, tk: int):
    """Query tiles ``[a, a + cn)`` and their key spans ``[a, kend)``."""
    for a in range(0, t, plan.chunk):
        cn = min(plan.chunk, t - a)
        yield a, cn, min(tk, a + cn + plan.width)


def _band_tile(plan: VectorBandPlan, span: tuple, x: tuple) -> torch.Tensor:
    """The band's output of queries ``[a, a + cn)`` from keys ``[a, kend)`` (differentiable):
    ``x`` the tiles ``q [B, cn, Hq, D]``, ``k, v [B, kn, Hx, .]``, ``r [B', kn, H, D]``;
    weight ``exp(E_j - E_i)`` per dimension, ``E`` the exclusive cumulative ``r`` of the tile."""
    a, cn, kend = span
    q, k, v, r = x
    cd, heads, dev = plan.cd, plan.heads, q.device
    nb = plan.spec.batch_size or 1
    i = torch.arange(a, a + cn, device=dev)
    j = torch.arange(a, kend, device=dev)
    vis = plan.spec.visible(torch.arange(nb, device=dev).view(nb, 1, 1),
                            (i + plan.offset).view(1, -1, 1), (j + plan.offset).view(1, 1, -1))
    vis = (vis & (j[None, :] > i[:, None])[None])[:, None, None, :, :, None]  # [B'',1,1,cn,kn,1]

    def grouped(z):  # [B, n, Hx, D] -> [B, K, Hx / K, n, D]
        return z.to(cd).transpose(1, 2).unflatten(1, (heads.k, -1))

    e = torch.cat([torch.zeros_like(r[:, :1]), r[:, :-1]], dim=1).to(torch.float64).cumsum(1)
    e = grouped(e)  # [B', K, G, kn, D] fp64
    logits = (e[..., None, :, :] - e[..., :cn, None, :]).to(cd)  # [B', K, G, cn, kn, D]
    w = torch.where(vis, logits, torch.tensor(float("-inf"), dtype=cd, device=dev)).exp()
    att = torch.einsum("...id,...jd,...ijd->...ij", grouped(q), grouped(k), w)
    return (att @ grouped(v)).flatten(1, 2).transpose(1, 2)  # [B, cn, H, Dv]


class VectorBandFunction(torch.autograd.Function):
    """``apply(plan, q, k, v, reverse_log_gate)`` -> the band's part of the output ``[B, T, H,
    Dv]`` (compute dtype); backward recomputes one tile at a time under autograd."""

    @staticmethod
    def forward(plan: VectorBandPlan, *tensors: torch.Tensor) -> torch.Tensor:
        q, k, v, r = tensors
        outs = [_band_tile(plan, span, (q[:, span[0]:span[0] + span[1]], k[:, span[0]:span[2]],
                                        v[:, span[0]:span[2]], r[:, span[0]:span[2]]))
                for span in _band_tiles(plan, q.shape[1], k.shape[1])]
        return torch.cat(outs, dim=1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.plan = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        grads = [torch.zeros(t.shape, dtype=ctx.plan.cd, device=t.device) if want else None
                 for t, want in zip(saved, need, strict=True)]
        q = saved[0]
        for a, cn, kend in _band_tiles(ctx.plan, q.shape[1], saved[1].shape[1]):
            spans = [(a, a + cn)] + [(a, kend)] * 3
            with torch.enable_grad():
                tiles = [t[:, lo:hi].detach().requires_grad_(want)
                         for t, (lo, hi), want in zip(saved, spans, need, strict=True)]
                o = _band_tile(ctx.plan, (a, cn, kend), tiles)
                wrt = [t for t in tiles if t.requires_grad]
                got = iter(torch.autograd.grad(o, wrt, do[:, a:a + cn].to(o.dtype),
                                               allow_unused=True))
            for gr, (lo, hi), want in zip(grads, spans, need, strict=True):
                if want:
                    x = next(got)
                    if x is not None:
                        gr[:, lo:hi] += x
        return (None, *(None if g is None else g.to(t.dtype)
                        for g, t in zip(grads, saved, strict=True)))
