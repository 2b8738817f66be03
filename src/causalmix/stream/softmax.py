"""Streaming softmax attention: a KV cache at absolute positions, evicted by the spec's lookback."""

from __future__ import annotations

import math

import torch

from causalmix.checks import check_scale
from causalmix.ops.softmax import available_impls, softmax_attention
from causalmix.ops.softmax.api import REGISTRY
from causalmix.stream._buffers import FrameBuffer
from causalmix.stream._common import MixerStream
from causalmix.visibility import And, Causal, Chunked, Full, Or, Visibility, Window


def period(vis: Visibility) -> int | None:
    """Smallest ``P`` with ``visible(i + P, j + P) == visible(i, j)`` for all ``i, j`` that this
    module can vouch for: 1 for ``Causal``/``Window``/``Full``, ``size`` for ``Chunked``, the lcm
    through ``&``/``|``; ``None`` for position-anchored specs (``Prefix``, ``Segments``)."""
    if isinstance(vis, (Causal, Window, Full)):
        return 1
    if isinstance(vis, Chunked):
        return vis.size
    if isinstance(vis, (And, Or)):
        pa, pb = period(vis.a), period(vis.b)
        return None if pa is None or pb is None else math.lcm(pa, pb)
    return None


def _check_impl(impl: str, visibility: Visibility) -> str:
    """``impl`` if it can serve every call the stream makes, else ``ValueError`` (at
    construction, not mid-stream). The calls put queries ``[p0, p0 + m)`` after cached keys
    ``[k0, p0 + m + lookahead)``; the probe asks each implementation about such a call (on CPU,
    without gradients: streams run under ``no_grad``)."""
    REGISTRY.check_name("SoftmaxStream", impl)
    if impl == "auto":
        return impl
    x = torch.zeros(1, 2, 1, 1)
    k = torch.zeros(1, 8, 1, 1)
    reasons = available_impls(x, k, k, visibility, q_offset=5, k_offset=0)
    if reasons[impl] is not None:
        ok = ["auto", *(name for name, why in reasons.items() if why is None)]
        raise ValueError(
            f"SoftmaxStream: impl={impl!r} cannot serve the calls of a stream under "
            f"{visibility!r} (queries after cached keys, e.g. queries [5, 7) against keys "
            f"[0, 8)): {reasons[impl]}; implementations that can: {ok}"
        )
    return impl


class SoftmaxStream(MixerStream):
    """Stream ``softmax_attention(q, k, v, visibility)`` frame by frame.

    Keys and values go to a cache holding absolute positions ``[cache_start, frames_in)``. Each
    push computes the outputs that became final with one ``softmax_attention`` call of those
    queries against the cache (``q_offset``/``k_offset`` absolute), so every query sees exactly
    the keys the parallel call gives it. When the spec's :attr:`~Visibility.lookback_frames` is
    bounded (``Window(left, right)``, ``Chunked(...) & Window(...)``), keys older than
    ``first pending query - lookback`` can never be seen again and are evicted: the cache holds
    at most ``lookback + lookahead + push size`` frames whatever the stream length. Otherwise
    (``Causal``, ``Prefix``, ``Chunked``) it grows with the stream, as attention must.

    When the spec repeats with a period ``P`` (:func:`period`: ``Window``, ``Causal``,
    ``Chunked``, their ``&``/``|``), each call is made at positions shifted down by a multiple of
    ``P`` (the same visibility pattern, so the same numbers): steady pushes then present the op
    with the same geometry every time and its block plans are reused instead of rebuilt.

    Which outputs are final: see :class:`~causalmix.stream.MixerStream`. ``Prefix(n)`` waits for
    the whole prefix (its first ``n`` outputs leave together once frame ``n - 1`` arrived), then
    runs causally. Specs with unbounded lookahead (``Full()``, ``Segments`` without a causal
    bound) raise ``ValueError`` at construction.

    Args:
        visibility: the spec, as for the parallel call.
        scale: score scale, default ``1 / sqrt(D)``.
        impl: passed to ``softmax_attention`` (``"auto"``, ``"blocks"``, ``"reference"``, ...);
            an explicit impl that cannot serve the stream's calls raises ``ValueError`` here.

    Shapes: ``push(q [B, n, H, D], k [B, n, Hkv, D], v [B, n, Hkv, Dv]) -> [B, m, H, Dv]``.
    """

    mixer = "softmax"

    def __init__(self, visibility: Visibility, *, scale: float | None = None, impl: str = "auto"):
        super().__init__(visibility)
        self.scale = check_scale("SoftmaxStream", scale)
        self.impl = _check_impl(impl, visibility)
        self._period = period(visibility)
        self._k = FrameBuffer()
        self._v = FrameBuffer()

    @property
    def cache_start(self) -> int:
        """Absolute position of the oldest cached key."""
        return self._k.start

    @property
    def cache_len(self) -> int:
        """Number of cached key/value frames."""
        return self._k.length

    def cache_nbytes(self) -> int:
        """Bytes held by the key/value cache and the pending-query buffer (allocated storage)."""
        return self._k.nbytes() + self._v.nbytes() + self._pending_q.nbytes()

    def _accept(self, frames):
        self._k.append(frames.k)
        self._v.append(frames.v)

    def _compute(self, q, p0, k_end):
        k0 = self._k.start
        shift = 0 if self._period is None else k0 - k0 % self._period
        return softmax_attention(
            q, self._k.view(k0, k_end), self._v.view(k0, k_end), self.visibility,
            q_offset=p0 - shift, k_offset=k0 - shift, scale=self.scale, impl=self.impl,
        )

    def _advance(self):
        lookback = self.visibility.lookback_frames
        if lookback is None:
            return
        # every future query sits at >= frames_out and sees keys >= its position - lookback
        keep = max(0, self.frames_out - lookback)
        self._k.drop_before(keep)
        self._v.drop_before(keep)

