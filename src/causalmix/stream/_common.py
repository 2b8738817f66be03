"""Pieces shared by the mixer streams: when an output becomes final, latency bookkeeping, a
growable frame buffer, and the push / flush skeleton.

Positions are absolute frame indices counted from the first pushed frame (frame ``t`` of the
stream is position ``t``), exactly as in the parallel ops, so the stream asks the spec the same
``visible(i, j)`` question as a parallel call over the whole sequence.
"""

from __future__ import annotations

import array
import bisect

import torch

from causalmix.checks import MAX_POSITION, UnboundedHorizonError, check_qkv
from causalmix.stream.latency import LatencyStats
from causalmix.visibility import Visibility

__all__ = ["FrameBuffer", "IntLog", "LatencyStats", "MixerStream", "ReadyTracker", "horizon",
           "unbounded_error"]

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


# ============================================================================ latency log


class IntLog:
    """Append-only int64 log indexed by absolute output position (a compact ``array('q')``, 8
    bytes per entry), optionally pruned below a position (``drop_before``) so that long streams
    keep only what is still asked for."""

    def __init__(self):
        self.start = 0  # position of the first live entry
        self._arr = array.array("q")
        self._off = 0  # index in _arr of `start`

    def append(self, values: list[int]) -> None:
        self._arr.extend(values)

    def get(self, positions: list[int]) -> list[int]:
        d = self._off - self.start
        return [self._arr[p + d] for p in positions]

    def values(self) -> torch.Tensor:
        """``[n]`` int64: the entries from position :attr:`start` on."""
        return torch.tensor(self._arr[self._off :], dtype=torch.int64)

    def drop_before(self, position: int) -> None:
        n = min(max(0, position - self.start), len(self._arr) - self._off)
        self._off += n
        self.start += n
        if self._off > 4096 and 2 * self._off > len(self._arr):
            del self._arr[: self._off]
            self._off = 0


# ============================================================================ frame buffer


