"""Streaming linear attention: a carried state plus a buffer of at most the lookahead."""

from __future__ import annotations

import torch

from causalmix.ops.linear import factorise, linear_attention
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
    cd = torch.float64 if k.dtype == torch.float64 else torch.float32
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
    """Stream ``linear_attention(q, k, v, visibility, decay=...)`` frame by frame, with memory
    constant in the stream length.

    Output ``i`` is ``sum_{j visible} lambda^|i-j| (q_i . k_j) v_j``. Every spec linear attention
    supports (``Causal()``, ``Prefix(n)``, ``Chunked(size, lookahead)``, ``Segments(ids) & ...``;
    see ``causalmix.ops.linear``) lets a query see every earlier key of its segment, so the keys
    before the first pending output live in one carried causal state
    ``S = sum_{j < frames_out} lambda^(frames_out-1-j) k_j v_j^T`` (``[B, H, D, Dv]``, fp32;
    reset at segment starts), passed as ``initial_state``. The keys from ``frames_out`` on (the
    in-flight ones: at most the lookahead plus one push, e.g. the incomplete chunks of
    ``Chunked(size, lookahead)``) stay raw in a buffer, because a query weighs a later key as
    ``lambda^(j - i)``, which no forward state holds.

    Each emission of the outputs ``[p0, p1)`` makes one ``linear_attention`` call over the
    positions ``[p0, k_end)`` (``k_end - 1``: the last key any of them sees) from the carried
    state, keeping the first ``p1 - p0`` outputs. When ``k_end == p1`` (``Causal``, whole chunks
    of ``Chunked(size, 0)``, the prefix of ``Prefix``) that call's ``final_state`` is the next
    state; otherwise the emitted keys are folded into the state with :func:`fold_state` (with
    ``Segments``, by a second call asking for the final state, so that resets apply).

    ``Window`` and ``|`` specs raise ``ValueError`` (linear attention has no exact state for
    them), and so does unbounded lookahead (``Full()``), as for every stream.

    Args:
        visibility: the spec, as for the parallel call.
        decay: ``[H]`` per-head decay in (0, 1], or ``None`` (no decay).
        impl, chunk_size: passed to ``linear_attention`` (``impl="auto"``: ``recurrent`` for
            single-frame steps, ``chunk`` otherwise).

    Shapes: ``push(q [B, n, H, D], k [B, n, H, D], v [B, n, H, Dv]) -> [B, m, H, Dv]``.
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
            factorise(visibility)
        except ValueError as e:
            raise ValueError(f"LinearStream: cannot stream {visibility!r}: {e}") from None
        if decay is not None:
            if not isinstance(decay, torch.Tensor) or not decay.dtype.is_floating_point \
                    or decay.dim() != 1:
                raise ValueError(
                    f"LinearStream: decay must be a floating [H] tensor in (0, 1] or None, got "
                    f"{decay!r}"
                )
            if bool(((decay <= 0) | (decay > 1)).any()):
                raise ValueError(f"LinearStream: decay must lie in (0, 1], got {decay.tolist()}")
            decay = decay.detach()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"LinearStream: chunk_size must be an int >= 1, got {chunk_size!r}")
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
        self._keys_past_queries = not factorise(visibility).has_reverse and impl != "recurrent"
        self.state: torch.Tensor | None = None  # causal state of the keys before the buffer
        self._k = FrameBuffer()
        self._v = FrameBuffer()

    @property
    def buffer_len(self) -> int:
        """Number of raw key/value frames held (those from the first pending output on)."""
        return self._k.length

    def cache_nbytes(self) -> int:
        """Bytes held by the state, the key/value buffer and the pending-query buffer."""
        s = 0 if self.state is None else self.state.numel() * self.state.element_size()
        return s + self._k.nbytes() + self._v.nbytes() + self._pending_q.nbytes()

    def _check_first(self, q, k, v):
        super()._check_first(q, k, v)
        if self.decay is not None and self.decay.shape[0] != q.shape[2]:
            raise ValueError(
                f"LinearStream.push: decay has {self.decay.shape[0]} heads but q has "
                f"{q.shape[2]}"
            )
        if k.shape[2] != q.shape[2]:
            raise ValueError(
                f"LinearStream.push: q, k, v must have the same heads, got q {q.shape[2]}, "
                f"k {k.shape[2]}"
            )

    def _accept(self, k, v):
        self._k.append(k)
        self._v.append(v)

    def _call(self, q, k, v, p0, want_state):
        decay = None if self.decay is None else self.decay.to(q.device)
        return linear_attention(
            q, k, v, self.visibility, decay=decay, q_offset=p0, k_offset=p0,
            initial_state=self.state, return_final_state=want_state, impl=self.impl,
            chunk_size=self.chunk_size,
        )

    def _compute(self, q, p0, k_end):
        m = q.shape[1]
        assert self._k.start == p0  # the buffer starts at the first pending output
        qs = self._pending_q.view(p0, k_end)
        ks, vs = self._k.view(p0, k_end), self._v.view(p0, k_end)
        if k_end == p0 + m:
            out, state = self._call(qs, ks, vs, p0, True)
        else:
            if self._keys_past_queries:
                # only the final queries: the op reads the later keys through its band
                out = self._call(q, ks, vs, p0, False)
            else:
                out = self._call(qs, ks, vs, p0, False)[:, :m]
            if self._segmented:
                _, state = self._call(q, ks[:, :m], vs[:, :m], p0, True)
            else:
                state = fold_state(self.state, ks[:, :m], vs[:, :m], self.decay)
        self.state = state
        return out

    def _compute_direct(self, q, k, v, p0):
        # every output of the push is final: the pushed keys go straight into the state
        out, self.state = self._call(q, k, v, p0, True)
        return out

    def _advance(self):
        self._k.drop_before(self.frames_out)
        self._v.drop_before(self.frames_out)
