"""Streaming executors: push frames, get the outputs that are final, with their latency.

::

    s = SoftmaxStream(Chunked(16, lookahead=1))        # one mixer call
    for q, k, v in frames:                             # [B, n, H, D] each, any n >= 1
        out = s.push(q, k, v)                          # [B, m, H, Dv], m >= 0
    rest = s.flush()
    s.latency_stats(frame_seconds=0.01)                # frames waited; compute and measured s

    g = LinearStream(Causal())                         # per-frame inputs: named arguments
    out = g.push(q, k, v, log_gate=lg)                 # lg: [B, n, H], checked with the frames
    d = DeltaStream(Chunked(16, lookahead=1))          # the delta rule: beta per frame too
    out = d.push(q, k, v, beta=b, log_gate=lg)         # b: [B, n, H] in (0, 2]

    m = ModelStream(layers)                            # layers implement StreamableLayer
    y = m.push(x)                                      # x: [B, n, C] -> [B, m, C']
    m = ModelStream(model)                             # a whole causalmix.nn.SequenceModel
    logits = m.push(tokens)                            # tokens: [B, n] -> [B, m, vocab]

Concatenated outputs equal the parallel run over the whole sequence (positions are absolute,
counted from the first pushed frame).

* **When an output leaves**: output ``i`` is final once frame ``ready_at[i] = max(i,
  horizon(i))`` has arrived (``horizon``: the last key position the spec lets ``i`` see; made
  non-decreasing since outputs leave in order). Its latency is ``ready_at[i] - i`` frames; at
  ``flush()`` it is clipped to the last frame. Through a stack, ``ready_at`` composes layer by
  layer (``r_1(r_2(...r_L(i)))``): ``L * right`` for ``Window(left, right)``, the chunk end
  ``L * lookahead`` chunks ahead for ``Chunked``.
* **Unbounded lookahead** (``Full()``, ``Segments`` ids not in runs, ``... | Full()``): building
  the stream raises ``ValueError``. ``Prefix(n)`` is bounded: its first ``n`` outputs wait for
  frame ``n - 1``, then it runs causally.
* **Memory**: the softmax KV cache evicts keys older than the spec's ``lookback`` (bounded for
  ``Window`` and ``... & Window``); the linear and delta streams hold one state plus the
  in-flight frames.
* **Decode**: ``step()`` pushes frames whose outputs must all be final at once (generation:
  ``Causal``, ``Window(left)``, ``Prefix`` with the prefix as the first step, ``Chunked`` a chunk
  per step) and raises otherwise.
* **Per-frame inputs** beyond q, k, v (a gated stream's ``log_gate``) are keyword arguments of
  ``push`` / ``step``, checked once into one :class:`Frames` object (a family's subclass, e.g.
  :class:`GateFrames`) that the skeleton hands to the family's hooks; a layer of a
  :class:`ModelStream` returns them by name from ``stream_qkv``.
* **Measured latency**: every push is timed; :meth:`MixerStream.latency_stats` reports per
  output the algorithmic wait (frames) and, given the frame duration, wait + compute (the wall
  time of the push that released the output) as p50 / p95 / max.

A call that raises (bad frames, positions the spec does not define, a decode step whose
outputs are not final) leaves the stream exactly as it was; wrong types raise
``ArgumentTypeError``; an empty batch (``B = 0``) streams right-shaped empty outputs. An
explicit ``impl`` that cannot serve the stream's calls raises at construction. ``repr`` shows
the spec, the options and the frames in / out / pending.

Latency maths: :class:`LatencyStats` (``LatencyStats.of(latency, compute, frame_seconds=)``),
:func:`compounded_latency` (a stack of specs, from their masks), :func:`expected_latency` (the
differentiable mean-field latency of per-frame gates). ``latency_stats`` (a dict) is deprecated.

Streams are for inference: they run under ``torch.no_grad()``.
"""

from causalmix.stream._common import Frames, MixerStream
from causalmix.stream.delta import DeltaFrames, DeltaStream
from causalmix.stream.latency import (
    LatencyStats,
    Spread,
    compounded_latency,
    expected_latency,
    latency_stats,
)
from causalmix.stream.linear import GateFrames, LinearStream
from causalmix.stream.model import (
    STREAMABLE_MIXERS,
    ModelStream,
    StreamableLayer,
    StreamableModel,
    mixer_stream,
)
from causalmix.stream.softmax import SoftmaxStream

__all__ = [
    "STREAMABLE_MIXERS",
    "DeltaFrames",
    "DeltaStream",
    "Frames",
    "GateFrames",
    "LatencyStats",
    "LinearStream",
    "MixerStream",
    "ModelStream",
    "SoftmaxStream",
    "Spread",
    "StreamableLayer",
    "StreamableModel",
    "compounded_latency",
    "expected_latency",
    "latency_stats",
    "mixer_stream",
]