class FrameBuffer:
    """Frames ``[B, n, ...]`` at absolute positions ``[start, end)``, appended at the end and
    dropped from the front, in one preallocated storage (amortised O(1) per frame, capacity at
    most twice the largest live length plus one push)."""

    def __init__(self):
        self.storage: torch.Tensor | None = None
        self.lo = 0  # storage index of position `start`
        self.start = 0  # absolute position of the first live frame
        self.length = 0

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.shape[1]

    def nbytes(self) -> int:
        s = self.storage
        return 0 if s is None else s.numel() * s.element_size()

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[1]
        if self.storage is None:
            self.storage = x.new_empty((x.shape[0], max(2 * n, 16), *x.shape[2:]))
        if self.lo + self.length + n > self.capacity:
            live = self.storage[:, self.lo : self.lo + self.length]
            cap = self.capacity
            if self.length + n > cap // 2:
                cap = max(2 * (self.length + n), 16)
                new = x.new_empty((x.shape[0], cap, *x.shape[2:]))
                new[:, : self.length] = live
                self.storage = new
            elif self.lo >= self.length:  # source and destination do not overlap
                self.storage[:, : self.length] = live
            else:
                self.storage[:, : self.length] = live.clone()
            self.lo = 0
        self.storage[:, self.lo + self.length : self.lo + self.length + n] = x
        self.length += n

    def view(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Frames at absolute positions ``[start, end)`` (default: all live ones), a view."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not (self.start <= start <= end <= self.end):
            raise AssertionError(
                f"[{start}, {end}) outside the live range [{self.start}, {self.end})"
            )
        a = self.lo + start - self.start
        return self.storage[:, a : a + end - start]

    def drop_before(self, position: int) -> None:
        n = min(max(0, position - self.start), self.length)
        self.lo += n
        self.start += n
        self.length -= n
        if self.length == 0:
            self.lo = 0
            self.start = max(self.start, position)


# ============================================================================ the mixer skeleton


class MixerStream:
    """Streams one mixer call ``mixer(q, k, v, visibility)`` over a sequence that arrives in
    pieces.

    ``push(q, k, v)`` takes the next ``n >= 1`` frames (``q, k: [B, n, H, D]``,
    ``v: [B, n, Hkv, Dv]``) and returns the outputs that are now final, ``[B, m, H, Dv]`` with
    ``m >= 0``; ``flush()`` ends the stream and returns the rest. Concatenated, the outputs equal
    the parallel op over the whole sequence. An output at position ``i`` is final once frame
    ``ready_at[i] = max(i, horizon(i))`` has arrived; its algorithmic latency is
    ``ready_at[i] - i`` frames (at flush, ``ready_at`` is clipped to the last frame). Outputs leave
    in order, so ``ready_at`` is made non-decreasing.

    Streams are for inference: they run under ``torch.no_grad()`` and their outputs carry no
    autograd graph.
    """

    mixer = "?"
    #: constructor options shown by ``repr`` (those the stream has)
    _REPR_OPTIONS = ("scale", "decay", "impl", "chunk_size")

    def __init__(self, visibility: Visibility):
        name = type(self).__name__
        if not isinstance(visibility, Visibility):
            raise TypeError(
                f"{name}: visibility must be a causalmix.visibility spec (Causal(), Window(...), "
                f"...), got {type(visibility).__name__}"
            )
        self.visibility = visibility
        self._tracker = ReadyTracker(name, visibility)
        self._pending_q = FrameBuffer()
        self._ready_log = IntLog()  # ready_at of every emitted output (clipped at flush)
        self._latency_log = IntLog()
        self._shapes: tuple | None = None  # (B, H, Hkv, D, Dv, dtype, device) of the first push
        self.frames_in = 0
        self.frames_out = 0
        self.closed = False

    # ------------------------------------------------------------------ subclass hooks
    def _accept(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute(self, q: torch.Tensor, p0: int, k_end: int) -> torch.Tensor:
        """Outputs ``[B, m, H, Dv]`` for queries ``q: [B, m, H, D]`` at ``[p0, p0 + m)``, which
        see no key at or after position ``k_end`` (``<= frames_in``)."""
        raise NotImplementedError

    def _compute_direct(self, q, k, v, p0: int) -> torch.Tensor:
        """Outputs of a push whose outputs are all final at once (nothing pending before it):
        ``q, k, v`` are the pushed frames at ``[p0, p0 + n)``, not yet given to ``_accept``."""
        self._accept(k, v)
        return self._compute(q, p0, p0 + q.shape[1])

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
        name = type(self).__name__
        if self.closed:
            raise ValueError(f"{name}.push: the stream was flushed (closed); start a new stream")
        # every check before the first change: a push that raises leaves the stream as it was
        shapes = self._check(q, k, v)
        n = q.shape[1]
        self._check_frame_positions(n)
        direct = self.frames_out == self.frames_in and self.final_after(n) == n
        self._shapes = shapes
        with torch.no_grad():
            if direct:
                # nothing pending and every output of this push is final: no query buffering
                self.frames_in += n
                return self._emit(n, direct=(q, k, v))
            self._pending_q.append(q)
            self._accept(k, v)
            self.frames_in += n
            m = self._tracker.count_ready(self.frames_out, self.frames_in)
            return self._emit(m)

    def flush(self) -> torch.Tensor:
        """End the stream: the remaining outputs, ``[B, m, H, Dv]``, each computed with the keys
        that exist (as the parallel op over the pushed sequence does)."""
        name = type(self).__name__
        if self.closed:
            raise ValueError(f"{name}.flush: the stream was already flushed")
        if self._shapes is None:
            raise ValueError(f"{name}.flush: nothing was pushed, there is no output to return")
        with torch.no_grad():
            out = self._emit(self.frames_in - self.frames_out)
        self.closed = True
        return out

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             **frame_inputs) -> torch.Tensor:
        """Decode step: push ``n`` frames and return exactly their ``n`` outputs.
        ``frame_inputs``: per-frame keyword tensors of the subclass's ``push`` (the linear
        stream's gates).

        For generation, where the next input depends on these outputs: ``Causal()``,
        ``Window(left, 0)``, ``Prefix(n)`` once the prefix was pushed in one piece, and
        ``Chunked(size)`` one whole chunk per step. Raises ``ValueError`` when an output of these
        frames is not final yet (the spec looks ahead of them) or earlier outputs are pending.
        """
        name = type(self).__name__
        if self.closed:
            raise ValueError(f"{name}.step: the stream was flushed (closed); start a new stream")
        if self.frames_out != self.frames_in:
            raise ValueError(
                f"{name}.step: {self.pending} earlier outputs are still "
                f"pending; step() needs a stream whose outputs are all final (use push())"
            )
        self._check(q, k, v)
        p0, n = self.frames_in, q.shape[1]
        self._check_frame_positions(n)
        final = self.final_after(n)
        if final != n:
            raise ValueError(
                f"{name}.step: outputs of positions [{p0 + final}, {p0 + n}) are "
                f"not final after this step under {self.visibility!r} (they wait for frames up "
                f"to {self._tracker.ready_of(p0 + n - 1)}); decode a whole chunk / the whole "
                f"prefix per step, or use push()"
            )
        return self.push(q, k, v, **frame_inputs)

    def final_after(self, n: int) -> int:
        """How many of the pending outputs and those of ``n`` more frames would be final once
        these frames arrived (changes nothing)."""
        return self._tracker.count_ready(self.frames_out, self.frames_in + n)

    @property
    def ready_at(self) -> torch.Tensor:
        """``[frames_out]`` int64: for each emitted output, the last input frame it waited for."""
        if self._ready_log.start:
            raise ValueError("ready_at history was pruned by the owning ModelStream")
        return self._ready_log.values()

    @property
    def latency(self) -> torch.Tensor:
        """``[frames_out]`` int64: frames each emitted output waited beyond its own frame."""
        return self._latency_log.values()

    def latency_stats(self) -> LatencyStats:
        """Mean / p50 / p90 / max of :attr:`latency`."""
        return LatencyStats.of(self.latency)

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

    # ------------------------------------------------------------------ internals
    def _emit(self, m: int, direct: tuple | None = None) -> torch.Tensor:
        b, hq, _, _, dv, dtype, device = self._shapes
        if m == 0:
            return torch.empty(b, 0, hq, dv, dtype=dtype, device=device)
        p0 = self.frames_out
        last = self.frames_in - 1
        ready = self._tracker.take(p0, m)
        if ready[-1] > last:  # flush: the stream ends before the lookahead is satisfied
            ready = [min(r, last) for r in ready]
        if direct is not None:
            out = self._compute_direct(*direct, p0)
        else:
            out = self._compute(self._pending_q.view(p0, p0 + m), p0, ready[-1] + 1)
        self._ready_log.append(ready)
        self._latency_log.append([r - p for r, p in zip(ready, range(p0, p0 + m), strict=True)])
        self.frames_out += m
        self._pending_q.drop_before(self.frames_out)
        self._advance()
        return out

    def _check(self, q, k, v) -> tuple:
        """Check a push's frames (changing nothing); returns their shapes to keep."""
        name = f"{type(self).__name__}.push"
        _, tq, tk, hq, hkv, d, dv = check_qkv(name, q, k, v)
        if tq != tk:
            raise ValueError(
                f"{name}: q, k, v must hold the same frames, got q {tq}, k/v {tk} frames"
            )
        if tq < 1:
            raise ValueError(f"{name}: push at least one frame, got q of shape {list(q.shape)}")
        shapes = (q.shape[0], hq, hkv, d, dv, q.dtype, q.device)
        if self._shapes is None:
            self._check_first(q, k, v)
        elif shapes != self._shapes:
            names = ("batch", "q heads", "kv heads", "head dim", "value dim", "dtype", "device")
            diff = [
                f"{n} {new} (was {old})"
                for n, new, old in zip(names, shapes, self._shapes, strict=True)
                if new != old
            ]
            raise ValueError(f"{name}: frames differ from the first push: {', '.join(diff)}")
        return shapes

    def _check_first(self, q, k, v) -> None:
        name = f"{type(self).__name__}.push"
        vb = self.visibility.batch_size
        if vb is not None and vb != q.shape[0]:
            raise ValueError(
                f"{name}: visibility {self.visibility!r} is for batch size {vb} but the frames "
                f"have batch size {q.shape[0]}"
            )

    def _check_frame_positions(self, n: int) -> None:
        """The push's queries ``[frames_in, frames_in + n)`` and keys ``[0, frames_in + n)``
        must be positions the spec defines (and below ``MAX_POSITION``)."""
        try:
            self.visibility.check_positions(n, self.frames_in + n, self.frames_in, 0)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}.push: this push would reach position "
                             f"{self.frames_in + n - 1}: {e}") from None


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return repr(value.tolist()) if value.numel() <= 8 else f"<tensor {list(value.shape)}>"
    return repr(value)
