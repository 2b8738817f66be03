"""Visibility: who may see whom.

A visibility spec answers one question, ``visible(b, i, j)``: may the query at **absolute**
position ``i`` (batch row ``b``) see the key at absolute position ``j``? Operations are told where
their queries and keys sit (``q_offset``, ``k_offset``), so prefill, decode, streaming chunks and
shards all ask the same question and there is no top-left / bottom-right ambiguity::

    Causal()                  j <= i
    Full()                    always
    Prefix(n)                 j <= i  or  j < n          (n: int, or a [B] tensor of lengths)
    Chunked(size, lookahead)  j // size <= i // size + lookahead     (lookahead counts chunks)
    Window(left, right)       i - left <= j <= i + right
    Segments(ids)             ids[i] == ids[j]           (ids: [T] or [B, T] integer tensor)
    AdaptiveLookahead(a)      j <= i + a[i]              (a: [T] or [B, T], per-query frames)
    ValidKeys(valid)          valid[b, j]                (valid: [B, T] bool, 0 = padding)
    a & b,  a | b             both / either

Example, ``Chunked(2, lookahead=1)`` on 6 positions (row = query i, column = key j)::

        j 0 1 2 3 4 5
    i 0   x x x x . .
      1   x x x x . .
      2   x x x x x x
      3   x x x x x x
      4   x x x x x x
      5   x x x x x x

The spec protocol
-----------------
Every mixer and execution mode talks to a spec through these public members only:

* :meth:`Visibility.visible` ``(b, i, j) -> bool tensor``: the elementwise predicate, shaped like
  FlexAttention's ``mask_mod`` (without the head index): broadcastable int64 tensors in, their
  broadcast bool tensor out, only elementwise ops and gathers (so it vmaps and compiles).
* :meth:`Visibility.key_range` ``(i) -> KeyRange(lo, hi) | None``: if every query sees one
  contiguous range of keys, its inclusive ends (each broadcastable to ``[B', N]`` for
  ``i: [N]``; ``None`` for an unbounded end); ``None`` if the keys seen are not a range. Optional:
  specs without it are served by dense masks per tile.
* :attr:`Visibility.lookahead_frames` / :attr:`Visibility.lookback_frames`: the largest
  ``j - i`` / ``i - j`` over visible pairs, in frames (``None``: unbounded or unknown, the safe
  answer). The lookahead fixes streaming latency, the lookback bounds a streaming KV cache.
* :attr:`Visibility.batch_size` (``None`` = any batch) and :attr:`Visibility.covered_length`
  (number of positions a tensor-holding spec defines, ``None`` = unlimited).

From these the base class derives the rest, the same for every spec: the dense boolean
:meth:`~Visibility.mask` (the oracle every test compares against), exact per-tile counts and the
empty / partial / full :meth:`~Visibility.block_map`, :meth:`~Visibility.horizon` (the last key
each query may see, which decides when a streamed output is final) and
:meth:`~Visibility.check_positions`. Writing your own spec (this example is a test)::

    @dataclasses.dataclass(frozen=True)
    class Dilated(Visibility):            # causal, every `step`-th key only
        step: int

        def visible(self, b, i, j):
            return (j <= i) & ((i - j) % self.step == 0)

        @property
        def lookahead_frames(self):
            return 0

    Dilated(2).mask(4, 4)                  # works with every mixer: block maps, streams, ...

Specs are frozen, hashable values. ``Prefix`` with a tensor, ``Segments`` and
``AdaptiveLookahead`` copy their tensor at construction (refilling the caller's buffer later
changes nothing), compare and hash by its content, and refuse to be used once their own copy has
been modified in place. Positions are ints in ``[0, MAX_POSITION)``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "EMPTY",
    "FULL",
    "MAX_POSITION",
    "PARTIAL",
    "AdaptiveLookahead",
    "And",
    "ArgumentTypeError",
    "Causal",
    "Chunked",
    "Full",
    "KeyRange",
    "Or",
    "Prefix",
    "Segments",
    "Strided",
    "UnboundedHorizonError",
    "ValidKeys",
    "Visibility",
    "Window",
    "check_int",
]

#: Tile kinds in :meth:`Visibility.block_map`.
EMPTY, PARTIAL, FULL = 0, 1, 2

#: Every position (offset + length) an operation asks about must be below this (exact in fp64,
#: far from the internal sentinels below).
MAX_POSITION = 2**53

# Internal sentinels for unbounded range ends in the counting code (never seen outside).
_NEG_INF = -(2**60)
_POS_INF = 2**60


class KeyRange(NamedTuple):
    """Inclusive key range per query: ``lo`` / ``hi`` int64 tensors broadcastable to ``[B', N]``,
    ``None`` for an unbounded end."""

    lo: torch.Tensor | None
    hi: torch.Tensor | None


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that is also a ``ValueError``: every bad
    input to causalmix can be caught as ``ValueError``)."""


class UnboundedHorizonError(ValueError):
    """A query may see keys arbitrarily far ahead: :meth:`Visibility.horizon` has no bound."""


def check_int(name: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an ``int`` (Python, numpy or 0-d integer tensor; never ``bool`` or float) in
    ``[minimum, maximum]``; else ``ValueError`` naming ``name``. The one integer check of the
    package."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (
            value.dim() != 0 or value.dtype.is_floating_point or value.dtype == torch.bool)):
        value_ok = None
    else:
        try:
            value_ok = operator.index(value)
        except TypeError:
            value_ok = None
    lo = "" if minimum is None else f" >= {minimum}"
    if value_ok is None:
        raise ValueError(f"{name} must be an int{lo}, got {value!r}")
    if minimum is not None and value_ok < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value_ok}")
    if maximum is not None and value_ok > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value_ok}")
    return int(value_ok)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.reshape(-1).tolist()))


