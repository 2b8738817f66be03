# A copy of src/causalmix/ops/softmax/impl/blocks.py at df0ed6f (the base of issue 15), kept only
# for the "before" column of benchmarks/softmax.py. Not part of the package; do not import it.
"""Block-sparse softmax attention in plain PyTorch, forward and backward, CPU and GPU.

The spec's block map splits the (query, key) plane into tiles. For each block of query rows the
non-empty key tiles are gathered (one narrow view when they are contiguous) and the row block is
computed in one go: scores, exact softmax over the gathered keys, output. Masks are built and
applied only on *partial* tiles; full tiles see no mask work and empty tiles no work at all.

Backward recomputes the scores per row block (FlashAttention-2 style): with ``P = exp(S - lse)``,
``dV += P^T dO``, ``dS = P * (dO V^T - delta + dlse)`` where ``delta = rowsum(dO * O)``,
``dQ = scale * dS K``, ``dK += scale * dS^T Q``. Memory is O(T * D) plus one row block of scores.

Math is fp32 inside whatever the input dtype; results are cast back to it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from causalmix.visibility import EMPTY, FULL, Visibility

_SCORE_BUDGET = 1 << 22  # floats in one row block of scores (16 MiB fp32)
_PIECE_BUDGET = 1 << 18  # floats in one backward piece of scores (1 MiB: stays in cache)
_KEY_BLOCK = 64
_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 32


def can_serve(q, k, v, visibility: Visibility, q_offset: int, k_offset: int, needs_lse: bool):
    return None


@dataclasses.dataclass
class _RowBlock:
    r0: int  # local query rows [r0, r1)
    r1: int
    ranges: list[tuple[int, int]]  # local key ranges [c0, c1) gathered, in order
    width: int  # total gathered keys
    partial: list[tuple[int, int, int]]  # (offset in gathered keys, local key start, end)
    # The same keys cut into cache-sized pieces for the backward pass: (c0, c1, partial tiles
    # as (offset in the piece, local key start, end)).
    pieces: list[tuple[int, int, list[tuple[int, int, int]]]] = dataclasses.field(
        default_factory=list
    )


_ROW_CHOICES = (256, 128, 64, 32)
_ROW_EFFICIENCY = {256: 1.0, 128: 1.08, 64: 1.2, 32: 1.45}  # matmul slowdown of thinner blocks
_BLOCK_OVERHEAD_FLOPS = 12e6  # Python + launch cost of one row block, in flop-equivalents
_ROWS_CACHE: OrderedDict = OrderedDict()


def _row_size(visibility, b, hq, d, tq, tk, q_offset, k_offset, cols) -> int:
    """Rows per block: the largest block whose scores fit the budget, unless a thinner one skips
    enough masked work (a window, a block diagonal) to pay for its slower matmuls."""
    key = (visibility, b, hq, d, tq, tk, q_offset, k_offset, cols)
    rows = _ROWS_CACHE.get(key)
    if rows is not None:
        return rows
    fit = _SCORE_BUDGET // max(1, b * hq * max(tk, 1))
    options = [r for r in _ROW_CHOICES if r <= fit] or [_ROW_CHOICES[-1]]
    options = [min(r, tq) for r in options]
    best = None
    for r in dict.fromkeys(options):
        kinds = visibility.block_map(tq, tk, r, cols, q_offset=q_offset, k_offset=k_offset)
        widths = ((kinds != EMPTY).any(dim=0).sum(dim=1) * cols).clamp(max=tk)
        blocks = int((widths > 0).sum())
        computed = float(widths.sum()) * r
        cost = computed * 14 * d * hq * b * _ROW_EFFICIENCY.get(r, 1.6) \
            + blocks * _BLOCK_OVERHEAD_FLOPS
        if best is None or cost < best[0]:
            best = (cost, r)
    rows = best[1]
    _ROWS_CACHE[key] = rows
    if len(_ROWS_CACHE) > _PLAN_CACHE_SIZE:
        _ROWS_CACHE.popitem(last=False)
    return rows


def _plan(visibility, tq, tk, q_offset, k_offset, rows, cols, piece) -> list[_RowBlock]:
    key = (visibility, tq, tk, q_offset, k_offset, rows, cols, piece)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    kinds = visibility.block_map(tq, tk, rows, cols, q_offset=q_offset, k_offset=k_offset)
    # One plan for the whole batch: a tile is skipped only if empty for every example, and
    # mask-free only if full for every example.
    nonempty = (kinds != EMPTY).any(dim=0)
    full = (kinds == FULL).all(dim=0)
    plan = []
    for r, (ne_row, full_row) in enumerate(zip(nonempty.tolist(), full.tolist(), strict=True)):
        ranges: list[tuple[int, int]] = []
        partial = []
        width = 0
        for c, (ne, fu) in enumerate(zip(ne_row, full_row, strict=True)):
            if not ne:
                continue
            c0, c1 = c * cols, min(tk, (c + 1) * cols)
            if not fu:
                partial.append((width, c0, c1))
            if ranges and ranges[-1][1] == c0:
                ranges[-1] = (ranges[-1][0], c1)
            else:
                ranges.append((c0, c1))
            width += c1 - c0
        blk = _RowBlock(r * rows, min(tq, (r + 1) * rows), ranges, width, partial)
        blk.pieces = _pieces(ranges, partial, piece)
        plan.append(blk)
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _pieces(ranges, partial, piece):
    """Cut the gathered key ranges into pieces of at most ``piece`` keys (tile-aligned)."""
    starts = {c0: (c0, c1) for _, c0, c1 in partial}
    out = []
    for r0, r1 in ranges:
        for c0 in range(r0, r1, piece):
            c1 = min(r1, c0 + piece)
            tiles = [(a - c0, a, b) for a, (_, b) in starts.items() if c0 <= a < c1]
            out.append((c0, c1, sorted(tiles)))
    return out


def _gather(x: torch.Tensor, ranges) -> torch.Tensor:
    """``x: [B, H, T, D]`` -> the key ranges along T (a view when there is one range)."""
    if len(ranges) == 1:
        c0, c1 = ranges[0]
        return x[:, :, c0:c1]
    return torch.cat([x[:, :, c0:c1] for c0, c1 in ranges], dim=2)


class _Masker:
    """Builds the boolean masks of a row block's partial tiles (``[B', rows, 1, width]`` so they
    broadcast over kv heads and the query-head group)."""

    def __init__(self, visibility, q_offset, k_offset, device):
        self.vis, self.q_offset, self.k_offset, self.device = visibility, q_offset, k_offset, device
        nb = visibility.batch_size or 1
        self.b = torch.arange(nb, device=device).view(nb, 1, 1)

    def apply(self, s: torch.Tensor, r0: int, r1: int, partial, group: int) -> None:
        """``s: [B, Hkv, (r1 - r0) * group, width]`` scores of query rows [r0, r1), masked in
        place on the ``partial`` tiles ``(offset in s, local key start, end)``."""
        if not partial:
            return
        bsz, hkv, _, width = s.shape
        s5 = s.view(bsz, hkv, r1 - r0, group, width)
        i = torch.arange(self.q_offset + r0, self.q_offset + r1, device=self.device).view(1, -1, 1)
        for off, c0, c1 in partial:
            j = torch.arange(self.k_offset + c0, self.k_offset + c1, device=self.device)
            vis = self.vis.visible(self.b, i, j.view(1, 1, -1))  # [B', rows, w]
            hidden = ~vis.expand(vis.shape[0], r1 - r0, c1 - c0)
            s5[..., off : off + c1 - c0].masked_fill_(hidden[:, None, :, None, :], float("-inf"))


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, visibility, q_offset, k_offset, scale):
        b, tq, hq, d = q.shape
        tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        group = hq // hkv
        dev = q.device
        cols = max(1, min(_KEY_BLOCK, tk))
        rows = _row_size(visibility, b, hq, d, tq, tk, q_offset, k_offset, cols)
        piece = max(4 * cols, _PIECE_BUDGET // max(1, b * hq * rows) // cols * cols)
        plan = _plan(visibility, tq, tk, q_offset, k_offset, rows, cols, piece)

        # Head-major fp32 layouts; query rows carry their head group innermost so that a row
        # block of all group heads is one contiguous [rows * group, D] matrix per kv head.
        qh = (q.float() * scale).view(b, tq, hkv, group, d).permute(0, 2, 1, 3, 4).contiguous()
        kh = k.float().transpose(1, 2).contiguous()  # [B, Hkv, Tk, D]
        vh = v.float().transpose(1, 2).contiguous()  # [B, Hkv, Tk, Dv]
        out = torch.zeros(b, hkv, tq, group, dv, device=dev)
        lse = torch.full((b, hkv, tq, group), float("-inf"), device=dev)
        masker = _Masker(visibility, q_offset, k_offset, dev)
        size_max = b * hkv * rows * group * max((r.width for r in plan), default=0)
        work_s = torch.empty(size_max, device=dev)
        for blk in plan:
            if blk.width == 0:
                continue
            n = blk.r1 - blk.r0
            shape = (b, hkv, n * group, blk.width)
            size = b * hkv * n * group * blk.width
            qb = qh[:, :, blk.r0 : blk.r1].view(b, hkv, n * group, d)
            kb, vb = _gather(kh, blk.ranges), _gather(vh, blk.ranges)
            s = work_s[:size].view(shape)
            torch.matmul(qb, kb.transpose(-1, -2), out=s)
            masker.apply(s, blk.r0, blk.r1, blk.partial, group)
            m = s.amax(dim=-1, keepdim=True)
            # One fused pass, in place: exp(s - m) / sum. (torch's last-dim softmax reads each
            # element before writing it; the blocks-vs-reference tests guard this.)
            p = torch.softmax(s, dim=-1, out=s)
            empty = None
            if blk.partial:
                empty = torch.isinf(m)
                if bool(empty.any()):
                    p.masked_fill_(empty, 0.0)  # rows that see nothing: 0, not NaN
                else:
                    empty = None
            # max_j p_j = exp(0) / l, so lse = m + log(l) = m - log(max_j p_j)
            blk_lse = m - p.amax(dim=-1, keepdim=True).log()
            if empty is not None:
                blk_lse.masked_fill_(empty, float("-inf"))
            torch.matmul(p, vb, out=out[:, :, blk.r0 : blk.r1].view(b, hkv, n * group, dv))
            lse[:, :, blk.r0 : blk.r1] = blk_lse.view(b, hkv, n, group)

        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.plan, ctx.masker, ctx.scale = plan, masker, scale
        ctx.shapes = (b, tq, tk, hq, hkv, group, d, dv, rows)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        o = out.permute(0, 2, 1, 3, 4).reshape(b, tq, hq, dv).to(q.dtype)
        ls = lse.permute(0, 2, 1, 3).reshape(b, tq, hq)
        return o, ls

    @staticmethod
    def backward(ctx, d_out, d_lse):
        qh, kh, vh, out, lse = ctx.saved_tensors
        b, tq, tk, hq, hkv, group, d, dv, rows = ctx.shapes
        plan, masker, scale = ctx.plan, ctx.masker, ctx.scale
        dev = qh.device
        if d_out is None:
            d_out = torch.zeros(b, tq, hq, dv, device=dev)
        do = d_out.float().view(b, tq, hkv, group, dv).permute(0, 2, 1, 3, 4)
        delta = (do * out).sum(-1)  # [B, Hkv, Tq, G]
        if d_lse is not None:
            delta = delta - d_lse.float().view(b, tq, hkv, group).permute(0, 2, 1, 3)
        # Fold the row shifts into the matmuls with one extra column:
        #   [q, -lse] . [k, 1] = s - lse          (then exp gives P directly)
        #   [dO, -delta] . [v, 1] = dO v - delta  (then times P gives dS)
        # Rows that see nothing have lse = -inf: use +inf there so that exp(s - lse) = 0.
        lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
        q_aug = torch.cat([qh, -lse_safe[..., None]], dim=-1)  # [B, Hkv, Tq, G, D+1]
        do_aug = torch.cat([do, -delta[..., None]], dim=-1)  # [B, Hkv, Tq, G, Dv+1]
        ones = torch.ones(b, hkv, tk, 1, device=dev)
        k_aug = torch.cat([kh, ones], dim=-1)  # [B, Hkv, Tk, D+1]
        v_aug = torch.cat([vh, ones], dim=-1)  # [B, Hkv, Tk, Dv+1]
        dq = torch.zeros_like(qh)
        dk = torch.zeros_like(kh)
        dvv = torch.zeros_like(vh)
        piece_max = max((c1 - c0 for r in plan for c0, c1, _ in r.pieces), default=0)
        work_p = torch.empty(b * hkv * rows * group * piece_max, device=dev)
        work_d = torch.empty_like(work_p)
        bh = b * hkv
        for blk in plan:
            n = blk.r1 - blk.r0
            sl = slice(blk.r0, blk.r1)
            # [B*Hkv, rows*G, .] views: every accumulation below is in place
            qa = q_aug[:, :, sl].reshape(bh, n * group, d + 1)
            doa = do_aug[:, :, sl].reshape(bh, n * group, dv + 1)
            qb, dob = qa[..., :d], doa[..., :dv]
            dq_blk = dq[:, :, sl].view(bh, n * group, d)
            for c0, c1, partial in blk.pieces:
                w = c1 - c0
                ka = k_aug[:, :, c0:c1].reshape(bh, w, d + 1)
                va = v_aug[:, :, c0:c1].reshape(bh, w, dv + 1)
                p = work_p[: bh * n * group * w].view(bh, n * group, w)
                torch.bmm(qa, ka.transpose(1, 2), out=p)  # s - lse
                masker.apply(p.view(b, hkv, n * group, w), blk.r0, blk.r1, partial, group)
                p.exp_()
                ds = work_d[: bh * n * group * w].view(bh, n * group, w)
                torch.bmm(doa, va.transpose(1, 2), out=ds)  # dO v^T - delta
                ds.mul_(p)
                dq_blk.baddbmm_(ds, ka[..., :d])
                dvv[:, :, c0:c1].view(bh, w, dv).baddbmm_(p.transpose(1, 2), dob)
                dk[:, :, c0:c1].view(bh, w, d).baddbmm_(ds.transpose(1, 2), qb)
        qd, kd, vd = ctx.dtypes
        dq = (dq * scale).permute(0, 2, 1, 3, 4).reshape(b, tq, hq, d).to(qd)
        dk = dk.transpose(1, 2).to(kd)
        dvv = dvv.transpose(1, 2).to(vd)
        return dq, dk, dvv, None, None, None, None


def _apply(q, k, v, visibility, q_offset, k_offset, scale):
    return _BlockAttention.apply(q, k, v, visibility, q_offset, k_offset, scale)


_EAGER_ONLY = None


def attention(q, k, v, visibility: Visibility, *, q_offset: int, k_offset: int, scale: float):
    """``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]`` ->
    ``(out [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] fp32)``.

    Under ``torch.compile`` the block loop runs eagerly (its plan is data, not a graph); the
    ``torch.compiler.disable`` wrapper is made on first use so that importing causalmix does not
    import torch's compiler stack (about a second)."""
    if torch.compiler.is_compiling():
        return _eager_only()(q, k, v, visibility, q_offset, k_offset, scale)
    return _apply(q, k, v, visibility, q_offset, k_offset, scale)


def _eager_only():
    global _EAGER_ONLY
    if _EAGER_ONLY is None:
        _EAGER_ONLY = torch.compiler.disable(_apply)
    return _EAGER_ONLY
