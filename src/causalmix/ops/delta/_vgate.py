"""Per-key-dimension decays inside a chunk (KDA's vector gates): the gated products of the
chunked delta scan, with only factors ``<= 1`` ever exponentiated.

With chunk-local cumulative log-gates ``b_r`` (``[C, D]``, fp64, non-increasing in r) a vector
gate turns every pair weight ``exp(b_r - b_j)`` (j <= r) of the scalar scan into a vector over
the key dimension. The three products the scan needs, over the lower triangle ``j <= r``::

    gram(X, Y)_rj = sum_d X_rd Y_jd exp(b_rd - b_jd)            [C, C]   (Y as a KeySide)
    lmul(M, Y)_r  = sum_j M_rj exp(b_r - b_j) * Y_j              [C, D]   (d gram / d X)
    rmul(M, X)_j  = sum_r M_rj exp(b_r - b_j) * X_r              [C, D]   (d gram / d Y)

``exp(b_r) exp(-b_j)`` would overflow (``-b_j`` reaches ``30 C`` for gates of -30): instead the
chunk is cut into sub-chunks of ``s`` positions (secondary chunking, as in the GLA paper) with
the reference ``a_R = b`` at the first position of sub-chunk R. For r in sub-chunk R and j in
an earlier sub-chunk J::

    exp(b_r - b_j) = exp(b_r - a_R) * exp(a_R - a_{J+1}) * exp(a_{J+1} - b_j)

three factors ``<= 1``: the off-diagonal blocks are matmuls of rescaled tiles (``xr`` and
``ks`` below). The exponents are formed in fp64 and exponentiated in the compute dtype; an
underflowing factor only ever stands for a smaller product.

The *middle split*: where every ``|b_r - m|`` stays within :data:`SHORTCUT` (``m`` = b at the
middle position of the span), ``exp(b_r - b_j) = exp(b_r - m) exp(m - b_j)`` with both factors
in ``[e^-30, e^30]``: no overflow, no underflow, each term of a product as accurate as with the
exact weight, and the products are matmuls of rescaled tiles. Three forms, the first that holds
on the whole block:

1. **shortcut**: the middle split over the whole chunk (moderate gates: a chunk may decay by
   up to e^60 in any dimension);
2. **sub-chunks of 16** (:data:`SUB_SPLIT`), off-diagonal pairs as above, pairs inside a
   sub-chunk by the middle split of the sub-chunk (a sub-chunk may decay by up to e^60);
3. **sub-chunks of 8** (:data:`SUB`), pairs inside a sub-chunk with the explicit ``[s, s, D]``
   weights ``exp(b_r - b_j)`` (``diag``): any gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SUB", "SUB_SPLIT", "KeySide", "VGate", "gram", "keyside", "lmul", "rmul", "vgate"]

#: Sub-chunk length of the explicit form (the largest divisor of C up to it).
SUB = 8

#: Sub-chunk length of the form with the middle split inside sub-chunks.
SUB_SPLIT = 16

#: Largest ``|b_r - m|`` of the middle split.
SHORTCUT = 30.0

_NEG_INF = float("-inf")


class VGate(NamedTuple):
    """The decay factors of one block's chunks, sub-chunks of ``s`` (``n = C / s``):
    ``xr [.., n, s, D]`` exp(b_r - a_R); ``ks [.., n, C, D]`` exp(a_R - b_j) for j before
    sub-chunk R (as ``exp(a_R - a_{J+1}) exp(a_{J+1} - b_j)``), else 0; inside a sub-chunk
    either ``diag [.., n, s, s, D]`` exp(b_r - b_j) for j <= r, else 0 (explicit form), or
    ``dx, dy [.., n, s, D]`` exp(b_r - m_R), exp(m_R - b_j) (middle split). The shortcut:
    ``xr = exp(b - m)``, ``ks = exp(m - b)``, ``[.., C, D]``, ``s = C``, the rest None."""

    s: int
    xr: torch.Tensor
    ks: torch.Tensor
    diag: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    dy: torch.Tensor | None = None

    @property
    def shortcut(self) -> bool:
        """The moderate-gate shortcut (module docstring)."""
        return self.diag is None and self.dx is None


def sub_size(c: int, most: int = SUB) -> int:
    """The sub-chunk length for chunks of ``c``: the largest divisor of c up to ``most``."""
    return max(d for d in range(1, min(c, most) + 1) if c % d == 0)


def _split(b: torch.Tensor, cd: torch.dtype):
    """The middle split of spans ``b [.., L, D]`` (fp64): ``(exp(b - m), exp(m - b))`` in
    ``cd``, or None where some ``|b - m|`` exceeds :data:`SHORTCUT` (NaN too)."""
    n = b.shape[-2]
    rel = b - b[..., n // 2:n // 2 + 1, :]
    if not bool(rel.abs().amax() <= SHORTCUT):
        return None
    return rel.to(cd).exp(), rel.neg_().to(cd).exp_()


def _across(bs: torch.Tensor, b: torch.Tensor, cd: torch.dtype):
    """``(xr, ks)`` of sub-chunks ``bs [.., n, s, D]`` of ``b [.., C, D]``."""
    n, s, d = bs.shape[-3:]
    ref = bs[..., :, 0, :]  # a_R: [.., n, D]
    nxt = torch.cat([ref[..., 1:, :], b[..., -1:, :]], -2)  # a_{J+1}
    xr = (bs - ref[..., :, None, :]).to(cd).exp_()
    yr = (nxt[..., :, None, :] - bs).to(cd).exp_()  # [.., J, s, D]
    idx = torch.arange(n, device=b.device)
    later = (idx[:, None] > idx[None, :])[..., None]  # [R, J, 1]: R > J
    mid = (ref[..., :, None, :] - nxt[..., None, :, :]).to(cd).masked_fill_(~later, _NEG_INF)
    ks = (mid.exp_()[..., None, :] * yr[..., None, :, :, :]).reshape(*b.shape[:-2], n, n * s, d)
    return xr, ks


def vgate(b: torch.Tensor, cd: torch.dtype) -> VGate:
    """:class:`VGate` of chunk-local cumulative log-gates ``b [.., C, D]`` (fp64), factors in
    ``cd``: the first form of the module docstring that holds on the whole block."""
    c, d = b.shape[-2:]
    whole = _split(b, cd)
    if whole is not None:
        return VGate(c, *whole)
    s = sub_size(c, SUB_SPLIT)
    bs = b.reshape(*b.shape[:-2], c // s, s, d)
    inner = _split(bs, cd)
    if inner is not None:
        return VGate(s, *_across(bs, b, cd), None, *inner)
    s = sub_size(c, SUB)
    bs = b.reshape(*b.shape[:-2], c // s, s, d)
    r = torch.arange(s, device=b.device)
    low = (r[:, None] >= r[None, :])[..., None]  # [r, j, 1]
    diag = (bs[..., :, :, None, :] - bs[..., :, None, :, :]).to(cd).masked_fill_(~low, _NEG_INF)
    return VGate(s, *_across(bs, b, cd), diag.exp_())


def _subs(x: torch.Tensor, s: int) -> torch.Tensor:
    """``[.., C, F]`` -> ``[.., n, s, F]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // s, s, x.shape[-1])


