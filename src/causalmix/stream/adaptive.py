"""Streaming a stack of layers whose frames choose their own lookahead (the adaptive layers of
``causalmix.nn.adaptive``), with outputs leaving as soon as they are final, in any order.

Layer ``l`` at frame ``t`` chooses a lookahead ``a_t`` from its own input at ``t`` (pointwise in
time), so its visibility is ``AdaptiveLookahead(a)``: ``j <= t + a_t``. Because ``a`` is only
known as frames arrive, and a frame that chose no lookahead should not wait behind an earlier one
that did, this stream does not emit in order as :class:`~causalmix.stream.ModelStream` does:
each sequence of the batch is scheduled on its own, and at each layer the output at ``t`` is
computed once that layer's inputs ``[0, t + a_t]`` exist (clipped to the sequence at flush); it
then becomes the next layer's input at ``t``. The mixing is one call of the public op per group of
consecutive outputs (``softmax_attention`` under ``AdaptiveLookahead``, or the
``linear_attention`` reference, which serves any spec), with the queries' absolute positions.

An output's latency is ``r^L_t - t`` (see :mod:`causalmix.stream.latency`), tracked through the
layers as the last input frame it waited for; pushed one frame at a time, each output leaves in
the push of frame ``r^L_t``. Memory grows with the stream (every key is kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from causalmix.checks import ArgumentTypeError
from causalmix.ops.linear import linear_attention
from causalmix.ops.softmax import softmax_attention
from causalmix.stream._buffers import FrameBuffer
from causalmix.stream.model import StreamableModel, layer_frames, model_and_layers
from causalmix.visibility import AdaptiveLookahead, Causal

__all__ = ["AdaptiveStream", "AdaptiveStreamableLayer", "Emitted"]


class Emitted(NamedTuple):
    """The outputs one sequence released in one call, in any order."""

    positions: torch.Tensor  # [m] int64 absolute positions of the outputs
    output: torch.Tensor  # [m, C_out]
    latency: torch.Tensor  # [m] int64: frames waited beyond the output's own (r^L_t - t)


@runtime_checkable
class AdaptiveStreamableLayer(Protocol):
    """A :class:`~causalmix.stream.StreamableLayer` (``mixer``, ``mixer_kwargs``,
    ``stream_qkv``, ``stream_out``) whose visibility is chosen per frame:
    ``stream_lookahead(x [B, n, C], positions [n]) -> [B, n]`` int64 lookaheads ``>= 0``,
    pointwise in time (0 everywhere: a causal layer)."""

    mixer: str

    def mixer_kwargs(self) -> dict: ...

    def stream_qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple: ...

    def stream_out(self, x: torch.Tensor, mixed: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor: ...

    def stream_lookahead(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class Arrivals(NamedTuple):
    """Layer inputs of one sequence arriving together (any order)."""

    positions: list[int]
    x: torch.Tensor  # [1, m, C]
    ready: list[int]  # per position: the last input frame this input waited for


def _consecutive(positions: list[int]) -> list[list[int]]:
    """Sorted positions cut into groups of consecutive ones."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


