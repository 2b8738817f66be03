"""Streaming delta attention (DeltaNet / Gated DeltaNet): a carried causal state plus a buffer
of at most the lookahead.

``DeltaStream(visibility).push(q, k, v, beta=b, log_gate=g)`` returns the outputs that are
final; concatenated (with ``flush()``) they equal :func:`causalmix.ops.delta.delta_attention`
over the whole sequence.

How (the family's semantics: :mod:`causalmix.ops.delta.api`): the forward part of every
served spec is the causal recurrence from the start of the query's segment, so the keys before
the first pending output live in one carried causal state ``S: [B, H, D, Dv]`` (fp32; fp64 for
fp64 inputs; reset at segment starts by the op itself), passed as ``initial_state``. The
reverse part of query ``i`` (``Prefix``, ``Chunked``) runs backwards from its last visible key
``hi(i)``, so it has no state to carry: the frames from the first pending output on stay raw
in a buffer (with their beta and gates) and each emission of the outputs ``[p0, p1)`` makes one
``delta_attention`` call with those ``p1 - p0`` queries and the keys ``[p0, k_end)`` (``k_end
- 1``: the last key any of them sees), from the carried state: the reverse part is recomputed
over the pending frames. When ``k_end == p1`` (``Causal``, whole chunks of ``Chunked(size,
0)``, the prefix of ``Prefix``) that call's final state is the next state; otherwise a second
call over ``[p0, p1)`` under the spec's forward part (``Causal()``, ``& Segments`` when the
spec has them) gives it.

Decode: ``step()`` (``Causal``, ``Prefix`` once the prefix was pushed, ``Chunked`` a chunk a
step) with one frame runs the ``recurrent`` implementation (``impl="auto"``), one delta update
from the carried state. Unbounded lookahead (``Full()``) is refused, as for every stream;
specs the family does not serve (``Window``, ``|``) raise ``ValueError`` naming the spec.
Heads: GQA (``k``, ``v`` with ``Hkv`` heads dividing q's ``H``) or value grouping (``q``, ``k``
with ``Hk`` heads dividing v's ``H``), as the op; beta and the gates have the output's ``H``
heads.
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.checks import check_int
from causalmix.ops.delta import REGISTRY, delta_attention
from causalmix.ops.delta.call import MIXER, check_beta_gates, check_inputs
from causalmix.ops.factor import factorise
from causalmix.stream._buffers import FrameBuffer
from causalmix.stream._common import Frames, MixerStream
from causalmix.visibility import Causal, Visibility

__all__ = ["DeltaFrames", "DeltaStream"]


@dataclasses.dataclass(frozen=True)
class DeltaFrames(Frames):
    """The frames of a delta-stream push: :class:`~causalmix.stream.Frames` plus the write
    strengths ``beta: [B, n, H]`` in (0, 2] (required) and the log-gates ``log_gate,
    reverse_log_gate: [B, n, H]`` or ``[B, n, H, D]`` (per key dimension, KDA; ``<= 0``) or
    ``None``."""

    beta: torch.Tensor | None = None
    log_gate: torch.Tensor | None = None
    reverse_log_gate: torch.Tensor | None = None


def _gate_mode(frames: DeltaFrames) -> tuple[str, str]:
    """The kinds of the frames' gates: ``"none"``, ``"[B, n, H]"`` (scalar) or ``"[B, n, H,
    D]"`` (per key dimension), for ``log_gate`` and ``reverse_log_gate``."""
    kinds = {3: "[B, n, H]", 4: "[B, n, H, D]"}
    return tuple("none" if x is None else kinds.get(x.dim(), f"{x.dim()}-D")
                 for x in (frames.log_gate, frames.reverse_log_gate))


