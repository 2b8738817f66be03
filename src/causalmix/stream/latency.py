"""Latency maths: summaries of per-output latencies, and the latency of a stack of layers
(exact from the specs' masks, or the differentiable mean-field expectation under per-frame
gate probabilities).

``r^0_t = t``; ``r^l_t = max over the frames j that t sees at layer l of r^{l-1}_j``; the
latency of output ``t`` is ``r^L_t - t`` frames (what a stream reports, see
:class:`causalmix.stream.ModelStream`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from causalmix.checks import check_int
from causalmix.visibility import Visibility

__all__ = ["LatencyStats", "compounded_latency", "expected_latency", "latency_stats"]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of per-output algorithmic latencies (frames waited beyond the output's own)."""

    count: int
    mean: float
    p50: float
    p90: float
    max: int

    @staticmethod
    def of(latency: torch.Tensor) -> LatencyStats:
        """``latency: [N]`` int -> summary (all zeros / NaN mean for N = 0)."""
        if latency.numel() == 0:
            return LatencyStats(0, math.nan, math.nan, math.nan, 0)
        f = latency.double()
        return LatencyStats(
            count=int(latency.numel()),
            mean=float(f.mean()),
            p50=float(torch.quantile(f, 0.5)),
            p90=float(torch.quantile(f, 0.9)),
            max=int(latency.max()),
        )


def latency_stats(latency: torch.Tensor) -> dict:
    """``{"mean", "p90", "max"}`` of per-output latencies (any shape, frames)."""
    s = LatencyStats.of(latency.reshape(-1).to(torch.int64))
    return {"mean": s.mean, "p90": s.p90, "max": s.max}


def compounded_latency(visibilities: Iterable[Visibility], seq_len: int) -> torch.Tensor:
    """Latency of each output of a stack of layers over a sequence of ``seq_len`` frames.

    ``visibilities``: one spec per layer, first layer first. ``r^0_t = t``;
    ``r^l_t = max_{j visible from t at layer l} r^{l-1}_j``; returns ``r^L_t - t`` as int64
    ``[B', seq_len]`` (frames beyond the end do not exist, so ``Full()`` gives
    ``seq_len - 1 - t``). Uses each spec's dense mask: O(L * seq_len^2), the oracle.
    """
    check_int("seq_len", seq_len, 1)
    visibilities = tuple(visibilities)
    if not visibilities or not all(isinstance(v, Visibility) for v in visibilities):
        raise ValueError("visibilities must be a non-empty sequence of visibility specs")
    t = torch.arange(seq_len)
    r = t[None, :]
    for vis in visibilities:
        m = vis.mask(seq_len, seq_len)  # [B', T, T]
        r = torch.where(m, r[:, None, :], torch.full_like(r[:, None, :], -1)).amax(-1)
    return r - t


def _cummax_at(r: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``r: [B, T]`` float -> ``[B, T, C]``: ``max_{j <= min(t + offsets[c], T - 1)} r_j``."""
    t = r.shape[1]
    pm = torch.cummax(r, dim=1).values  # differentiable (gradient to the argmax)
    idx = (torch.arange(t, device=r.device)[:, None] + offsets[None, :]).clamp(max=t - 1)
    return pm[:, idx]  # [B, T, C]


def expected_latency(probs: Iterable[torch.Tensor | None],
                     choices: Iterable[torch.Tensor | None], seq_len: int,
                     batch: int = 1) -> torch.Tensor:
    """Mean-field expected latency per output, differentiable in the gate probabilities.

    ``probs``: one entry per layer, ``[B, T, C_l]`` gate probabilities or ``None`` for a causal
    layer; ``choices``: per layer, the ``[C_l]`` int64 lookaheads (``None`` for causal layers).
    ``R^0_t = t``, ``R^l_t = sum_c p^l_{t,c} max_{j <= t + choice_c} R^{l-1}_j`` (clipped to
    the sequence). Returns ``R^L_t - t``: ``[B, T]`` float. Equals :func:`compounded_latency` of
    the ``AdaptiveLookahead`` specs when every ``p`` is one-hot.
    """
    probs, choices = list(probs), list(choices)
    dev = next((p.device for p in probs if p is not None), torch.device("cpu"))
    b = next((p.shape[0] for p in probs if p is not None), batch)
    t = torch.arange(seq_len, device=dev, dtype=torch.float32)
    r = t[None, :].expand(b, seq_len)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    for p, ch in zip(probs, choices, strict=True):
        if p is None:
            r = _cummax_at(r, zero)[..., 0]
        else:
            r = (p * _cummax_at(r, ch.to(dev))).sum(-1)
    return r - t
