"""Hand-written backward of one block of the per key dimension (GLA) chunked scan, for the
common case: a forward scan only (no reverse part) and every chunk of the block within
:data:`~causalmix.ops.linear._chunk_vector.LIMIT` (the tile is one product). Private to
``_chunk_vector``; other blocks are recomputed under autograd there.

With ``qf = q * exp(b)``, ``kf = k * exp(B - b)``, ``qi = qf * exp(-B)`` (chunk-local sums
``b``, total ``B``; flags and masks of the geometry as in the forward)::

    O = mask(qi kf^T) V + read * (qf S_n),    S_{n+1} = diag(exp(B)) S_n + (key * kf)^T V

    dS_n = qf^T (read * dO) + diag(exp(B)) dS_{n+1}
    dV   = mask(qi kf^T)^T dO + (key * kf) dS_{n+1}
    dqi  = mask(dO V^T) kf,   dkf = mask(dO V^T)^T qi + key * (V dS_{n+1}^T)
    dqf  = dqi exp(-B) + (read * dO) S_n^T,   dq = dqf exp(b),   dk = dkf exp(B - b)
    dL/db = dqf * qf - dkf * kf (per dimension),
    dL/dB = sum_j dkf * kf - sum_r dqi * qi + exp(B) * <dS_{n+1}, S_n> (over Dv)
    dg_s  = sum_{r >= s} dL/db_r + dL/dB   (computed regrouped, see fast_block_grads)
"""

from __future__ import annotations

import torch

from causalmix.ops.linear._chunk_vector import (
    Block,
    VectorPlan,
    _chunks,
    _flag,
    _gates,
    _masked,
    _masks,
    _scan,
    _tiles,
)


def _unchunk(x: torch.Tensor, blk: Block, members: int) -> torch.Tensor:
    """``[B, K, G, nb, C, D]`` per output head -> ``[B, a1 - a0, Hx, D]``, summed over the
    output heads sharing an input head (``members`` of them per key head: G or 1)."""
    if x.shape[2] != members:
        x = x.sum(2, keepdim=True)
    x = x.flatten(1, 2).permute(0, 2, 3, 1, 4).flatten(1, 2)
    return x[:, :blk.a1 - blk.a0]


def _state_grads(carry, p, ds):
    """``dS_{n+1}`` of every chunk (stacked ``[B, K, G, nb, D, Dv]``) and dS entering the
    block, from ``dS_n = p_n + diag(carry_n) dS_{n+1}``."""
    nb = p.shape[3]
    outs: list = [None] * nb
    for n in range(nb - 1, -1, -1):
        outs[n] = ds
        ds = p[..., n, :, :] + carry[..., n, :, None] * ds
    return torch.stack(outs, dim=3), ds


def fast_block_grads(plan: VectorPlan, blk: Block, saved: tuple, flowing: tuple,
                     grads: list) -> torch.Tensor | None:
    """As ``_chunk_vector._block_grads`` (same arguments) for a block the module docstring's
    formulas serve; returns dL/dS entering the block, or None (then nothing is touched) when
    the block has a reverse part or a chunk decaying past LIMIT."""
    q, k, v, g, r, s, _rs = saved
    if r is not None:
        return None
    geo, cd, heads, fl = plan.geo, plan.cd, plan.heads, plan.geo.flags
    fwd, _ = _gates(plan, blk, _tiles(g, blk), None)
    if fwd.inv is None:
        return None
    do, ds, _h = flowing
    q, k, v, do = (_chunks(_tiles(t, blk), blk, geo, heads, cd) for t in (q, k, v, do))
    qf, kf = q * fwd.read, k * fwd.key
    qi = qf * fwd.inv
    fmask, kflag = _masks(geo, blk, "fmask"), _flag(fl.key_f, blk, True)
    kfm = _masked(kf, kflag)
    s_in, _ = _scan(fwd.carry, kfm.transpose(-1, -2) @ v, s, False)
    do_r = _masked(do, _flag(fl.read_f, blk, True))
    ds_out, ds_in = _state_grads(fwd.carry, qf.transpose(-1, -2) @ do_r, ds)
    att = _masked(qi @ kf.transpose(-1, -2), fmask)
    datt = _masked(do @ v.transpose(-1, -2), fmask)
    dv = att.transpose(-1, -2) @ do + kfm @ ds_out
    dqi = datt @ kf
    dkf = datt.transpose(-1, -2) @ qi + _masked(v @ ds_out.transpose(-1, -2), kflag)
    dqs = do_r @ s_in.transpose(-1, -2)
    grads_here = [(dqi * fwd.inv + dqs) * fwd.read, dkf * fwd.key, dv]
    if grads[3] is not None:
        # dg_s = sum_{r >= s} dqs_r qf_r + sum_{j < s} (dkf_j kf_j - dqi_j qi_j)
        #        + exp(B) <dS_{n+1}, S_n>: the docstring's sums regrouped so that no term
        #        cancels another (the gates of a chunk weigh the pairs that straddle them)
        pair = dkf * kf - dqi * qi
        dg = (dqs * qf).flip(-2).cumsum(-2).flip(-2) + (pair.cumsum(-2) - pair) \
            + (fwd.carry * (ds_out * s_in).sum(-1))[..., None, :]
        grads_here.append(dg)
    members = (heads.q // heads.k, 1, heads.v // heads.k, heads.out // heads.k)
    for gr, x, m in zip(grads, grads_here, members, strict=False):
        if gr is not None:
            x = _unchunk(x, blk, m)
            if gr.shape[0] == 1 and x.shape[0] != 1:
                x = x.sum(0, keepdim=True)
            gr[:, blk.a0:blk.a1] += x
    return ds_in
