"""Merging partial softmax results by log-sum-exp: the one helper for every caller that splits
the keys of a query into disjoint parts (ring attention's shards, an adaptive layer's band of
lookahead keys on top of its causal output)."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["MergedSoftmax", "merge_softmax"]


class MergedSoftmax(NamedTuple):
    output: torch.Tensor  # [B, T, H, Dv]
    lse: torch.Tensor  # [B, T, H]


def merge_softmax(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> MergedSoftmax:
    """Softmax attention over the union of two disjoint key sets, from each set's result.

    Args:
        out_a: ``[B, T, H, Dv]`` output of the first key set, ``lse_a: [B, T, H]`` its
            log-sum-exp of the scores (``-inf`` where a query sees no key of the set, whose
            output must then be 0 or anything finite).
        out_b, lse_b: the same for the second key set.

    Returns:
        ``MergedSoftmax(output [B, T, H, Dv], lse [B, T, H])``:
        ``lse = logaddexp(lse_a, lse_b)``, ``output = (e^lse_a out_a + e^lse_b out_b) / e^lse``,
        computed against the larger lse so nothing overflows. A query that sees no key in either
        set gets output 0 and lse ``-inf``, with zero (not NaN) gradients; NaN or ``+inf`` in an
        lse gives NaN. Differentiable in all four inputs; computed in their (promoted) dtype.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # both sets empty: weights 0
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = wa + wb
    empty = den == 0  # (NaN is not 0: it flows on)
    den_safe = torch.where(empty, torch.ones_like(den), den)
    out = (out_a * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / den_safe.unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(den_safe))
    return MergedSoftmax(out, lse)