class _LayerStream:
    """One adaptive layer of one sequence: its keys (contiguous from position 0; those that
    arrive ahead wait in ``early``), and the queries whose output is not computed yet."""

    def __init__(self, layer, index: int):
        for attr in ("mixer", "mixer_kwargs", "stream_qkv", "stream_out", "stream_lookahead"):
            if not hasattr(layer, attr):
                raise ArgumentTypeError(f"AdaptiveStream: layers[{index}] "
                                        f"({type(layer).__name__}) is "
                                f"not an AdaptiveStreamableLayer: it has no {attr!r}")
        if layer.mixer not in ("softmax", "linear"):
            raise ValueError(f"AdaptiveStream: layers[{index}].mixer must be 'softmax' or "
                             f"'linear', got {layer.mixer!r}")
        self.layer, self.index = layer, index
        self.k, self.v = FrameBuffer(), FrameBuffer()  # keys at [0, contig)
        self.early: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.x: dict[int, torch.Tensor] = {}  # [C] inputs whose output is not computed yet
        self.q: dict[int, torch.Tensor] = {}  # [H, D]
        self.hi: dict[int, int] = {}  # last key position each pending query sees: t + a_t
        self.ready: dict[int, int] = {}  # last input frame each key's input waited for
        self.prefix_ready: list[int] = []  # running max of ready over [0, contig)

    def add(self, arr: Arrivals) -> None:
        pos = torch.tensor(arr.positions, dtype=torch.int64, device=arr.x.device)
        inputs = layer_frames(f"AdaptiveStream: layers[{self.index}]",
                              self.layer.stream_qkv(arr.x, pos), ("q", "k", "v"))
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        a = self.layer.stream_lookahead(arr.x, pos)[0].tolist()
        for i, p in enumerate(arr.positions):
            self.x[p], self.q[p], self.hi[p] = arr.x[0, i], q[0, i], p + int(a[i])
            self.early[p], self.ready[p] = (k[0, i], v[0, i]), arr.ready[i]
        arrived = []
        while self.k.end + len(arrived) in self.early:
            arrived.append(self.early.pop(self.k.end + len(arrived)))
        if arrived:
            for p in range(self.k.end, self.k.end + len(arrived)):
                prev = self.prefix_ready[-1] if self.prefix_ready else -1
                self.prefix_ready.append(max(prev, self.ready.pop(p)))
            self.k.append(torch.stack([kk for kk, _ in arrived])[None])
            self.v.append(torch.stack([vv for _, vv in arrived])[None])

    def take(self, end: int | None) -> Arrivals | None:
        """The outputs whose keys ``[0, t + a_t]`` all exist (clipped to the sequence's ``end``
        at flush), as the next layer's inputs."""
        def last_key(p: int) -> int:
            return self.hi[p] if end is None else min(self.hi[p], end - 1)

        done = sorted(p for p in self.q if last_key(p) < self.k.end)
        if not done:
            return None
        mixed = torch.cat([self._mix(group, [last_key(p) for p in group])
                           for group in _consecutive(done)], dim=1)
        pos = torch.tensor(done, dtype=torch.int64, device=mixed.device)
        x = torch.stack([self.x.pop(p) for p in done])[None]
        y = self.layer.stream_out(x, mixed, pos)
        ready = [self.prefix_ready[last_key(p)] for p in done]
        for p in done:
            del self.q[p], self.hi[p]
        return Arrivals(done, y, ready)

    def _mix(self, group: list[int], last: list[int]) -> torch.Tensor:
        """Mixer outputs ``[1, m, H, Dv]`` of the consecutive positions ``group``, whose last
        visible keys are ``last``: one call of the public op at absolute positions."""
        p0, p1, k_end = group[0], group[-1] + 1, max(last) + 1
        a = torch.zeros(max(p1, k_end), dtype=torch.int64)
        a[p0:p1] = torch.tensor(last) - torch.arange(p0, p1)
        spec = AdaptiveLookahead(a)
        q = torch.stack([self.q[p] for p in group])[None]
        k, v = self.k.view(0, k_end), self.v.view(0, k_end)
        kwargs = self.layer.mixer_kwargs()
        if self.layer.mixer == "softmax":
            return softmax_attention(q, k, v, spec, q_offset=p0, **kwargs)
        return linear_attention(q, k, v, spec, q_offset=p0, impl="reference", **kwargs)


class _Sequence:
    """One sequence of the batch, scheduled on its own (its lookaheads differ)."""

    def __init__(self, layers):
        self.layers = [_LayerStream(layer, i) for i, layer in enumerate(layers)]
        self.frames_in = 0
        self.latency: list[int] = []

    def step(self, x: torch.Tensor | None, end: int | None) -> Arrivals | None:
        """``x: [1, n, C]`` the next frames (``None`` at flush, with ``end`` set)."""
        batch = None
        if x is not None:
            new = list(range(self.frames_in, self.frames_in + x.shape[1]))
            self.frames_in += x.shape[1]
            batch = Arrivals(new, x, new)
        for layer in self.layers:
            if batch is not None:
                layer.add(batch)
            batch = layer.take(end)
        if batch is not None:
            self.latency.extend(r - p for r, p in zip(batch.ready, batch.positions, strict=True))
        return batch


