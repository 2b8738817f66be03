"""The chunked delta scan over one frame: forward stages and the autograd Function.

Stages (per block of chunks, :mod:`causalmix.ops.delta._chunk_math` for the notation):
``gather_block`` -> ``intra`` (Gamma, A, one triangular solve for U0 and W, batched over the
block's chunks) -> ``_chunk_states`` (the only sequential step: ``U_n = U0_n - W_n S_n``,
``S_{n+1} = c_n S_n + Kd_n^T U_n``) -> the outputs ``O = wq Q S_n + (Q K^T * Gamma') U``,
batched again. The forward saves the inputs, the values written ``U`` (``[T, H, Dv]``) and the
state entering every block (``T / (C G)`` states of ``[B, H, D, Dv]``); the backward
(:mod:`causalmix.ops.delta._scan_grad`) recomputes the rest block by block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from causalmix.checks import compute_dtype
from causalmix.ops.delta._chunk_math import chunk_states, gather_block, intra, pmat
from causalmix.ops.delta._scan_grad import scan_backward
from causalmix.ops.delta._tiles import Frame, Geometry

__all__ = ["DeltaScan", "ScanOptions"]


class ScanOptions(NamedTuple):
    """The non-tensor options of one scan: region starts ``start [B', Tk]`` in frame positions
    (``-1``: reads the initial state), ``flip`` (a reverse pass), ``strict`` (a query reads the
    state before its own key's update), ``chunk`` (C) and ``block`` (chunks a block), ``hk``
    (key heads: the grouping base)."""

    start: torch.Tensor
    flip: bool
    strict: bool
    chunk: int
    block: int
    hk: int

    def frame(self, t: int, cd: torch.dtype) -> Frame:
        return Frame(t, self.chunk, self.block, self.flip, self.hk, cd)


def scan_forward(q, k, v, bg, s0, opts: ScanOptions):
    """``q [B, Tq, Hq, D]``, ``k [B, Tk, Hk, D]``, ``v [B, Tk, Hv, Dv]``, ``bg [B, Tk, H, 2]``
    (beta, log-gate; ``[B, Tk, H, 1 + D]``: per-key-dimension log-gates; compute dtype),
    ``s0 [B, H, D, Dv]`` or None -> ``(o [B, Tq, H, Dv], final state [B, H, D, Dv], the
    states entering each block [blocks + 1, B, Hk, H / Hk, D, Dv], the values written [N, B,
    Hk, H / Hk, C, Dv])`` in the compute dtype (the backward replays the states inside a block
    from the last two)."""
    cd = compute_dtype(q)
    b, tq, _, d = q.shape
    tk, h, dv, hk = k.shape[1], bg.shape[2], v.shape[-1], opts.hk
    frame = opts.frame(tk, cd)
    geo = Geometry(opts.start, frame)
    blocks = frame.blocks()
    saved = torch.empty(len(blocks) + 1, b, hk, h // hk, d, dv, dtype=cd, device=q.device)
    s = q.new_zeros(b, hk, h // hk, d, dv, dtype=cd) if s0 is None else \
        s0.to(cd).reshape(b, hk, h // hk, d, dv)
    o = torch.empty(b, tq, h, dv, dtype=cd, device=q.device)
    values = torch.empty(frame.n, b, hk, h // hk, frame.c, dv, dtype=cd, device=q.device)
    for i, (n0, n1) in enumerate(blocks):
        saved[i] = s
        blk = gather_block(frame, (q, k, v, bg), n0, n1)
        it = intra(blk, geo.block(n0, n1), opts.strict)
        u = values[n0:n1]
        states, s = chunk_states(it, it.wu * blk.k, s, u)
        ob = (it.wq * blk.q) @ states + pmat(blk, it) @ u
        frame.scatter(o, ob, n0, n1)
    saved[-1] = s
    return o, s.reshape(b, h, d, dv), saved, values


class DeltaScan(torch.autograd.Function):
    """One chunked delta scan over a frame: ``(q, k, v, bg, s0, opts) -> (o, final state,
    states, values)`` (:func:`scan_forward`; the last two are saved for the backward and not
    differentiable). Hand-written backward: :func:`scan_backward`."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bg: torch.Tensor,
                s0: torch.Tensor | None, opts: ScanOptions):
        return scan_forward(q, k, v, bg, s0, opts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, bg, s0, opts = inputs
        ctx.save_for_backward(q, k, v, bg, s0, output[2], output[3])
        ctx.opts = opts
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor | None, ds: torch.Tensor | None, *_saved: Any):
        q, k, v, bg, s0, states, values = ctx.saved_tensors
        dq, dk, dv, dbg, ds0 = scan_backward((q, k, v, bg), (states, values), do, ds,
                                             ctx.opts)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbg.to(bg.dtype),
                None if s0 is None else ds0.to(s0.dtype), None)
