"""Block-sparse softmax attention in PyTorch ops (bands in its fused CPU kernel), forward and
backward, CPU (and GPU: untested).

The plan (:mod:`causalmix.ops.softmax._plan`) lists, per block of query rows, the non-empty key
tiles in cache-sized *pieces*, with a cached 0 / -inf mask for the partial ones; empty tiles get
no work at all, full tiles no mask work.

Forward (stages ``_scores`` -> ``_row_block_one`` or ``_row_block_online``): a row block whose
keys fit one piece takes an exact softmax; longer rows merge their pieces online
(FlashAttention's running max ``m``, sum ``l`` and rescaled accumulator). Backward
(``_backward_block``) recomputes each piece (FlashAttention-2): with ``P = exp(S - lse)``,
``dV += P^T dO``, ``dS = P * (dO V^T - delta + dlse)`` where ``delta = rowsum(dO * O)``,
``dQ = scale * dS K``, ``dK += scale * dS^T Q``. Memory is O(T * D) plus one piece of scores:
nothing but the output and the lse is saved for the backward besides the inputs.
Band row blocks (``Window``-like specs) run as batched products over a strided view of the keys
(:mod:`causalmix.ops.softmax._band`), in PyTorch's fused CPU attention kernel where queries and
values share a head size.
Specs whose rows are a few runs of rectangles and causal squares (``Causal``, ``Prefix``,
``Segments & Causal``, ``Segments & Full``) run as a few calls of that fused kernel instead of
tiles, where it can serve the call (:mod:`causalmix.ops.softmax._diagonal`): documents of one
length are one call; partial results merge by log-sum-exp.

Work is split into *units* (one example, some kv heads). On a multi-threaded CPU the units run in
worker threads whose own ops run single-threaded (``_run_units``,
:mod:`causalmix.ops.softmax._workers`): one fork/join per call rather than one per small op, which
matters most on a loaded machine. No process-wide setting is touched (``torch.set_num_threads``
is never called). Each unit reads its heads of ``q``, ``k``, ``v`` in place (strided head views:
no head-major copies when the inputs are already in the compute dtype and each kv head serves one
query head) and writes its slices of the outputs and gradients directly.

Scores are kept in base 2 (the matmuls carry ``scale * log2(e)`` as their ``alpha``, so
exponentials are ``exp2``, several times cheaper than ``exp`` on CPU); the lse is returned in
natural log. Math is fp32 inside (fp64 for fp64 inputs); results are cast back to the input
dtype. A ``+inf`` or NaN score makes its row NaN, as in the reference; a row that sees no key gets
0 and lse ``-inf``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.softmax import _band, _diagonal, _plan, _workers
from causalmix.ops.softmax._call import Call, overflow_reason
from causalmix.ops.softmax._plan import Block, Geometry, Heads, Piece, Plan, Rect, Sizes
from causalmix.visibility import Visibility

_LOG2E = 1.0 / math.log(2.0)


def can_serve(call: Call) -> str | None:
    return None


class _Unit(NamedTuple):
    """What one worker computes: kv heads ``[h0, h1)`` of example ``e``; ``b`` is its example's
    index in the spec's masks (0 when the spec has no batch)."""

    e: int
    h0: int
    h1: int
    b: int


class _Job(NamedTuple):
    """What one worker computes with: the plan, the call's spec (masks not cached in the plan
    are rebuilt from it), its unit, a scratch buffer for one piece of scores, and the scores'
    factor ``scale * log2(e)`` (base-2 scores from unscaled ``q . k``)."""

    plan: Plan
    visibility: Visibility
    unit: _Unit
    work: torch.Tensor
    alpha: float


