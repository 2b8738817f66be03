"""Pieces shared by the mixer streams: when an output becomes final, the checked per-frame
inputs of a push (:class:`Frames`), and the push / flush skeleton (:class:`MixerStream`).

Positions are absolute frame indices counted from the first pushed frame (frame ``t`` of the
stream is position ``t``), exactly as in the parallel ops, so the stream asks the spec the same
``visible(i, j)`` question as a parallel call over the whole sequence.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import torch

from causalmix.checks import MAX_POSITION, ArgumentTypeError, UnboundedHorizonError, check_qkv
from causalmix.stream import latency as latency_maths
from causalmix.stream._buffers import FrameBuffer, PositionLog
from causalmix.stream.latency import LatencyStats
from causalmix.visibility import Visibility

__all__ = ["Frames", "MixerStream", "ReadyTracker", "horizon", "unbounded_error"]

# ============================================================================ when is output final


def horizon(visibility: Visibility, positions: torch.Tensor) -> torch.Tensor | None:
    """Last key position each query may see (:meth:`Visibility.horizon`: exact for specs with a
    key range, an upper bound otherwise, which only makes the stream wait longer than needed), or
    ``None`` when some query may see keys arbitrarily far ahead."""
    try:
        return visibility.horizon(positions)
    except UnboundedHorizonError:
        return None


def unbounded_error(owner: str, visibility: Visibility) -> ValueError:
    return ValueError(
        f"{owner}: {visibility!r} has an unbounded lookahead (a query may see keys arbitrarily far "
        f"ahead), so no output is final before the end of the stream; streaming it is refused. "
        f"Run the parallel op over the whole sequence instead, or use a spec with a bounded "
        f"lookahead (Causal(), Prefix(n), Chunked(size, lookahead), Window(left, right), or one "
        f"of them combined with &)."
    )


class ReadyTracker:
    """For each position, the position of the last input frame its output needs
    (``ready_at``): ``max(i, horizon(i))`` (max over the batch for batch-dependent specs), made
    non-decreasing with a running max because outputs leave in order. Output ``i`` is final once
    frame ``ready_at[i]`` has arrived.

    ``ready_at`` depends on positions only, so it is computed ahead in blocks (kept as a list of
    Python ints: a push then costs one ``bisect``, no tensor op)."""

    BLOCK = 1024

    def __init__(self, owner: str, visibility: Visibility):
        self.owner, self.visibility = owner, visibility
        self.running = -1
        self.base = 0  # position of ready[0]
        self.ready: list[int] = []
        self._cover = visibility.covered_length
        if self._cover == 0:
            raise ValueError(f"{owner}: {visibility!r} defines no position to stream")
        self._extend(1)

    def _extend(self, upto: int) -> None:
        """Make ``ready_at`` known for every position below ``upto``."""
        while self.base + len(self.ready) < upto:
            a = self.base + len(self.ready)
            n = min(max(upto - a, self.BLOCK), MAX_POSITION - a)
            if self._cover is not None:
                n = min(n, self._cover - a)
            positions = torch.arange(a, a + n)
            h = horizon(self.visibility, positions)
            if h is None:
                raise unbounded_error(self.owner, self.visibility)
            if h.dim() == 2:
                h = h.amax(dim=0)
            r = torch.maximum(h, positions).clamp(min=self.running).cummax(dim=0).values
            self.running = int(r[-1])
            self.ready.extend(r.tolist())

    def count_ready(self, frames_out: int, frames_in: int) -> int:
        """How many outputs from position ``frames_out`` on are final once the frames below
        ``frames_in`` have arrived."""
        self._extend(frames_in)
        lo, hi = frames_out - self.base, frames_in - self.base
        return bisect.bisect_right(self.ready, frames_in - 1, lo, hi) - lo

    def ready_of(self, position: int) -> int:
        """``ready_at`` of a position not yet taken."""
        self._extend(position + 1)
        return self.ready[position - self.base]

    def take(self, frames_out: int, m: int) -> list[int]:
        """``ready_at`` of the outputs ``[frames_out, frames_out + m)``; forgets earlier ones."""
        lo = frames_out - self.base
        out = self.ready[lo : lo + m]
        if lo + m >= self.BLOCK:
            del self.ready[: lo + m]
            self.base += lo + m
        return out


# ============================================================================ the mixer skeleton




@dataclasses.dataclass(frozen=True)
class Frames:
    """The per-frame inputs of one push, checked once by the stream's ``push`` / ``step`` and
    carried as one object through its hooks (``_accept(frames)``, ``_compute_direct(frames,
    p0)``).

    ``q: [B, n, H, D]``, ``k: [B, n, Hkv, D]``, ``v: [B, n, Hkv, Dv]``. A family with more
    per-frame inputs subclasses it with one field per input, named as its ``push`` keyword
    (:class:`~causalmix.stream.linear.GateFrames` adds ``log_gate`` and ``reverse_log_gate``; a
    delta-rule stream would add ``beta``): each a ``[B, n, ...]`` tensor (time on dim 1) or
    ``None``. The field names are what a :class:`~causalmix.stream.StreamableLayer` may return
    from ``stream_qkv``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The per-frame inputs, in order (``("q", "k", "v", ...)``)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def n(self) -> int:
        """Number of frames."""
        return self.q.shape[1]

    def head(self, m: int) -> Frames:
        """The first ``m`` frames of every input."""
        cut = {}
        for name in self.names():
            x = getattr(self, name)
            cut[name] = None if x is None else x[:, :m]
        return dataclasses.replace(self, **cut)


