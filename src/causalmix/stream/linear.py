"""Streaming linear attention: a carried state plus a buffer of at most the lookahead."""

from __future__ import annotations

import torch

from causalmix.checks import ArgumentTypeError, check_decay, check_int, compute_dtype
from causalmix.ops.linear import factorise, linear_attention
from causalmix.ops.linear.api import check_gate
from causalmix.stream._common import FrameBuffer, MixerStream
from causalmix.visibility import And, Segments, Visibility


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


class LinearStream(MixerStream):
    """Stream ``linear_attention(q, k, v, visibility, decay=... | log_gate=...)`` frame by frame,
    with memory constant in the stream length.

    Output ``i`` is ``sum_{j visible} w_ij (q_i . k_j) v_j`` with ``w_ij = lambda^|i-j|``, or
    with per-token gates pushed with their frames (``push(q, k, v, log_gate=g)``, ``g: [B, n,
    H]``, optional ``reverse_log_gate``; see ``causalmix.ops.linear``). Every spec linear
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

    Shapes: ``push(q [B, n, H, D], k [B, n, Hkv, D], v [B, n, Hkv, Dv], *, log_gate [B, n, H],
    reverse_log_gate [B, n, H]) -> [B, m, H, Dv]``.
    """

    mixer = "linear"

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
        if impl not in ("auto", "chunk", "recurrent", "reference"):
            raise ValueError(
                f"LinearStream: impl must be one of ['auto', 'chunk', 'recurrent', 'reference'], "
                f"got {impl!r}"
            )
        self.decay, self.impl, self.chunk_size = decay, impl, chunk_size
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
        self._gates: tuple[bool, bool] | None = None  # (gated, reverse gate) from the first push
        self._incoming: tuple = (None, None)  # gates of the push being processed

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
        final. ``log_gate, reverse_log_gate: [B, n, H]``; see :class:`MixerStream.push`."""
        if not self.closed:
            self._check(q, k, v)
            self._check_gates(q, log_gate, reverse_log_gate)
        self._incoming = (log_gate, reverse_log_gate)
        try:
            return super().push(q, k, v)
        finally:
            self._incoming = (None, None)

    def _check_gates(self, q, log_gate, reverse_log_gate) -> None:
        name = "LinearStream.push"
        mode = (log_gate is not None, reverse_log_gate is not None)
        if mode[0] and self.decay is not None:
            raise ValueError(f"{name}: this stream has a constant decay; log_gate is exclusive "
                             f"with it")
        if mode[1] and not mode[0]:
            raise ValueError(f"{name}: reverse_log_gate needs log_gate")
        if self._gates is not None and mode != self._gates:
            raise ValueError(f"{name}: every push must give the same gates as the first one "
                             f"(log_gate {self._gates[0]}, reverse_log_gate {self._gates[1]}), "
                             f"got log_gate {mode[0]}, reverse_log_gate {mode[1]}")
        b, n, h = q.shape[0], q.shape[1], q.shape[2]
        for gname, gate in (("log_gate", log_gate), ("reverse_log_gate", reverse_log_gate)):
            if gate is not None:
                check_gate(name, gname, gate, (b, n, h), q)
        self._gates = mode

    def _check_first(self, q, k, v):
        super()._check_first(q, k, v)
        if self.decay is not None and self.decay.shape[0] != q.shape[2]:
            raise ValueError(
                f"LinearStream.push: decay has {self.decay.shape[0]} heads but q has "
                f"{q.shape[2]}"
            )

    def _accept(self, k, v):
        self._k.append(k)
        self._v.append(v)
        g, gr = self._incoming
        if g is not None:
            self._g.append(g)
        if gr is not None:
            self._gr.append(gr)

    def _gate_views(self, p0, k_end):
        if not self._gates or not self._gates[0]:
            return None, None
        gr = self._gr.view(p0, k_end) if self._gates[1] else None
        return self._g.view(p0, k_end), gr

    def _call(self, q, k, v, p0, want_state, gates):
        decay = None if self.decay is None else self.decay.to(q.device)
        return linear_attention(
            q, k, v, self.visibility, decay=decay, log_gate=gates[0],
            reverse_log_gate=gates[1], q_offset=p0, k_offset=p0, initial_state=self.state,
            return_final_state=want_state, impl=self.impl, chunk_size=self.chunk_size,
        )

    def _compute(self, q, p0, k_end):
        m = q.shape[1]
        assert self._k.start == p0  # the buffer starts at the first pending output
        qs = self._pending_q.view(p0, k_end)
        ks, vs = self._k.view(p0, k_end), self._v.view(p0, k_end)
        gates = self._gate_views(p0, k_end)
        if k_end == p0 + m:
            out, state = self._call(qs, ks, vs, p0, True, gates)
        else:
            if self._keys_past_queries:
                # only the final queries: the op reads the later keys through its band
                out = self._call(q, ks, vs, p0, False, gates)
            else:
                out = self._call(qs, ks, vs, p0, False, gates)[:, :m]
            if self._segmented or gates[0] is not None or ks.shape[2] != q.shape[2]:
                head = tuple(None if g is None else g[:, :m] for g in gates)
                _, state = self._call(q, ks[:, :m], vs[:, :m], p0, True, head)
            else:
                state = fold_state(self.state, ks[:, :m], vs[:, :m], self.decay)
        self.state = state
        return out

    def _compute_direct(self, q, k, v, p0):
        # every output of the push is final: the pushed keys go straight into the state
        out, self.state = self._call(q, k, v, p0, True, self._incoming)
        return out

    def _advance(self):
        for buf in (self._k, self._v, self._g, self._gr):
            buf.drop_before(self.frames_out)