def _mask(s: torch.Tensor, job: _Job, blk: Block, pc: Piece) -> None:
    """Add the piece's mask to its scores ``s: [units, rows * G, c1 - c0]`` in place."""
    if pc.m1 == pc.m0:
        return
    bias = pc.bias
    if bias is None:
        bias = _plan.bias(job.visibility, job.plan.geo, Rect(blk.r0, blk.r1, pc.m0, pc.m1),
                          dtype=s.dtype, device=s.device)
    s4 = s.view(s.shape[0], blk.r1 - blk.r0, -1, pc.c1 - pc.c0)
    s4[..., pc.m0 - pc.c0 : pc.m1 - pc.c0].add_(bias[job.unit.b])


def _scores(qb: torch.Tensor, kf: torch.Tensor, job: _Job, blk: Block, pc: Piece):
    """Base-2 scores of one piece, masked: ``[units, rows * G, c1 - c0]`` in ``job.work``."""
    bh, n, _ = qb.shape
    w = pc.c1 - pc.c0
    s = job.work[: bh * n * w].view(bh, n, w)
    s.baddbmm_(qb, kf[:, pc.c0 : pc.c1].transpose(1, 2), beta=0.0, alpha=job.alpha)
    _mask(s, job, blk, pc)
    return s


class _Rows(NamedTuple):
    """One row block's operands: ``q: [units, n, D]`` (n = rows * G), the unit's keys and
    values ``k: [units, Tk, D]``, ``v: [units, Tk, Dv]``, and its output rows ``o: [units, n,
    Dv]`` (written)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


def _row_block_one(x: _Rows, job: _Job, blk: Block) -> torch.Tensor:
    """Keys in one piece: exact softmax into ``x.o``; returns lse2 ``[units, n, 1]``."""
    pc = blk.pieces[0]
    s = _scores(x.q, x.k, job, blk, pc)
    # Rows that see nothing have max -inf: clamp it to the lowest finite value, so that
    # exp2(-inf - m) = 0 (not NaN) while a +inf or NaN score still makes the row NaN.
    m = s.amax(dim=-1, keepdim=True).clamp_min_(-torch.finfo(s.dtype).max)
    s.sub_(m).exp2_()
    l = s.sum(dim=-1, keepdim=True)
    torch.bmm(s, x.v[:, pc.c0 : pc.c1], out=x.o)
    x.o.div_(l.clamp_min(torch.finfo(s.dtype).tiny))  # empty rows: 0 / tiny = 0
    return m + l.log2()  # -inf where l = 0


def _row_block_online(x: _Rows, job: _Job, blk: Block) -> torch.Tensor:
    """Keys in several pieces: running max ``m``, running sum ``l``, rescaled accumulator."""
    m = l = None
    for pc in blk.pieces:
        s = _scores(x.q, x.k, job, blk, pc)
        mp = s.amax(dim=-1, keepdim=True)
        if m is None:
            m = mp.clamp_min_(-torch.finfo(s.dtype).max)
            s.sub_(m).exp2_()
            l = s.sum(dim=-1, keepdim=True)
            torch.bmm(s, x.v[:, pc.c0 : pc.c1], out=x.o)
            continue
        m_new = torch.maximum(m, mp)
        alpha = (m - m_new).exp2_()
        s.sub_(m_new).exp2_()
        l.mul_(alpha).add_(s.sum(dim=-1, keepdim=True))
        x.o.mul_(alpha).baddbmm_(s, x.v[:, pc.c0 : pc.c1])
        m = m_new
    x.o.div_(l.clamp_min(torch.finfo(x.o.dtype).tiny))
    return m + l.log2()


class _Fwd(NamedTuple):
    """One unit's forward operands, rows ``i * G + g`` (query row ``i``, head ``g`` of its
    group): any strides, last dim contiguous or not."""

    q: torch.Tensor  # [nh, Tq * G, D]
    k: torch.Tensor  # [nh, Tk, D]
    v: torch.Tensor  # [nh, Tk, Dv]
    out: torch.Tensor  # [nh, Tq * G, Dv], written
    lse2: torch.Tensor  # [nh, Tq * G], written (base 2)


def _forward_rows(t: _Fwd, plan: Plan | _diagonal.Diagonal, opts: _Opts, unit: _Unit) -> None:
    """Every row block of one unit (or the diagonal plan's kernel calls)."""
    if isinstance(plan, _diagonal.Diagonal):
        _diagonal.forward(t, plan, unit.b, opts.scale)
        return
    q, kf, vf, out, lse2 = t
    visibility, alpha = opts.visibility, opts.scale * _LOG2E
    nu = q.shape[0]
    g = q.shape[1] // max(1, plan.geo.tq)
    work = torch.empty(nu * plan.rows * g * plan.piece_max, dtype=q.dtype, device=q.device)
    job = _Job(plan, visibility, unit, work, alpha)
    for blk in plan.blocks:
        rs = slice(blk.r0 * g, blk.r1 * g)
        if not blk.pieces:  # rows that see no key
            out[:, rs] = 0.0
            lse2[:, rs] = float("-inf")
            continue
        run_rows = _row_block_one if len(blk.pieces) == 1 else _row_block_online
        lse2[:, rs] = run_rows(_Rows(q[:, rs], kf, vf, out[:, rs]), job, blk)[..., 0]
    if plan.band is None:
        return
    if opts.fused and _band.fused(q, vf):
        _band.forward_fused(t, plan, opts.scale)
    else:
        _band.forward(t, plan, alpha)


class _Bwd(NamedTuple):
    """One unit's backward operands (rows as in :class:`_Fwd`)."""

    q: torch.Tensor  # [nh, Tq * G, D]
    k: torch.Tensor  # [nh, Tk, D]
    v: torch.Tensor  # [nh, Tk, Dv]
    do: torch.Tensor  # [nh, Tq * G, Dv]
    shift: torch.Tensor  # [nh, Tq * G, 1]: lse2 (+inf for rows that see nothing: P = 0)
    delta: torch.Tensor  # [nh, Tq * G, 1]: rowsum(dO * O) - dlse
    dq: torch.Tensor  # [nh, Tq * G, D], accumulated
    dk: torch.Tensor  # [nh, Tk, D], accumulated
    dv: torch.Tensor  # [nh, Tk, Dv], accumulated
    alpha: float  # scale * log2(e)
    scale: float
    o: torch.Tensor  # [nh, Tq * G, Dv]: the output
    fused: bool  # the fused kernel's backward may serve the band (no dlse, no overflow)


def _backward_rows(t: _Bwd, plan: Plan | _diagonal.Diagonal, opts: _Opts, unit: _Unit) -> None:
    """Every row block's contributions to one unit's dq, dk, dv (or the diagonal plan's)."""
    if isinstance(plan, _diagonal.Diagonal):
        _diagonal.backward(t, plan, unit.b)
        return
    visibility = opts.visibility
    nu = t.q.shape[0]
    g = t.q.shape[1] // max(1, plan.geo.tq)
    size = nu * plan.rows * g * plan.piece_max
    jobs = (_Job(plan, visibility, unit, torch.empty(size, device=t.dq.device, dtype=t.dq.dtype),
                 t.alpha),
            torch.empty(size, device=t.dq.device, dtype=t.dq.dtype))
    for blk in plan.blocks:
        _backward_block(t, blk, g, jobs)
    if plan.band is None:
        return
    if t.fused and _band.fused(t.q, t.v):
        _band.backward_fused(t, plan)
    else:
        _band.backward(t, plan)


def _backward_block(t: _Bwd, blk: Block, g: int, jobs: tuple[_Job, torch.Tensor]) -> None:
    """Accumulate one row block's contributions to dq, dk, dv (every update in place); ``jobs``
    holds the job (scores of P in its buffer) and dS's buffer."""
    rs = slice(blk.r0 * g, blk.r1 * g)
    qb, dob, dq_blk = t.q[:, rs], t.do[:, rs], t.dq[:, rs]
    shift, delta = t.shift[:, rs], t.delta[:, rs]
    nu, n, _ = qb.shape
    job, work_d = jobs
    for pc in blk.pieces:
        p = _scores(qb, t.k, job, blk, pc)  # s, base 2
        p.sub_(shift).exp2_()
        w = pc.c1 - pc.c0
        ds = work_d[: nu * n * w].view(nu, n, w)
        torch.bmm(dob, t.v[:, pc.c0 : pc.c1].transpose(1, 2), out=ds)
        ds.sub_(delta).mul_(p)
        dq_blk.baddbmm_(ds, t.k[:, pc.c0 : pc.c1], alpha=t.scale)
        t.dv[:, pc.c0 : pc.c1].baddbmm_(p.transpose(1, 2), dob)
        t.dk[:, pc.c0 : pc.c1].baddbmm_(ds.transpose(1, 2), qb, alpha=t.scale)


def _units(b: int, hkv: int, per_example: bool, workers: int) -> list[_Unit]:
    """About ``workers`` units (at least one per example) covering every (example, kv head)."""
    step = -(-hkv // max(1, -(-workers // max(1, b))))  # heads per unit
    return [_Unit(e, h, min(hkv, h + step), e if per_example else 0)
            for e in range(b) for h in range(0, hkv, step)]


def _run_units(fn, args: tuple, units: list[_Unit], device: torch.device) -> None:
    """``fn(*args, unit)`` for every unit: on a multi-threaded CPU in the single-threaded workers
    of :mod:`causalmix.ops.softmax._workers` (one fork and join per call), else in the calling
    thread. No process-wide setting changes either way."""
    pool = _pool(units, device)
    if pool is None:
        for unit in units:
            fn(*args, unit)
    else:
        pool.map(_without_grad, [(fn, *args, unit) for unit in units])


def _pool(units: list[_Unit], device: torch.device):
    """The worker pool that runs ``units``, or None (they run in the calling thread)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and len(units) > 1:
        return _workers.pool(threads)
    return None


def _without_grad(fn, *args) -> None:
    """``fn(*args)`` with autograd off (grad mode is per thread; a worker's is on)."""
    with torch.no_grad():
        fn(*args)


class _Opts(NamedTuple):
    """The non-tensor arguments of one call."""

    visibility: Visibility
    q_offset: int
    k_offset: int
    scale: float
    fused: bool  # the fused CPU kernel may serve the band: scale > 0 and no score can overflow


def _plan_for(q: torch.Tensor, k: torch.Tensor, opts: _Opts) -> Plan:
    """The call's (cached) plan."""
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    geo = Geometry(tq, tk, opts.q_offset, opts.k_offset)
    cols = max(1, min(_plan.KEY_BLOCK, tk))
    heads = Heads(b, hq, d)
    rows = _plan.row_size(opts.visibility, geo, heads, cols)
    sizes = Sizes(rows, cols, _plan.piece_keys(heads, rows, cols), compute_dtype(q), q.device)
    return _plan.plan(opts.visibility, geo, sizes)


def _diagonal_for(ins: tuple, opts: _Opts, units: list[_Unit]) -> _diagonal.Diagonal | None:
    """The call's diagonal plan where the fused kernel may serve it (CPU, fp32 / fp64 math, one
    head size for queries and values, no score that may overflow) from worker threads or a
    single-threaded caller (never from a caller with intra-op threads: see ``_band``), else
    None."""
    q, k, v = ins
    if not (opts.fused and _band.fused(q, v, compute_dtype(q))):
        return None
    if torch.get_num_threads() > 1 and _pool(units, q.device) is None:
        return None
    return _diagonal.plan(opts.visibility, Geometry(q.shape[1], k.shape[1], opts.q_offset,
                                                    opts.k_offset))


def _heads(x: torch.Tensor, unit: _Unit, g: int) -> torch.Tensor:
    """The unit's heads of a token-major ``[B, T, Hkv * g, C]`` tensor: a view ``[T, nh, g, C]``."""
    return x[unit.e, :, unit.h0 * g : unit.h1 * g].unflatten(1, (unit.h1 - unit.h0, g))


def _rows(x: torch.Tensor, unit: _Unit, g: int, dtype: torch.dtype) -> torch.Tensor:
    """The unit's heads of ``x: [B, T, Hkv * g, C]`` as ``[nh, T * g, C]`` in ``dtype``: a view
    of ``x`` where its layout and dtype allow (always when ``g == 1`` and ``x.dtype == dtype``),
    else a copy."""
    xh = _heads(x, unit, g)
    return xh.permute(1, 0, 2, 3).reshape(xh.shape[1], -1, xh.shape[-1]).to(dtype)


def _target(x: torch.Tensor, unit: _Unit, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Where a unit computes its slice of the output ``x`` (see :func:`_rows`): a view of ``x``
    where possible, else a new buffer that :func:`_put` copies back."""
    r = _rows(x, unit, g, dtype)
    if x.dtype == dtype and r.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return r
    return torch.empty(r.shape, dtype=dtype, device=x.device)


def _put(x: torch.Tensor, unit: _Unit, g: int, buf: torch.Tensor) -> None:
    """Copy a unit's ``buf [nh, T * g, C]`` into its heads of ``x`` unless ``buf`` is a view of
    ``x`` (from :func:`_target`)."""
    if buf.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return
    xh = _heads(x, unit, g)
    xh.copy_(buf.view(xh.shape[1], xh.shape[0], g, -1).transpose(0, 1))


def _forward_unit(ins: tuple, opts: _Opts, plan: Plan, bufs: tuple, unit: _Unit) -> None:
    """One unit's whole forward. ``ins = (q, k, v)``; ``bufs = (o [B, Tq, Hq, Dv] in q.dtype,
    lse [B, Tq, Hq], out_c, lse2 [B, Hkv, Tq * G])``, written in the unit's slices; ``out_c`` is
    the compute-dtype output the backward reads, ``o`` itself or ``[B, Tq, Hq, Dv]``."""
    q, k, v = ins
    o, lse, out_c, lse2 = bufs
    g, cd = q.shape[2] // k.shape[2], lse2.dtype
    oh = _target(out_c, unit, g, cd)
    l2 = lse2[unit.e, unit.h0 : unit.h1]
    _forward_rows(_Fwd(_rows(q, unit, g, cd), _rows(k, unit, 1, cd), _rows(v, unit, 1, cd), oh,
                       l2), plan, opts, unit)
    _put(out_c, unit, g, oh)
    if out_c is not o:
        _heads(o, unit, g).copy_(_heads(out_c, unit, g))
    lh = _heads(lse[..., None], unit, g)[..., 0]  # [Tq, nh, g]
    torch.mul(l2.view(lh.shape[1], lh.shape[0], g).transpose(0, 1), math.log(2.0), out=lh)


def _backward_unit(ins: tuple, grads_in: tuple, opts: _Opts, plan: Plan, bufs: tuple,
                   unit: _Unit) -> None:
    """One unit's whole backward. ``ins = (q, k, v)``; ``grads_in = (d_out [B, Tq, Hq, Dv] or
    None, d_lse [B, Tq, Hq] or None)``; ``bufs = (out_c, lse2, dq, dk, dv)`` (the gradients in
    the inputs' shapes and dtypes, written in the unit's slices)."""
    q, k, v = ins
    d_out, d_lse = grads_in
    out_c, lse2, dq, dk, dv = bufs
    g, cd = q.shape[2] // k.shape[2], lse2.dtype
    l2 = lse2[unit.e, unit.h0 : unit.h1, :, None]
    oh = _rows(out_c, unit, g, cd)
    if d_out is None:
        doh = torch.zeros_like(oh)
    else:
        doh = _rows(d_out, unit, g, cd)
    delta = torch.linalg.vecdot(doh, oh)[..., None]  # [nh, Tq * G, 1]
    if d_lse is not None:
        delta.sub_(_rows(d_lse[..., None], unit, g, cd))
    grads = [_target(x, unit, gx, cd).zero_() for x, gx in ((dq, g), (dk, 1), (dv, 1))]
    t = _Bwd(_rows(q, unit, g, cd), _rows(k, unit, 1, cd), _rows(v, unit, 1, cd), doh,
             torch.where(torch.isneginf(l2), float("inf"), l2), delta, *grads,
             opts.scale * _LOG2E, opts.scale, oh, opts.fused and d_lse is None)
    _backward_rows(t, plan, opts, unit)
    for x, gx, buf in zip((dq, dk, dv), (g, 1, 1), grads, strict=True):
        _put(x, unit, gx, buf)


def _direct(q: torch.Tensor) -> bool:
    """Whether the output ``o`` itself is the compute-dtype output the backward reads."""
    return q.dtype == compute_dtype(q)


class _BlockAttention(torch.autograd.Function):
    """``(q, k, v, opts) -> (out, lse, out_c, lse2)``: ``out_c`` (the output in the compute
    dtype when ``q``'s is another, else empty) and ``lse2`` (base 2, head-major) are outputs so
    that ``setup_context`` can keep them for the backward. Every tensor op runs inside the units
    (:func:`_forward_unit`, :func:`_backward_unit`); the calling thread only allocates."""

    @staticmethod
    def forward(q, k, v, opts: _Opts):
        b, tq, hq, _ = q.shape
        hkv, dv = k.shape[2], v.shape[3]
        cd, dev = compute_dtype(q), q.device
        o = torch.empty(b, tq, hq, dv, dtype=q.dtype, device=dev)
        lse = torch.empty(b, tq, hq, dtype=cd, device=dev)
        out_c = o if _direct(q) else torch.empty(b, tq, hq, dv, dtype=cd, device=dev)
        lse2 = torch.empty(b, hkv, tq * (hq // hkv), dtype=cd, device=dev)
        units = _units(b, hkv, opts.visibility.batch_size is not None, torch.get_num_threads())
        plan = _diagonal_for((q, k, v), opts, units) or _plan_for(q, k, opts)
        _run_units(_forward_unit, ((q, k, v), opts, plan, (o, lse, out_c, lse2)), units, dev)
        return o, lse, (o.new_empty(0) if out_c is o else out_c), lse2

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, opts = inputs
        o, _, out_c, lse2 = output
        ctx.mark_non_differentiable(out_c, lse2)
        ctx.save_for_backward(q, k, v, o if _direct(q) else out_c, lse2)
        ctx.opts = opts

    @staticmethod
    def backward(ctx, d_out, d_lse, *_):
        q, k, v, out_c, lse2 = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format)
                      for x in (q, k, v))
        units = _units(q.shape[0], k.shape[2], ctx.opts.visibility.batch_size is not None,
                       torch.get_num_threads())
        # The fused kernel's backward takes no lse gradient: the tile plan serves one (its
        # math needs only the output and the lse, whichever plan made them).
        plan = (_diagonal_for((q, k, v), ctx.opts, units) if d_lse is None else None) \
            or _plan_for(q, k, ctx.opts)
        _run_units(_backward_unit, ((q, k, v), (d_out, d_lse), ctx.opts, plan,
                                    (out_c, lse2, dq, dk, dv)), units, q.device)
        return dq, dk, dv, None


def _apply(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    opts = _Opts(call.visibility, call.q_offset, call.k_offset, call.scale,
                 overflow_reason(call, "blocks") is None)
    out, lse, *_ = _BlockAttention.apply(call.q, call.k, call.v, opts)
    return out, lse


_EAGER_ONLY = None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]`` ->
    ``(out [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] in the compute dtype)``.

    Under ``torch.compile`` the block loop runs eagerly (its plan is data, not a graph); the
    ``torch.compiler.disable`` wrapper is made on first use so that importing causalmix does not
    import torch's compiler stack (about a second)."""
    global _EAGER_ONLY
    if torch.compiler.is_compiling():
        if _EAGER_ONLY is None:
            _EAGER_ONLY = torch.compiler.disable(_apply)
        return _EAGER_ONLY(call)
    return _apply(call)
