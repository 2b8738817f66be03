"""The spec protocol: the :class:`Visibility` base class and what it derives for every spec.

A spec implements :meth:`Visibility.visible` (and optionally :meth:`~Visibility.key_range`,
the frame properties, :attr:`~Visibility.batch_size`, :attr:`~Visibility.covered_length`); the
base class derives the dense :meth:`~Visibility.mask`, the exact per-tile counts and
:meth:`~Visibility.block_map`, :meth:`~Visibility.horizon` and
:meth:`~Visibility.check_positions` from them, the same for every spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from causalmix.checks import MAX_POSITION, ArgumentTypeError, UnboundedHorizonError, check_int
from causalmix.visibility.tiling import NEG_INF, POS_INF, Tiling

__all__ = ["EMPTY", "FULL", "PARTIAL", "KeyRange", "Visibility", "check_layer_specs", "check_spec",
           "check_visibility"]

#: Tile kinds in :meth:`Visibility.block_map`.
EMPTY, PARTIAL, FULL = 0, 1, 2


class KeyRange(NamedTuple):
    """Inclusive key range per query: ``lo`` / ``hi`` int64 tensors broadcastable to ``[B', N]``,
    ``None`` for an unbounded end."""

    lo: torch.Tensor | None
    hi: torch.Tensor | None


# ------------------------------------------------------------------ None-aware helpers
# Frame counts: ``None`` means unbounded (+infinity).
def frames_min(a: int | None, b: int | None) -> int | None:
    """``min`` of two frame counts, ``None`` = unbounded."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def frames_max(a: int | None, b: int | None) -> int | None:
    """``max`` of two frame counts, ``None`` = unbounded (absorbing)."""
    return None if a is None or b is None else max(a, b)


# Range ends: ``None`` means the end is unbounded (-inf for ``lo``, +inf for ``hi``).
def tighter_lo(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The larger of two lower ends (``None`` = unbounded below)."""
    if a is None:
        return b
    return a if b is None else torch.maximum(a, b)


def tighter_hi(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The smaller of two upper ends (``None`` = unbounded above)."""
    if a is None:
        return b
    return a if b is None else torch.minimum(a, b)


def clamp_position(x: int) -> int:
    """A non-negative int argument clamped to ``MAX_POSITION``: a distance or length larger
    than every position means the same as ``MAX_POSITION``, and keeps int64 arithmetic on
    positions from overflowing."""
    return min(int(x), MAX_POSITION)


def merge_batch(a: int | None, b: int | None, what: str) -> int | None:
    """The batch size of two combined specs (``None`` = any)."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    raise ValueError(f"cannot combine specs with batch sizes {a} and {b} in {what}")


def mask_batch(spec: Visibility) -> int:
    """Leading dimension of the spec's masks: its batch size, or 1 (a batch of 0 stays 0)."""
    nb = spec.batch_size
    return 1 if nb is None else nb


def bounds(spec: Visibility, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``spec.key_range(i)`` with unbounded ends replaced by the internal sentinels."""
    kr = spec.key_range(i)
    if kr is None:
        return None
    lo = torch.full_like(i, NEG_INF) if kr.lo is None else kr.lo.to(torch.int64)
    hi = torch.full_like(i, POS_INF) if kr.hi is None else kr.hi.to(torch.int64)
    return lo, hi


def _check_positions_arg(positions: Any) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"positions must be an int64 [N] tensor, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or \
            positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer [N] tensor, got dtype {positions.dtype}")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [N], got shape {list(positions.shape)}")
    positions = positions.to(torch.int64)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= MAX_POSITION):
        raise ValueError(
            f"positions must lie in [0, {MAX_POSITION}), got min {int(positions.min())}, "
            f"max {int(positions.max())}"
        )
    return positions


class Visibility:
    """Base class of all visibility specs (see :mod:`causalmix.visibility` for the protocol).
    Combine specs with ``&`` (both) and ``|`` (either)."""

    __slots__ = ()

    # ---------------------------------------------------------------- the protocol
    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Elementwise ``visible``: ``b`` (batch index), ``i`` (query position) and ``j`` (key
        position) are broadcastable int64 tensors (scalars inside FlexAttention's ``mask_mod``);
        returns their broadcast bool tensor. Only elementwise ops and gathers, so it can be
        vmapped and compiled."""
        raise NotImplementedError(f"{type(self).__name__} must implement visible(b, i, j)")

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        """If every query sees one contiguous range of keys: ``KeyRange(lo, hi)`` (inclusive),
        each ``None`` (unbounded) or broadcastable to ``[B', N]`` for ``i: [N]``; else ``None``.
        """
        return None

    @property
    def batch_size(self) -> int | None:
        """Batch size the spec is tied to (``Prefix`` with a tensor, ``Segments`` with
        ``[B, T]`` ids), or ``None`` when it applies to any batch."""
        return None

    @property
    def lookahead_frames(self) -> int | None:
        """Largest ``j - i`` over visible pairs, in frames (``None`` if unbounded or unknown).
        For ``a & b`` this is ``min`` of the two, an upper bound; for ``a | b`` the ``max``
        (``None`` if either is)."""
        return None

    @property
    def lookback_frames(self) -> int | None:
        """Largest ``i - j`` over visible pairs, in frames (``None`` if unbounded or unknown):
        how far back a query can ever look, which bounds a streaming KV cache."""
        return None

    @property
    def covered_length(self) -> int | None:
        """Number of positions the spec is defined on (tensor-holding specs), ``None`` if
        unlimited."""
        return None

    def check_unmodified(self) -> None:
        """Raise ``ValueError`` if a tensor the spec holds was modified in place after
        construction (specs are immutable values); a no-op for specs without tensors."""

    # ---------------------------------------------------------------- combinators
    def __and__(self, other: Visibility) -> Visibility:
        if not isinstance(other, Visibility):
            return NotImplemented
        from causalmix.visibility.combine import And

        return And(self, other)

    def __or__(self, other: Visibility) -> Visibility:
        if not isinstance(other, Visibility):
            return NotImplemented
        from causalmix.visibility.combine import Or

        return Or(self, other)

    # ---------------------------------------------------------------- public queries
    def check_positions(self, q_len: int, k_len: int, q_offset: int = 0,
                        k_offset: int = 0) -> None:
        """Raise ``ValueError`` unless queries at ``q_offset + [0, q_len)`` and keys at
        ``k_offset + [0, k_len)`` are ints inside ``[0, MAX_POSITION)`` and inside the positions
        the spec defines (:attr:`covered_length`)."""
        check_int("q_len", q_len, 0)
        check_int("k_len", k_len, 0)
        check_int("q_offset", q_offset, 0)
        check_int("k_offset", k_offset, 0)
        for what, off, n in (("q", q_offset, q_len), ("k", k_offset, k_len)):
            if int(off) + int(n) > MAX_POSITION:
                raise ValueError(
                    f"{what}_offset + {what}_len must be <= {MAX_POSITION} (positions are ints "
                    f"below 2**53), got {what}_offset={int(off)}, {what}_len={int(n)}"
                )
        cover = self.covered_length
        if cover is not None:
            need = max(q_offset + q_len, k_offset + k_len)
            if need > cover:
                raise ValueError(
                    f"{self!r} defines positions [0, {cover}) but positions up to {need - 1} were "
                    f"asked for (q_offset={q_offset}, q_len={q_len}, k_offset={k_offset}, "
                    f"k_len={k_len})"
                )

    def mask(self, q_len: int, k_len: int, *, q_offset: int = 0, k_offset: int = 0,
             device: torch.device | str | None = None) -> torch.Tensor:
        """The dense boolean mask, True = visible: the oracle every mixer is tested against.

        Queries sit at absolute positions ``q_offset + [0, q_len)``, keys at
        ``k_offset + [0, k_len)``. Returns ``[B', q_len, k_len]`` with ``B'`` = 1, or the spec's
        :attr:`batch_size`.
        """
        self.check_positions(q_len, k_len, q_offset, k_offset)
        q_offset, k_offset = int(q_offset), int(k_offset)
        nb = mask_batch(self)
        b = torch.arange(nb, device=device).view(nb, 1, 1)
        i = torch.arange(q_offset, q_offset + q_len, device=device).view(1, q_len, 1)
        j = torch.arange(k_offset, k_offset + k_len, device=device).view(1, 1, k_len)
        if nb == 0 or q_len == 0 or k_len == 0:
            return torch.zeros(nb, q_len, k_len, dtype=torch.bool, device=device)
        return self.visible(b, i, j).expand(nb, q_len, k_len)

    def mask_mod(self, q_offset: int = 0, k_offset: int = 0) -> Callable[..., torch.Tensor]:
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for queries at ``q_offset + q_idx``
        and keys at ``k_offset + kv_idx``."""
        check_int("q_offset", q_offset, 0)
        check_int("k_offset", k_offset, 0)

        def mask_mod(b, h, q_idx, kv_idx):
            return self.visible(b, q_idx + q_offset, kv_idx + k_offset)

        return mask_mod

    def horizon(self, positions: torch.Tensor) -> torch.Tensor:
        """Last key position each query position may see -- the one horizon contract, used to
        decide when a streamed output is final.

        ``positions: [N]`` int -> int64 ``[N]`` or ``[B, N]``. Exact for specs with a
        :meth:`key_range`; otherwise an upper bound (``a | b``: the larger of the two, ``a & b``:
        the smaller, any other spec: ``i + lookahead_frames``). Raises
        :class:`UnboundedHorizonError` (a ``ValueError``) where a query may see keys arbitrarily
        far ahead, ``ValueError`` for positions that are not a 1-D int tensor in
        ``[0, MAX_POSITION)``.
        """
        return self._horizon(_check_positions_arg(positions))

    def _horizon(self, positions: torch.Tensor) -> torch.Tensor:
        kr = self.key_range(positions)
        if kr is not None:
            if kr.hi is None:
                raise UnboundedHorizonError(
                    f"{self!r} has an unbounded horizon: a query may see every future key")
            hi = kr.hi.to(torch.int64)
            return hi.expand(torch.broadcast_shapes(hi.shape, positions.shape)).clone()
        la = self.lookahead_frames
        if la is None:
            raise UnboundedHorizonError(
                f"{self!r} has no per-query key horizon (keys seen are not a range) and an "
                f"unbounded lookahead"
            )
        return positions + clamp_position(la)

    def tile_counts(self, q_len: int, k_len: int, block_q: int, block_k: int | None = None, *,
                    q_offset: int = 0, k_offset: int = 0) -> torch.Tensor:
        """Exact number of visible pairs in each (query-block, key-block) tile.

        Blocks start at the first query / key (``q_offset``, ``k_offset``); the last block of each
        axis may be short. Returns int64 ``[B', ceil(q_len / block_q), ceil(k_len / block_k)]`` on
        the CPU. Specs with a :meth:`key_range` are counted analytically in
        O(q_len * n_key_blocks); the rest fall back to the dense mask, one query block at a time,
        only where the tile is undetermined.
        """
        block_k = block_q if block_k is None else block_k
        check_int("block_q", block_q, 1)
        check_int("block_k", block_k, 1)
        self.check_positions(q_len, k_len, q_offset, k_offset)
        t = Tiling(q_len, k_len, block_q, block_k, q_off=q_offset, k_off=k_offset)
        b = mask_batch(self)
        if b == 0 or t.nq == 0 or t.nk == 0:
            return torch.zeros(b, t.nq, t.nk, dtype=torch.int64)
        counts = self._counts(t)
        counts = (t.unknown() if counts is None else counts).expand(b, t.nq, t.nk).clone()
        for r in (counts < 0).any(dim=2).any(dim=0).nonzero().flatten().tolist():
            counts[:, r] = self._dense_row_counts(t, r, counts[:, r])
        return counts

    def _dense_row_counts(self, t: Tiling, r: int, row: torch.Tensor) -> torch.Tensor:
        """Fill the unknown (-1) tiles of query block ``r`` from the dense mask."""
        q0 = t.q_off + r * t.bq
        rows = min(t.bq, t.q_off + t.q_len - q0)
        m = self.mask(rows, t.k_len, q_offset=q0, k_offset=t.k_off)  # [B', rows, Tk]
        pad = t.nk * t.bk - t.k_len
        per_tile = torch.nn.functional.pad(m.to(torch.int64).sum(1), (0, pad))
        per_tile = per_tile.view(-1, t.nk, t.bk).sum(-1).expand(row.shape[0], t.nk)
        return torch.where(row < 0, per_tile, row)

    def block_map(self, q_len: int, k_len: int, block_q: int, block_k: int | None = None, *,
                  q_offset: int = 0, k_offset: int = 0) -> torch.Tensor:
        """Classify each (query-block, key-block) tile: ``EMPTY`` (no visible pair), ``FULL``
        (every pair visible) or ``PARTIAL`` (both). Returns int8 ``[B', n_q_blocks, n_k_blocks]``
        on the CPU; blocks as in :meth:`tile_counts`."""
        block_k = block_q if block_k is None else block_k
        counts = self.tile_counts(
            q_len, k_len, block_q, block_k, q_offset=q_offset, k_offset=k_offset
        )
        t = Tiling(q_len, k_len, block_q, block_k, q_off=q_offset, k_off=k_offset)
        out = torch.full(counts.shape, PARTIAL, dtype=torch.int8)
        out[counts == 0] = EMPTY
        out[counts == t.sizes()] = FULL
        return out

    def count_visible(self, q_len: int, k_len: int, *, q_offset: int = 0,
                      k_offset: int = 0) -> torch.Tensor:
        """Number of visible (query, key) pairs, int64 ``[B']``."""
        blk = max(1, min(max(q_len, 1), 256))
        c = self.tile_counts(
            q_len, k_len, blk, max(1, min(max(k_len, 1), 1024)), q_offset=q_offset,
            k_offset=k_offset,
        )
        return c.sum(dim=(1, 2))

    # ---------------------------------------------------------------- counting
    def _counts(self, t: Tiling) -> torch.Tensor | None:
        """Exact tile counts ``[B', nq, nk]`` where known, -1 where not; ``None`` if unknown."""
        iv = bounds(self, t.q_positions())
        if iv is None:
            return None
        return t.count_intervals(*iv)


def check_spec(name: str, spec: Any) -> None:
    """``spec`` must be a :class:`Visibility`; else :class:`ArgumentTypeError` naming it."""
    if not isinstance(spec, Visibility):
        raise ArgumentTypeError(
            f"{name} must be a causalmix.visibility spec (Causal(), Window(...), ...), got "
            f"{type(spec).__name__} {spec!r}"
        )


def check_visibility(fn: str, visibility: Any, batch: int, q_len: int, k_len: int, *,
                     q_offset: int = 0, k_offset: int = 0) -> None:
    """The spec of a call: a :class:`Visibility` for this batch size that covers the queries at
    ``q_offset + [0, q_len)`` and keys at ``k_offset + [0, k_len)``; else ``ValueError``
    (:class:`ArgumentTypeError` for a non-spec) naming ``fn``."""
    if not isinstance(visibility, Visibility):
        raise ArgumentTypeError(
            f"{fn}: visibility must be a causalmix.visibility spec (Causal(), Window(...), ...), "
            f"got {type(visibility).__name__}"
        )
    check_int("q_offset", q_offset, 0)
    check_int("k_offset", k_offset, 0)
    visibility.check_unmodified()
    vb = visibility.batch_size
    if vb is not None and vb != batch:
        raise ValueError(
            f"{fn}: visibility {visibility!r} is for batch size {vb} but the inputs have "
            f"batch size {batch}"
        )
    visibility.check_positions(q_len, k_len, q_offset, k_offset)


def check_layer_specs(where: str, visibility: Any, n_layers: int, *,
                      batch: int | None = None) -> tuple[Visibility, ...]:
    """``visibility``: one spec per layer (a tuple or list of ``n_layers`` specs, each for the
    batch size ``batch`` when given); returns it as a tuple, else ``ValueError`` (an
    :class:`ArgumentTypeError` for wrong types) naming ``where`` and the layer."""
    if isinstance(visibility, Visibility) or not isinstance(visibility, (tuple, list)):
        raise ArgumentTypeError(f"{where}: visibility must be a tuple with one spec per layer "
                                f"({n_layers}) or None, got {type(visibility).__name__}")
    if len(visibility) != n_layers:
        raise ValueError(f"{where}: visibility must give one spec per layer ({n_layers}), got "
                         f"{len(visibility)}")
    for i, spec in enumerate(visibility):
        check_spec(f"{where}: visibility[{i}]", spec)
        if batch is not None and spec.batch_size is not None and spec.batch_size != batch:
            raise ValueError(f"{where}: visibility[{i}] {spec!r} is for batch size "
                             f"{spec.batch_size} but the inputs have batch size {batch}")
    return tuple(visibility)
