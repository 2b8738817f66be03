"""Streaming linear attention: a carried state plus a buffer of at most the lookahead."""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import ArgumentTypeError, check_decay, check_int, compute_dtype
from causalmix.ops.linear import REGISTRY, check_gate, factorise, linear_attention
from causalmix.stream._buffers import FrameBuffer
from causalmix.stream._common import Frames, MixerStream
from causalmix.visibility import And, Segments, Visibility

__all__ = ["GateFrames", "LinearStream", "fold_state"]


def _has_segments(vis: Visibility) -> bool:
    if isinstance(vis, And):
        return _has_segments(vis.a) or _has_segments(vis.b)
    return isinstance(vis, Segments)


def fold_state(
    state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """Advance the causal linear-attention state over ``n`` keys: ``S_t = lambda S_{t-1} +
    k_t v_t^T`` (the state convention of ``causalmix.ops.linear``, without segment resets).

    ``state: [B, H, D, Dv]`` (``None`` = zeros), ``k: [B, n, H, D]``, ``v: [B, n, H, Dv]``,
    ``decay: [H]`` in (0, 1] or ``None`` (= 1). Returns ``[B, H, D, Dv]``, fp32 (fp64 for fp64
    inputs): ``lambda^n S + sum_j lambda^(n-1-j) k_j v_j^T``.
    """
    n = k.shape[1]
    cd = compute_dtype(k)
    kf, vf = k.to(cd), v.to(cd)
    vh = vf.transpose(1, 2)  # [B, H, n, Dv]
    if decay is None:
        new = kf.permute(0, 2, 3, 1) @ vh
        return new if state is None else state + new
    lam = decay.to(device=k.device, dtype=cd)
    expo = torch.arange(n - 1, -1, -1, device=k.device, dtype=cd)
    w = lam[None, :] ** expo[:, None]  # [n, H]: lambda^(n-1-j)
    new = (kf * w[None, :, :, None]).permute(0, 2, 3, 1) @ vh  # [B, H, D, Dv]
    if state is None:
        return new
    return state * (lam**n)[None, :, None, None] + new


@dataclasses.dataclass(frozen=True)
class GateFrames(Frames):
    """The frames of a linear-stream push: :class:`~causalmix.stream.Frames` plus the per-token
    gates, ``log_gate, reverse_log_gate: [B, n, H]`` (or ``[B, n, H, D]``) or ``None``."""

    log_gate: torch.Tensor | None = None
    reverse_log_gate: torch.Tensor | None = None


class LinearStream(MixerStream):
    """Stream ``linear_attention(q, k, v, visibility, decay=... | log_gate=...)`` frame by frame,
    with memory constant in the stream length.

    Output ``i`` is ``sum_{j visible} w_ij (q_i . k_j) v_j`` with ``w_ij = lambda^|i-j|``, or
    with per-token gates pushed with their frames (``push(q, k, v, log_gate=g)``, ``g: [B, n,
    H]``, or per key dimension ``[B, n, H, D]`` (GLA; every push of one kind), optional
    ``reverse_log_gate``; see ``causalmix.ops.linear``). Every spec linear
    attention supports (``Causal()``, ``Prefix(n)``, ``Chunked(size, lookahead)``,
    ``Segments(ids) & ...``) lets a query see every earlier key of its segment, so the keys
    before the first pending output live in one carried causal state (``[B, H, D, Dv]``, fp32;
    reset at segment starts), passed as ``initial_state``. The keys from ``frames_out`` on (the
    in-flight ones: at most the lookahead plus one push) stay raw in a buffer, with their gates,
    because a query weighs a later key by the gates in between, which no forward state holds;
    the gates are dropped exactly when their frames are.

    Each emission of the outputs ``[p0, p1)`` makes one ``linear_attention`` call over the
    positions ``[p0, k_end)`` (``k_end - 1``: the last key any of them sees) from the carried
    state, keeping the first ``p1 - p0`` outputs. When ``k_end == p1`` (``Causal``, whole chunks
    of ``Chunked(size, 0)``, the prefix of ``Prefix``) that call's ``final_state`` is the next
    state; otherwise the emitted keys are folded into the state with :func:`fold_state` (with
    ``Segments``, gates or GQA, by a second call asking for the final state).

    ``Window`` and ``|`` specs raise ``ValueError`` (linear attention has no exact state for
    them), and so does unbounded lookahead (``Full()``), as for every stream.

    Args:
        visibility: the spec, as for the parallel call.
        decay: ``[H]`` per-head decay in (0, 1], or ``None`` (no decay, or gates per push: the
            first push decides, and every later push must do the same).
        impl, chunk_size: passed to ``linear_attention`` (``impl="auto"``: ``recurrent`` for
            single-frame steps, ``chunk`` otherwise).

    Shapes: ``push(q [B, n, H, D], k [B, n, Hkv, D], v [B, n, Hkv, Dv], *, log_gate [B, n, H]
    or [B, n, H, D], reverse_log_gate likewise) -> [B, m, H, Dv]``.
    """

    mixer = "linear"
    frames_type = GateFrames

    def __init__(
        self,
        visibility: Visibility,
        *,
        decay: torch.Tensor | None = None,
        impl: str = "auto",
        chunk_size: int = 64,
    ):
        super().__init__(visibility)
        try:
            f = factorise(visibility)
        except ValueError as e:
            raise ValueError(f"LinearStream: cannot stream {visibility!r}: {e}") from None
        if decay is not None:
            if not isinstance(decay, torch.Tensor) or decay.dim() != 1:
                raise ArgumentTypeError(
                    f"LinearStream: decay must be a floating [H] tensor in (0, 1] or None, got "
                    f"{decay!r}")
            decay = check_decay("LinearStream", decay, decay.shape[0], decay.device).detach()
        check_int("chunk_size", chunk_size, 1)
        self.decay, self.impl = decay, REGISTRY.check_name("LinearStream", impl)
        self.chunk_size = chunk_size
        self._segmented = _has_segments(visibility)
        # Without a reverse scan (Causal, Chunked(size, lookahead > 0), with Segments) the op
        # takes keys past the last query, so the frames of the lookahead are not recomputed as
        # queries on every push.
        self._keys_past_queries = not f.has_reverse and impl != "recurrent"
        self.state: torch.Tensor | None = None  # causal state of the keys before the buffer
        self._k = FrameBuffer()
        self._v = FrameBuffer()
        self._g = FrameBuffer()  # gates of the buffered frames (gated streams)
        self._gr = FrameBuffer()
        # (gated, reverse gate, their dims) from the first push
        self._gates: tuple[bool, bool, int, int] | None = None

    @property
    def buffer_len(self) -> int:
        """Number of raw key/value frames held (those from the first pending output on)."""
        return self._k.length

    def cache_nbytes(self) -> int:
        """Bytes held by the state, the key/value/gate buffers and the pending-query buffer."""
        s = 0 if self.state is None else self.state.numel() * self.state.element_size()
        bufs = (self._k, self._v, self._g, self._gr, self._pending_q)
        return s + sum(b.nbytes() for b in bufs)

    def push(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             log_gate: torch.Tensor | None = None,
             reverse_log_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Take the next frames (and their gates, for a gated stream), return the outputs now
        final. ``log_gate, reverse_log_gate: [B, n, H]`` or ``[B, n, H, D]``; see
        :meth:`MixerStream.push`."""
        return self._push("push", GateFrames(q, k, v, log_gate, reverse_log_gate))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             log_gate: torch.Tensor | None = None,
             reverse_log_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Decode step with the frames' gates; see :meth:`MixerStream.step`."""
        return self._push("step", GateFrames(q, k, v, log_gate, reverse_log_gate))

    # ------------------------------------------------------------------ hooks
    def _check_extras(self, name, frames):
        mode = (frames.log_gate is not None, frames.reverse_log_gate is not None)
        if mode[0] and self.decay is not None:
            raise ValueError(f"{name}: this stream has a constant decay; log_gate is exclusive "
                             f"with it")
        if mode[1] and not mode[0]:
            raise ValueError(f"{name}: reverse_log_gate needs log_gate")
        if self._gates is not None and mode != self._gates[:2]:
            raise ValueError(f"{name}: every push must give the same gates as the first one "
                             f"(log_gate {self._gates[0]}, reverse_log_gate {self._gates[1]}), "
                             f"got log_gate {mode[0]}, reverse_log_gate {mode[1]}")
        q = frames.q
        for i, gname in enumerate(("log_gate", "reverse_log_gate")):
            gate = getattr(frames, gname)
            if gate is not None:
                check_gate(name, gname, gate, tuple(q.shape[:3]), q, per_dim=q.shape[-1])
                if self._gates is not None and gate.dim() != self._gates[2 + i]:
                    kind = ("[B, n, H]", "[B, n, H, D]")
                    raise ValueError(f"{name}: every push must give {gname} of the first one's "
                                     f"kind, {kind[self._gates[2 + i] - 3]} (per key dimension "
                                     f"or not), got shape {list(gate.shape)}")

    def _check_first(self, name, frames):
        super()._check_first(name, frames)
        h = frames.q.shape[2]
        if self.decay is not None and self.decay.shape[0] != h:
            raise ValueError(f"{name}: decay has {self.decay.shape[0]} heads but q has {h}")

    def _start(self, frames):
        # (log_gate given, reverse_log_gate given, their dims: 3 scalar, 4 per key dimension)
        self._gates = (frames.log_gate is not None, frames.reverse_log_gate is not None,
                       *(0 if g is None else g.dim()
                         for g in (frames.log_gate, frames.reverse_log_gate)))

    def _accept(self, frames):
        self._k.append(frames.k)
        self._v.append(frames.v)
        if frames.log_gate is not None:
            self._g.append(frames.log_gate)
        if frames.reverse_log_gate is not None:
            self._gr.append(frames.reverse_log_gate)

    def _window(self, p0: int, k_end: int) -> GateFrames:
        """The buffered frames ``[p0, k_end)`` (queries from the pending ones), views."""
        gated, reverse = self._gates[:2]
        return GateFrames(
            self._pending_q.view(p0, k_end), self._k.view(p0, k_end), self._v.view(p0, k_end),
            self._g.view(p0, k_end) if gated else None,
            self._gr.view(p0, k_end) if reverse else None)

    def _call(self, frames: GateFrames, p0: int, *, want_state: bool):
        """One ``linear_attention`` call over ``frames`` at ``[p0, ...)`` from the carried
        state."""
        decay = None if self.decay is None else self.decay.to(frames.q.device)
        return linear_attention(
            frames.q, frames.k, frames.v, self.visibility, decay=decay,
            log_gate=frames.log_gate, reverse_log_gate=frames.reverse_log_gate, q_offset=p0,
            k_offset=p0, initial_state=self.state, return_final_state=want_state,
            impl=self.impl, chunk_size=self.chunk_size,
        )

    def _compute(self, q, p0, k_end):
        m = q.shape[1]
        assert self._k.start == p0  # the buffer starts at the first pending output
        window = self._window(p0, k_end)
        if k_end == p0 + m:
            out, state = self._call(window, p0, want_state=True)
        else:
            if self._keys_past_queries:
                # only the final queries: the op reads the later keys through its band
                out = self._call(dataclasses.replace(window, q=q), p0, want_state=False)
            else:
                out = self._call(window, p0, want_state=False)[:, :m]
            head = window.head(m)
            if self._segmented or head.log_gate is not None or head.k.shape[2] != q.shape[2]:
                _, state = self._call(head, p0, want_state=True)
            else:
                state = fold_state(self.state, head.k, head.v, self.decay)
        self.state = state
        return out

    def _compute_direct(self, frames, p0):
        # every output of the push is final: the pushed keys go straight into the state
        out, self.state = self._call(frames, p0, want_state=True)
        return out

    def _advance(self):
        for buf in (self._k, self._v, self._g, self._gr):
            buf.drop_before(self.frames_out)
