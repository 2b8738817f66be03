"""Chunked linear attention (Lightning Attention-2 / GLA / SSD tiling), hand-written backward.

Per-position ``log_gate`` ``g_t`` (forward) and ``reverse_log_gate`` ``r_t`` (reverse),
``[B', T, H]``, ``<= 0`` (:meth:`~causalmix.ops.linear.call.LinearCall.scan_gates`; a constant
decay is ``g_t = r_t = log(lambda)``). The sequence is cut into chunks of ``C`` positions.
Inside chunk n (local positions ``0..cn-1``), with the *chunk-local* cumulative sums ``b_r = g_0
+ .. + g_r`` and ``e_r = r_0 + .. + r_{r-1}`` (``B = b_{cn-1}``, ``E`` the sum of all ``r`` of
the chunk; :class:`~causalmix.ops.linear._chunk_geometry.Weights` ``fwd_cum`` / ``rev_cum``)::

    tile     M_rj = exp(b_r - b_j) (j <= r, same segment),  exp(e_j - e_r) (j > r, reverse)
    forward  S_{n+1} = exp(B) S_n + sum_j exp(B - b_j) k_j v_j^T,   read: exp(b_r) q_r S_n
    reverse  R_{n-1} = exp(E) R_n + sum_j exp(e_j) k_j v_j^T,       read: exp(E - e_r) q_r R_n

``S_n`` is anchored at the position before chunk n (reset at segment starts), ``R_n`` after it
(reset at the ends of the reverse regions); ``Chunked(s, L > 0)`` adds a band of width
``(L + 1) * s - 1`` (:mod:`causalmix.ops.linear._chunk_band`). Every exponent is a difference
of chunk-local cumulative log-gates, ``<= 0``: nothing overflows at any length or gate strength.

Stages: forward ``_reverse_scan`` -> ``_forward_scan``; backward ``_reverse_grad_scan``
(dL/dR) -> ``_backward_scan`` (per chunk ``_tile_grads``, ``_forward_state_grads``,
``_reverse_state_grads``) -> ``_gate_grads`` (chunk-local reverse cumulative sums).

Per key dimension gates (``[B', T, H, D]``, GLA) run in
:mod:`causalmix.ops.linear._chunk_vector` (secondary chunking, blocks of chunks recomputed or
differentiated by hand in backward); this module dispatches to it.

Memory: forward saves q, k, v, the gates and one ``[B, H, D, Dv]`` state per chunk (``T / C``
states, no per-token state, no ``[T, T]`` tensor); backward recomputes the weights and tiles
and keeps one more state per chunk for the reverse scan. States are fp64 when a constant decay
is differentiated (:class:`~causalmix.ops.linear.call.ScanGates` ``wide_states``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from causalmix.checks import compute_dtype
from causalmix.ops.heads import Heads
from causalmix.ops.linear._chunk_band import BandFunction, BandPlan
from causalmix.ops.linear._chunk_geometry import (
    ChunkMasks,
    Geometry,
    TileWeights,
    Weights,
    chunk_weights,
    geometry,
    tile,
)
from causalmix.ops.linear._chunk_vector import (
    VectorBandFunction,
    VectorBandPlan,
    VectorPlan,
    VectorScanFunction,
)
from causalmix.ops.linear.call import LinearCall


def can_serve(call: LinearCall) -> str | None:
    """Queries and keys at the same positions and a spec that factorises; keys past the last
    query only for specs without a reverse scan and without a final state."""
    refusal = call.scan_refusal()
    if refusal is not None:
        return refusal
    tq, tk = call.q.shape[1], call.k.shape[1]
    if tk != tq:
        if call.factor.has_reverse:
            return (f"keys past the last query (q {tq}, k {tk}) are served only for specs "
                    f"without a reverse scan (Causal, Chunked(size, lookahead > 0), with "
                    f"Segments), not {call.visibility!r}")
        if call.return_final_state:
            return (f"with keys past the last query (q {tq}, k {tk}) chunk returns no final "
                    f"state (it is anchored at the last key)")
    return None


def _outer(x: torch.Tensor, y: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """``x^T y`` over the chunk's positions (a state update), accumulated in ``sd``."""
    return x.to(sd).transpose(-1, -2) @ y.to(sd)


