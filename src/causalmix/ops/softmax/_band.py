"""The band path of the ``blocks`` implementation (imported by ``impl/blocks.py`` only).

Row blocks of a shift-invariant band spec (``Window``: query ``i`` sees keys ``[i - left, i +
right]``) all read ``width`` keys starting ``rows`` later for each next block, so a chunk of
blocks is one batched product over an overlapping strided view of the keys (Longformer's sliding
chunks), with one mask for all; dk / dv of each block's ``width`` keys fold back onto the key
axis ``rows`` at a time.

Two ways to run one unit's band (some kv heads of one example, in ``blocks``' workers):

* ``forward_fused`` / ``backward_fused``: each chunk of blocks one call of PyTorch's fused CPU
  attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: any
  strides, an additive mask, the blocks as its batch): one op per chunk where the plain path
  issues a dozen, so workers seldom wait for each other at op boundaries. Needs CPU, fp32 / fp64
  (bf16 inputs are converted first), one head size for queries and values, no score that may
  overflow (``blocks._Opts.fused``), and for the backward no lse gradient;
* ``forward`` / ``backward``: plain batched matmuls, base-2 scores, everywhere else.

Run in the calling thread for all heads at once instead (torch's intra-op threads, as SDPA
runs), the kernel would start an OpenMP team there, after which a forked child that uses
OpenMP hangs (libgomp); ``tests/ops/softmax/test_blocks.py`` checks that ``blocks`` never does.
"""

from __future__ import annotations

import math

import torch

from causalmix.ops.softmax import _plan
from causalmix.ops.softmax._plan import Plan

LOG2E = 1.0 / math.log(2.0)
FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


def keys(x: torch.Tensor, k0: int, shape: tuple[int, int, int], rows: int):
    """``x: [Tk, C]`` -> overlapping ``shape = [nblk, width, C]`` view: block ``n`` holds rows
    ``[k0 + n * rows, k0 + n * rows + width)``."""
    s0, s1 = x.stride()
    return x.as_strided(shape, (rows * s0, s0, s1), x.storage_offset() + k0 * s0)


