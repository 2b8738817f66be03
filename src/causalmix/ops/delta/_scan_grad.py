"""The hand-written backward of the chunked delta scan (notation of
:mod:`causalmix.ops.delta._chunk_math`; ``Kd = wu K``, ``P = (Q K^T) * Gamma'``).

Blocks are visited from the last; each recomputes its intra-chunk quantities and replays its
chunk states from the state the forward saved at its start and the values ``U`` it wrote.
Then:

1. ``_state_grads`` (sequential, backwards over the chunks; ``dS'`` the gradient of the state
   leaving the chunk)::

       dU = P^T dO + Kd dS';      dS = (wq Q)^T dO + c dS' - W^T dU

2. ``_input_grads`` (batched), with ``X = (I + A)^{-T} dU`` (a matmul with the recomputed
   inverse)::

       dV = beta X,   dA = -(X U^T) on j < r,   M = dA * beta_r * Gamma,   dP = dO U^T
       dQ = wq dO S^T + (dP * Gamma') K
       dK = (dP * Gamma')^T Q + wu U dS'^T - wk X S^T + (M + M^T) K
       dbeta_r = X_r . v_r - wq_r k_r . (X S^T)_r + sum_j dA_rj (k_r . k_j) Gamma_rj

3. the gates: every pair term ``p_rj`` of ``exp(b_r - b_j)`` (from P and from A) adds to
   ``db_r`` and subtracts from ``db_j``; the reads ``wq``, ``wk`` add ``d log w`` to ``db_r``,
   the writes ``wu`` move theirs from ``db_j`` to the chunk total, and so does the carry
   ``c``; then ``dg_s = sum_{r >= s} db_r + d B_tot`` (chunk-local, fp64).

A per-key-dimension gate (``_input_grads_vector``) follows the same steps per dimension: the
pair terms of ``P = gram(Q, K)`` and ``A = beta_r gram(K, K)`` (:mod:`causalmix.ops.delta._vgate`)
give ``dX = lmul(M, Y)``, ``dY = rmul(M, X)`` and ``db += X * dX - Y * dY`` for a cotangent M,
the row scales ``wq``, ``wk``, ``wu``, ``c`` add their ``d log w`` to ``db`` ``[C, D]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.delta._chunk_math import Block, Intra, gather_block, intra, pmat, replay_states
from causalmix.ops.delta._tiles import Frame, Geometry
from causalmix.ops.delta._vgate import lmul, rmul

if TYPE_CHECKING:
    from causalmix.ops.delta._scan import ScanOptions

__all__ = ["scan_backward"]


class BlockGrads(NamedTuple):
    """One block's gradients as tiles: ``dq``, ``dk``, ``dv`` in their inputs' groups, and
    ``dbg [.., C, 2]`` (beta, log-gate)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dbg: torch.Tensor


class Recomputed(NamedTuple):
    """What a block's backward reuses: tiles, intra quantities, the states entering its
    chunks ``s``, the values written ``u``, ``P`` and the output gradient tile ``dot``."""

    blk: Block
    it: Intra
    s: torch.Tensor
    u: torch.Tensor
    p: torch.Tensor
    dot: torch.Tensor