def _col(x: torch.Tensor, n: int, cn: int) -> torch.Tensor:
    """Weights of chunk n as a column ``[B'', K, G, cn, 1]``."""
    return x[..., n, :cn, None]


def _carry(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[..., n, None, None]


def _split(x: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Grouped heads: ``[B, H, ...]`` -> ``[B, K, H / K, ...]``, heads as (key head, member of
    its group), a view (output head ``h`` is member ``h % G`` of key head ``h // G``). Without
    grouping, ``x`` itself (no extra dimension, no extra op)."""
    return x.unflatten(1, (heads.k, x.shape[1] // heads.k)) if heads.grouped else x


def _merge(x: torch.Tensor, heads: Heads) -> torch.Tensor:
    """The inverse of :func:`_split`: ``[B, K, G, ...]`` -> ``[B, H, ...]``."""
    return x.flatten(1, 2) if heads.grouped else x


def _tile(x: torch.Tensor, a: int, cn: int, scan: Scan) -> torch.Tensor:
    """Positions ``[a, a + cn)`` of a ``[B, T, Hx, D]`` input as tiles ``[B, Hx, cn, D]`` in the
    compute dtype, grouped by :func:`_split` (views: a k or v head serving G output heads is
    never repeated)."""
    return _split(tile(x, a, cn, scan.cd), scan.heads)


def _heads(x: torch.Tensor, members: int, heads: Heads) -> torch.Tensor:
    """A per-output-head tile gradient (grouped ``[B, K, G, cn, D]``) summed over the output
    heads that share one input head (``members`` of them per key head: G or 1), as ``[B, cn,
    Hx, D]``."""
    if heads.grouped:
        x = (x if x.shape[2] == members else x.sum(2, keepdim=True)).flatten(1, 2)
    return x.transpose(1, 2)


class ScanPlan(NamedTuple):
    """The non-tensor options of one scan: its geometry (positions, chunk length, reverse scan
    or not; built once for forward and backward), the state dtype, whether the gates are
    constant in time (a decay: weights and shared tiles are reused across calls), and the head
    layout."""

    geo: Geometry
    state_dtype: torch.dtype
    constant: bool
    heads: Heads


class Scan(NamedTuple):
    """What every stage reads: inputs, geometry, weights ``[B'', H, N, C]``, tile weights,
    dtypes and the head layout. With grouped heads (K key heads, each read by G output heads)
    every per-output-head tensor -- weights, states, tiles -- is split ``[B, K, G, ...]``
    (:func:`_split`) and the inputs with fewer heads broadcast."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geo: Geometry
    w: Weights
    tiles: TileWeights
    cd: torch.dtype
    sd: torch.dtype
    heads: Heads

    def tile_weights(self, n: int) -> torch.Tensor:
        """``M`` of chunk n, ``[B'', H, cn, cn]`` (split)."""
        return _split(self.tiles(n), self.heads)

    def pair_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A ``[B', cn, cn]`` mask of a chunk, broadcastable against its tiles."""
        return mask[:, None, None] if self.heads.grouped else mask[:, None]


class ChunkTiles(NamedTuple):
    """Chunk ``n`` (positions ``[a, a + cn)``) of q, k, v and the output gradient ``do`` as
    tiles ``[B, H, cn, D | Dv]`` in the compute dtype."""

    n: int
    a: int
    cn: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor


def _prepare(plan: ScanPlan, q, k, v, log_gate, reverse_log_gate) -> Scan:
    """Geometry and weights of a scan (recomputed in backward: O(T H), the geometry cached).
    Constant gates (a decay, ``[1, T, H]`` broadcast): weights and shared tiles are reused
    across calls, as they depend only on the geometry and the H decay values."""
    cd, geo = compute_dtype(q), plan.geo
    width = v.shape[-1]  # a block of tile weights weighs at most the output [B, T, H, Dv]
    if not plan.constant:
        w = chunk_weights(log_gate, reverse_log_gate, geo, cd)
        tiles = TileWeights(w, geo, cd, width)
    else:
        key = (cd, tuple(log_gate[0, 0].tolist()), tuple(reverse_log_gate[0, 0].tolist()))
        w, memo = geo.memo.get_or_make(
            key, lambda: (chunk_weights(log_gate, reverse_log_gate, geo, cd), {}))
        tiles = TileWeights(w, geo, cd, width, memo)
    w = Weights(*(None if x is None else _split(x, plan.heads) for x in w))
    return Scan(q, k, v, geo, w, tiles, cd, plan.state_dtype, plan.heads)


def _state_zeros(x: Scan) -> torch.Tensor:
    """A zero state ``[B, H, D, Dv]`` (split)."""
    shape = (x.q.shape[0], x.heads.out, x.q.shape[-1], x.v.shape[-1])
    return _split(x.q.new_zeros(shape, dtype=x.sd), x.heads)


def _reverse_scan(x: Scan) -> list:
    """Reverse states ``R_n`` (anchored after chunk n), built from the end."""
    rstates: list = [None] * x.geo.n
    rs = _state_zeros(x)
    for n in range(x.geo.n - 1, -1, -1):
        rstates[n] = rs
        if x.geo.dead(n):
            continue
        a, cn = n * x.geo.c, min(x.geo.c, x.geo.t - n * x.geo.c)
        kt, vt = _tile(x.k, a, cn, x), _tile(x.v, a, cn, x)
        rs = _carry(x.w.carry_r, n) * rs + _outer(kt * _col(x.w.key_r, n, cn), vt, x.sd)
    return rstates


def _forward_scan(x: Scan, s0, rstates):
    """Outputs ``[B, T, H, Dv]`` and the forward states ``S_0 .. S_N`` ``[N + 1, B, K, G, D,
    Dv]`` (the last one the final state)."""
    b, t = x.q.shape[:2]
    o = torch.empty(b, t, x.heads.out, x.v.shape[-1], dtype=x.cd, device=x.q.device)
    s = _state_zeros(x) if s0 is None else _split(s0.to(x.sd), x.heads)
    states = s.new_empty(x.geo.n + 1, *s.shape)
    for n in range(x.geo.n):
        states[n] = s
        m = x.geo.chunk(n)
        a, cn = m.a, m.cn
        qt, kt, vt = _tile(x.q, a, cn, x), _tile(x.k, a, cn, x), _tile(x.v, a, cn, x)
        att = (qt @ kt.transpose(-1, -2)) * x.tile_weights(n)
        out = att @ vt + (qt * _col(x.w.read_f, n, cn)) @ s.to(x.cd)
        if rstates[n] is not None and not x.geo.dead(n):
            out = out + (qt * _col(x.w.read_r, n, cn)) @ rstates[n].to(x.cd)
        o[:, a:a + cn] = _merge(out, x.heads).transpose(1, 2)
        s = _carry(x.w.carry_f, n) * s + _outer(kt * _col(x.w.key_f, n, cn), vt, x.sd)
    states[x.geo.n] = s
    return o, states


class ScanFunction(torch.autograd.Function):
    """Forward (+ optional reverse) chunked scan: ``apply(plan, q, k, v, log_gate,
    reverse_log_gate, initial_state)`` with ``q, k: [B, T, H, D]``, ``v: [B, T, H, Dv]``,
    gates ``[B', T, H]`` (``reverse_log_gate`` unread without a reverse scan),
    ``initial_state: [B, H, D, Dv]`` or None -> ``(o [B, T, H, Dv], final state, states)`` in
    the compute dtype (``states``: the per-chunk forward states, for backward only)."""

    @staticmethod
    def forward(plan: ScanPlan, *tensors: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, log_gate, reverse_log_gate, initial_state = tensors
        x = _prepare(plan, q, k, v, log_gate, reverse_log_gate)
        rstates = _reverse_scan(x) if plan.geo.reverse else [None] * x.geo.n
        o, states = _forward_scan(x, initial_state, rstates)
        return o, _merge(states[-1], plan.heads).to(x.cd, copy=True), states

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        plan, q, k, v, log_gate, reverse_log_gate, initial_state = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(q, k, v, log_gate, reverse_log_gate, output[2])
        ctx.plan, ctx.has_initial_state = plan, initial_state is not None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor | None, ds_final: torch.Tensor | None,
                 _dstates: Any) -> tuple[torch.Tensor | None, ...]:
        q, k, v, log_gate, reverse_log_gate, states = ctx.saved_tensors
        plan = ctx.plan
        x = _prepare(plan, q, k, v, log_gate, reverse_log_gate)
        if do is None:
            do = torch.zeros(*q.shape[:2], plan.heads.out, v.shape[-1], dtype=x.cd,
                             device=q.device)
        want_g = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        hstates = _reverse_grad_scan(x, do) if plan.geo.reverse else None
        grads = _backward_scan(x, do.to(x.cd), ds_final, states, hstates, want_g)
        dg = dgr = None
        if want_g:
            dg, dgr = _gate_grads(x, grads, log_gate, reverse_log_gate)
        ds0 = grads.gs.to(x.cd) if ctx.has_initial_state else None
        return (None, grads.dq.to(q.dtype), grads.dk.to(k.dtype), grads.dv.to(v.dtype), dg,
                dgr if plan.geo.reverse else None, ds0)


def _reverse_grad_scan(x: Scan, do) -> list:
    """``H_n = dL/dR_n`` in forward order: ``H_n = (read_r Q_n)^T dO_n + exp(E_n) H_{n-1}``."""
    hstates: list = [None] * x.geo.n
    hs = _state_zeros(x)
    for n in range(x.geo.n):
        if x.geo.dead(n):
            break  # later chunks are dead too; nothing reads their H
        a, cn = n * x.geo.c, min(x.geo.c, x.geo.t - n * x.geo.c)
        qt, dot = _tile(x.q, a, cn, x), _tile(do, a, cn, x)
        hs = _outer(qt * _col(x.w.read_r, n, cn), dot, x.sd) + _carry(x.w.carry_r, n) * hs
        hstates[n] = hs
    return hstates


class GateAcc(NamedTuple):
    """Gate-gradient terms the backward scan accumulates, per output head (``[B, K, G, N(,
    C)]``): ``dbt, det`` w.r.t. the chunk totals ``B``, ``E``; ``de`` w.r.t. the reverse local
    sums ``e`` (None without a reverse scan); ``db`` w.r.t. the forward local sums ``b``.
    ``wide`` (fp64 states: a differentiated constant decay, whose gradient sums these terms
    over all T): the pair and state terms are accumulated into ``db`` one by one in fp64
    (``q . dq - k . dk`` in fp32 would cancel ~C/2-fold); otherwise ``db`` holds ``q . dq - k .
    dk`` of each chunk's own (per output head) dq, dk with grouped heads, and is None without
    (:func:`_gate_grads` takes it from dq, dk); ``de`` is added to it at the end."""

    dbt: torch.Tensor
    de: torch.Tensor | None
    det: torch.Tensor | None
    db: torch.Tensor | None
    wide: bool


class Grads(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    gs: torch.Tensor  # dL/dS_0, the initial state's gradient
    acc: GateAcc | None


class TileGrad(NamedTuple):
    """Gradients of one chunk per output head, ``[B, K, G, cn, D|Dv]`` (summed over the heads
    sharing an input head by :func:`_heads`)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _tile_grads(x: Scan, m: ChunkMasks, tl: ChunkTiles, acc: GateAcc | None) -> TileGrad:
    """Intra-chunk tile ``O = (Q K^T * M) V``; reverse pairs' gate terms into ``acc``."""
    tw = x.tile_weights(tl.n)
    att = (tl.q @ tl.k.transpose(-1, -2)) * tw
    datt = tl.do @ tl.v.transpose(-1, -2)
    dp = datt * tw
    if acc is not None and acc.wide:  # pair terms one by one, in fp64
        p = (datt * att).to(x.sd)
        pf = p if m.bmask is None else p * x.pair_mask(m.fmask)
        acc.db[..., tl.n, :m.cn] += pf.sum(-1) - pf.sum(-2)  # M = exp(b_r - b_j)
        if m.bmask is not None:
            pr = p - pf
            acc.de[..., tl.n, :m.cn] += pr.sum(-2) - pr.sum(-1)
    elif acc is not None and m.bmask is not None:
        pr = (datt * att * x.pair_mask(m.bmask)).to(x.sd)  # dL/d(e_j - e_r), reverse pairs
        acc.de[..., tl.n, :m.cn] += pr.sum(-2) - pr.sum(-1)
    return TileGrad(dp @ tl.k, dp.transpose(-1, -2) @ tl.q, att.transpose(-1, -2) @ tl.do)


def _forward_state_grads(x: Scan, tl: ChunkTiles, pair: tuple, gs, g: TileGrad, acc):
    """State read ``O += diag(read_f) Q S_n`` and update ``S_{n+1} = carry_f S_n + (key_f
    K)^T V`` (``pair``: ``S_n, S_{n+1}``; ``gs``: dL/dS_{n+1}). ``S_{n+1}`` is ``exp(B)``
    times what the chunk-local sums give, so ``dL/dB = <dL/dS_{n+1}, S_{n+1}>``. Returns the
    tile gradients and dL/dS_n."""
    n, cn = tl.n, tl.cn
    s, s_next = pair
    wf, uf, cf = _col(x.w.read_f, n, cn), _col(x.w.key_f, n, cn), _carry(x.w.carry_f, n)
    xs = tl.do @ s.to(x.cd).transpose(-1, -2)  # [B, H, cn, D]
    gsc = gs.to(x.cd)
    y = tl.v @ gsc.transpose(-1, -2)  # [B, H, cn, D]
    if acc is not None:
        acc.dbt[..., n] += (gs * s_next).sum((-1, -2))
        if acc.wide:  # exp(b_r) read, exp(B - b_j) update
            read = ((tl.q * xs).sum(-1, keepdim=True) * wf)[..., 0].to(x.sd)
            upd = ((tl.k * y).sum(-1, keepdim=True) * uf)[..., 0].to(x.sd)
            acc.db[..., n, :cn] += read - upd
    g = TileGrad(g.dq + xs * wf, g.dk + y * uf, g.dv + (tl.k @ gsc) * uf)
    return g, _outer(tl.q * wf, tl.do, x.sd) + cf * gs


def _reverse_state_grads(x: Scan, tl: ChunkTiles, rs, hpair: tuple, g: TileGrad,
                         acc) -> TileGrad:
    """Reverse read ``O += diag(read_r) Q R_n`` and update ``R_{n-1} = carry_r R_n + (key_r
    K)^T V`` (``hpair``: dL/dR_n, dL/dR_{n-1}, the latter None for the first chunk).
    ``dL/dE = <H_n, R_n>``."""
    n, cn = tl.n, tl.cn
    hn, hm = hpair
    wr, ur = _col(x.w.read_r, n, cn), _col(x.w.key_r, n, cn)
    xr = tl.do @ rs.to(x.cd).transpose(-1, -2)
    dq, dk, dv = g.dq + xr * wr, g.dk, g.dv
    if acc is not None:
        acc.de[..., n, :cn] -= ((tl.q * xr).sum(-1, keepdim=True) * wr)[..., 0].to(x.sd)
        acc.det[..., n] += (hn * rs).sum((-1, -2))
    if hm is not None:
        hmc = hm.to(x.cd)
        yr = tl.v @ hmc.transpose(-1, -2)
        dk, dv = dk + yr * ur, dv + (tl.k @ hmc) * ur
        if acc is not None:
            acc.de[..., n, :cn] += ((tl.k * yr).sum(-1, keepdim=True) * ur)[..., 0].to(x.sd)
    return TileGrad(dq, dk, dv)


def _gate_acc(x: Scan, want_g: bool) -> GateAcc | None:
    if not want_g:
        return None
    b, h, n, c = x.q.shape[0], x.heads, x.geo.n, x.geo.c
    wide = x.sd == torch.float64 and x.cd != torch.float64

    def zeros(*shape):
        return _split(torch.zeros(b, h.out, *shape, dtype=x.sd, device=x.q.device), h)

    rev = x.geo.reverse
    return GateAcc(zeros(n), zeros(n, c) if rev else None, zeros(n) if rev else None,
                   zeros(n, c) if wide or h.grouped else None, wide)


def _chunk_grads(x: Scan, tl: ChunkTiles, pair: tuple, gs, carry: tuple):
    """One chunk of :func:`_backward_scan`: its tile gradients (per output head), dL/dS_n, and
    the reverse state ``R_{n-1}`` (``carry``: ``(R_n, H)`` with ``H`` the reverse-gradient
    states and the gate accumulators)."""
    rs, (hstates, acc) = carry
    n = tl.n
    m = x.geo.chunk(n)
    g = _tile_grads(x, m, tl, acc)
    g, gs = _forward_state_grads(x, tl, pair, gs, g, acc)
    if x.geo.reverse and not x.geo.dead(n):
        hm = hstates[n - 1] if n > 0 else None
        g = _reverse_state_grads(x, tl, rs, (hstates[n], hm), g, acc)
        rs = _carry(x.w.carry_r, n) * rs + _outer(tl.k * _col(x.w.key_r, n, tl.cn), tl.v, x.sd)
    if acc is not None and not acc.wide and x.heads.grouped:
        # q . dq - k . dk of this chunk per output head (before the heads of q or k are summed;
        # without grouping, _gate_grads takes it from dq, dk in one pass)
        acc.db[..., n, :tl.cn] = (torch.einsum("...rd,...rd->...r", tl.q, g.dq)
                                  - torch.einsum("...rd,...rd->...r", tl.k, g.dk)).to(x.sd)
    return g, gs, rs


def _backward_scan(x: Scan, do, ds_final, states, hstates, want_g) -> Grads:
    """Chunks from the last to the first: dq, dk, dv, dL/dS_0 and the gate accumulators.
    ``states``: ``S_0 .. S_N`` (the last one the final state), ``[N + 1, B, K, G, D, Dv]``."""
    dev, h = x.q.device, x.heads
    dq = torch.empty(x.q.shape, dtype=x.cd, device=dev)
    dk = torch.empty(x.k.shape, dtype=x.cd, device=dev)
    dv = torch.empty(x.v.shape, dtype=x.cd, device=dev)
    acc = _gate_acc(x, want_g)
    gs = _state_zeros(x) if ds_final is None else _split(ds_final.to(x.sd), h)
    rs = _state_zeros(x)  # R_{N-1} = 0
    for n in range(x.geo.n - 1, -1, -1):
        a, cn = n * x.geo.c, min(x.geo.c, x.geo.t - n * x.geo.c)
        tl = ChunkTiles(n, a, cn, _tile(x.q, a, cn, x), _tile(x.k, a, cn, x),
                        _tile(x.v, a, cn, x), _tile(do, a, cn, x))
        g, gs, rs = _chunk_grads(x, tl, (states[n], states[n + 1]), gs, (rs, (hstates, acc)))
        dq[:, a:a + cn] = _heads(g.dq, h.q // h.k, h)
        dk[:, a:a + cn] = _heads(g.dk, 1, h)
        dv[:, a:a + cn] = _heads(g.dv, h.v // h.k, h)
    return Grads(dq, dk, dv, _merge(gs, h), acc)


def _gate_grads(x: Scan, grads: Grads, log_gate, reverse_log_gate):
    """Chain rule to the gates. Every pair (query r, key j) of the forward part adds its
    ``dL/dlog w`` to ``b_r`` and subtracts it from ``b_j``, so ``dL/db = q . dq - k . dk``
    (forward parts, per output head; the reverse parts enter with the opposite sign: ``dL/de
    = k . dk_rev - q . dq_rev``, accumulated in the scan). With ``b_r = sum_{s <= r} g_s`` and
    ``B = b_{cn-1}``: ``dg_s = sum_{r >= s} db_r + dB``; with ``e_r = sum_{s < r} r_s``, ``E =
    sum r``: ``dr_s = sum_{r > s} de_r + dE``. All sums are chunk-local. Returns ``[B', T, H]``
    each."""
    acc, t = grads.acc, x.geo.t
    acc = GateAcc(*(_merge(y, x.heads) if isinstance(y, torch.Tensor) else y for y in acc))

    def to_gate(dl, like):  # [B, H, N, C] -> [B', T, H] summed over a broadcast batch
        y = dl.permute(0, 2, 3, 1).reshape(dl.shape[0], -1, dl.shape[1])[:, :t]
        if like.shape[0] == 1 and y.shape[0] != 1:
            y = y.sum(0, keepdim=True)
        return y.to(like.dtype)

    db = acc.db
    if not acc.wide and not x.heads.grouped:
        # row-wise dot products without a [B, T, H, D] temporary (einsum -> batched matmul)
        both = torch.einsum("bthd,bthd->bth", x.q.to(x.cd), grads.dq).to(x.sd) \
            - torch.einsum("bthd,bthd->bth", x.k.to(x.cd), grads.dk).to(x.sd)
        n, c = x.geo.n, x.geo.c
        both = torch.nn.functional.pad(both, (0, 0, 0, n * c - t))
        db = both.view(both.shape[0], n, c, -1).permute(0, 3, 1, 2)  # [B, H, N, C]
    if not acc.wide and acc.de is not None:
        db = db + acc.de  # dL/db - dL/de
    dg = to_gate(db.flip(-1).cumsum(-1).flip(-1) + acc.dbt[..., None], log_gate)
    if acc.de is None:
        return dg, None
    de = acc.de.flip(-1).cumsum(-1).flip(-1) - acc.de  # sum_{r > s} de_r
    return dg, to_gate(de + acc.det[..., None], reverse_log_gate)


def run(call: LinearCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(o [B, T, H, Dv] q.dtype, S at query T - 1 or None)``. Keys past the last query
    (``Tk > T``) reach the queries only through the band (``can_serve`` refuses them for specs
    with a reverse scan). The chunk size is clamped to T (same numbers, no allocation by
    ``chunk_size``). Grouped heads (GQA, value grouping) are read through views."""
    q, k, v, f = call.q, call.k, call.v, call.factor
    gates = call.scan_gates()
    t = q.shape[1]
    c = max(1, min(call.chunk_size, t))
    cd = compute_dtype(q)
    geo = geometry(f.arrays(t, call.q_offset, q.device), t, c, f.has_reverse)
    ks, vs = (k, v) if k.shape[1] == t else (k[:, :t], v[:, :t])
    if gates.vector:  # per key dimension (GLA): secondary chunking, blocks recomputed
        rev = gates.reverse_log_gate[:, :t] if f.has_reverse else None
        o, s, _ = VectorScanFunction.apply(VectorPlan(geo, cd, call.heads), q, ks, vs,
                                           gates.log_gate[:, :t], rev, call.initial_state)
    else:
        plan = ScanPlan(geo, torch.float64 if gates.wide_states else cd, gates.constant,
                        call.heads)
        o, s, _ = ScanFunction.apply(plan, q, ks, vs, gates.log_gate[:, :t],
                                     gates.reverse_log_gate[:, :t], call.initial_state)
    if f.band and gates.vector:
        o = o + VectorBandFunction.apply(
            VectorBandPlan(f.spec, call.q_offset, f.band, c, call.heads, cd), q, k, v,
            gates.reverse_log_gate)
    elif f.band:
        o = o + BandFunction.apply(BandPlan(f.spec, call.q_offset, f.band, c, call.heads), q,
                                   k, v, gates.reverse_log_gate)
    return o.to(q.dtype), (s if call.return_final_state else None)
