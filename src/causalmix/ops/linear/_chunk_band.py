"""The future band of ``Chunked(s, L > 0)`` for the chunked scan (private to ``impl/chunk.py``).

For query i, keys ``j`` in ``(i, i + width]`` that the spec shows it, weight ``exp(E_j - E_i)``
with ``E`` the cumulative ``reverse_log_gate``, local to each tile (fp64: exact differences).
Exact dense tiles of ``[C, C + width]``, recomputed in backward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from causalmix.checks import compute_dtype
from causalmix.ops.heads import Heads
from causalmix.ops.linear._chunk_geometry import MINUS_INF, tile
from causalmix.visibility import Visibility


class BandPlan(NamedTuple):
    """The band of one call: the spec, the offset of the call, the band's width (largest
    ``j - i``), the tile length and the head layout."""

    spec: Visibility
    offset: int
    width: int
    chunk: int
    heads: Heads


def _tiles(plan: BandPlan, xs: tuple, a: int, b: int, cd) -> list:
    """Positions ``[a, b)`` of each ``[B, T, Hx, D]`` input as ``[B, K, Hx / K, b - a, D]``
    (views grouped by key head: an input head read by several output heads is not repeated)."""
    return [tile(x, a, b - a, cd).unflatten(1, (plan.heads.k, -1)) for x in xs]


def _heads(x: torch.Tensor, members: int) -> torch.Tensor:
    """``[B, K, G, n, D]`` per output head -> ``[B, n, Hx, D]`` summed over the output heads
    sharing an input head (``members`` per key head)."""
    if x.shape[2] != members:
        x = x.sum(2, keepdim=True)
    return x.flatten(1, 2).transpose(1, 2)


def _band_tiles(plan: BandPlan, t: int, tk: int, reverse_log_gate: torch.Tensor, cd):
    """Tiles of the band: queries ``[a, a + cn)`` of ``t``, keys ``[a, kend)`` of ``tk >= t``,
    and their weights ``[B'', K, G, cn, kn]``."""
    dev = reverse_log_gate.device
    nb = plan.spec.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1, 1)
    for a in range(0, t, plan.chunk):
        cn = min(plan.chunk, t - a)
        kend = min(tk, a + cn + plan.width)
        i = torch.arange(a, a + cn, device=dev)
        j = torch.arange(a, kend, device=dev)
        vis = plan.spec.visible(bidx, (i + plan.offset).view(1, -1, 1),
                                (j + plan.offset).view(1, 1, -1))
        vis = (vis & (j[None, :] > i[:, None])[None])[:, None]
        r = reverse_log_gate[:, a:kend].to(torch.float64).transpose(1, 2)  # [B', H, kn]
        e = torch.nn.functional.pad(r[..., :-1], (1, 0)).cumsum(-1)  # fp64: exact differences
        logits = torch.where(vis, (e[..., None, :] - e[..., :cn, None]).to(cd),
                             MINUS_INF)
        yield a, cn, kend, torch.exp(logits).unflatten(1, (plan.heads.k, -1))


class BandFunction(torch.autograd.Function):
    """``apply(plan, q, k, v, reverse_log_gate)``: ``q: [B, T, H, D]``, ``k: [B, Tk, H, D]``,
    ``v: [B, Tk, H, Dv]``, ``reverse_log_gate: [B', Tk, H]`` -> the band's part of the output
    ``[B, T, H, Dv]`` (compute dtype)."""

    @staticmethod
    def forward(plan: BandPlan, *tensors: torch.Tensor) -> torch.Tensor:
        q, k, v, reverse_log_gate = tensors
        b, t = q.shape[:2]
        cd = compute_dtype(q)
        o = torch.empty(b, t, plan.heads.out, v.shape[-1], dtype=cd, device=q.device)
        for a, cn, kend, m in _band_tiles(plan, t, k.shape[1], reverse_log_gate, cd):
            (qt,) = _tiles(plan, (q,), a, a + cn, cd)
            kt, vt = _tiles(plan, (k, v), a, kend, cd)
            o[:, a:a + cn] = (((qt @ kt.transpose(-1, -2)) * m) @ vt).flatten(1, 2).transpose(1, 2)
        return o

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.plan = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, reverse_log_gate = ctx.saved_tensors
        plan, (b, t), tk = ctx.plan, q.shape[:2], k.shape[1]
        cd, hd = compute_dtype(q), plan.heads
        do = do.to(cd)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=q.device)
        dvv = torch.zeros(v.shape, dtype=cd, device=q.device)
        want_g = ctx.needs_input_grad[4]
        dg = torch.zeros(b, tk, hd.out, dtype=cd, device=q.device) if want_g else None
        for a, cn, kend, m in _band_tiles(plan, t, tk, reverse_log_gate, cd):
            qt, dot = _tiles(plan, (q, do), a, a + cn, cd)
            kt, vt = _tiles(plan, (k, v), a, kend, cd)
            att = (qt @ kt.transpose(-1, -2)) * m
            datt = dot @ vt.transpose(-1, -2)
            dp = datt * m
            dq[:, a:a + cn] += _heads(dp @ kt, hd.q // hd.k)
            dk[:, a:kend] += _heads(dp.transpose(-1, -2) @ qt, 1)
            dvv[:, a:kend] += _heads(att.transpose(-1, -2) @ dot, hd.v // hd.k)
            if want_g:
                p = (datt * att).flatten(1, 2)  # d/d(E_j - E_i), [B, H, cn, kn]
                de = p.sum(-2)  # [B, H, kn]
                de[..., :cn] -= p.sum(-1)
                de = de.flip(-1).cumsum(-1).flip(-1) - de  # dE_s: sum over p > s
                dg[:, a:kend] += de.transpose(1, 2)
        if want_g:
            dg = dg.sum(0, keepdim=True) if reverse_log_gate.shape[0] == 1 else dg
            dg = dg.to(reverse_log_gate.dtype)
        return None, dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dg
