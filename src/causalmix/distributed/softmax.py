"""Sequence-parallel softmax attention: K/V travel around a ring, partial results merge by
log-sum-exp.

Forward, on each rank, for ``s = 0 .. W-1``: the rank holds the K/V shard of rank ``r - s``; it
posts the exchange of that shard with its neighbours (send to ``r + 1``, receive from ``r - 1``),
then computes, for every (local query span, visiting key span) pair whose tile of the spec is not
empty, ``softmax_attention(..., impl="blocks", return_lse=True)`` on the pair's absolute positions,
and merges it into an fp32 accumulator::

    L = logaddexp(L, l_p);   O = O * exp(L_old - L) + o_p * exp(l_p - L)

A query that sees no key keeps ``O = 0`` and ``L = -inf``.

Backward walks the same ring. For a pair with merged output ``O`` and lse ``L``, the partial
``(o_p, l_p)`` gets ``do_p = w dO`` and ``dl_p = w (dO . o_p - dO . O + dL)`` with
``w = exp(l_p - L)`` (the exact chain rule of the merge), and the op's own backward (recomputing
the partial) gives dq, dk, dv. dK/dV accumulators travel around the ring with their blocks: each
rank adds its contribution to the accumulator it received and sends it on; after ``W`` hops every
block's gradient is back home. The send of one step's accumulator overlaps the next step's compute.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from causalmix.caching import LRUCache
from causalmix.checks import check_bool, check_qkv, check_scale, compute_dtype
from causalmix.distributed._agree import checked_on_every_rank, signature
from causalmix.distributed._ring import Exchange, Ring
from causalmix.distributed._spec import pair_count, pair_spec
from causalmix.distributed.layout import LAYOUTS, Span, spans
from causalmix.ops.softmax import AttentionOutput, merge_softmax
from causalmix.ops.softmax import softmax_attention as _local_attention
from causalmix.visibility import Visibility, check_spec, check_visibility

_PLANS: LRUCache[list] = LRUCache(16)

# p2p tags: forward/backward K and V, and the travelling dK / dV accumulators
_TAG_KV, _TAG_DKV = 0, 2


def _schedule(spec: Visibility, layout: str, seq_len: int, rank: int, world: int):
    """For each ring step ``s``: the (query span, key span) pairs with a visible pair between this
    rank's queries and rank ``(rank - s) % world``'s keys."""

    def make():
        q_spans = spans(layout, seq_len, rank, world)
        plan = []
        for s in range(world):
            k_spans = spans(layout, seq_len, (rank - s) % world, world)
            plan.append([(a, b) for a in q_spans for b in k_spans if pair_count(spec, a, b) > 0])
        return plan

    return _PLANS.get_or_make((spec, layout, seq_len, rank, world), make)


def _sl(r: Span) -> slice:
    return slice(r.local, r.local + r.length)


class RingCall(NamedTuple):
    """What the ring needs besides the tensors: the spec, the schedule of span pairs per ring
    step, the ring and the score scale."""

    spec: Visibility
    plan: list
    ring: Ring
    scale: float


def _partial(q, k, v, pair: tuple[Span, Span], *, spec: Visibility, scale: float):
    """Softmax of the queries of ``pair[0]`` against the keys of ``pair[1]``, with the lse."""
    qr, kr = pair
    ps, qo, ko = pair_spec(spec, qr, kr)
    return _local_attention(
        q[:, _sl(qr)], k[:, _sl(kr)], v[:, _sl(kr)], ps, q_offset=qo, k_offset=ko, scale=scale,
        impl="blocks", return_lse=True,
    )


def _merge(out: torch.Tensor, lse: torch.Tensor, o_p: torch.Tensor, l_p: torch.Tensor) -> None:
    """In place, fp32: ``(out, lse) <- merge((out, lse), (o_p, l_p))`` by log-sum-exp
    (:func:`causalmix.ops.softmax.merge_softmax`)."""
    merged = merge_softmax(out, lse, o_p, l_p)
    out.copy_(merged.output)
    lse.copy_(merged.lse)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: RingCall):
        spec, plan, ring, scale = call
        b, n, hq, _ = q.shape
        dv = v.shape[3]
        cd = compute_dtype(q)  # fp32, fp64 for fp64 inputs
        out = torch.zeros(b, n, hq, dv, device=q.device, dtype=cd)
        lse = torch.full((b, n, hq), float("-inf"), device=q.device, dtype=cd)
        qf = q.to(cd)
        kv = (k, v)
        for s in range(ring.world):
            ex = Exchange(ring, kv, _TAG_KV) if s < ring.world - 1 else None
            kf, vf = kv[0].to(cd), kv[1].to(cd)
            for qr, kr in plan[s]:
                o_p, l_p = _partial(qf, kf, vf, (qr, kr), spec=spec, scale=scale)
                _merge(out[:, _sl(qr)], lse[:, _sl(qr)], o_p, l_p)
            if ex is not None:
                kv = tuple(ex.wait())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        spec, plan, ring, scale = ctx.call
        cd = out.dtype
        d_o = torch.zeros_like(out) if d_out is None else d_out.to(cd)
        d_l = torch.zeros_like(lse) if d_lse is None else d_lse.to(cd)
        o_dot = (d_o * out).sum(-1)  # [B, n, H]: dO . O
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        qf = q.to(cd)
        dq = torch.zeros_like(qf)
        kv = (k, v)
        acc_ex = None
        for s in range(ring.world):
            kv_ex = Exchange(ring, kv, _TAG_KV) if s < ring.world - 1 else None
            kf, vf = kv[0].to(cd), kv[1].to(cd)
            dk_c = dv_c = None
            for qr, kr in plan[s]:
                qs, ks = _sl(qr), _sl(kr)
                with torch.enable_grad():
                    qp = qf[:, qs].detach().requires_grad_()
                    kp = kf[:, ks].detach().requires_grad_()
                    vp = vf[:, ks].detach().requires_grad_()
                    o_p, l_p = _partial(qp, kp, vp, (qr._replace(local=0), kr._replace(local=0)),
                                        spec=spec, scale=scale)
                w = torch.exp(l_p.detach() - lse_safe[:, qs])
                do_p = d_o[:, qs] * w.unsqueeze(-1)
                dl_p = w * ((d_o[:, qs] * o_p.detach()).sum(-1) - o_dot[:, qs] + d_l[:, qs])
                gq, gk, gv = torch.autograd.grad((o_p, l_p), (qp, kp, vp), (do_p, dl_p))
                dq[:, qs] += gq
                if dk_c is None:
                    dk_c, dv_c = torch.zeros_like(kf), torch.zeros_like(vf)
                dk_c[:, ks] += gk
                dv_c[:, ks] += gv
            if acc_ex is None:
                acc = (dk_c, dv_c) if dk_c is not None else (torch.zeros_like(kf),
                                                             torch.zeros_like(vf))
            else:
                acc = acc_ex.wait()
                if dk_c is not None:
                    acc[0].add_(dk_c)
                    acc[1].add_(dv_c)
            if ring.world > 1:
                acc_ex = Exchange(ring, acc, _TAG_DKV)
            if kv_ex is not None:
                kv = tuple(kv_ex.wait())
        dk, dvv = acc_ex.wait() if acc_ex is not None else acc
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    layout: str,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | AttentionOutput:
    """Sequence-parallel softmax attention under any visibility spec, on this rank's shards.

    Every rank of ``group`` calls it with its own shards of one sequence of ``T = W * n``
    positions (``W`` ranks), laid out by ``layout`` (see :mod:`causalmix.distributed.layout`;
    :func:`~causalmix.distributed.shard` cuts them).

    Args:
        q: ``[B, n, Hq, D]`` this rank's queries.
        k: ``[B, n, Hkv, D]`` this rank's keys (same positions as q), ``Hq % Hkv == 0``.
        v: ``[B, n, Hkv, Dv]`` this rank's values. q, k, v share dtype and device.
        visibility: any spec over absolute positions ``[0, T)``.
        layout: ``"contiguous"``, ``"zigzag"`` (needs ``n`` even) or ``"striped"``.
        group: the ``torch.distributed`` process group (default: the world).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        ``[B, n, Hq, Dv]`` in q's dtype, or ``AttentionOutput(output, lse)`` with ``lse: [B, n,
        Hq]`` fp32 (``-inf`` where a query sees no key, whose output is 0). Equal to the
        single-process ``causalmix.softmax_attention`` on the full sequence, sharded the same way;
        differentiable (dK/dV travel back around the ring). Partial results are merged in fp32
        (fp64, and an fp64 lse, for fp64 inputs).

    Every rank must call it with the same spec (compared by content), layout, shapes, dtype,
    scale and need for gradients, and with arguments its own checks accept; both are settled
    before any exchange: a mismatch, or a bad argument on any rank, raises the same
    ``ValueError`` on every rank, naming the arguments and each rank's value, or the rank that
    refused its arguments and why. A rank that dies makes the others fail when the process
    group's timeout expires.
    """
    fn = "causalmix.distributed.softmax_attention"
    grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, v))
    agreed = {"visibility": visibility, "layout": layout, "q": signature(q), "k": signature(k),
              "v": signature(v), "scale": scale, "requires_grad": grad}
    args = SoftmaxArgs(q, k, v, visibility, layout, scale, return_lse)
    ring, scale = checked_on_every_rank(fn, group, agreed,
                                        lambda world: _check_arguments(fn, args, world))
    seq_len = q.shape[1] * ring.world
    plan = _schedule(visibility, layout, seq_len, ring.rank, ring.world)
    out, lse = _RingAttention.apply(q, k, v, RingCall(visibility, plan, ring, scale))
    return AttentionOutput(out, lse) if return_lse else out


class SoftmaxArgs(NamedTuple):
    """The arguments of one sharded softmax call, as passed."""

    q: object
    k: object
    v: object
    visibility: object
    layout: object
    scale: object
    return_lse: object


def _check_arguments(fn: str, a: SoftmaxArgs, world: int | None) -> float:
    """This rank's own checks (``world``: the group's size, ``None`` outside a process group:
    then the spec's positions are not checked); returns the scale."""
    _bsz, n, nk, _hq, _hkv, d, _dv = check_qkv(fn, a.q, a.k, a.v)
    check_spec(f"{fn}: visibility", a.visibility)
    if n != nk:
        raise ValueError(f"{fn}: q and k must hold the same positions (one layout), got q "
                         f"{n} and k {nk} local positions")
    if not isinstance(a.layout, str) or a.layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {list(LAYOUTS)}, got {a.layout!r}")
    if a.layout == "zigzag" and n % 2:
        raise ValueError(f"{fn}: layout 'zigzag' needs an even number of positions per rank "
                         f"(two chunks of seq_len / (2 * world)), got {n}")
    scale = check_scale(fn, a.scale)
    check_bool(fn, "return_lse", a.return_lse)
    if world is not None:
        check_visibility(fn, a.visibility, a.q.shape[0], n * world, n * world)
    return (1.0 / math.sqrt(d) if d > 0 else 1.0) if scale is None else scale