class AdaptiveStream:
    """Stream a stack of :class:`AdaptiveStreamableLayer` s, or a whole model (a
    :class:`~causalmix.stream.StreamableModel` whose ``blocks`` are such layers).

    ``push(x)``: ``x: [B, n, C]`` (a model: its inputs, ``[B, n]`` token ids or
    ``[B, n, F]`` features), ``n >= 1`` -> a list of ``B`` :class:`Emitted`, the outputs of
    each sequence that became final (``[m, C']``; a model: after its output map), in any order,
    with their positions and latencies. ``flush()`` ends the stream and returns the rest.
    Concatenated by position, the outputs equal the parallel run. A call that raises leaves
    the stream as it was. Inference only (``torch.no_grad()``).
    """

    def __init__(self, layers: Iterable[AdaptiveStreamableLayer] | StreamableModel):
        self.model, self._layers = model_and_layers("AdaptiveStream", layers, "adaptive layer")
        for i, layer in enumerate(self._layers):
            _LayerStream(layer, i)  # checks the protocol now, not at the first push
        self.rows: list[_Sequence] | None = None
        self._shape: tuple | None = None  # (B, C, dtype, device) of the first push
        self.frames_in = 0
        self.closed = False

    def push(self, inputs: torch.Tensor) -> list[Emitted]:
        """The next ``n >= 1`` frames of every sequence (see the class docstring)."""
        name = f"{type(self).__name__}.push"
        if self.closed:
            raise ValueError(f"{name}: the stream was flushed (closed)")
        with torch.no_grad():
            x = inputs if self.model is None else self.model.stream_in(inputs)
            self._check(name, x)
            if self.rows is None:
                self.rows = [_Sequence(self._layers) for _ in range(x.shape[0])]
            self._shape = (x.shape[0], x.shape[2], x.dtype, x.device)
            self.frames_in += x.shape[1]
            return [self._emit(row.step(x[b : b + 1], None), x)
                    for b, row in enumerate(self.rows)]

    def flush(self) -> list[Emitted]:
        """End the stream: every remaining output, computed with the keys that exist."""
        name = f"{type(self).__name__}.flush"
        if self.closed:
            raise ValueError(f"{name}: the stream was already flushed")
        if self.rows is None:
            raise ValueError(f"{name}: nothing was pushed")
        self.closed = True
        b, c, dtype, device = self._shape
        empty = torch.empty(1, 0, c, dtype=dtype, device=device)
        with torch.no_grad():
            return [self._emit(row.step(None, row.frames_in), empty) for row in self.rows]

    @property
    def latency(self) -> list[torch.Tensor]:
        """Per sequence, ``[outputs emitted]`` int64 latencies in emission order."""
        return [torch.tensor(r.latency, dtype=torch.int64) for r in (self.rows or [])]

    def __repr__(self) -> str:
        what = "" if self.model is None else f"{type(self.model).__name__}: "
        state = "closed" if self.closed else "open"
        return (f"{type(self).__name__}({what}{len(self._layers)} layers; frames_in="
                f"{self.frames_in}, {state})")

    def _emit(self, arr: Arrivals | None, x: torch.Tensor) -> Emitted:
        if arr is None:
            y = x[:1, :0]
            pos: list[int] = []
            lat: list[int] = []
        else:
            y, pos = arr.x, arr.positions
            lat = [r - p for r, p in zip(arr.ready, pos, strict=True)]
        if self.model is not None:
            y = self.model.stream_head(y)
        return Emitted(torch.tensor(pos, dtype=torch.int64), y[0],
                       torch.tensor(lat, dtype=torch.int64))

    def _check(self, name: str, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"{name}: frames must be a [batch, n >= 1, features] "
                                    f"tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1] < 1:
            raise ValueError(f"{name}: frames must be [batch, n >= 1, features], got "
                             f"{list(getattr(x, 'shape', []))}")
        if self._shape is not None and x.shape[0] != self._shape[0]:
            raise ValueError(f"{name}: batch size {x.shape[0]} differs from the first push's "
                             f"{self._shape[0]}")
        if self._shape is not None and (x.shape[2], x.dtype, x.device) != self._shape[1:]:
            raise ValueError(f"{name}: frames (features, dtype, device) = "
                             f"{(x.shape[2], x.dtype, x.device)} differ from the first push's "
                             f"{self._shape[1:]}")
        try:
            Causal().check_positions(x.shape[1], self.frames_in + x.shape[1], self.frames_in, 0)
        except ValueError as e:
            raise ValueError(f"{name}: this push would reach position "
                             f"{self.frames_in + x.shape[1] - 1}: {e}") from None
