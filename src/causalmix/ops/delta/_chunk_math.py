"""The intra-chunk quantities of the chunked delta scan (the WY / UT representation), shared by
its forward and its backward (which recomputes them instead of saving them).

Inside one chunk (positions r, j = 0..C-1, incoming state ``S``, chunk-local cumulative
log-gates ``b_r = g_0 + .. + g_r`` in fp64, ``b_{C-1} = B_tot``)::

    Gamma_rj = exp(b_r - b_j)                      j <= r in the same region, else 0
    A_rj     = beta_r (k_r . k_j) Gamma_rj         j < r
    (I + A) [U0 | W] = [beta V | beta exp(b) [r reads S] K]        (one unit-triangular solve)
    U   = U0 - W S                                  the values the delta rule actually writes
    O   = exp(b) [r reads S] Q S + (Q K^T * Gamma') U     (Gamma' = Gamma, diagonal dropped
                                                           for a strict reverse read)
    S'  = exp(B_tot) [carries] S + (exp(B_tot - b) [j enters S'] K)^T U

Every exponent is a difference of chunk-local cumulative log-gates, ``<= 0``.

A per-key-dimension gate (``bg [B, Tk, H, 1 + D]``, KDA) makes ``b`` ``[C, D]`` and every
``exp(..)`` a diagonal over the key dimension: ``wq``, ``wk``, ``wu`` become ``[C, D]`` row
scales of Q and K, ``c`` a ``[D, 1]`` row scale of S, and the Gamma-weighted products ``K K^T *
Gamma`` and ``Q K^T * Gamma'`` the gated products of :mod:`causalmix.ops.delta._vgate`
(``gamma`` / ``pg`` then hold only the masks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.ops.delta._tiles import BlockGeometry, Frame
from causalmix.ops.delta._vgate import KeySide, VGate, gram, keyside, vgate

_NEG_INF = float("-inf")


class Block(NamedTuple):
    """One block's tiles, ``[G, B, Hk, Gx, C, *]``: ``q`` (Gx = q's group), ``k`` (Gx = 1),
    ``v`` (v's group), ``beta`` and ``b`` (the fp64 chunk-local cumulative log-gates), both
    ``[G, B, Hk, Gout, C]`` (``b [.., C, D]`` for a per-key-dimension gate)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    b: torch.Tensor


class Intra(NamedTuple):
    """The intra-chunk quantities of one block (module docstring), ``[G, B, Hk, Gout, ...]``:
    ``gamma`` and ``pg`` (Gamma, Gamma') ``[.., C, C]``; ``kg`` (``(K K^T) * Gamma``) and
    ``tinv`` (``(I + A)^{-1}``, ``A = beta_r kg``); ``u0 [.., C, Dv]`` (None when the values
    written are known: the backward), ``w [.., C, D]``; the
    weights ``wq`` (exp(b) [reads]), ``wk`` (beta wq), ``wu`` (exp(B_tot - b) [enters])
    ``[.., C, 1]`` and ``c`` (exp(B_tot) [carries]) ``[.., 1, 1]``; ``vg`` the
    :class:`~causalmix.ops.delta._vgate.VGate` of a per-key-dimension gate (then ``gamma``,
    ``pg`` are the masks, ``wq``, ``wk``, ``wu`` ``[.., C, D]`` and ``c`` ``[.., D, 1]``), else
    None, and ``kside`` the keys' :class:`~causalmix.ops.delta._vgate.KeySide`."""

    gamma: torch.Tensor
    pg: torch.Tensor
    kg: torch.Tensor
    tinv: torch.Tensor
    u0: torch.Tensor | None
    w: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wu: torch.Tensor
    c: torch.Tensor
    vg: VGate | None = None
    kside: KeySide | None = None

    @property
    def vector(self) -> bool:
        """A per-key-dimension gate."""
        return self.vg is not None


def gather_block(frame: Frame, inputs: tuple, n0: int, n1: int) -> Block:
    """``inputs = (q, k, v, bg)`` (``bg [B, Tk, H, 2]``: beta, log-gate; ``[B, Tk, H, 1 + D]``:
    beta, per-key-dimension log-gates) -> :class:`Block`."""
    q, k, v, bg = inputs
    bgt = frame.gather(bg, n0, n1)
    if bg.shape[-1] > 2:
        b = bgt[..., 1:].to(torch.float64).cumsum(-2)
    else:
        b = bgt[..., 1].to(torch.float64).cumsum(-1)
    return Block(frame.gather(q, n0, n1), frame.gather(k, n0, n1), frame.gather(v, n0, n1),
                 bgt[..., 0], b)


def _mask(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    return x if m is None else x * m


def _eye(c: int, dtype, device) -> torch.Tensor:
    return torch.eye(c, dtype=dtype, device=device)


def intra(blk: Block, geo: BlockGeometry, strict: bool, values: bool = True) -> Intra:
    """The :class:`Intra` quantities of a block (module docstring; ``values``: also ``U0``).
    ``(I + A)^{-1}`` is formed explicitly (one unit-triangular solve against the identity), so
    that every later product, forward and backward, is a batched matmul."""
    if blk.b.dim() == blk.k.dim():
        return _intra_vector(blk, geo, strict, values)
    cd, dev = blk.k.dtype, blk.k.device
    c = blk.k.shape[-2]
    b = blk.b
    low = _low(geo, c, dev)
    diff = b[..., :, None] - b[..., None, :]
    gamma = diff.masked_fill_(~low, _NEG_INF).to(cd).exp_()
    pg = gamma
    if strict:
        pg = gamma * (1 - _eye(c, cd, dev))
    kg = (blk.k @ blk.k.transpose(-1, -2)) * gamma
    tinv = torch.linalg.solve_triangular(blk.beta[..., :, None] * kg, _eye(c, cd, dev),
                                         upper=False, unitriangular=True)
    tot = b[..., -1:]
    wq = _mask(b.to(cd).exp(), geo.read)[..., None]
    wk = blk.beta[..., None] * wq
    wu = _mask((tot - b).to(cd).exp(), geo.keyf)[..., None]
    cc = _mask(tot[..., 0].to(cd).exp(), geo.carry)[..., None, None]
    return _solve(blk, (gamma, pg, kg, tinv), (wq, wk, wu, cc), values)


def _low(geo: BlockGeometry, c: int, dev) -> torch.Tensor:
    """Key j <= query r in the same region, ``[.., C, C]`` (bool)."""
    if geo.low is None:
        return torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    return geo.low


def _solve(blk: Block, mats: tuple, weights: tuple, values: bool, vec: tuple = (None, None)):
    """The :class:`Intra` from ``mats = (gamma, pg, kg, tinv)``, ``weights = (wq, wk, wu,
    c)`` and ``vec = (vg, kside)``: ``W`` (and ``U0`` when ``values``) by the one product with
    ``tinv``."""
    tinv, wk = mats[3], weights[1]
    if not values:
        return Intra(*mats, None, tinv @ (wk * blk.k), *weights, *vec)
    dv = blk.v.shape[-1]
    sol = tinv @ torch.cat([blk.beta[..., None] * blk.v, wk * blk.k], -1)  # [.., C, Dv + D]
    return Intra(*mats, sol[..., :dv], sol[..., dv:], *weights, *vec)


def _intra_vector(blk: Block, geo: BlockGeometry, strict: bool, values: bool) -> Intra:
    """:func:`intra` for a per-key-dimension gate (``blk.b [.., C, D]``)."""
    cd, dev = blk.k.dtype, blk.k.device
    c = blk.k.shape[-2]
    b = blk.b
    vg = vgate(b, cd)
    ks = keyside(blk.k, vg)
    gamma = _low(geo, c, dev).to(cd)
    pg = gamma * (1 - _eye(c, cd, dev)) if strict else gamma
    kg = gram(blk.k, ks, vg) * gamma
    tinv = torch.linalg.solve_triangular(blk.beta[..., :, None] * kg, _eye(c, cd, dev),
                                         upper=False, unitriangular=True)
    tot = b[..., -1:, :]  # [.., 1, D]
    wq = _mask(b.to(cd).exp(), None if geo.read is None else geo.read[..., None])
    wk = blk.beta[..., None] * wq
    wu = _mask((tot - b).to(cd).exp(), None if geo.keyf is None else geo.keyf[..., None])
    cc = _mask(tot[..., 0, :].to(cd).exp(), None if geo.carry is None else geo.carry[..., None])
    return _solve(blk, (gamma, pg, kg, tinv), (wq, wk, wu, cc[..., None]), values, (vg, ks))


def pmat(blk: Block, it: Intra) -> torch.Tensor:
    """``P = (Q K^T) * Gamma'`` (the gated product for a per-key-dimension gate), ``[.., C,
    C]``."""
    if it.vector:
        return gram(blk.q, it.kside, it.vg) * it.pg
    return (blk.q @ blk.k.transpose(-1, -2)) * it.pg


def chunk_states(it: Intra, kd: torch.Tensor, s: torch.Tensor, u: torch.Tensor):
    """The only sequential step, over a block's chunks from the state ``s`` entering it:
    ``U_n = U0_n - W_n S_n``, ``S_{n+1} = c_n S_n + Kd_n^T U_n`` (``kd = wu K``). Writes the
    values ``U`` into ``u [G, .., C, Dv]``; returns the states entering each chunk ``[G, .., D,
    Dv]`` and the state leaving the block."""
    states = torch.empty(u.shape[0], *s.shape, dtype=s.dtype, device=s.device)
    for i in range(u.shape[0]):
        states[i] = s
        ui = torch.sub(it.u0[i], it.w[i] @ s, out=u[i])
        s = it.c[i] * s + kd[i].transpose(-1, -2) @ ui
    return states, s


def replay_states(it: Intra, kd: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The states entering each chunk of a block from the state ``s`` entering it and the
    values ``u`` the forward wrote: ``S_{n+1} = c_n S_n + Kd_n^T U_n``."""
    states = torch.empty(u.shape[0], *s.shape, dtype=s.dtype, device=s.device)
    for i in range(u.shape[0]):
        states[i] = s
        s = it.c[i] * s + kd[i].transpose(-1, -2) @ u[i]
    return states
