"""Visibility between two runs of positions, phrased for the single-process ops.

The ops take *contiguous* absolute positions (``q_offset + [0, Tq)``). A run with stride 1 maps
onto them directly. A strided run (the striped layout: positions ``r + W * t``) does not, so
:class:`Strided` re-indexes the spec: local query ``i`` sits at ``q_start + q_stride * i`` and local
key ``j`` at ``k_start + k_stride * j``. Where the wrapped spec sees one range of keys per query,
so does the wrapper (a range of absolute keys holds a range of every arithmetic progression), so
the block map stays analytic and exact.
"""

from __future__ import annotations

from collections.abc import Iterable

from causalmix.distributed.layout import Run
from causalmix.visibility import Strided, Visibility


def pair_spec(spec: Visibility, qr: Run, kr: Run) -> tuple[Visibility, int, int]:
    """``(spec', q_offset, k_offset)`` such that the op called on the two runs' local slices with
    them computes exactly ``spec`` between the runs' absolute positions."""
    if qr.stride == 1 and kr.stride == 1:
        return spec, qr.start, kr.start
    return Strided(spec, qr.start, qr.stride, kr.start, kr.stride), 0, 0


def pair_count(spec: Visibility, qr: Run, kr: Run) -> int:
    """Visible (query, key) pairs between two runs, summed over the spec's batch."""
    ps, qo, ko = pair_spec(spec, qr, kr)
    return int(ps.count_visible(qr.length, kr.length, q_offset=qo, k_offset=ko).sum())


def runs_count(spec: Visibility, q_runs: Iterable[Run], k_runs: Iterable[Run]) -> int:
    return sum(pair_count(spec, a, b) for a in q_runs for b in k_runs)


