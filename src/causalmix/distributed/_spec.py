"""Visibility between two spans of positions, phrased for the single-process ops.

The ops take *contiguous* absolute positions (``q_offset + [0, Tq)``). A span with stride 1 maps
onto them directly. A strided span (the striped layout: positions ``r + W * t``) does not, so
:class:`Strided` re-indexes the spec: local query ``i`` sits at ``q_start + q_stride * i`` and local
key ``j`` at ``k_start + k_stride * j``. Where the wrapped spec sees one range of keys per query,
so does the wrapper (a range of absolute keys holds a range of every arithmetic progression), so
the block map stays analytic and exact.
"""

from __future__ import annotations

from collections.abc import Iterable

from causalmix.distributed.layout import Span
from causalmix.visibility import Strided, Visibility


def pair_spec(spec: Visibility, qr: Span, kr: Span) -> tuple[Visibility, int, int]:
    """``(spec', q_offset, k_offset)`` such that the op called on the two spans' local slices with
    them computes exactly ``spec`` between the spans' absolute positions."""
    if qr.stride == 1 and kr.stride == 1:
        return spec, qr.start, kr.start
    return Strided(spec, qr.start, qr.stride, kr.start, kr.stride), 0, 0


def pair_count(spec: Visibility, qr: Span, kr: Span) -> int:
    """Visible (query, key) pairs between two spans, summed over the spec's batch."""
    ps, qo, ko = pair_spec(spec, qr, kr)
    return int(ps.count_visible(qr.length, kr.length, q_offset=qo, k_offset=ko).sum())


def spans_count(spec: Visibility, q_spans: Iterable[Span], k_spans: Iterable[Span]) -> int:
    return sum(pair_count(spec, a, b) for a in q_spans for b in k_spans)


