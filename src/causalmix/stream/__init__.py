"""Streaming executors: push frames, get the outputs that are final, with their latency.

::

    s = SoftmaxStream(Chunked(16, lookahead=1))        # one mixer call
    for q, k, v in frames:                             # [B, n, H, D] each, any n >= 1
        out = s.push(q, k, v)                          # [B, m, H, Dv], m >= 0
    rest = s.flush()
    s.latency_stats()                                  # mean / p50 / p90 / max frames waited

    m = ModelStream(layers)                            # layers implement StreamableLayer
    y = m.push(x)                                      # x: [B, n, C] -> [B, m, C']

Concatenated outputs equal the parallel run over the whole sequence. Specs whose lookahead is
unbounded (``Full()``) raise ``ValueError`` when a stream is built for them; ``Prefix(n)``
waits for the whole prefix, then runs causally.
"""

from causalmix.stream._common import LatencyStats, MixerStream
from causalmix.stream.linear import LinearStream
from causalmix.stream.model import ModelStream, StreamableLayer, mixer_stream
from causalmix.stream.softmax import SoftmaxStream

__all__ = [
    "LatencyStats",
    "LinearStream",
    "MixerStream",
    "ModelStream",
    "SoftmaxStream",
    "StreamableLayer",
    "mixer_stream",
]