class DeltaStream(MixerStream):
    """Stream ``delta_attention(q, k, v, visibility, beta=..., log_gate=...)`` frame by frame,
    with memory constant in the stream length (module docstring for how).

    Args:
        visibility: ``Causal()``, ``Prefix(n)``, ``Chunked(size, lookahead)``, ``Segments(ids)
            & any of these`` (absolute positions from the first pushed frame).
        impl, chunk_size: passed to ``delta_attention`` (``impl="auto"``: ``recurrent`` for
            single-frame steps, ``chunk`` otherwise).

    Shapes: ``push(q [B, n, H, D], k [B, n, Hkv, D], v [B, n, Hkv, Dv], *, beta [B, n, H],
    log_gate [B, n, H] or [B, n, H, D], reverse_log_gate likewise) -> [B, m, H, Dv]`` (a
    ``[B, n, H, D]`` gate: per key dimension, KDA). The first push decides whether the stream
    is gated, with which gate shapes (and whether it has a reverse gate); every later push must
    do the same.

    Examples:
        >>> import torch
        >>> from causalmix import Chunked, delta_attention
        >>> from causalmix.stream import DeltaStream
        >>> q, k, v = torch.randn(3, 1, 10, 2, 4).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> beta, g = torch.rand(1, 10, 2) * 0.9 + 0.1, -torch.rand(1, 10, 2)
        >>> s = DeltaStream(Chunked(4, lookahead=1))
        >>> parts = [s.push(q[:, a:a + 3], k[:, a:a + 3], v[:, a:a + 3], beta=beta[:, a:a + 3],
        ...                 log_gate=g[:, a:a + 3]) for a in range(0, 10, 3)]
        >>> out = torch.cat(parts + [s.flush()], 1)
        >>> ref = delta_attention(q, k, v, Chunked(4, lookahead=1), beta=beta, log_gate=g)
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """

    mixer = "delta"
    frames_type = DeltaFrames
    family_heads = True  # GQA or value grouping: checked by check_inputs in _check_extras

    def __init__(self, visibility: Visibility, *, impl: str = "auto", chunk_size: int = 64):
        super().__init__(visibility)
        try:
            f = factorise(visibility, mixer=MIXER)
        except ValueError as e:
            raise ValueError(f"DeltaStream: cannot stream {visibility!r}: {e}") from None
        check_int("chunk_size", chunk_size, 1)
        self.impl = REGISTRY.check_name("DeltaStream", impl)
        self.chunk_size = chunk_size
        # the spec's forward part: the causal recurrence, restarted at segment starts
        self._forward_spec = Causal() if f.segments is None else f.segments & Causal()
        self.state: torch.Tensor | None = None  # causal state of the keys before the buffer
        self._bufs = {name: FrameBuffer() for name in ("k", "v", "beta", "log_gate",
                                                       "reverse_log_gate")}
        self._gates: tuple[str, str] | None = None  # the gates' kinds from the first push

    @property
    def buffer_len(self) -> int:
        """Number of raw key / value frames held (those from the first pending output on)."""
        return self._bufs["k"].length

    def cache_nbytes(self) -> int:
        """Bytes held by the state, the key / value / beta / gate buffers and the pending
        queries."""
        s = 0 if self.state is None else self.state.numel() * self.state.element_size()
        return s + self._pending_q.nbytes() + sum(b.nbytes() for b in self._bufs.values())

    def push(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
             log_gate: torch.Tensor | None = None,
             reverse_log_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Take the next frames with their ``beta`` (and gates, for a gated stream), return the
        outputs now final. ``beta: [B, n, H]``, ``log_gate, reverse_log_gate: [B, n, H]`` or
        ``[B, n, H, D]``; see :meth:`MixerStream.push`."""
        return self._push("push", DeltaFrames(q, k, v, beta, log_gate, reverse_log_gate))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
             log_gate: torch.Tensor | None = None,
             reverse_log_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Decode step with the frames' beta and gates; see :meth:`MixerStream.step`."""
        return self._push("step", DeltaFrames(q, k, v, beta, log_gate, reverse_log_gate))

    # ------------------------------------------------------------------ hooks
    def _check_extras(self, name, frames):
        if frames.beta is None:
            raise ValueError(f"{name}: beta is required (the delta rule's write strengths, "
                             f"[B, n, H] in (0, 2])")
        mode = _gate_mode(frames)
        if self._gates is not None and mode != self._gates:
            raise ValueError(f"{name}: every push must give the same gates as the first one "
                             f"(log_gate {self._gates[0]}, reverse_log_gate {self._gates[1]}), "
                             f"got log_gate {mode[0]}, reverse_log_gate {mode[1]}")
        heads = check_inputs(name, q=frames.q, k=frames.k, v=frames.v)
        check_beta_gates(name, q=frames.q, k=frames.k, heads=heads, beta=frames.beta,
                         log_gate=frames.log_gate, reverse_log_gate=frames.reverse_log_gate,
                         vector=True)

    def _start(self, frames):
        self._gates = _gate_mode(frames)

    def _accept(self, frames):
        for name, buf in self._bufs.items():
            x = getattr(frames, name)
            if x is not None:
                buf.append(x)

    def _window(self, p0: int, k_end: int) -> dict[str, torch.Tensor | None]:
        """The buffered frames ``[p0, k_end)`` by name (views; None for an absent gate)."""
        present = {"k": True, "v": True, "beta": True, "log_gate": self._gates[0] != "none",
                   "reverse_log_gate": self._gates[1] != "none"}
        return {name: buf.view(p0, k_end) if present[name] else None
                for name, buf in self._bufs.items()}

    def _call(self, q: torch.Tensor, keys: dict, p0: int, visibility: Visibility, *,
              want_state: bool):
        """One ``delta_attention`` call: queries ``q`` and the frames ``keys`` from ``p0``,
        from the carried state."""
        return delta_attention(q, keys["k"], keys["v"], visibility, beta=keys["beta"],
                               log_gate=keys["log_gate"],
                               reverse_log_gate=keys["reverse_log_gate"], q_offset=p0,
                               k_offset=p0, initial_state=self.state,
                               return_final_state=want_state, impl=self.impl,
                               chunk_size=self.chunk_size)

    def _compute(self, q, p0, k_end):
        m = q.shape[1]
        assert self._bufs["k"].start == p0  # the buffer starts at the first pending output
        window = self._window(p0, k_end)
        if k_end == p0 + m:
            out, state = self._call(q, window, p0, self.visibility, want_state=True)
        else:
            out = self._call(q, window, p0, self.visibility, want_state=False)
            head = {name: None if x is None else x[:, :m] for name, x in window.items()}
            _, state = self._call(q, head, p0, self._forward_spec, want_state=True)
        self.state = state
        return out

    def _compute_direct(self, frames, p0):
        # every output of the push is final: the pushed keys go straight into the state
        keys = {name: getattr(frames, name) for name in self._bufs}
        out, self.state = self._call(frames.q, keys, p0, self.visibility, want_state=True)
        return out

    def _advance(self):
        for buf in self._bufs.values():
            buf.drop_before(self.frames_out)