class MixerStream:
    """Streams one mixer call ``mixer(q, k, v, visibility)`` over a sequence that arrives in
    pieces.

    ``push(q, k, v)`` takes the next ``n >= 1`` frames (``q, k: [B, n, H, D]``,
    ``v: [B, n, Hkv, Dv]``) and returns the outputs that are now final, ``[B, m, H, Dv]`` with
    ``m >= 0``; ``flush()`` ends the stream and returns the rest. Concatenated, the outputs equal
    the parallel op over the whole sequence. An output at position ``i`` is final once frame
    ``ready_at[i] = max(i, horizon(i))`` has arrived; its algorithmic latency is
    ``ready_at[i] - i`` frames (at flush, ``ready_at`` is clipped to the last frame). Outputs leave
    in order, so ``ready_at`` is made non-decreasing. Each push is timed: an output's compute
    time is the wall time of the push that released it (:meth:`latency_stats`).

    A family subclasses it with its own ``push(q, k, v, *, <per-frame inputs>)`` / ``step``
    signature, a :class:`Frames` subclass holding those inputs (``frames_type``), and the hooks
    ``_check_extras`` (check them), ``_accept`` (take the frames), ``_compute`` (outputs of
    pending queries) and optionally ``_compute_direct``, ``_check_first``, ``_start``,
    ``_advance``. The skeleton checks q, k, v and positions, never the extra inputs.

    An empty batch (``B = 0``) streams: every output is ``[0, m, H, Dv]``, with the latency of
    any other batch size. Streams are for inference: they run under ``torch.no_grad()`` and
    their outputs carry no autograd graph.
    """

    mixer = "?"
    #: the per-frame inputs ``push`` takes, as a :class:`Frames` type
    frames_type: type[Frames] = Frames
    #: constructor options shown by ``repr`` (those the stream has)
    _REPR_OPTIONS = ("scale", "decay", "impl", "chunk_size")
    #: True: the family checks its own head groupings in ``_check_extras`` (the delta family's
    #: value grouping, ``v`` with more heads than ``k``); else ``k`` and ``v`` share their heads
    family_heads = False

    def __init__(self, visibility: Visibility):
        name = type(self).__name__
        if not isinstance(visibility, Visibility):
            raise ArgumentTypeError(
                f"{name}: visibility must be a causalmix.visibility spec (Causal(), Window(...), "
                f"...), got {type(visibility).__name__}"
            )
        self.visibility = visibility
        self._tracker = ReadyTracker(name, visibility)
        self._pending_q = FrameBuffer()
        self._ready_log = PositionLog()  # ready_at of every emitted output (clipped at flush)
        self._compute_log = PositionLog("d")  # seconds of the push that released each output
        self._shapes: tuple | None = None  # (B, H, Hk, Hv, D, Dv, dtype, device), first push
        self.frames_in = 0
        self.frames_out = 0
        self.closed = False

    # ------------------------------------------------------------------ subclass hooks
    def _check_extras(self, name: str, frames: Frames) -> None:
        """Check the family's own per-frame inputs (changing nothing); ``name``: the caller, for
        messages."""

    def _check_first(self, name: str, frames: Frames) -> None:
        """Checks of the first push only (later pushes must match its shapes)."""
        vb = self.visibility.batch_size
        if vb is not None and vb != frames.q.shape[0]:
            raise ValueError(
                f"{name}: visibility {self.visibility!r} is for batch size {vb} but the frames "
                f"have batch size {frames.q.shape[0]}"
            )

    def _start(self, frames: Frames) -> None:
        """The first push was accepted (before its frames are taken)."""

    def _accept(self, frames: Frames) -> None:
        raise NotImplementedError

    def _compute(self, q: torch.Tensor, p0: int, k_end: int) -> torch.Tensor:
        """Outputs ``[B, m, H, Dv]`` for queries ``q: [B, m, H, D]`` at ``[p0, p0 + m)``, which
        see no key at or after position ``k_end`` (``<= frames_in``)."""
        raise NotImplementedError

    def _compute_direct(self, frames: Frames, p0: int) -> torch.Tensor:
        """Outputs of a push whose outputs are all final at once (nothing pending before it):
        ``frames`` are the pushed frames at ``[p0, p0 + n)``, not yet given to ``_accept``."""
        self._accept(frames)
        return self._compute(frames.q, p0, p0 + frames.n)

    def _advance(self) -> None:
        """Called after outputs were emitted: drop what no future output needs."""

    def cache_nbytes(self) -> int:
        """Bytes of allocated storage the stream holds (cache / state and pending frames)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def push(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Take the next frames, return the outputs now final.

        Args:
            q: ``[B, n, H, D]`` queries of the next ``n >= 1`` frames.
            k: ``[B, n, Hkv, D]`` keys, ``v: [B, n, Hkv, Dv]`` values of the same frames; the
                batch size, heads, dims, dtype and device must stay those of the first push.

        Returns:
            ``[B, m, H, Dv]`` in q's dtype: outputs of positions ``[frames_out, frames_out + m)``
            (``m`` may be 0).
        """
        return self._push("push", Frames(q, k, v))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode step: push ``n`` frames and return exactly their ``n`` outputs.

        For generation, where the next input depends on these outputs: ``Causal()``,
        ``Window(left, 0)``, ``Prefix(n)`` once the prefix was pushed in one piece, and
        ``Chunked(size)`` one whole chunk per step. Raises ``ValueError`` (pushing nothing) when
        an output of these frames is not final yet (the spec looks ahead of them) or earlier
        outputs are pending.
        """
        return self._push("step", Frames(q, k, v))

    def flush(self) -> torch.Tensor:
        """End the stream: the remaining outputs, ``[B, m, H, Dv]``, each computed with the keys
        that exist (as the parallel op over the pushed sequence does)."""
        t0 = latency_maths.CLOCK()
        name = type(self).__name__
        if self.closed:
            raise ValueError(f"{name}.flush: the stream was already flushed")
        if self._shapes is None:
            raise ValueError(f"{name}.flush: nothing was pushed, there is no output to return")
        with torch.no_grad():
            out = self._emit(self.frames_in - self.frames_out)
        self.closed = True
        self._log_compute(t0, out.shape[1])
        return out

    def final_after(self, n: int) -> int:
        """How many of the pending outputs and those of ``n`` more frames would be final once
        these frames arrived (changes nothing)."""
        return self._tracker.count_ready(self.frames_out, self.frames_in + n)

    @property
    def ready_at(self) -> torch.Tensor:
        """``[frames_out]`` int64: for each emitted output, the last input frame it waited for."""
        return self._ready_log.values()

    def ready_at_of(self, positions: Sequence[int]) -> list[int]:
        """:attr:`ready_at` of emitted outputs at these absolute positions (ints
        ``< frames_out``), without building the whole tensor."""
        return self._ready_log.get(positions)

    @property
    def latency(self) -> torch.Tensor:
        """``[frames_out]`` int64: frames each emitted output waited beyond its own."""
        return self._ready_log.values() - torch.arange(self.frames_out)

    @property
    def compute_seconds(self) -> torch.Tensor:
        """``[frames_out]`` float64: for each emitted output, the wall time (seconds) of the push
        or flush that released it."""
        return self._compute_log.values()

    def latency_stats(self, *, frame_seconds: float | None = None) -> LatencyStats:
        """:class:`LatencyStats` of the emitted outputs: :attr:`latency` (frames), the compute
        time (:attr:`compute_seconds`) and, given ``frame_seconds`` (the input's frame
        duration), the measured latency ``latency * frame_seconds + compute``."""
        return LatencyStats.of(self.latency, self.compute_seconds, frame_seconds=frame_seconds)

    @property
    def pending(self) -> int:
        """Number of outputs not yet emitted: frames pushed whose outputs still wait for their
        lookahead (``frames_in - frames_out``)."""
        return self.frames_in - self.frames_out

    def __repr__(self) -> str:
        options = "".join(f", {f}={_short(getattr(self, f))}" for f in self._REPR_OPTIONS
                          if hasattr(self, f))
        state = "closed" if self.closed else "open"
        return (f"{type(self).__name__}({self.visibility!r}{options}; frames_in={self.frames_in}, "
                f"frames_out={self.frames_out}, pending={self.pending}, {state})")

    # ------------------------------------------------------------------ the skeleton
    def _push(self, where: str, frames: Frames) -> torch.Tensor:
        """``push`` (``where="push"``) or ``step`` of checked-once ``frames``."""
        t0 = latency_maths.CLOCK()
        # every check before the first change: a push that raises leaves the stream as it was
        shapes = self._check(f"{type(self).__name__}.{where}", frames)
        n = frames.n
        if where == "step":
            self._check_step(n)
        direct = self.frames_out == self.frames_in and self.final_after(n) == n
        if self._shapes is None:
            self._start(frames)
        self._shapes = shapes
        with torch.no_grad():
            if direct:
                # nothing pending and every output of this push is final: no query buffering
                self.frames_in += n
                out = self._emit(n, direct=frames)
            else:
                self._pending_q.append(frames.q)
                self._accept(frames)
                self.frames_in += n
                out = self._emit(self._tracker.count_ready(self.frames_out, self.frames_in))
        self._log_compute(t0, out.shape[1])
        return out

    def _emit(self, m: int, direct: Frames | None = None) -> torch.Tensor:
        b, hq, _, hv, _, dv, dtype, device = self._shapes
        if m == 0:  # output heads: q's, or v's under the delta family's value grouping
            return torch.empty(b, 0, max(hq, hv), dv, dtype=dtype, device=device)
        p0 = self.frames_out
        last = self.frames_in - 1
        ready = self._tracker.take(p0, m)
        if ready[-1] > last:  # flush: the stream ends before the lookahead is satisfied
            ready = [min(r, last) for r in ready]
        if b == 0:  # an empty batch: nothing to compute, the frames still count
            if direct is not None:
                self._accept(direct)
            out = torch.empty(0, m, hq, dv, dtype=dtype, device=device)
        elif direct is not None:
            out = self._compute_direct(direct, p0)
        else:
            out = self._compute(self._pending_q.view(p0, p0 + m), p0, ready[-1] + 1)
        self._ready_log.append(ready)
        self.frames_out += m
        self._pending_q.drop_before(self.frames_out)
        self._advance()
        return out

    def _log_compute(self, t0: float, m: int) -> None:
        if m:
            self._compute_log.append([latency_maths.CLOCK() - t0] * m)

    def _check(self, name: str, frames: Frames) -> tuple:
        """Check a push's frames (changing nothing); returns their shapes to keep."""
        if self.closed:
            raise ValueError(f"{name}: the stream was flushed (closed); start a new stream")
        q, k, v = frames.q, frames.k, frames.v
        _, tq, tk, hq, hkv, d, dv = check_qkv(name, q, k, v, heads=not self.family_heads)
        if tq != tk:
            raise ValueError(
                f"{name}: q, k, v must hold the same frames, got q {tq}, k/v {tk} frames"
            )
        if tq < 1:
            raise ValueError(f"{name}: push at least one frame, got q of shape {list(q.shape)}")
        shapes = (q.shape[0], hq, hkv, v.shape[2], d, dv, q.dtype, q.device)
        if self._shapes is None:
            self._check_first(name, frames)
        elif shapes != self._shapes:
            names = ("batch", "q heads", "kv heads", "v heads", "head dim", "value dim", "dtype",
                     "device")
            diff = [
                f"{n} {new} (was {old})"
                for n, new, old in zip(names, shapes, self._shapes, strict=True)
                if new != old
            ]
            raise ValueError(f"{name}: frames differ from the first push: {', '.join(diff)}")
        self._check_extras(name, frames)
        self.check_frame_positions(name, tq)
        return shapes

    def _check_step(self, n: int) -> None:
        name = f"{type(self).__name__}.step"
        if self.frames_out != self.frames_in:
            raise ValueError(
                f"{name}: {self.pending} earlier outputs are still "
                f"pending; step() needs a stream whose outputs are all final (use push())"
            )
        final = self.final_after(n)
        if final != n:
            p0 = self.frames_in
            raise ValueError(
                f"{name}: outputs of positions [{p0 + final}, {p0 + n}) are "
                f"not final after this step under {self.visibility!r} (they wait for frames up "
                f"to {self._tracker.ready_of(p0 + n - 1)}); decode a whole chunk / the whole "
                f"prefix per step, or use push()"
            )

    def check_frame_positions(self, name: str, n: int) -> None:
        """Raise ``ValueError`` (naming ``name``) unless the queries of ``n`` more frames
        ``[frames_in, frames_in + n)`` and keys ``[0, frames_in + n)`` are positions the spec
        defines (and below ``MAX_POSITION``). Changes nothing."""
        try:
            self.visibility.check_positions(n, self.frames_in + n, self.frames_in, 0)
        except ValueError as e:
            raise ValueError(f"{name}: this push would reach position "
                             f"{self.frames_in + n - 1}: {e}") from None


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return repr(value.tolist()) if value.numel() <= 8 else f"<tensor {list(value.shape)}>"
    return repr(value)