def per_chunk(plan: Plan, g: int) -> int:
    """Band blocks per chunk: their scores fit one piece."""
    return max(1, _plan.PIECE_FLOATS // (plan.rows * g * plan.band.width))


def chunks(plan: Plan, g: int):
    """Groups of band blocks ``(n, count)`` whose scores fit one piece."""
    band, per = plan.band, per_chunk(plan, g)
    for n in range(band.n0, band.n1, per):
        yield n, min(per, band.n1 - n)


def scratch(plan: Plan, g: int, like: torch.Tensor) -> torch.Tensor:
    size = per_chunk(plan, g) * plan.rows * g * plan.band.width
    return torch.empty(size, dtype=like.dtype, device=like.device)


def forward(t, plan: Plan, alpha: float) -> None:
    """Band blocks of one unit (``t``: ``blocks._Fwd``, rows ``i * G + g``)."""
    nu, _, d = t.q.shape
    g = t.q.shape[1] // plan.geo.tq
    band, rows = plan.band, plan.rows
    dv, w = t.v.shape[-1], band.width
    work = scratch(plan, g, t.q)
    for u in range(nu):
        for n, c in chunks(plan, g):
            rr = slice(n * rows * g, (n + c) * rows * g)
            k0 = band.k0 + (n - band.n0) * rows
            s = work[: c * rows * g * w].view(c, rows * g, w)
            s.baddbmm_(t.q[u, rr].view(c, rows * g, d),
                       keys(t.k[u], k0, (c, w, d), rows).transpose(1, 2),
                       beta=0.0, alpha=alpha)
            s.view(c, rows, g, w).add_(band.bias[0])
            m = s.amax(dim=-1, keepdim=True).clamp_min_(-torch.finfo(s.dtype).max)
            s.sub_(m).exp2_()
            l = s.sum(dim=-1, keepdim=True)
            ob = t.out[u, rr].view(c, rows * g, dv)
            torch.bmm(s, keys(t.v[u], k0, (c, w, dv), rows), out=ob)
            ob.div_(l.clamp_min(torch.finfo(s.dtype).tiny))
            t.lse2[u, rr] = (m + l.log2()).view(-1)


def fused(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether PyTorch's fused CPU attention kernel can run rows of ``q`` against values ``v``
    computed in ``dtype`` (default ``q``'s): device, dtype, one head size for queries and
    values. The band and the diagonal plan both ask it."""
    dtype = q.dtype if dtype is None else dtype
    return q.device.type == "cpu" and dtype in (torch.float32, torch.float64) \
        and q.shape[-1] == v.shape[-1] and FLASH is not None


def fused_mask(plan: Plan, g: int, dtype: torch.dtype) -> torch.Tensor:
    """The band's mask for the fused kernel: ``[1, 1, rows * g, width]`` of 0 / -inf."""
    bias = plan.band.bias[0]  # [rows, 1, width]
    return bias.expand(-1, g, -1).reshape(1, 1, -1, bias.shape[-1]).to(dtype)


def forward_fused(t, plan: Plan, scale: float) -> None:
    """:func:`forward` with each chunk of blocks one call of PyTorch's fused CPU kernel
    (blocks as its batch, the overlapping key views as they are): one op per chunk instead of a
    dozen, so worker threads seldom wait for each other at op boundaries."""
    nu, _, d = t.q.shape
    g = t.q.shape[1] // plan.geo.tq
    band, rows, n2 = plan.band, plan.rows, plan.rows * g
    dv, w = t.v.shape[-1], band.width
    mask = fused_mask(plan, g, t.q.dtype)
    for u in range(nu):
        for n, c in chunks(plan, g):
            rr = slice(n * n2, (n + c) * n2)
            k0 = band.k0 + (n - band.n0) * rows
            o, lse = FLASH(t.q[u, rr].view(c, 1, n2, d),
                            keys(t.k[u], k0, (c, w, d), rows)[:, None],
                            keys(t.v[u], k0, (c, w, dv), rows)[:, None], 0.0, False,
                            attn_mask=mask, scale=scale)
            t.out[u, rr].view(c, n2, dv).copy_(o[:, 0])
            torch.mul(lse[:, 0], LOG2E, out=t.lse2[u, rr].view(c, n2))


def backward(t, plan: Plan) -> None:
    """Band blocks of one unit: dq rows are written once; dk/dv fold each block's ``width``
    keys back onto the key axis, ``rows`` at a time."""
    nu, _, d = t.q.shape
    g = t.q.shape[1] // plan.geo.tq
    band, rows = plan.band, plan.rows
    dv1, w = t.do.shape[-1], band.width
    work_p, work_d = scratch(plan, g, t.q), scratch(plan, g, t.q)
    per = per_chunk(plan, g)
    # dk / dv of a chunk's blocks before the fold: made once (fresh multi-MiB buffers per chunk
    # page-fault in every call, and worker threads faulting at once contend in the kernel).
    work_k = torch.empty(per * w * (d + dv1), dtype=t.q.dtype, device=t.q.device)
    for u in range(nu):
        for n, c in chunks(plan, g):
            rr, n2 = slice(n * rows * g, (n + c) * rows * g), rows * g
            k0 = band.k0 + (n - band.n0) * rows
            qb, dob = t.q[u, rr].view(c, n2, d), t.do[u, rr].view(c, n2, dv1)
            ka = keys(t.k[u], k0, (c, w, d), rows)
            p = work_p[: c * n2 * w].view(c, n2, w)
            p.baddbmm_(qb, ka.transpose(1, 2), beta=0.0, alpha=t.alpha)
            p.view(c, rows, g, w).add_(band.bias[0])
            p.sub_(t.shift[u, rr].view(c, n2, 1)).exp2_()
            ds = work_d[: c * n2 * w].view(c, n2, w)
            torch.bmm(dob, keys(t.v[u], k0, (c, w, dv1), rows).transpose(1, 2), out=ds)
            ds.sub_(t.delta[u, rr].view(c, n2, 1)).mul_(p)
            t.dq[u, rr].view(c, n2, d).baddbmm_(ds, ka, beta=0.0, alpha=t.scale)
            dk_band = work_k[: c * w * d].view(c, w, d)
            dv_band = work_k[c * w * d : c * w * (d + dv1)].view(c, w, dv1)
            torch.bmm(ds.transpose(1, 2), qb, out=dk_band)
            torch.bmm(p.transpose(1, 2), dob, out=dv_band)
            fold(t.dk[u], dk_band, k0, rows, t.scale)
            fold(t.dv[u], dv_band, k0, rows, 1.0)


def backward_fused(t, plan: Plan) -> None:
    """:func:`backward` in PyTorch's fused CPU kernel (see :func:`forward_fused`);
    band rows see at least one key each, so their lse is finite."""
    nu, _, d = t.q.shape
    g = t.q.shape[1] // plan.geo.tq
    band, rows, n2 = plan.band, plan.rows, plan.rows * g
    dv1, w = t.do.shape[-1], band.width
    mask = fused_mask(plan, g, t.q.dtype)
    for u in range(nu):
        for n, c in chunks(plan, g):
            rr = slice(n * n2, (n + c) * n2)
            k0 = band.k0 + (n - band.n0) * rows
            qb = t.q[u, rr].view(c, 1, n2, d)
            kb = keys(t.k[u], k0, (c, w, d), rows)[:, None]
            vb = keys(t.v[u], k0, (c, w, dv1), rows)[:, None]
            lse = t.shift[u, rr].view(c, 1, n2) * math.log(2.0)
            dq, dk, dv = FLASH_BACKWARD(t.do[u, rr].view(c, 1, n2, dv1), qb, kb, vb,
                                         t.o[u, rr].view(c, 1, n2, dv1), lse, 0.0, False,
                                         attn_mask=mask, scale=t.scale)
            t.dq[u, rr].view(c, n2, d).copy_(dq[:, 0])
            fold(t.dk[u], dk[:, 0], k0, rows, 1.0)
            fold(t.dv[u], dv[:, 0], k0, rows, 1.0)


def fold(dst: torch.Tensor, band_grad: torch.Tensor, k0: int, rows: int, alpha: float) -> None:
    """``dst [Tk, C] += alpha * band_grad [c, width, C]`` folded back onto the key axis (block
    ``n``'s keys start at ``k0 + n * rows``), ``rows`` keys of every block at a time."""
    c, w, _ = band_grad.shape
    for j in range(0, w, rows):
        dst[k0 + j : k0 + j + c * rows].view(c, rows, -1).add_(band_grad[:, j : j + rows],
                                                                alpha=alpha)