def _state_grads(r: Recomputed, ds: torch.Tensor):
    """Step 1: ``(dU [G, .., C, Dv], dS' of every chunk [G, .., D, Dv], dS entering the
    block)`` from ``ds``, the gradient of the state leaving the block."""
    it, blk = r.it, r.blk
    pdo = r.p.transpose(-1, -2) @ r.dot
    qdo = (it.wq * blk.q).transpose(-1, -2) @ r.dot
    kd = it.wu * blk.k
    du, dsn = torch.empty_like(pdo), torch.empty_like(r.s)
    for i in range(pdo.shape[0] - 1, -1, -1):
        dsn[i] = ds
        dui = pdo[i] + kd[i] @ ds
        du[i] = dui
        ds = qdo[i] + it.c[i] * ds - it.w[i].transpose(-1, -2) @ dui
    return du, dsn, ds


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a per-output-head gradient ``[.., Gout, C, F]`` over the heads sharing an input with
    ``groups`` heads per key head."""
    return x if x.shape[3] == groups else x.sum(3, keepdim=True)


def _input_grads(r: Recomputed, du: torch.Tensor, dsn: torch.Tensor) -> BlockGrads:
    """Steps 2 and 3 for one block."""
    if r.it.vector:
        return _input_grads_vector(r, du, dsn)
    it, blk, s, u = r.it, r.blk, r.s, r.u
    c = u.shape[-2]
    x = it.tinv.transpose(-1, -2) @ du
    both = torch.cat([r.dot, x], -2)  # [.., 2C, Dv]: dO and X share their right factors
    dpa = both @ u.transpose(-1, -2)
    dp, da = dpa[..., :c, :], dpa[..., c:, :].neg_()
    da.diagonal(dim1=-2, dim2=-1).zero_()  # A has no diagonal (it is the identity's)
    dpm = dp * it.pg
    bs = both @ s.transpose(-1, -2)
    dos, xs = bs[..., :c, :], bs[..., c:, :]  # [.., C, D]
    uds = u @ dsn.transpose(-1, -2)
    dakg = da * it.kg
    m = blk.beta[..., :, None] * (da * it.gamma)  # dL/d(k_r . k_j)
    dq = it.wq * dos + dpm @ blk.k
    dk = dpm.transpose(-1, -2) @ blk.q + (m + m.transpose(-1, -2)) @ blk.k \
        + it.wu * uds - it.wk * xs
    dv = blk.beta[..., None] * x
    kxs = (blk.k * xs).sum(-1)
    dbeta = (x * blk.v).sum(-1) - it.wq[..., 0] * kxs + dakg.sum(-1)
    wuk = it.wu[..., 0] * (blk.k * uds).sum(-1)
    pair = dp * r.p + blk.beta[..., :, None] * dakg  # d/d(b_r - b_j) of P's and A's pairs
    db = it.wq[..., 0] * (blk.q * dos).sum(-1) - it.wk[..., 0] * kxs - wuk \
        + pair.sum(-1) - pair.sum(-2)
    dtot = wuk.sum(-1) + it.c[..., 0, 0] * (dsn * s).sum((-1, -2))
    db = db.to(torch.float64)
    dg = db.flip(-1).cumsum(-1).flip(-1) + dtot[..., None].to(torch.float64)
    dbg = torch.stack([dbeta, dg.to(dbeta.dtype)], -1)
    return BlockGrads(_fold(dq, blk.q.shape[3]), dk.sum(3, keepdim=True),
                      _fold(dv, blk.v.shape[3]), dbg)


def _common_grads(r: Recomputed, du: torch.Tensor, dsn: torch.Tensor):
    """What steps 2 and 3 share for a per-key-dimension gate: ``X``, ``dP * Gamma'``,
    ``dA``, ``(dO S^T, X S^T)`` and ``U dS'^T``."""
    it, s, u = r.it, r.s, r.u
    c = u.shape[-2]
    x = it.tinv.transpose(-1, -2) @ du
    both = torch.cat([r.dot, x], -2)  # [.., 2C, Dv]: dO and X share their right factors
    dpa = both @ u.transpose(-1, -2)
    dp, da = dpa[..., :c, :], dpa[..., c:, :].neg_()
    da.diagonal(dim1=-2, dim2=-1).zero_()  # A has no diagonal (it is the identity's)
    bs = both @ s.transpose(-1, -2)
    return x, dp * it.pg, da, (bs[..., :c, :], bs[..., c:, :]), u @ dsn.transpose(-1, -2)


