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
import time
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch

from causalmix.checks import ArgumentTypeError, check_int
from causalmix.visibility import Visibility

__all__ = ["CLOCK", "LatencyStats", "Spread", "compounded_latency", "expected_latency",
           "latency_stats"]


#: The clock streams time their pushes with (seconds, monotonic); tests may replace it.
CLOCK = time.perf_counter


class Spread(NamedTuple):
    """Median, 95th percentile and maximum of per-output values."""

    p50: float
    p95: float
    max: float

    @staticmethod
    def of(values: torch.Tensor) -> Spread:
        """``values: [N]``, ``N >= 1`` -> their spread."""
        f = values.double()
        return Spread(float(torch.quantile(f, 0.5)), float(torch.quantile(f, 0.95)),
                      float(f.max()))


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Per-output latency of a stream: the algorithmic wait in frames and, for a stream that
    timed its pushes, the measured latency in seconds.

    * ``count, mean, p50, p90, max``: the algorithmic latency, frames each output waited beyond
      its own for the frames its spec needs (``ready_at[i] - i``; exact, no timing).
    * ``compute``: seconds, :class:`Spread` over outputs of the wall time of the push (or flush)
      that released each output; ``None`` when no times were given.
    * ``measured``: seconds, ``algorithmic * frame_seconds + compute`` per output (the wait for
      later frames at the input's frame rate, then the push that computes it), given
      ``frame_seconds``; else ``None``. Frames that arrive together in one push also wait for
      that push to fill (up to ``push - 1`` frames): the caller's choice of push size, not
      counted here.

    ``LatencyStats.of(latency, compute, frame_seconds=)`` builds it from per-output values; a
    stream's ``latency_stats(frame_seconds=)`` from its own logs. For ``count == 0``: NaN
    mean / percentiles, ``max`` 0, no spreads.
    """

    count: int
    mean: float
    p50: float
    p90: float
    max: int
    compute: Spread | None = None
    measured: Spread | None = None

    @staticmethod
    def of(latency: torch.Tensor, compute: torch.Tensor | None = None, *,
           frame_seconds: float | None = None) -> LatencyStats:
        """``latency: [N]`` int frames; ``compute: [N]`` float seconds per output or ``None``;
        ``frame_seconds``: the duration of one frame (needs ``compute``)."""
        fn = "LatencyStats.of"
        if not isinstance(latency, torch.Tensor) or latency.dim() != 1 \
                or latency.dtype.is_floating_point or latency.dtype == torch.bool:
            raise ArgumentTypeError(f"{fn}: latency must be a [N] integer tensor, got "
                                    f"{_what(latency)}")
        if compute is not None and (not isinstance(compute, torch.Tensor)
                                    or compute.shape != latency.shape):
            raise ArgumentTypeError(f"{fn}: compute must be a [N] = {list(latency.shape)} "
                                    f"tensor of seconds or None, got {_what(compute)}")
        if frame_seconds is not None:
            if compute is None:
                raise ValueError(f"{fn}: frame_seconds needs compute (the measured latency is "
                                 f"algorithmic * frame_seconds + compute)")
            frame_seconds = _check_seconds(fn, frame_seconds)
        if latency.numel() == 0:
            return LatencyStats(0, math.nan, math.nan, math.nan, 0)
        f = latency.double()
        return LatencyStats(
            count=int(latency.numel()),
            mean=float(f.mean()),
            p50=float(torch.quantile(f, 0.5)),
            p90=float(torch.quantile(f, 0.9)),
            max=int(latency.max()),
            compute=None if compute is None else Spread.of(compute),
            measured=None if frame_seconds is None else Spread.of(
                f * frame_seconds + compute.double()),
        )


def _what(x) -> str:
    return f"shape {list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_seconds(fn: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{fn}: frame_seconds must be a float (seconds per frame) or "
                                f"None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: frame_seconds must be finite and > 0, got {value!r}")
    return float(value)


def latency_stats(latency: torch.Tensor) -> dict:
    """Deprecated: ``LatencyStats.of(latency.reshape(-1))`` is the one way to summarise
    latencies. ``{"mean", "p90", "max"}`` of per-output latencies (any shape, frames)."""
    warnings.warn("causalmix.stream.latency_stats is deprecated; use "
                  "causalmix.stream.LatencyStats.of(latency)", DeprecationWarning, stacklevel=2)
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
    if not isinstance(visibilities, Iterable) or isinstance(visibilities, Visibility):
        raise ArgumentTypeError(f"compounded_latency: visibilities must be a sequence of "
                                f"visibility specs (one per layer), got "
                                f"{type(visibilities).__name__}")
    visibilities = tuple(visibilities)
    if not visibilities:
        raise ValueError("compounded_latency: visibilities must hold at least one spec")
    bad = [type(v).__name__ for v in visibilities if not isinstance(v, Visibility)]
    if bad:
        raise ArgumentTypeError(f"compounded_latency: visibilities must be visibility specs, got "
                                f"{bad}")
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
