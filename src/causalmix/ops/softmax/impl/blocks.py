"""Block-sparse softmax attention in plain PyTorch, forward and backward, CPU (and GPU: untested).

The plan (:mod:`causalmix.ops.softmax._plan`) lists, per block of query rows, the non-empty key
tiles in cache-sized *pieces*, with a cached 0 / -inf mask for the partial ones; empty tiles get
no work at all, full tiles no mask work.

Forward (stages ``_scores`` -> ``_row_block_one`` or ``_row_block_online``): a row block whose
keys fit one piece takes an exact softmax; longer rows merge their pieces online
(FlashAttention's running max ``m``, sum ``l`` and rescaled accumulator). Backward
(``_backward_block``) recomputes each piece (FlashAttention-2): with ``P = exp(S - lse)``,
``dV += P^T dO``, ``dS = P * (dO V^T - delta + dlse)`` where ``delta = rowsum(dO * O)``,
``dQ = scale * dS K``, ``dK += scale * dS^T Q``. Memory is O(T * D) plus one piece of scores.
Band row blocks (``Window``-like specs) run as batched matmuls over a strided view of the keys
(``_band_forward`` / ``_band_backward``).

On a multi-threaded CPU the (batch, kv head) axis is split into slices computed by worker
threads whose own ops run single-threaded (``_run_units``, :mod:`causalmix.ops.softmax._workers`):
one fork/join per call rather than one per small op, which matters most on a loaded machine. No
process-wide setting is touched (``torch.set_num_threads`` is never called).

Scores are kept in base 2 (``q`` is scaled by ``scale * log2(e)`` once, so exponentials are
``exp2``, several times cheaper than ``exp`` on CPU); the lse is returned in natural log. Math is
fp32 inside (fp64 for fp64 inputs); results are cast back to the input dtype. A ``+inf`` or NaN
score makes its row NaN, as in the reference; a row that sees no key gets 0 and lse ``-inf``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.softmax import _plan, _workers
from causalmix.ops.softmax._call import Call
from causalmix.ops.softmax._plan import Band, Block, Geometry, Heads, Piece, Plan, Rect, Sizes
from causalmix.visibility import Visibility

_LOG2E = 1.0 / math.log(2.0)


def can_serve(call: Call) -> str | None:
    return None


class _Unit(NamedTuple):
    """What one worker computes: examples ``[b0, b1)`` x kv heads ``[h0, h1)`` (several whole
    examples, or some heads of one); ``b`` is its example's index in the spec's masks (0 when
    the spec has no batch)."""

    b0: int
    b1: int
    h0: int
    h1: int
    b: int


class _Job(NamedTuple):
    """What one worker computes with: the plan, the call's spec (masks not cached in the plan
    are rebuilt from it), its unit, and a scratch buffer for one piece of scores."""

    plan: Plan
    visibility: Visibility
    unit: _Unit
    work: torch.Tensor


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
    torch.bmm(qb, kf[:, pc.c0 : pc.c1].transpose(1, 2), out=s)
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
    q: torch.Tensor  # [BH, Tq, G, D]: base-2 scaled queries
    k: torch.Tensor  # [BH, Tk, D]
    v: torch.Tensor  # [BH, Tk, Dv]
    out: torch.Tensor  # [BH, Tq, G, Dv], written
    lse2: torch.Tensor  # [BH, Tq, G], written


def _forward_rows(t: _Fwd, plan: Plan, visibility: Visibility, unit: _Unit) -> None:
    """Every row block of one unit (``t`` holds the unit's heads only)."""
    q, kf, vf, out, lse2 = t
    nu, _, g, d = q.shape
    dv = vf.shape[-1]
    work = torch.empty(nu * plan.rows * g * plan.piece_max, dtype=q.dtype, device=q.device)
    job = _Job(plan, visibility, unit, work)
    for blk in plan.blocks:
        if not blk.pieces:  # rows that see no key
            out[:, blk.r0 : blk.r1] = 0.0
            lse2[:, blk.r0 : blk.r1] = float("-inf")
            continue
        n = (blk.r1 - blk.r0) * g
        x = _Rows(q[:, blk.r0 : blk.r1].reshape(nu, n, d), kf, vf,
                  out[:, blk.r0 : blk.r1].view(nu, n, dv))
        run_rows = _row_block_one if len(blk.pieces) == 1 else _row_block_online
        lse2[:, blk.r0 : blk.r1] = run_rows(x, job, blk).view(nu, blk.r1 - blk.r0, g)
    if plan.band is not None:
        _band_forward(_Fwd(q, kf, vf, out, lse2), plan.band, plan.rows)


def _band_keys(x: torch.Tensor, k0: int, shape: tuple[int, int, int], rows: int):
    """``x: [Tk, C]`` (a row-contiguous view) -> overlapping ``shape = [nblk, width, C]`` view:
    block ``n`` holds rows ``[k0 + n * rows, k0 + n * rows + width)``."""
    st = x.stride(0)
    return x.as_strided(shape, (rows * st, st, 1), x.storage_offset() + k0 * st)


def _band_chunks(band: Band, rows: int, g: int):
    """Groups of band blocks ``(n, count)`` whose scores fit one piece."""
    per = max(1, _plan.PIECE_FLOATS // (rows * g * band.width))
    for n in range(band.n0, band.n1, per):
        yield n, min(per, band.n1 - n)


def _band_forward(t: _Fwd, band: Band, rows: int) -> None:
    """Band blocks of one unit: ``t.q: [nu, Tq, G, D]``, ``t.k`` / ``t.v``: ``[nu, Tk, .]``."""
    nu, _, g, d = t.q.shape
    dv, w = t.v.shape[-1], band.width
    work = torch.empty(max(1, _plan.PIECE_FLOATS // (rows * g * w)) * rows * g * w,
                       dtype=t.q.dtype, device=t.q.device)
    for u in range(nu):
        for n, c in _band_chunks(band, rows, g):
            r0, k0 = n * rows, band.k0 + (n - band.n0) * rows
            qb = t.q[u, r0 : r0 + c * rows].reshape(c, rows * g, d)
            s = work[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(qb, _band_keys(t.k[u], k0, (c, w, d), rows).transpose(1, 2), out=s)
            s.view(c, rows, g, w).add_(band.bias[0])
            m = s.amax(dim=-1, keepdim=True).clamp_min_(-torch.finfo(s.dtype).max)
            s.sub_(m).exp2_()
            l = s.sum(dim=-1, keepdim=True)
            ob = t.out[u, r0 : r0 + c * rows].view(c, rows * g, dv)
            torch.bmm(s, _band_keys(t.v[u], k0, (c, w, dv), rows), out=ob)
            ob.div_(l.clamp_min(torch.finfo(s.dtype).tiny))
            t.lse2[u, r0 : r0 + c * rows] = (m + l.log2()).view(c * rows, g)


class _Bwd(NamedTuple):
    q_aug: torch.Tensor  # [BH, Tq, G, D+1]: [q scaled, -lse2]
    do_aug: torch.Tensor  # [BH, Tq, G, Dv+1]: [dO, -delta]
    k_aug: torch.Tensor  # [BH, Tk, D+1]: [k, 1]
    v_aug: torch.Tensor  # [BH, Tk, Dv+1]: [v, 1]
    dq: torch.Tensor  # [BH, Tq, G, D], accumulated
    dk: torch.Tensor  # [BH, Tk, D], accumulated
    dv: torch.Tensor  # [BH, Tk, Dv], accumulated


def _band_backward(t: _Bwd, band: Band, rows: int) -> None:
    """Band blocks of one unit (``t`` already sliced to it): dq rows are written once; dk/dv
    fold each block's ``width`` keys back onto the key axis, ``rows`` at a time."""
    nu, _, g, d1 = t.q_aug.shape
    dv1, w = t.do_aug.shape[-1], band.width
    size = max(1, _plan.PIECE_FLOATS // (rows * g * w)) * rows * g * w
    work_p = torch.empty(size, dtype=t.q_aug.dtype, device=t.q_aug.device)
    work_d = torch.empty_like(work_p)
    for u in range(nu):
        dq, dk, dv = t.dq[u], t.dk[u], t.dv[u]
        for n, c in _band_chunks(band, rows, g):
            r0, k0 = n * rows, band.k0 + (n - band.n0) * rows
            qa = t.q_aug[u, r0 : r0 + c * rows].reshape(c, rows * g, d1)
            doa = t.do_aug[u, r0 : r0 + c * rows].reshape(c, rows * g, dv1)
            ka = _band_keys(t.k_aug[u], k0, (c, w, d1), rows)
            va = _band_keys(t.v_aug[u], k0, (c, w, dv1), rows)
            p = work_p[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(qa, ka.transpose(1, 2), out=p)  # s - lse, base 2
            p.view(c, rows, g, w).add_(band.bias[0])
            p.exp2_()
            ds = work_d[: c * rows * g * w].view(c, rows * g, w)
            torch.bmm(doa, va.transpose(1, 2), out=ds)  # dO v^T - delta
            ds.mul_(p)
            torch.bmm(ds, ka[..., : d1 - 1], out=dq[r0 : r0 + c * rows].view(c, rows * g, -1))
            dk_band = torch.bmm(ds.transpose(1, 2), qa[..., : d1 - 1])  # [c, w, D]
            dv_band = torch.bmm(p.transpose(1, 2), doa[..., : dv1 - 1])  # [c, w, Dv]
            for j in range(0, w, rows):
                dst = slice(k0 + j, k0 + j + c * rows)
                dk[dst].view(c, rows, -1).add_(dk_band[:, j : j + rows])
                dv[dst].view(c, rows, -1).add_(dv_band[:, j : j + rows])


def _backward_rows(t: _Bwd, plan: Plan, visibility: Visibility, unit: _Unit) -> None:
    """Every row block's contributions to one unit's dq, dk, dv (``t`` holds its heads only)."""
    nu, _, g, _ = t.q_aug.shape
    size = nu * plan.rows * g * plan.piece_max
    jobs = (_Job(plan, visibility, unit, torch.empty(size, device=t.dq.device, dtype=t.dq.dtype)),
            torch.empty(size, device=t.dq.device, dtype=t.dq.dtype))
    for blk in plan.blocks:
        _backward_block(t, blk, jobs)
    if plan.band is not None:
        _band_backward(t, plan.band, plan.rows)


def _backward_block(t: _Bwd, blk: Block, jobs: tuple[_Job, torch.Tensor]) -> None:
    """Accumulate one row block's contributions to dq, dk, dv (every update in place); ``t`` is
    sliced to the unit, ``jobs`` holds the job (scores of P in its buffer) and dS's buffer."""
    nu, _, g, d1 = t.q_aug.shape
    d, dv = d1 - 1, t.do_aug.shape[-1] - 1
    n = (blk.r1 - blk.r0) * g
    rows = slice(blk.r0, blk.r1)
    qa = t.q_aug[:, rows].reshape(nu, n, d + 1)
    doa = t.do_aug[:, rows].reshape(nu, n, dv + 1)
    qb, dob = qa[..., :d], doa[..., :dv]
    dq_blk = t.dq[:, rows].view(nu, n, d)
    job, work_d = jobs
    for pc in blk.pieces:
        p = _scores(qa, t.k_aug, job, blk, pc)  # s - lse, base 2
        p.exp2_()
        w = pc.c1 - pc.c0
        ds = work_d[: nu * n * w].view(nu, n, w)
        torch.bmm(doa, t.v_aug[:, pc.c0 : pc.c1].transpose(1, 2), out=ds)  # dO v^T - delta
        ds.mul_(p)
        dq_blk.baddbmm_(ds, t.k_aug[:, pc.c0 : pc.c1, :d])
        t.dv[:, pc.c0 : pc.c1].baddbmm_(p.transpose(1, 2), dob)
        t.dk[:, pc.c0 : pc.c1].baddbmm_(ds.transpose(1, 2), qb)


def _units(b: int, hkv: int, per_example: bool, workers: int) -> list[_Unit]:
    """About ``workers`` units covering every (example, kv head); a spec with a batch
    (per-example masks) gets units within one example each."""
    if not per_example and b >= workers:
        step = -(-b // workers)
        return [_Unit(b0, min(b, b0 + step), 0, hkv, 0) for b0 in range(0, b, step)]
    step = -(-hkv // max(1, -(-workers // b)))  # heads per unit
    return [_Unit(e, e + 1, h, min(hkv, h + step), e if per_example else 0)
            for e in range(b) for h in range(0, hkv, step)]


def _run_units(fn, args: tuple, units: list[_Unit], device: torch.device) -> None:
    """``fn(*args, unit)`` for every unit: on a multi-threaded CPU in the single-threaded workers
    of :mod:`causalmix.ops.softmax._workers` (one unit each: one fork and join per call), else in
    the calling thread. No process-wide setting changes either way."""
    threads = torch.get_num_threads()
    pool = None
    if device.type == "cpu" and threads > 1 and len(units) > 1:
        pool = _workers.pool(threads)
    if pool is None:
        for unit in units:
            fn(*args, unit)
    else:
        pool.map(_without_grad, [(fn, *args, unit) for unit in units])


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


class _Saved(NamedTuple):
    """Head-major fp32 (fp64) buffers, ``[B, Hkv, ...]``, each unit filling its own slices:
    ``q_aug [.., Tq, G, D+1]`` ([q * scale * log2(e), -lse2]), ``k_aug [.., Tk, D+1]`` ([k, 1]),
    ``v_aug [.., Tk, Dv+1]`` ([v, 1]), ``out [.., Tq, G, Dv]``, ``lse2 [.., Tq, G]`` (base 2)."""

    q_aug: torch.Tensor
    k_aug: torch.Tensor
    v_aug: torch.Tensor
    out: torch.Tensor
    lse2: torch.Tensor


def _heads(x: torch.Tensor, unit: _Unit, g: int) -> torch.Tensor:
    """The unit's slice of a token-major ``[B, T, H, C]`` tensor (``H = Hkv * g``) as a
    head-major view ``[nb, nh, T, g, C]``."""
    xs = x[unit.b0 : unit.b1, :, unit.h0 * g : unit.h1 * g]
    nb, t, _, c = xs.shape
    return xs.view(nb, t, unit.h1 - unit.h0, g, c).permute(0, 2, 1, 3, 4)


def _mine(x: torch.Tensor, unit: _Unit) -> torch.Tensor:
    """The unit's slice of a ``[B, Hkv, T, ...]`` buffer as ``[nb * nh, T, ...]`` (a view:
    a unit is whole examples or heads of one)."""
    xs = x[unit.b0 : unit.b1, unit.h0 : unit.h1]
    return xs.reshape(-1, *xs.shape[2:])


def _fill_augmented(dst: torch.Tensor, src: torch.Tensor, scale: float | None = None) -> None:
    """``dst[..., :C] = src`` (times ``scale``) and ``dst[..., C] = 1`` (the backward's row-shift
    trick)."""
    if scale is None:
        dst[..., :-1].copy_(src)
    else:
        torch.mul(src, scale, out=dst[..., :-1])
    dst[..., -1] = 1.0


def _forward_unit(q, k, v, opts: _Opts, plan: Plan, bufs: tuple, unit: _Unit) -> None:
    """One unit's whole forward: its head-major copies, its row blocks, its outputs. ``bufs`` is
    ``(_Saved, o [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq])``, written in the unit's slices."""
    saved, o, lse = bufs
    g, d, dv = q.shape[2] // k.shape[2], q.shape[-1], v.shape[-1]
    nb, nh = unit.b1 - unit.b0, unit.h1 - unit.h0
    q_aug, k_aug, v_aug, out, lse2 = (_mine(x, unit) for x in saved)
    _fill_augmented(q_aug.view(nb, nh, -1, g, d + 1), _heads(q, unit, g), opts.scale * _LOG2E)
    _fill_augmented(k_aug.view(nb, nh, -1, d + 1), _heads(k, unit, 1)[..., 0, :])
    _fill_augmented(v_aug.view(nb, nh, -1, dv + 1), _heads(v, unit, 1)[..., 0, :])
    _forward_rows(_Fwd(q_aug[..., :d], k_aug[..., :d], v_aug[..., :dv], out, lse2), plan,
                  opts.visibility, unit)
    # The backward's row shift (see there); rows that see nothing are shifted by -inf so that
    # exp2(s - lse2) = 0 for them.
    q_aug[..., -1] = torch.where(torch.isneginf(lse2), float("-inf"), -lse2)
    _heads(o, unit, g).copy_(out.view(nb, nh, *out.shape[1:]))
    torch.mul(lse2.view(nb, nh, -1, g, 1), math.log(2.0), out=_heads(lse[..., None], unit, g))


def _backward_unit(grads_in: tuple, opts: _Opts, plan: Plan, bufs: tuple, unit: _Unit) -> None:
    """One unit's whole backward. ``grads_in = (d_out [B, Tq, Hq, Dv] or None, d_lse [B, Tq,
    Hq] or None)``; ``bufs = (_Saved, dq, dk, dv)`` (the inputs' shapes and dtypes), the
    gradients written in the unit's slices."""
    d_out, d_lse = grads_in
    saved, dq, dk, dv = bufs
    q_aug, k_aug, v_aug, out, lse2 = (_mine(x, unit) for x in saved)
    nu, tq, g, d1 = q_aug.shape
    tk, dvv = k_aug.shape[1], v_aug.shape[-1] - 1
    nb, nh = unit.b1 - unit.b0, unit.h1 - unit.h0
    # Fold the row shifts into the matmuls with the extra column (q's is set by forward):
    #   [q, -lse2] . [k, 1] = s - lse2        (then exp2 gives P directly)
    #   [dO, -delta] . [v, 1] = dO v - delta  (then times P gives dS)
    do_aug = torch.zeros(nu, tq, g, dvv + 1, dtype=out.dtype, device=out.device)
    if d_out is not None:
        do_aug.view(nb, nh, tq, g, -1)[..., :dvv].copy_(_heads(d_out, unit, g))
    delta = torch.linalg.vecdot(do_aug[..., :dvv], out)  # [nu, Tq, G]
    if d_lse is not None:
        delta.sub_(_heads(d_lse[..., None], unit, g).reshape(nu, tq, g))
    do_aug[..., -1] = -delta
    t = _Bwd(q_aug, do_aug, k_aug, v_aug,
             torch.zeros(nu, tq, g, d1 - 1, dtype=out.dtype, device=out.device),
             torch.zeros(nu, tk, d1 - 1, dtype=out.dtype, device=out.device),
             torch.zeros(nu, tk, dvv, dtype=out.dtype, device=out.device))
    _backward_rows(t, plan, opts.visibility, unit)
    # The scores were scale * log2(e) * q.k: dq = scale * dS k, dk = ln 2 * dS^T (q scaled).
    torch.mul(t.dq.view(nb, nh, tq, g, -1), opts.scale, out=_heads(dq, unit, g))
    torch.mul(t.dk.view(nb, nh, tk, 1, -1), math.log(2.0), out=_heads(dk, unit, 1))
    _heads(dv, unit, 1).copy_(t.dv.view(nb, nh, tk, 1, -1))


class _BlockAttention(torch.autograd.Function):
    """``(q, k, v, opts) -> (out, lse, *saved)``; ``saved`` (:class:`_Saved`) are outputs so
    that ``setup_context`` can keep them for the backward. Every tensor op runs inside the units
    (:func:`_forward_unit`, :func:`_backward_unit`); the calling thread only allocates."""

    @staticmethod
    def forward(q, k, v, opts: _Opts):
        plan = _plan_for(q, k, opts)
        b, tq, hq, d = q.shape
        tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        g, cd, dev = hq // hkv, compute_dtype(q), q.device
        saved = _Saved(torch.empty(b, hkv, tq, g, d + 1, dtype=cd, device=dev),
                       torch.empty(b, hkv, tk, d + 1, dtype=cd, device=dev),
                       torch.empty(b, hkv, tk, dv + 1, dtype=cd, device=dev),
                       torch.empty(b, hkv, tq, g, dv, dtype=cd, device=dev),
                       torch.empty(b, hkv, tq, g, dtype=cd, device=dev))
        o = torch.empty(b, tq, hq, dv, dtype=q.dtype, device=dev)
        lse = torch.empty(b, tq, hq, dtype=cd, device=dev)
        units = _units(b, hkv, opts.visibility.batch_size is not None, torch.get_num_threads())
        _run_units(_forward_unit, (q, k, v, opts, plan, (saved, o, lse)), units, dev)
        return o, lse, *saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, opts = inputs
        saved = output[2:]
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*saved)
        ctx.opts = opts
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.plan = _plan_for(q, k, opts)

    @staticmethod
    def backward(ctx, d_out, d_lse, *_):
        saved = _Saved(*ctx.saved_tensors)
        dev = saved.out.device
        dq, dk, dv = (torch.empty(s, dtype=t, device=dev)
                      for s, t in zip(ctx.shapes, ctx.dtypes, strict=True))
        b, hkv = saved.k_aug.shape[:2]
        units = _units(b, hkv, ctx.opts.visibility.batch_size is not None,
                       torch.get_num_threads())
        _run_units(_backward_unit, ((d_out, d_lse), ctx.opts, ctx.plan, (saved, dq, dk, dv)),
                   units, dev)
        return dq, dk, dv, None


def _apply(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    opts = _Opts(call.visibility, call.q_offset, call.k_offset, call.scale)
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