def _input_grads_vector(r: Recomputed, du: torch.Tensor, dsn: torch.Tensor) -> BlockGrads:
    """Steps 2 and 3 for a per-key-dimension gate: the pair terms through the gated products
    (``P = gram(Q, K)``, ``A = beta_r gram(K, K)``): for a cotangent ``M`` of ``gram(X, Y)``,
    ``dX = lmul(M, Y)``, ``dY = rmul(M, X)``, ``db += X * dX - Y * dY``; the row scales add
    their ``d log w`` per dimension."""
    it, blk, s = r.it, r.blk, r.s
    x, dpm, da, (dos, xs), uds = _common_grads(r, du, dsn)
    m = blk.beta[..., :, None] * (da * it.gamma)  # d L / d gram(K, K)
    gq, gkp = lmul(dpm, it.kside, it.vg), rmul(dpm, blk.q, it.vg)
    gka, gkb = lmul(m, it.kside, it.vg), rmul(m, blk.k, it.vg)
    dq = it.wq * dos + gq
    dk = gkp + gka + gkb + it.wu * uds - it.wk * xs
    dv = blk.beta[..., None] * x
    kxs = blk.k * xs
    dbeta = (x * blk.v).sum(-1) - (it.wq * kxs).sum(-1) + (da * it.kg).sum(-1)
    wuk = it.wu * blk.k * uds
    db = it.wq * blk.q * dos - it.wk * kxs - wuk + blk.q * gq - blk.k * gkp \
        + blk.k * (gka - gkb)
    dtot = wuk.sum(-2) + it.c[..., 0] * (dsn * s).sum(-1)  # [.., D]
    db = db.to(torch.float64)
    dg = db.flip(-2).cumsum(-2).flip(-2) + dtot[..., None, :].to(torch.float64)
    dbg = torch.cat([dbeta[..., None], dg.to(dbeta.dtype)], -1)
    return BlockGrads(_fold(dq, blk.q.shape[3]), dk.sum(3, keepdim=True),
                      _fold(dv, blk.v.shape[3]), dbg)


def _recompute(frame: Frame, geo: Geometry, inputs: tuple, saved: tuple, do,
               span: tuple[int, int, bool]) -> Recomputed:
    """A block's tiles and intra-chunk quantities, and its chunk states replayed from ``saved
    = (state entering the block, values written)``."""
    n0, n1, strict = span
    blk = gather_block(frame, inputs, n0, n1)
    it = intra(blk, geo.block(n0, n1), strict, values=False)
    u = saved[1]
    s = replay_states(it, it.wu * blk.k, saved[0], u)
    p = pmat(blk, it)
    return Recomputed(blk, it, s, u, p, frame.gather(do, n0, n1))


def scan_backward(inputs: tuple, saved: tuple, do: torch.Tensor | None,
                  ds: torch.Tensor | None, opts: ScanOptions):
    """Gradients ``(dq, dk, dv, dbg, ds0)`` (compute dtype) of one scan: ``inputs = (q, k, v,
    bg)``, ``saved = (states entering each block, values written)`` by the forward, ``do [B,
    Tq, H, Dv]`` and ``ds [B, H, D, Dv]`` the gradients of the output and the final state (None:
    zero)."""
    q, k, v, bg = inputs
    cd = compute_dtype(q)
    b, tq, _, d = q.shape
    tk, h, dv = k.shape[1], bg.shape[2], v.shape[-1]
    frame = opts.frame(tk, cd)
    geo = Geometry(opts.start, frame)
    if do is None:
        do = q.new_zeros(b, tq, h, dv, dtype=cd)
    grads = [torch.empty(x.shape, dtype=cd, device=x.device) for x in inputs]  # all written
    shape = (b, opts.hk, h // opts.hk, d, dv)
    dsn = q.new_zeros(shape, dtype=cd) if ds is None else ds.to(cd).reshape(shape)
    blocks = frame.blocks()
    for i in range(len(blocks) - 1, -1, -1):
        n0, n1 = blocks[i]
        r = _recompute(frame, geo, inputs, (saved[0][i], saved[1][n0:n1]), do,
                       (n0, n1, opts.strict))
        du, dss, dsn = _state_grads(r, dsn)
        for buf, tile in zip(grads, _input_grads(r, du, dss), strict=True):
            frame.scatter(buf, tile, n0, n1)
    return (*grads, dsn.reshape(b, h, d, dv))