def _min_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return None
    return max(a, b)


def _merge_batch(a: int | None, b: int | None, what: str) -> int | None:
    if a is None:
        return b
    if b is None or a == b:
        return a
    raise ValueError(f"cannot combine specs with batch sizes {a} and {b} in {what}")


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


def _bounds(spec: Visibility, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``spec.key_range(i)`` with unbounded ends replaced by the internal sentinels."""
    kr = spec.key_range(i)
    if kr is None:
        return None
    lo, hi = kr
    lo = torch.full_like(i, _NEG_INF) if lo is None else lo.to(torch.int64)
    hi = torch.full_like(i, _POS_INF) if hi is None else hi.to(torch.int64)
    return lo, hi


def _opt_max(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else torch.maximum(a, b)


def _opt_min(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else torch.minimum(a, b)


class Visibility:
    """Base class of all visibility specs (see the module docstring for the protocol). Combine
    specs with ``&`` (both) and ``|`` (either)."""

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
    def lookback(self) -> int | None:
        """Same as :attr:`lookback_frames`."""
        return self.lookback_frames

    @property
    def covered_length(self) -> int | None:
        """Number of positions the spec is defined on (tensor-holding specs), ``None`` if
        unlimited."""
        return None

    # ---------------------------------------------------------------- combinators
    def __and__(self, other: Visibility) -> Visibility:
        if not isinstance(other, Visibility):
            return NotImplemented
        return And(self, other)

    def __or__(self, other: Visibility) -> Visibility:
        if not isinstance(other, Visibility):
            return NotImplemented
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

    def mask(
        self,
        q_len: int,
        k_len: int,
        *,
        q_offset: int = 0,
        k_offset: int = 0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The dense boolean mask, True = visible: the oracle every mixer is tested against.

        Queries sit at absolute positions ``q_offset + [0, q_len)``, keys at
        ``k_offset + [0, k_len)``. Returns ``[B', q_len, k_len]`` with ``B'`` = 1, or the spec's
        :attr:`batch_size`.
        """
        self.check_positions(q_len, k_len, q_offset, k_offset)
        q_offset, k_offset = int(q_offset), int(k_offset)
        nb = self.batch_size or 1
        b = torch.arange(nb, device=device).view(nb, 1, 1)
        i = torch.arange(q_offset, q_offset + q_len, device=device).view(1, q_len, 1)
        j = torch.arange(k_offset, k_offset + k_len, device=device).view(1, 1, k_len)
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
        positions = _check_positions_arg(positions)
        return self._horizon(positions)

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
        return positions + la

    def tile_counts(
        self,
        q_len: int,
        k_len: int,
        block_q: int,
        block_k: int | None = None,
        *,
        q_offset: int = 0,
        k_offset: int = 0,
    ) -> torch.Tensor:
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
        tiling = _Tiling(q_len, k_len, block_q, block_k, q_offset, k_offset)
        counts = self._counts(tiling)
        b = self.batch_size or 1
        if counts is None:
            counts = torch.full((b, tiling.nq, tiling.nk), -1, dtype=torch.int64)
        counts = counts.expand(b, tiling.nq, tiling.nk).clone()
        unknown_rows = (counts < 0).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        for r in unknown_rows:
            q0 = q_offset + r * block_q
            rows = min(block_q, q_offset + q_len - q0)
            m = self.mask(rows, k_len, q_offset=q0, k_offset=k_offset)  # [B', rows, Tk]
            pad = tiling.nk * block_k - k_len
            per_tile = torch.nn.functional.pad(m.to(torch.int64).sum(1), (0, pad))
            per_tile = per_tile.view(-1, tiling.nk, block_k).sum(-1).expand(b, tiling.nk)
            row = counts[:, r]
            counts[:, r] = torch.where(row < 0, per_tile, row)
        return counts

    def block_map(
        self,
        q_len: int,
        k_len: int,
        block_q: int,
        block_k: int | None = None,
        *,
        q_offset: int = 0,
        k_offset: int = 0,
    ) -> torch.Tensor:
        """Classify each (query-block, key-block) tile: ``EMPTY`` (no visible pair), ``FULL``
        (every pair visible) or ``PARTIAL`` (both). Returns int8 ``[B', n_q_blocks, n_k_blocks]``
        on the CPU; blocks as in :meth:`tile_counts`."""
        block_k = block_q if block_k is None else block_k
        counts = self.tile_counts(
            q_len, k_len, block_q, block_k, q_offset=q_offset, k_offset=k_offset
        )
        tiling = _Tiling(q_len, k_len, block_q, block_k, q_offset, k_offset)
        out = torch.full(counts.shape, PARTIAL, dtype=torch.int8)
        out[counts == 0] = EMPTY
        out[counts == tiling.sizes()] = FULL
        return out

    def count_visible(
        self, q_len: int, k_len: int, *, q_offset: int = 0, k_offset: int = 0
    ) -> torch.Tensor:
        """Number of visible (query, key) pairs, int64 ``[B']``."""
        blk = max(1, min(max(q_len, 1), 256))
        c = self.tile_counts(
            q_len, k_len, blk, max(1, min(max(k_len, 1), 1024)), q_offset=q_offset,
            k_offset=k_offset,
        )
        return c.sum(dim=(1, 2))

    # ---------------------------------------------------------------- counting
    def _counts(self, t: _Tiling) -> torch.Tensor | None:
        """Exact tile counts ``[B', nq, nk]`` where known, -1 where not; ``None`` if unknown."""
        iv = _bounds(self, t.q_positions())
        if iv is None:
            return None
        return t.count_intervals(*iv)


class _Tiling:
    """Tile geometry shared by the counting code (CPU, int64)."""

    def __init__(self, q_len: int, k_len: int, bq: int, bk: int, q_off: int, k_off: int):
        self.q_len, self.k_len, self.bq, self.bk = q_len, k_len, bq, bk
        self.q_off, self.k_off = q_off, k_off
        self.nq = -(-q_len // bq)
        self.nk = -(-k_len // bk)

    def q_positions(self) -> torch.Tensor:
        return torch.arange(self.q_off, self.q_off + self.q_len)

    def sizes(self) -> torch.Tensor:
        rq = torch.full((self.nq,), self.bq, dtype=torch.int64)
        rk = torch.full((self.nk,), self.bk, dtype=torch.int64)
        if self.nq:
            rq[-1] = self.q_len - (self.nq - 1) * self.bq
        if self.nk:
            rk[-1] = self.k_len - (self.nk - 1) * self.bk
        return rq[:, None] * rk[None, :]

    def count_intervals(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.broadcast_tensors(lo.to(torch.int64), hi.to(torch.int64))
        if lo.dim() == 1:
            lo, hi = lo[None], hi[None]
        b = lo.shape[0]
        starts = self.k_off + torch.arange(self.nk) * self.bk
        ends = torch.clamp(starts + self.bk, max=self.k_off + self.k_len) - 1
        out = torch.zeros(b, self.nq, self.nk, dtype=torch.int64)
        rows_per_step = max(1, (1 << 21) // max(1, self.nk * b * self.bq)) * self.bq
        for r0 in range(0, self.q_len, rows_per_step):
            r1 = min(self.q_len, r0 + rows_per_step)
            c = torch.minimum(hi[:, r0:r1, None], ends) - torch.maximum(lo[:, r0:r1, None], starts)
            c = (c + 1).clamp_min_(0)  # [b, rows, nk]
            pad = (-(r1 - r0)) % self.bq
            c = torch.nn.functional.pad(c, (0, 0, 0, pad))
            out[:, r0 // self.bq : r0 // self.bq + c.shape[1] // self.bq] = c.view(
                b, -1, self.bq, self.nk
            ).sum(2)
        return out


# ==================================================================================== the specs


def _snapshot(name: str, t: Any, dims: tuple[int, ...], shape_doc: str) -> torch.Tensor:
    """A private int64 copy of a spec's tensor argument (checked)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer {shape_doc} tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer {shape_doc} tensor, got dtype {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {shape_doc}, got shape {list(t.shape)}")
    return t.detach().to(torch.int64, copy=True)


def _int_vector(name: str, x: Any, shape_doc: str) -> torch.Tensor:
    """A 1-D integer tensor, or a list / tuple of ints >= 0, as a private int64 copy."""
    if not isinstance(x, torch.Tensor):
        if not isinstance(x, (list, tuple)):
            raise ValueError(f"{name} must be a {shape_doc} integer tensor or a list of ints, "
                             f"got {type(x).__name__}")
        x = torch.tensor([check_int(f"{name}[{k}]", v, 0) for k, v in enumerate(x)],
                         dtype=torch.int64)
    return _snapshot(name, x, (1,), shape_doc)


class _HoldsTensor(Visibility):
    """Value semantics for specs holding a tensor (their own copy, taken at construction): equal
    and hashed by the content of :meth:`_content` (shape and values), computed once per instance.
    Any use after the copy was modified in place raises instead of serving stale caches."""

    __slots__ = ()

    def _tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def _content(self):
        raise NotImplementedError

    def _seal(self) -> None:
        object.__setattr__(self, "_version_at_init", self._tensor()._version)

    def _check_unmodified(self) -> None:
        v0 = self.__dict__.get("_version_at_init")
        if v0 is not None and self._tensor()._version != v0:
            raise ValueError(
                f"the tensor of this {type(self).__name__} spec was modified in place after "
                f"construction; specs are immutable values: build a new spec instead"
            )

    def _cached(self, name: str, make):
        """``make()`` computed once per instance (refused after an in-place modification)."""
        self._check_unmodified()
        cached = self.__dict__.get(name)
        if cached is None:
            cached = make()
            object.__setattr__(self, name, cached)
        return cached

    def _key(self):
        return self._cached("_cached_key", self._content)

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__, self._key()))

    def mask(self, *args, **kwargs) -> torch.Tensor:
        self._check_unmodified()
        return super().mask(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Causal(Visibility):
    """``j <= i``: each query sees itself and the past."""

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return j <= i

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(None, i)

    @property
    def lookahead_frames(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "Causal()"


@dataclasses.dataclass(frozen=True)
class Full(Visibility):
    """Every query sees every key (bidirectional)."""

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i >= 0) & (j >= 0)  # positions are never negative

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(None, None)

    def __repr__(self) -> str:
        return "Full()"


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix(_HoldsTensor):
    """``j <= i or j < n``: the first ``n`` positions see each other, the rest are causal
    (prefix-LM). ``n`` is an int, or an int ``[B]`` tensor of per-example prefix lengths (copied).

    ``lookahead_frames`` is ``n - 1`` (query 0 may see key ``n - 1``): a stream waits for the
    whole prefix, then runs causally.
    """

    n: int | torch.Tensor

    def __post_init__(self):
        n = self.n
        if isinstance(n, torch.Tensor):
            if n.dim() == 0:
                object.__setattr__(self, "n", check_int("n", n, 0))
                return
            n = _snapshot("n", n, (1,), "int or [B]")
            if n.numel() and int(n.min()) < 0:
                raise ValueError(f"n must be >= 0, got min {int(n.min())}")
            object.__setattr__(self, "n", n)
            self._seal()
        else:
            object.__setattr__(self, "n", check_int("n", n, 0))

    def _tensor(self):
        return self.n if isinstance(self.n, torch.Tensor) else torch.empty(0)

    def _check_unmodified(self) -> None:
        if isinstance(self.n, torch.Tensor):
            super()._check_unmodified()

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        n = self.n.to(i.device)[b] if isinstance(self.n, torch.Tensor) else self.n
        return (j <= i) | (j < n)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        if isinstance(self.n, torch.Tensor):
            self._check_unmodified()
            hi = torch.maximum(i[None, :], self.n.to(i.device)[:, None] - 1)
        else:
            hi = torch.clamp(i, min=self.n - 1)
        return KeyRange(None, hi)

    @property
    def batch_size(self) -> int | None:
        return self.n.shape[0] if isinstance(self.n, torch.Tensor) else None

    @property
    def lookahead_frames(self) -> int:
        if isinstance(self.n, torch.Tensor):
            nmax = int(self.n.max()) if self.n.numel() else 0
        else:
            nmax = self.n
        return max(nmax - 1, 0)

    def _content(self):
        return ("tensor", _tensor_key(self.n)) if isinstance(self.n, torch.Tensor) \
            else ("int", self.n)

    def __repr__(self) -> str:
        if isinstance(self.n, torch.Tensor):
            vals = self.n.tolist()
            shown = vals if len(vals) <= 8 else vals[:8] + ["..."]
            return f"Prefix(n={shown})"
        return f"Prefix({self.n})"


@dataclasses.dataclass(frozen=True)
class Chunked(Visibility):
    """``j // size <= i // size + lookahead``: block-causal over chunks of ``size`` positions
    (chunk boundaries at multiples of ``size`` from position 0), each chunk also seeing
    ``lookahead`` chunks ahead (``lookahead`` counts **chunks**; the frame-valued
    :attr:`lookahead_frames`, the largest ``j - i`` as for every spec, is
    ``(lookahead + 1) * size - 1``)."""

    size: int
    lookahead: int = 0

    def __post_init__(self):
        object.__setattr__(self, "size", check_int("size", self.size, 1))
        object.__setattr__(self, "lookahead", check_int("lookahead", self.lookahead, 0))

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j // self.size) <= (i // self.size) + self.lookahead

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(None, (i // self.size + self.lookahead + 1) * self.size - 1)

    @property
    def lookahead_frames(self) -> int:
        return (self.lookahead + 1) * self.size - 1

    def __repr__(self) -> str:
        return f"Chunked(size={self.size}, lookahead={self.lookahead})"


@dataclasses.dataclass(frozen=True)
class Window(Visibility):
    """``i - left <= j <= i + right``: a sliding window of ``left`` past and ``right`` future
    positions (plus the query's own)."""

    left: int
    right: int = 0

    def __post_init__(self):
        object.__setattr__(self, "left", check_int("left", self.left, 0))
        object.__setattr__(self, "right", check_int("right", self.right, 0))

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j >= i - self.left) & (j <= i + self.right)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        return KeyRange(i - self.left, i + self.right)

    @property
    def lookahead_frames(self) -> int:
        return self.right

    @property
    def lookback_frames(self) -> int:
        return self.left

    def __repr__(self) -> str:
        return f"Window(left={self.left}, right={self.right})"


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(_HoldsTensor):
    """``ids[i] == ids[j]``: documents packed in one sequence, hash buckets, modalities.

    ``ids`` is an integer ``[T]`` or ``[B, T]`` tensor (copied) indexed by **absolute** position,
    so it must cover every position an operation asks about. Usually combined:
    ``Segments(ids) & Causal()`` is per-document causal attention. Ids need not be contiguous runs
    (hash buckets are fine); contiguous runs are counted faster. Packed batches without a
    ``T x T`` tensor: :meth:`from_lengths`, :meth:`from_cu_seqlens`, :meth:`from_position_ids`.
    """

    ids: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "ids", _snapshot("ids", self.ids, (1, 2), "[T] or [B, T]"))
        self._seal()

    # ------------------------------------------------------------ packed-batch constructors
    @classmethod
    def from_lengths(cls, lengths: Any) -> Segments:
        """Documents of the given lengths packed back to back: ``lengths: [N]`` ints >= 0 (a
        tensor or a sequence) -> ids ``[sum(lengths)]`` (document ``d`` has id ``d``)."""
        lengths = _int_vector("lengths", lengths, "[N]")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got min {int(lengths.min())}")
        return cls(torch.repeat_interleave(torch.arange(lengths.numel()), lengths))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Any) -> Segments:
        """The varlen-kernel convention: ``cu_seqlens: [N + 1]`` cumulative lengths starting at 0,
        non-decreasing (``[0, 3, 7]``: documents ``[0, 3)`` and ``[3, 7)``)."""
        cu = _int_vector("cu_seqlens", cu_seqlens, "[N + 1]")
        if cu.numel() == 0 or int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start with 0, got {cu.tolist()[:8]}")
        lengths = cu[1:] - cu[:-1]
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        return cls.from_lengths(lengths)

    @classmethod
    def from_position_ids(cls, position_ids: Any) -> Segments:
        """Packed sequences as transformers marks them: ``position_ids: [T]`` or ``[B, T]``
        integer tensor; a new document starts wherever ``position_ids[t] !=
        position_ids[t - 1] + 1`` (e.g. a restart at 0). Returns ids of the same shape."""
        p = _snapshot("position_ids", position_ids, (1, 2), "[T] or [B, T]")
        new = torch.ones_like(p, dtype=torch.bool)
        new[..., 1:] = p[..., 1:] != p[..., :-1] + 1
        return cls(new.to(torch.int64).cumsum(-1) - 1)

    # ------------------------------------------------------------ protocol
    def _tensor(self):
        return self.ids

    def _ids(self, device) -> torch.Tensor:
        ids = self.ids if self.ids.dim() == 2 else self.ids[None]
        return ids.to(device)

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        ids = self.ids.to(i.device)
        if ids.dim() == 1:
            return ids[i] == ids[j]
        return ids[b, i] == ids[b, j]

    def _make_runs(self):
        ids = self._ids("cpu")
        b, n = ids.shape
        pos = torch.arange(n).expand(b, n)
        new = torch.ones(b, n, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]
        start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
        last = torch.ones(b, n, dtype=torch.bool)
        last[:, :-1] = new[:, 1:]
        end = torch.where(last, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values
        end = end.flip(1)
        contiguous = all(
            int(new[r].sum()) == int(torch.unique(ids[r]).numel()) for r in range(b)
        )
        return start, end, contiguous

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        start, end, contiguous = self._cached("_cached_runs", self._make_runs)
        if not contiguous:
            return None
        dev = i.device
        i = i.cpu()
        lo, hi = start[:, i].to(dev), end[:, i].to(dev)
        return KeyRange(lo, hi) if self.ids.dim() == 2 else KeyRange(lo[0], hi[0])

    @property
    def covered_length(self) -> int:
        return self.ids.shape[-1]

    @property
    def batch_size(self) -> int | None:
        return self.ids.shape[0] if self.ids.dim() == 2 else None

    def _content(self):
        return _tensor_key(self.ids)

    def __repr__(self) -> str:
        n_runs = sum(int((r[1:] != r[:-1]).sum()) + 1 for r in self._ids("cpu") if r.numel())
        return f"Segments(ids=<{list(self.ids.shape)}, {n_runs} runs>)"


@dataclasses.dataclass(frozen=True, eq=False)
class ValidKeys(_HoldsTensor):
    """``valid[b, j]``: a query may see key ``j`` of example ``b`` iff it is not padding.

    ``valid`` is a bool (or 0/1 integer) ``[B, T]`` tensor (copied) indexed by **absolute** key
    position -- transformers' 2-D ``attention_mask``, 1 = token, 0 = padding -- so it must cover
    every position an operation asks about. Combined with a rule, ``Causal() & ValidKeys(mask)``
    is the causal mask with padding in O(B * T) memory; a query whose row sees no key (a
    left-padding query) gets output 0. Rows whose tokens form one run (left or right padding)
    give each query one key range (block maps counted analytically); rows with holes fall back
    to the dense mask one block of queries at a time.

    ``Causal() & ValidKeys(tensor([[0, 0, 1, 1, 1]]))`` (row = query i, column = key j)::

            j 0 1 2 3 4
        i 0   . . . . .
          1   . . . . .
          2   . . x . .
          3   . . x x .
          4   . . x x x
    """

    valid: torch.Tensor

    def __post_init__(self):
        v = self.valid
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"valid must be a bool [B, T] tensor, got {type(v).__name__}")
        if v.dtype.is_floating_point or v.dtype.is_complex:
            raise ValueError(f"valid must be a bool or 0/1 integer tensor, got dtype {v.dtype}")
        if v.dim() != 2:
            raise ValueError(f"valid must be [B, T], got shape {list(v.shape)}")
        if v.dtype != torch.bool and v.numel() and not bool(((v == 0) | (v == 1)).all()):
            raise ValueError("valid must hold only 0 and 1")
        object.__setattr__(self, "valid", v.detach().to(torch.bool, copy=True))
        self._seal()

    def _tensor(self) -> torch.Tensor:
        return self.valid

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.valid.to(j.device)[b, j] & (i >= 0)

    def _make_runs(self):
        valid = self.valid
        n = valid.shape[1]
        pos = torch.arange(n)
        count = valid.sum(1)
        first = torch.where(valid, pos, n).amin(1) if n else count
        last = torch.where(valid, pos, -1).amax(1) if n else count - 1
        one_run = bool(((last - first + 1 == count) | (count == 0)).all())
        empty = count == 0  # an empty row gets the empty range [n, n - 1]
        return torch.where(empty, n, first), torch.where(empty, n - 1, last), one_run

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        first, last, one_run = self._cached("_cached_runs", self._make_runs)
        if not one_run:
            return None
        shape = (first.shape[0], i.shape[-1])
        return KeyRange(first.to(i.device)[:, None].expand(shape),
                        last.to(i.device)[:, None].expand(shape))

    @property
    def covered_length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def _content(self):
        return _tensor_key(self.valid)

    def __repr__(self) -> str:
        pads = (~self.valid).sum(1).tolist()
        shown = pads if len(pads) <= 8 else pads[:8] + ["..."]
        return f"ValidKeys(<{list(self.valid.shape)}, padding per row {shown}>)"


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptiveLookahead(_HoldsTensor):
    """``j <= i + a[b, i]``: causal, plus a per-query lookahead ``a`` (in frames).

    ``a`` is an int ``[B, T]`` (or ``[T]``) tensor >= 0 (copied) indexed by **absolute** query
    position, so it must cover every query position an operation asks about
    (``covered_length = T``). Each query sees the range ``[0, i + a_i]``, so block maps are exact
    and ``impl="blocks"`` skips empty tiles; combine with ``&`` for more
    (``& Window(left, W)``). ``lookahead_frames`` is ``max(a)``. Compares and hashes by the
    content of ``a``. Made by :class:`causalmix.nn.adaptive.AdaptiveBlock`'s gates.
    """

    a: torch.Tensor

    def __post_init__(self):
        a = _snapshot("a", self.a, (1, 2), "[T] or [B, T]")
        if a.numel() and int(a.min()) < 0:
            raise ValueError(f"a must be >= 0 (lookaheads), got min {int(a.min())}")
        object.__setattr__(self, "a", a)
        self._seal()

    def _tensor(self):
        return self.a

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        a = self.a.to(i.device)
        ai = a[i] if a.dim() == 1 else a[b, i]
        return j <= i + ai

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        self._check_unmodified()
        a = self.a.to(i.device)
        return KeyRange(None, i + (a[i] if a.dim() == 1 else a[:, i]))

    @property
    def covered_length(self) -> int:
        return self.a.shape[-1]

    @property
    def batch_size(self) -> int | None:
        return self.a.shape[0] if self.a.dim() == 2 else None

    @property
    def lookahead_frames(self) -> int:
        return int(self.a.max()) if self.a.numel() else 0

    def _content(self):
        return _tensor_key(self.a)

    def __repr__(self) -> str:
        return f"AdaptiveLookahead(a=<{list(self.a.shape)}, max {self.lookahead_frames}>)"


@dataclasses.dataclass(frozen=True)
class Strided(Visibility):
    """``inner`` seen through local indices: ``visible(i, j) = inner.visible(q_start +
    q_stride * i, k_start + k_stride * j)`` (a strided shard of a sequence, e.g. the striped
    sequence-parallel layout). Where ``inner`` sees one range of keys per query, so does the
    wrapper (a range of absolute keys holds a range of every arithmetic progression)."""

    inner: Visibility
    q_start: int
    q_stride: int
    k_start: int
    k_stride: int

    def __post_init__(self):
        _check_spec("inner", self.inner)
        for name, minimum in (("q_start", 0), ("q_stride", 1), ("k_start", 0), ("k_stride", 1)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum))

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.inner.visible(b, self.q_start + self.q_stride * i,
                                  self.k_start + self.k_stride * j)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        kr = self.inner.key_range(self.q_start + self.q_stride * i)
        if kr is None:
            return None
        s, k0 = self.k_stride, self.k_start
        # smallest j with k0 + s*j >= lo, largest j with k0 + s*j <= hi
        lo = None if kr.lo is None else -((k0 - kr.lo) // s)
        hi = None if kr.hi is None else (kr.hi - k0) // s
        return KeyRange(lo, hi)

    @property
    def batch_size(self) -> int | None:
        return self.inner.batch_size

    def __repr__(self) -> str:
        return (f"Strided({self.inner!r}, q={self.q_start}+{self.q_stride}*i, "
                f"k={self.k_start}+{self.k_stride}*j)")


def _check_spec(name: str, spec: Any) -> None:
    if not isinstance(spec, Visibility):
        raise ArgumentTypeError(
            f"{name} must be a causalmix.visibility spec (Causal(), Window(...), ...), got "
            f"{type(spec).__name__} {spec!r}"
        )


def _unknown(c: torch.Tensor | None, t: _Tiling) -> torch.Tensor:
    return torch.full((1, t.nq, t.nk), -1, dtype=torch.int64) if c is None else c


class _Combined(Visibility):
    """Shared by ``&`` and ``|``: argument checks, batch size, covered length."""

    __slots__ = ()
    _symbol = "?"

    def __post_init__(self):
        _check_spec("a", self.a)
        _check_spec("b", self.b)
        _merge_batch(self.a.batch_size, self.b.batch_size, repr(self))

    @property
    def batch_size(self) -> int | None:
        return _merge_batch(self.a.batch_size, self.b.batch_size, self._symbol)

    @property
    def covered_length(self) -> int | None:
        return _min_opt(self.a.covered_length, self.b.covered_length)

    def _side_counts(self, t: _Tiling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each side's tile counts (-1 where unknown), broadcast, and the tile sizes."""
        ca, cb = torch.broadcast_tensors(_unknown(self.a._counts(t), t),
                                         _unknown(self.b._counts(t), t))
        return ca, cb, t.sizes()

    def __repr__(self) -> str:
        return f"({self.a!r} {self._symbol} {self.b!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class And(_Combined):
    """Visible under both ``a`` and ``b``. Written ``a & b``."""

    a: Visibility
    b: Visibility
    _symbol = "&"

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.a.visible(b, i, j) & self.b.visible(b, i, j)

    def key_range(self, i: torch.Tensor) -> KeyRange | None:
        ka, kb = self.a.key_range(i), self.b.key_range(i)
        if ka is None or kb is None:
            return None
        return KeyRange(_opt_max(ka.lo, kb.lo), _opt_min(ka.hi, kb.hi))

    def _horizon(self, positions):
        if self.key_range(positions) is not None:
            return super()._horizon(positions)
        ha = hb = None
        try:
            ha = self.a._horizon(positions)
        except UnboundedHorizonError:
            pass
        try:
            hb = self.b._horizon(positions)
        except UnboundedHorizonError:
            pass
        if ha is None and hb is None:
            return super()._horizon(positions)
        return _opt_min(ha, hb)

    def _counts(self, t):
        exact = super()._counts(t)
        if exact is not None:
            return exact
        ca, cb, size = self._side_counts(t)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == size, cb, out)
        out = torch.where(cb == size, ca, out)
        return torch.where((ca == 0) | (cb == 0), torch.zeros_like(out), out)

    @property
    def lookahead_frames(self) -> int | None:
        return _min_opt(self.a.lookahead_frames, self.b.lookahead_frames)

    @property
    def lookback_frames(self) -> int | None:
        return _min_opt(self.a.lookback_frames, self.b.lookback_frames)


@dataclasses.dataclass(frozen=True, repr=False)
class Or(_Combined):
    """Visible under ``a`` or ``b``. Written ``a | b``, e.g. ``Chunked(64) | Window(16)``: chunked
    attention whose first frames still see the end of the previous chunk."""

    a: Visibility
    b: Visibility
    _symbol = "|"

    def visible(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.a.visible(b, i, j) | self.b.visible(b, i, j)

    def _horizon(self, positions):
        return torch.maximum(self.a._horizon(positions), self.b._horizon(positions))

    def _counts(self, t):
        ia, ib = _bounds(self.a, t.q_positions()), _bounds(self.b, t.q_positions())
        if ia is not None and ib is not None:
            both = t.count_intervals(torch.maximum(ia[0], ib[0]), torch.minimum(ia[1], ib[1]))
            return t.count_intervals(*ia) + t.count_intervals(*ib) - both
        ca, cb, size = self._side_counts(t)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == 0, cb, out)
        out = torch.where(cb == 0, ca, out)
        return torch.where((ca == size) | (cb == size), size.expand_as(out), out)

    @property
    def lookahead_frames(self) -> int | None:
        return _max_opt(self.a.lookahead_frames, self.b.lookahead_frames)

    @property
    def lookback_frames(self) -> int | None:
        return _max_opt(self.a.lookback_frames, self.b.lookback_frames)
