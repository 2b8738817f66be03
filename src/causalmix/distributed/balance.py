"""Work balance: how many visible (query, key) pairs each rank computes under a layout."""

from __future__ import annotations

import dataclasses

from causalmix.checks import ArgumentTypeError
from causalmix.distributed._spec import spans_count
from causalmix.distributed.layout import Span, check_layout, spans
from causalmix.visibility import Visibility


@dataclasses.dataclass(frozen=True)
class BalanceReport:
    """Visible pairs per rank (``pairs[r]``: rank ``r``'s queries against every key, summed over
    the spec's batch) and the imbalance ``max_over_mean`` (1.0 = perfect; the ring runs at the
    pace of the busiest rank)."""

    visibility: Visibility
    layout: str
    world: int
    seq_len: int
    pairs: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.pairs)

    @property
    def max_pairs(self) -> int:
        return max(self.pairs)

    @property
    def mean_pairs(self) -> float:
        return self.total / self.world

    @property
    def max_over_mean(self) -> float:
        return self.max_pairs / self.mean_pairs if self.total else 1.0


def work_balance(visibility: Visibility, layout: str, world: int, seq_len: int) -> BalanceReport:
    """Exact visible pairs per rank for ``visibility`` on ``seq_len`` positions split over
    ``world`` ranks by ``layout``, counted by the spec over each rank's actual query positions
    against all keys ``[0, seq_len)``."""
    if not isinstance(visibility, Visibility):
        raise ArgumentTypeError(f"work_balance: visibility must be a causalmix.visibility spec, "
                                f"got {type(visibility).__name__}")
    check_layout(layout, seq_len, world)
    visibility.check_positions(seq_len, seq_len, 0, 0)
    everything = [Span(0, 1, seq_len, 0)] if seq_len else []
    pairs = tuple(spans_count(visibility, spans(layout, seq_len, r, world), everything)
                  for r in range(world))
    return BalanceReport(visibility, layout, world, seq_len, pairs)