def _diag_blocks(m: torch.Tensor, s: int) -> torch.Tensor:
    """The ``[.., n, s, s]`` diagonal blocks of ``m [.., C, C]``."""
    n = m.shape[-1] // s
    idx = torch.arange(n, device=m.device)
    return m.reshape(*m.shape[:-2], n, s, n, s)[..., idx, :, idx, :].movedim(0, -3)


class KeySide(NamedTuple):
    """A right operand ``y`` with its decays applied once, for every product that reads it:
    ``yk = y_j * ks`` (``[.., n, C, D]``; the shortcut's ``[.., C, D]``) and ``yd``, inside
    the sub-chunks: ``diag * y_j`` (``[.., n, s, s, D]``, explicit form) or ``y * dy`` (``[..,
    n, s, D]``, middle split); None for the shortcut."""

    yk: torch.Tensor
    yd: torch.Tensor | None


def keyside(y: torch.Tensor, vg: VGate) -> KeySide:
    """:class:`KeySide` of ``y [.., C, D]``."""
    if vg.shortcut:
        return KeySide(y * vg.ks, None)
    ys = _subs(y, vg.s)
    yd = ys * vg.dy if vg.diag is None else vg.diag * ys[..., :, None, :, :]
    return KeySide(y[..., None, :, :] * vg.ks, yd)


def gram(x: torch.Tensor, y: KeySide, vg: VGate) -> torch.Tensor:
    """``sum_d x_rd y_jd exp(b_rd - b_jd)`` on ``j <= r``, 0 above: ``[.., C, C]``."""
    if vg.shortcut:
        return ((x * vg.xr) @ y.yk.transpose(-1, -2)).tril_()
    s = vg.s
    xs = _subs(x, s)
    c = x.shape[-2]
    n = c // s
    off = (xs * vg.xr) @ y.yk.transpose(-1, -2)  # [.., R, s, C]
    if vg.diag is None:
        dg = ((xs * vg.dx) @ y.yd.transpose(-1, -2)).tril_()  # [.., n, s, s]
    else:
        dg = (xs[..., :, :, None, :] * y.yd).sum(-1)
    off = off.reshape(*off.shape[:-3], n, s, n, s)
    idx = torch.arange(n, device=x.device)
    off[..., idx, :, idx, :] += dg.movedim(-3, 0)
    return off.reshape(*off.shape[:-4], c, c)


def lmul(m: torch.Tensor, y: KeySide, vg: VGate) -> torch.Tensor:
    """``sum_{j <= r} m_rj exp(b_r - b_j) * y_j``: ``[.., C, D]`` (``m`` is read only on
    and below the diagonal)."""
    if vg.shortcut:
        return vg.xr * (m.tril() @ y.yk)
    s = vg.s
    c = m.shape[-1]
    mr = m.reshape(*m.shape[:-2], c // s, s, c)  # rows by sub-chunk
    out = vg.xr * (mr @ y.yk)  # [.., R, s, D]
    if vg.diag is None:
        out = out + vg.dx * (_diag_blocks(m, s).tril() @ y.yd)
    else:
        out = out + (_diag_blocks(m, s)[..., None] * y.yd).sum(-2)
    return out.reshape(*out.shape[:-3], c, out.shape[-1])


def rmul(m: torch.Tensor, x: torch.Tensor, vg: VGate) -> torch.Tensor:
    """``sum_{r >= j} m_rj exp(b_r - b_j) * x_r``: ``[.., C, D]``."""
    if vg.shortcut:
        return vg.ks * (m.tril().transpose(-1, -2) @ (x * vg.xr))
    s = vg.s
    c = m.shape[-1]
    xs = _subs(x, s)
    mr = m.reshape(*m.shape[:-2], c // s, s, c)
    off = ((mr.transpose(-1, -2) @ (xs * vg.xr)) * vg.ks).sum(-3)  # [.., C, D]
    dm = _diag_blocks(m, s)
    if vg.diag is None:
        dg = vg.dy * (dm.tril().transpose(-1, -2) @ (xs * vg.dx))
    else:
        dg = (dm[..., None] * vg.diag * xs[..., :, :, None, :]).sum(-3)
    return off + dg.reshape(*dg.shape[:-3], c, dg.shape[-1])
