"""The diagonal plan of the ``blocks`` implementation (imported by ``impl/blocks.py`` only).

Specs whose visible keys are, run after run of query rows, a rectangle and / or a causal square
(``Causal``, ``Prefix(n)``, packed documents ``Segments & Causal`` and ``Segments & Full``) run
as a few calls of PyTorch's fused CPU attention kernel (``_band.FLASH``), which skips the upper
half of a causal square itself, instead of tiles with masks::

    Prefix(3), T = 7        runs                 calls
    q\\k 0123456
     0   ###....           rows 0-2: full        rect  rows 0-2 x keys 0-2
     1   ###....
     2   ###....
     3   ####...           rows 3-6: causal      rect  rows 3-6 x keys 0-2
     4   #####..                                 causal square rows 3-6 x keys 3-6
     5   ######.                                 (top-left aligned)
     6   #######

The plan reads only the spec's public ``key_range`` (exact, contiguous, per query), clipped to
the call's keys, and splits the query rows into maximal *runs* where the first key ``lo`` is
constant and either the last key ``hi`` is (full-like) or ``hi - i`` is (causal-like). Equal
runs one after another (documents of one length) form one kernel :class:`Call` with the runs
as its batch (strided views, no copies). A row seen by two calls gets their results merged by
log-sum-exp in the forward; the backward runs the kernel's backward per call with the *merged*
output and lse (so ``P = exp(S - lse)`` and ``rowsum(dO * O)`` are the global ones) and sums dq
over calls, dk / dv over key ranges. The backward's calls may differ from the forward's: it
halves large causal squares into two squares and a rectangle where the kernel's block sizes
make that cheaper (:func:`square_depth`; measured on four documents of 1024: the backward about
6% faster, the forward not faster, so the forward keeps whole squares and fewer merges). Too
many runs (``Chunked``, ``Window``) and calls the kernel cannot serve get no diagonal plan
(``None``): the tile plan runs them.

Rows are ``i * G + g`` (query ``i``, head ``g`` of its kv group); each kv head of a unit is one
kernel call per part, its ``G`` query heads the kernel's heads and the kv head expanded over
them (stride 0).
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import torch

from causalmix.caching import LRUCache
from causalmix.ops.softmax._band import FLASH, FLASH_BACKWARD
from causalmix.ops.softmax._call import SpecKey
from causalmix.ops.softmax._plan import Geometry
from causalmix.ops.softmax.merge import merge_softmax
from causalmix.visibility import Visibility

MAX_RUNS = 32  # more runs than this (chunks, windows): the tile plan serves the spec
#: Score pairs a kernel call must compute on average for the plan to pay: one call costs about as
#: much as this much work, so plans of many tiny calls (short sequences with a per-example
#: prefix, e.g. in-context regression at T = 24: 2x slower than tiles) run as tiles.
MIN_PAIRS_PER_CALL = 1024
_LN2 = math.log(2.0)
_PLANS: LRUCache = LRUCache(32)


class Part(NamedTuple):
    """One kernel call's keys for a run starting at local row ``r0``: keys ``[r0 + shift, r0 +
    shift + width)``, with the top-left-aligned causal mask when ``causal`` (then ``width`` is
    the run's length)."""

    causal: bool
    shift: int
    width: int


class Call(NamedTuple):
    """One batched kernel call: ``n`` blocks of ``rows`` query rows, block ``m``'s rows starting
    at local row ``r0 + m * step`` and its ``width`` keys at that row plus ``shift``; top-left
    causal when ``causal`` (then ``width == rows``). ``width <= step`` where ``n > 1``, so that
    dk / dv add back through one strided view. ``first``: no earlier call of the plan touches
    these rows (the results are written, not merged)."""

    r0: int
    rows: int
    n: int
    step: int
    shift: int
    width: int
    causal: bool
    first: bool


class Diagonal(NamedTuple):
    """The calls of every example (one entry when the spec has no batch) over ``tq`` query
    rows: the forward's, and the backward's (causal squares split, see :func:`square_depth`)."""

    calls: tuple[tuple[Call, ...], ...]
    grads: tuple[tuple[Call, ...], ...]
    tq: int


def plan(visibility: Visibility, geo: Geometry) -> Diagonal | None:
    """The cached diagonal plan of a call, or None where the spec is not run after run of
    rectangles and causal squares (see the module docstring)."""
    return _PLANS.get_or_make((SpecKey(visibility), geo), lambda: _make(visibility, geo)) \
        or None


def _make(visibility: Visibility, geo: Geometry) -> Diagonal | bool:
    """The plan, or False (cached as a refusal)."""
    if geo.tq * geo.tk < MIN_PAIRS_PER_CALL:  # no call could average enough (and no planning)
        return False
    i = torch.arange(geo.q_offset, geo.q_offset + geo.tq)
    kr = visibility.key_range(i)
    if kr is None:
        return False
    nb = visibility.batch_size or 1
    lo = torch.zeros(nb, geo.tq, dtype=torch.int64) if kr.lo is None else \
        torch.broadcast_to(kr.lo.cpu() - geo.k_offset, (nb, geo.tq)).clamp_min(0)
    hi = torch.full((nb, geo.tq), geo.tk - 1, dtype=torch.int64) if kr.hi is None else \
        torch.broadcast_to(kr.hi.cpu() - geo.k_offset, (nb, geo.tq)).clamp_max(geo.tk - 1)
    fwd, bwd = [], []
    for b in range(nb):
        runs = _runs(lo[b], hi[b])
        if runs is None:
            return False
        fwd.append(_calls(runs, geo.tq, split=False))
        bwd.append(_calls(runs, geo.tq, split=True))
    calls = [c for example in fwd for c in example]
    if sum(c.n * c.rows * c.width for c in calls) < MIN_PAIRS_PER_CALL * len(calls):
        return False
    return Diagonal(tuple(fwd), tuple(bwd), geo.tq)


def _runs(lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[int, int, tuple[Part, ...]]] | None:
    """Maximal runs ``(r0, r1, parts)`` of one example's rows (local, clipped ``lo``, ``hi``),
    or None past ``MAX_RUNS``."""
    tq = lo.shape[0]
    seen = hi >= lo
    # Each pair of rows (i, i + 1): 0 full-like, 1 causal-like, 2 a break, 3 both see nothing.
    same = (lo[1:] == lo[:-1]) & seen[1:] & seen[:-1]
    dh = hi[1:] - hi[:-1]
    kind = torch.full_like(dh, 2)
    kind[same & (dh == 0)] = 0
    kind[same & (dh == 1)] = 1
    kind[~seen[1:] & ~seen[:-1]] = 3
    changes = ((kind[1:] != kind[:-1]).nonzero()[:, 0] + 1).tolist()
    if len(changes) > 4 * MAX_RUNS:
        return None
    kinds, los, his, sees = kind.tolist(), lo.tolist(), hi.tolist(), seen.tolist()
    runs, a = [], 0
    while a < tq:
        k = kinds[a] if a < tq - 1 else 2
        if k == 2:
            r1 = a + 1
        else:  # pairs [a, j) all of kind k: rows [a, j]
            at = bisect.bisect_right(changes, a)
            r1 = (changes[at] if at < len(changes) else tq - 1) + 1
        if len(runs) == MAX_RUNS:
            return None
        runs.append((a, r1, _parts(a, r1, los[a], his[a], (sees[a], k == 1))))
        a = r1
    return runs


def _parts(r0: int, r1: int, lo: int, hi: int, how: tuple[bool, bool]) -> tuple[Part, ...]:
    """The calls of run ``[r0, r1)`` whose first row sees keys ``[lo, hi]``; ``how = (sees
    any key, causal-like)``."""
    seen, causal = how
    if not seen:
        return ()
    if not causal:
        return (Part(False, lo - r0, hi - lo + 1),)
    rect = (Part(False, lo - r0, hi - lo),) if hi > lo else ()
    return (*rect, Part(True, hi - r0, r1 - r0))


def _calls(runs, tq: int, *, split: bool) -> tuple[Call, ...]:
    """The kernel calls of one example's runs: equal runs one after another batched (where
    their keys do not overlap), each causal square split as :func:`square_depth` says if
    ``split``."""
    groups: list[list] = []  # [r0, rows, n, parts]
    for r0, r1, parts in runs:
        last = groups[-1] if groups else None
        if last is not None and last[0] + last[1] * last[2] == r0 and last[1] == r1 - r0 \
                and last[3] == parts and all(p.width <= r1 - r0 for p in parts):
            last[2] += 1
        elif parts:
            groups.append([r0, r1 - r0, 1, parts])
    out: list[Call] = []
    covered = torch.zeros(tq, dtype=torch.bool)
    for r0, rows, n, parts in groups:
        for p in parts:
            whole = Call(r0, rows, n, rows, p.shift, p.width, p.causal, False)
            for c in _split(whole) if split else (whole,):
                rs = _rows_of(c)
                out.append(c._replace(first=not bool(covered[rs].any())))
                covered[rs] = True
    return tuple(out)


def _rows_of(c: Call) -> torch.Tensor:
    return (c.r0 + torch.arange(c.n)[:, None] * c.step + torch.arange(c.rows)).view(-1)


def _split(c: Call) -> list[Call]:
    """A causal call as ``2 ** depth`` smaller causal squares (first) and a rectangle per level
    (block ``a`` of size ``2h``: rows ``[a + h, a + 2h)`` x keys ``[a, a + h)``)."""
    if not c.causal:
        return [c]
    depth = square_depth(c.rows)
    leaf = c.rows >> depth
    out = [c._replace(rows=leaf, n=c.n << depth, step=leaf, width=leaf)]
    for level in range(depth):
        h = c.rows >> (level + 1)
        out.append(Call(c.r0 + h, h, c.n << level, 2 * h, c.shift - h, h, False, False))
    return out


MIN_SQUARE = 256  # smaller causal squares run slower than their extra rectangles save


def square_depth(length: int) -> int:
    """How many times to halve a causal square of ``length`` rows (the cost model of
    :func:`_kernel_pairs`)."""
    return _square_cost(length)[1]


def _square_cost(length: int) -> tuple[float, int]:
    """(score pairs computed, halvings) of the cheapest split of a causal square."""
    direct = (_kernel_pairs(length, length, True), 0)
    h = length // 2
    if length % 2 or h < MIN_SQUARE:
        return direct
    sub, depth = _square_cost(h)
    split = 2 * sub + h * h
    return (split, depth + 1) if split < direct[0] else direct


def _kernel_pairs(lq: int, lk: int, causal: bool) -> float:
    """Score pairs the fused CPU kernel computes for one (lq x lk) call: whole blocks of
    ``qs`` rows x ``ks`` keys up to each block's last visible key when causal (its own block
    sizes: 256 / 64 / 32 rows from 768 / 192 / fewer queries, 512 keys or all of them)."""
    if not causal:
        return float(lq * lk)
    qs = 256 if lq >= 768 else (64 if lq >= 192 else 32)
    ks = 512 if lk >= 512 else max(1, lk)
    total = 0
    for i0 in range(0, lq, qs):
        i1 = min(lq, i0 + qs)
        total += (i1 - i0) * min(lk, -(-i1 // ks) * ks)
    return float(total)


# ------------------------------------------------------------------ views of one kv head
def _q_view(x: torch.Tensor, c: Call, g: int) -> torch.Tensor:
    """Rows of ``x: [Tq * g, C]`` as ``[n, g, rows, C]``: the call's blocks as the batch."""
    s0, s1 = x.stride()
    return x.as_strided((c.n, g, c.rows, x.shape[1]), (c.step * g * s0, s0, g * s0, s1),
                        x.storage_offset() + c.r0 * g * s0)


def _lse_view(x: torch.Tensor, c: Call, g: int) -> torch.Tensor:
    """Rows of ``x: [Tq * g]`` as ``[n, g, rows]``."""
    return _q_view(x[:, None], c, g)[..., 0]


def _k_view(x: torch.Tensor, c: Call) -> torch.Tensor:
    """Keys of ``x: [Tk, C]`` as ``[n, width, C]``."""
    s0, s1 = x.stride()
    return x.as_strided((c.n, c.width, x.shape[1]), (c.step * s0, s0, s1),
                        x.storage_offset() + (c.r0 + c.shift) * s0)


def _kv(x: torch.Tensor, c: Call, g: int) -> torch.Tensor:
    """:func:`_k_view` expanded over the ``g`` query heads of the kv head: ``[n, g, width, C]``
    (stride 0)."""
    kv = _k_view(x, c)
    return kv[:, None].expand(kv.shape[0], g, *kv.shape[1:])


def forward(t, diag: Diagonal, b: int, scale: float) -> None:
    """Every call of example ``b`` for one unit (``t``: ``blocks._Fwd``): rows no call touches
    see no key (0, lse -inf); a call's results are written or merged into the rows' running
    ``(o, lse)`` by log-sum-exp (``lse`` in natural log until the end)."""
    nu, g = t.q.shape[0], t.q.shape[1] // diag.tq
    for u in range(nu):
        t.out[u].zero_()
        lse = t.lse2[u]
        lse.fill_(float("-inf"))
        for c in diag.calls[b]:
            o_p, l_p = FLASH(_q_view(t.q[u], c, g), _kv(t.k[u], c, g), _kv(t.v[u], c, g), 0.0,
                             c.causal, scale=scale)
            o_t, l_t = _q_view(t.out[u], c, g), _lse_view(lse, c, g)
            if not c.first:  # rows an earlier call saw: the union of both calls' keys
                o_p, l_p = merge_softmax(o_t, l_t, o_p, l_p)
            o_t.copy_(o_p)
            l_t.copy_(l_p)
        lse.mul_(1.0 / _LN2)


def backward(t, diag: Diagonal, b: int) -> None:
    """Every call's contributions to one unit's dq, dk, dv (``t``: ``blocks._Bwd``, no lse
    gradient; ``dq``, ``dk``, ``dv`` zeroed), each from the merged output and lse."""
    nu, g = t.q.shape[0], t.q.shape[1] // diag.tq
    for u in range(nu):
        lse_all = t.shift[u, :, 0] * _LN2
        for c in diag.grads[b]:
            dq, dk, dv = FLASH_BACKWARD(_q_view(t.do[u], c, g), _q_view(t.q[u], c, g),
                                        _kv(t.k[u], c, g), _kv(t.v[u], c, g),
                                        _q_view(t.o[u], c, g), _lse_view(lse_all, c, g), 0.0,
                                        c.causal, scale=t.scale)
            _q_view(t.dq[u], c, g).add_(dq)
            _k_view(t.dk[u], c).add_(dk.sum(dim=1) if g > 1 else dk[:, 0])
            _k_view(t.dv[u], c).add_(dv.sum(dim=1) if g > 1 else dv[:, 0])
