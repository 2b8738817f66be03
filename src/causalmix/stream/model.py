"""Streaming a stack of layers: each layer is pointwise in time around one mixer call."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from causalmix.checks import ArgumentTypeError
from causalmix.stream import latency as latency_maths
from causalmix.stream._buffers import FrameBuffer, PositionLog
from causalmix.stream._common import MixerStream
from causalmix.stream.latency import LatencyStats
from causalmix.visibility import Visibility, check_layer_specs

__all__ = ["STREAMABLE_MIXERS", "ModelStream", "StreamableLayer", "StreamableModel",
           "layer_frames", "mixer_stream"]

#: the mixers :func:`mixer_stream` (hence :class:`ModelStream`) can stream
STREAMABLE_MIXERS = ("softmax", "linear", "delta")


@runtime_checkable
class StreamableLayer(Protocol):
    """What a layer provides to be streamed by :class:`ModelStream` (``causalmix.nn`` layers
    implement it; ``stream`` never imports ``nn``).

    A layer computes ``y = stream_out(x, mixer(*stream_qkv(x, pos), visibility, **mixer_kwargs()),
    pos)`` where everything except the mixer is pointwise in time (projections, norms, position
    encodings, residuals, MLPs): frame ``t`` of ``stream_qkv`` / ``stream_out`` depends only on
    frame ``t`` of their inputs. A layer with a short causal convolution before its mixer
    may also define ``stream_context(visibility)``: when that returns a carry (not None), the
    stream calls ``stream_qkv(x, pos, context)``, which returns ``(inputs, next context)``,
    and keeps the next context once the mixer took the frames.
    """

    mixer: str  # "softmax" | "linear" | "delta" (STREAMABLE_MIXERS)
    visibility: Visibility

    def mixer_kwargs(self) -> dict:
        """Keyword arguments of the mixer stream, e.g. ``{"scale": s}`` (softmax) or
        ``{"decay": tensor}`` (linear); may include ``impl``."""
        ...

    def stream_qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [B, n, C]``, ``positions: [n]`` int64 absolute -> the mixer stream's per-frame
        inputs by name, as its ``push`` takes them: ``{"q": [B, n, H, D], "k": [B, n, Hkv, D],
        "v": [B, n, Hkv, Dv]}`` plus the family's own (a gated linear layer: ``"log_gate"``,
        ``"reverse_log_gate"``, ``[B, n, H]``; the names are the fields of the stream's
        :class:`~causalmix.stream.Frames` type), or just the tuple ``(q, k, v)``. Pointwise in
        time."""
        ...

    def stream_out(
        self, x: torch.Tensor, mixed: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``x: [B, n, C]`` (the layer input at these positions), ``mixed: [B, n, H, Dv]`` ->
        ``y: [B, n, C']``. Pointwise in time."""
        ...


def mixer_stream(mixer: str, visibility: Visibility, **kwargs) -> MixerStream:
    """The stream of one mixer call: ``"softmax"`` -> :class:`SoftmaxStream`, ``"linear"`` ->
    :class:`LinearStream`, ``"delta"`` -> :class:`DeltaStream`, with ``kwargs`` passed to its
    constructor."""
    if mixer == "softmax":
        from causalmix.stream.softmax import SoftmaxStream

        cls = SoftmaxStream
        allowed = ("scale", "impl")
    elif mixer == "linear":
        from causalmix.stream.linear import LinearStream

        cls = LinearStream
        allowed = ("decay", "impl", "chunk_size")
    elif mixer == "delta":
        from causalmix.stream.delta import DeltaStream

        cls = DeltaStream
        allowed = ("impl", "chunk_size")
    else:
        raise ValueError(f"mixer must be one of {list(STREAMABLE_MIXERS)}, got {mixer!r}")
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(
            f"mixer_kwargs {bad} are not accepted by the {mixer!r} stream; allowed: {list(allowed)}"
        )
    return cls(visibility, **kwargs)


def layer_frames(owner: str, result: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """A layer's ``stream_qkv`` result as the named per-frame inputs of a stream whose ``push``
    takes ``names`` (``("q", "k", "v", ...)``): a mapping of those names (q, k, v required), or
    the tuple ``(q, k, v)``. Anything else raises ``ValueError`` naming ``owner``."""
    if isinstance(result, Mapping):
        inputs = dict(result)
    elif isinstance(result, tuple) and len(result) == 3:
        inputs = dict(zip(("q", "k", "v"), result, strict=True))
    else:
        raise ArgumentTypeError(f"{owner}: stream_qkv must return a mapping of per-frame inputs "
                                f"{list(names)} or a tuple (q, k, v), got "
                                f"{type(result).__name__}")
    missing = [n for n in ("q", "k", "v") if n not in inputs]
    unknown = sorted(set(inputs) - set(names))
    if missing or unknown:
        raise ValueError(f"{owner}: stream_qkv returned inputs {sorted(inputs)}; the stream "
                         f"takes {list(names)} (q, k, v required), missing {missing}, unknown "
                         f"{unknown}")
    return inputs


class _LayerState:
    def __init__(self, index: int, layer, visibility: Visibility | None = None):
        for attr in ("mixer", "visibility", "mixer_kwargs", "stream_qkv", "stream_out"):
            if not hasattr(layer, attr):
                raise ArgumentTypeError(
                    f"ModelStream: layers[{index}] ({type(layer).__name__}) is not a "
                    f"StreamableLayer: it has no {attr!r}"
                )
        kwargs = layer.mixer_kwargs()
        if not isinstance(kwargs, dict):
            raise ArgumentTypeError(
                f"ModelStream: layers[{index}].mixer_kwargs() must return a dict, got "
                f"{type(kwargs).__name__}"
            )
        self.index = index
        self.layer = layer
        self.visibility = layer.visibility if visibility is None else visibility
        self.mixer = mixer_stream(layer.mixer, self.visibility, **kwargs)
        self.x = FrameBuffer()  # layer inputs waiting for their mixed output (residual)
        make = getattr(layer, "stream_context", None)
        # a layer's carry between pushes (e.g. a short convolution's last inputs), or None
        self.context = None if make is None else make(self.visibility)

    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        p0 = self.mixer.frames_in
        positions = torch.arange(p0, p0 + x.shape[1], device=x.device)
        if self.context is None:
            result, context = self.layer.stream_qkv(x, positions), None
        else:
            result, context = self.layer.stream_qkv(x, positions, self.context)
        inputs = layer_frames(f"ModelStream: layers[{self.index}]", result,
                              self.mixer.frames_type.names())
        mixed = self.mixer.push(**inputs)
        if context is not None:
            self.context = context
        self.x.append(x)
        return self._finish(mixed)

    def flush(self) -> torch.Tensor | None:
        return self._finish(self.mixer.flush())

    def _finish(self, mixed: torch.Tensor) -> torch.Tensor | None:
        m = mixed.shape[1]
        if m == 0:
            return None
        o1 = self.mixer.frames_out
        o0 = o1 - m
        positions = torch.arange(o0, o1, device=mixed.device)
        y = self.layer.stream_out(self.x.view(o0, o1), mixed, positions)
        self.x.drop_before(o1)
        return y


def _tensor_nbytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a tuple / list of values; else 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_nbytes(v) for v in value)
    return 0


def model_and_layers(owner: str, layers: Any, kind: str) -> tuple[Any, list]:
    """A stream's ``layers`` argument: a :class:`StreamableModel` (its blocks) or a non-empty
    sequence of layers of ``kind``; returns ``(model or None, the layers)``."""
    model = None
    if isinstance(layers, StreamableModel):
        model, layers = layers, layers.blocks
    if not isinstance(layers, Iterable) or isinstance(layers, torch.Tensor):
        raise ArgumentTypeError(f"{owner}: layers must be a sequence of {kind}s or a "
                                f"StreamableModel, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{owner}: layers must hold at least one {kind}")
    return model, layers


def _per_layer_specs(visibility: Any, n: int) -> list[Visibility | None]:
    """``visibility`` of :class:`ModelStream`: ``None`` (each layer's own) or one spec per
    layer."""
    if visibility is None:
        return [None] * n
    return list(check_layer_specs("ModelStream", visibility, n))


@runtime_checkable
class StreamableModel(Protocol):
    """A whole model :class:`ModelStream` can stream (``causalmix.nn.SequenceModel`` implements
    it): an input map, a stack of :class:`StreamableLayer` s, an output map, the two maps
    pointwise in time."""

    blocks: Sequence[StreamableLayer]

    def stream_in(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs: [B, n]`` token ids or ``[B, n, F]`` features -> ``[B, n, C]``; raises
        ``ValueError`` for inputs the model does not take."""
        ...

    def stream_head(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output ``[B, n, C]`` -> ``[B, n, C_out]`` (e.g. logits)."""
        ...


class ModelStream:
    """Stream a stack of :class:`StreamableLayer` s, or a whole :class:`StreamableModel`:
    ``push(x [B, n, C]) -> [B, m, C']`` (a model: ``push(inputs [B, n])`` token ids, or its
    ``[B, n, F]`` features, ``-> [B, m, C_out]`` logits).

    Frames go through the layers in order; each layer's mixer stream releases the outputs that
    are final, which then feed the next layer. Concatenated outputs (``push`` ... ``flush``)
    equal running the layers (the model) in parallel over the whole sequence.

    Latency compounds exactly: final output ``i`` needs layer ``L``'s input up to
    ``r_L(i)``, which needs layer ``L-1``'s input up to ``r_{L-1}(r_L(i))``, and so on, where
    ``r_l`` is layer ``l``'s ``ready_at``; the reported latency is ``r_1(...r_L(i)) - i``. With
    ``Window(left, a)`` in every layer that is ``L * a``; with ``Chunked(size, a)`` it is
    ``(i // size + L * a + 1) * size - 1 - i`` (clipped to the last frame at flush).

    ``visibility``: one spec per layer for this stream (a tuple, e.g. ``(Prefix(lengths),) *
    n_layers`` for a batch whose rows have their own prompt lengths), replacing the layers' own
    ``visibility``; ``None`` streams each layer under its own.

    An empty result before any output was produced has the input's feature size ``C`` (a
    model: its output size). A call that raises leaves the stream as it was. Streams are for
    inference (``torch.no_grad()``).
    """

    def __init__(self, layers: Iterable[StreamableLayer] | StreamableModel, *,
                 visibility: Sequence[Visibility] | None = None):
        self.model, layers = model_and_layers("ModelStream", layers, "StreamableLayer")
        specs = _per_layer_specs(visibility, len(layers))
        self.layers = [_LayerState(i, layer, spec)
                       for i, (layer, spec) in enumerate(zip(layers, specs, strict=True))]
        self._latency = PositionLog()
        self._compute = PositionLog("d")
        self._shape: tuple | None = None  # (B, C, dtype, device) of the first push
        self._out_features: int | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.closed = False

    # ------------------------------------------------------------------ public
    def push(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, n, C]``, the next ``n >= 1`` frames (a model: its inputs ``[B, n]`` or
        ``[B, n, F]``) -> ``[B, m, C']`` final outputs of positions
        ``[frames_out, frames_out + m)``."""
        return self._push(x, "push")

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Decode step: push ``x: [B, n, C]`` (a model: its inputs) and return exactly its ``n``
        outputs; raises ``ValueError`` (pushing nothing) if an output would not be final yet
        (some layer looks ahead of these frames) or earlier outputs are pending. See
        :meth:`MixerStream.step` for the specs it serves."""
        return self._push(x, "step")

    def flush(self) -> torch.Tensor:
        """End the stream and return the remaining outputs ``[B, m, C']``."""
        t0 = latency_maths.CLOCK()
        if self.closed:
            raise ValueError("ModelStream.flush: the stream was already flushed")
        if self._shape is None:
            raise ValueError("ModelStream.flush: nothing was pushed, there is no output to return")
        with torch.no_grad():
            h: torch.Tensor | None = None
            for st in self.layers:
                parts = []
                if h is not None:
                    y = st.push(h)
                    if y is not None:
                        parts.append(y)
                y = st.flush()
                if y is not None:
                    parts.append(y)
                h = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
            self.closed = True
            b, c, dtype, device = self._shape
            return self._collect(h, torch.empty(b, 0, c, dtype=dtype, device=device), t0)

    @property
    def pending(self) -> int:
        """Number of outputs not yet emitted (``frames_in - frames_out``)."""
        return self.frames_in - self.frames_out

    @property
    def latency(self) -> torch.Tensor:
        """``[frames_out]`` int64: input frames each emitted output waited for beyond its own."""
        return self._latency.values()

    @property
    def compute_seconds(self) -> torch.Tensor:
        """``[frames_out]`` float64: for each emitted output, the wall time (seconds) of the
        ``push`` / ``step`` / ``flush`` that released it (every layer, and the model's maps)."""
        return self._compute.values()

    def latency_stats(self, *, frame_seconds: float | None = None) -> LatencyStats:
        """:class:`LatencyStats` of the emitted outputs: :attr:`latency` (frames, compounded
        through the layers), the compute time (:attr:`compute_seconds`) and, given
        ``frame_seconds``, the measured latency ``latency * frame_seconds + compute``."""
        return LatencyStats.of(self.latency, self.compute_seconds, frame_seconds=frame_seconds)

    def cache_nbytes(self) -> int:
        """Bytes held by every layer's mixer state / cache, pending-frame buffers and carried
        context (the tensors in it, e.g. a short convolution's last inputs)."""
        return sum(st.mixer.cache_nbytes() + st.x.nbytes() + _tensor_nbytes(st.context)
                   for st in self.layers)

    def __repr__(self) -> str:
        what = "" if self.model is None else f"{type(self.model).__name__}: "
        layers = ", ".join(f"{st.mixer.mixer} {st.visibility!r}" for st in self.layers)
        state = "closed" if self.closed else "open"
        return (f"ModelStream({what}{len(self.layers)} layers [{layers}]; frames_in="
                f"{self.frames_in}, frames_out={self.frames_out}, pending={self.pending}, "
                f"{state})")

    # ------------------------------------------------------------------ internals
    def _push(self, x, where: str) -> torch.Tensor:
        t0 = latency_maths.CLOCK()
        name = f"ModelStream.{where}"
        if self.closed:
            raise ValueError(f"{name}: the stream was flushed (closed); start a new one")
        with torch.no_grad():
            x = self._prepare(x, where)
            if where == "step":
                self._check_step(x.shape[1])
            self._shape = (x.shape[0], x.shape[2], x.dtype, x.device)
            self.frames_in += x.shape[1]
            h: torch.Tensor | None = x
            for st in self.layers:
                h = st.push(h)
                if h is None:
                    break
            return self._collect(h, x, t0)

    def _prepare(self, x, where: str) -> torch.Tensor:
        """Every check of a push, changing nothing: the model's input map, the frames' shape,
        and the positions every layer's spec must define. Returns the first layer's input."""
        if self.model is not None:
            x = self.model.stream_in(x)
        self._check(x, where)
        n = x.shape[1]
        for st in self.layers:
            st.mixer.check_frame_positions(f"ModelStream.{where}", n)
        return x

    def _check_step(self, n: int) -> None:
        if self.frames_out != self.frames_in:
            raise ValueError(
                f"ModelStream.step: {self.pending} earlier outputs are still "
                f"pending; step() needs a stream whose outputs are all final (use push())"
            )
        not_final = [i for i, st in enumerate(self.layers) if st.mixer.final_after(n) != n]
        if not_final:
            p0 = self.frames_in
            specs = [repr(st.visibility) for st in self.layers]
            raise ValueError(
                f"ModelStream.step: outputs of positions [{p0}, {p0 + n}) would not be final "
                f"after this step: not final after this step in layers {not_final} (layer "
                f"specs {specs}); decode a whole chunk / the whole prefix per step, or use push()"
            )

    def _collect(self, h: torch.Tensor | None, x: torch.Tensor, t0: float) -> torch.Tensor:
        """The model's output of the final layer outputs ``h`` (``None``: none), logging their
        compounded latency and the compute time since ``t0``."""
        if h is None:
            if self.model is not None:
                return self.model.stream_head(x[:, :0])
            c = self._out_features if self._out_features is not None else x.shape[2]
            return x.new_empty(x.shape[0], 0, c)
        self._out_features = h.shape[2]
        m = h.shape[1]
        positions = range(self.frames_out, self.frames_out + m)
        p = list(positions)
        for st in reversed(self.layers):
            p = st.mixer.ready_at_of(p)
        self._latency.append([r - i for r, i in zip(p, positions, strict=True)])
        self.frames_out += m
        out = h if self.model is None else self.model.stream_head(h)
        self._compute.append([latency_maths.CLOCK() - t0] * m)
        return out

    def _check(self, x, where: str = "push") -> None:
        name = f"ModelStream.{where}"
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"{name}: x must be a torch.Tensor, got "
                                    f"{type(x).__name__}")
        if x.dim() != 3 or x.shape[1] < 1:
            raise ValueError(
                f"{name}: x must be [batch, n >= 1 frames, features], got shape "
                f"{list(x.shape)}"
            )
        shape = (x.shape[0], x.shape[2], x.dtype, x.device)
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"{name}: frames (batch, features, dtype, device) = {shape} differ from "
                f"the first push's {self._shape}"
            )
