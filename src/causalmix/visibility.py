"""Visibility: who may see whom.

A visibility spec answers one question, ``visible(i, j)``: may the query at **absolute** position
``i`` see the key at absolute position ``j``? Operations are told where their queries and keys sit
(``q_offset``, ``k_offset``), so prefill, decode, streaming chunks and shards all ask the same
question and there is no top-left / bottom-right ambiguity::

    Causal()                  j <= i
    Full()                    always
    Prefix(n)                 j <= i  or  j < n          (n: int, or a [B] tensor of lengths)
    Chunked(size, lookahead)  j // size <= i // size + lookahead
    Window(left, right)       i - left <= j <= i + right
    Segments(ids)             ids[i] == ids[j]           (ids: [T] or [B, T] integer tensor)
    a & b,  a | b             both / either

Example, ``Chunked(2, lookahead=1)`` on 6 positions (row = query i, column = key j)::

        j 0 1 2 3 4 5
    i 0   x x x x . .
      1   x x x x . .
      2   x x x x x x
      3   x x x x x x
      4   x x x x x x
      5   x x x x x x

Every spec can build the dense boolean mask (:meth:`Visibility.mask`, the oracle), count the
visible pairs in each (query-block, key-block) tile and classify tiles as empty / partial / full
(:meth:`Visibility.block_map`), and report its :attr:`~Visibility.lookahead` (the largest
``j - i`` it allows, which fixes streaming latency) and :attr:`~Visibility.lookback`.

Specs are frozen, hashable values. ``Prefix`` with a tensor and ``Segments`` compare and hash by
the *content* of their tensor (shape and values), computed once per instance.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "And",
    "Causal",
    "Chunked",
    "Full",
    "Or",
    "Prefix",
    "Segments",
    "Visibility",
    "Window",
]

#: Tile kinds in :meth:`Visibility.block_map`.
EMPTY, PARTIAL, FULL = 0, 1, 2

# Sentinels for unbounded interval ends (positions are < 2**40 in any realistic use).
_NEG_INF = -(2**60)
_POS_INF = 2**60


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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


class Visibility:
    """Base class of all visibility specs. Combine specs with ``&`` (both) and ``|`` (either)."""

    __slots__ = ()

    # ---------------------------------------------------------------- to be defined by specs
    def _pred(self, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Elementwise ``visible``: ``b`` (batch index), ``i`` (query position) and ``j`` (key
        position) are broadcastable int64 tensors (scalars inside FlexAttention's ``mask_mod``);
        returns their broadcast bool tensor. Only elementwise ops and gathers, so it can be
        vmapped and compiled."""
        raise NotImplementedError

    def _intervals(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """If every query sees one contiguous range of keys: ``(lo, hi)`` (inclusive), each
        broadcastable to ``[B', Tq]`` for ``i: [Tq]``; else ``None``."""
        return None

    @property
    def batch_size(self) -> int | None:
        """Batch size the spec is tied to (``Prefix`` with a tensor, ``Segments`` with
        ``[B, T]`` ids), or ``None`` when it applies to any batch."""
        return None

    @property
    def lookahead(self) -> int | None:
        """Largest ``j - i`` over visible pairs (``None`` if unbounded). For ``a & b`` this is
        ``min`` of the two, an upper bound; for ``a | b`` the ``max`` (``None`` if either is)."""
        raise NotImplementedError

    @property
    def lookback(self) -> int | None:
        """Largest ``i - j`` over visible pairs (``None`` if unbounded): how far back a query can
        ever look, which bounds a streaming KV cache."""
        raise NotImplementedError

    def _covered_length(self) -> int | None:
        """Number of positions the spec is defined on (``Segments``), ``None`` if unlimited."""
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
    def _check_positions(self, q_len: int, k_len: int, q_offset: int, k_offset: int) -> None:
        _check_int("q_len", q_len, 0)
        _check_int("k_len", k_len, 0)
        _check_int("q_offset", q_offset, 0)
        _check_int("k_offset", k_offset, 0)
        cover = self._covered_length()
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
        self._check_positions(q_len, k_len, q_offset, k_offset)
        nb = self.batch_size or 1
        b = torch.arange(nb, device=device).view(nb, 1, 1)
        i = torch.arange(q_offset, q_offset + q_len, device=device).view(1, q_len, 1)
        j = torch.arange(k_offset, k_offset + k_len, device=device).view(1, 1, k_len)
        return self._pred(b, i, j).expand(nb, q_len, k_len)

    def horizon(self, positions: torch.Tensor) -> torch.Tensor:
        """Largest key position each query position may see: ``positions: [N]`` int ->
        ``[N]`` or ``[B, N]`` int64. Raises ``ValueError`` where that is unbounded or the spec does
        not see one contiguous range per query (then streaming must wait for the end)."""
        positions = positions.to(torch.int64)
        iv = self._intervals(positions)
        if iv is None:
            raise ValueError(f"{self!r} has no per-query key horizon (keys seen are not a range)")
        hi = iv[1]
        if bool((hi >= _POS_INF // 2).any()):
            raise ValueError(f"{self!r} has an unbounded horizon: a query may see every future key")
        return hi.expand(torch.broadcast_shapes(hi.shape, positions.shape)).clone()

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
        the CPU. Interval-shaped specs (everything except non-contiguous ``Segments`` and some
        ``|`` combinations) are counted analytically in O(q_len * n_key_blocks); the rest fall back
        to the dense mask, one query block at a time, only where the tile is undetermined.
        """
        block_k = block_q if block_k is None else block_k
        _check_int("block_q", block_q, 1)
        _check_int("block_k", block_k, 1)
        self._check_positions(q_len, k_len, q_offset, k_offset)
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
        iv = self._intervals(t.q_positions())
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


class _HoldsTensor(Visibility):
    """Value semantics for specs holding a tensor: equal and hashed by the content of
    :meth:`_content` (shape and values), computed once per instance."""

    __slots__ = ()

    def _content(self):
        raise NotImplementedError

    def _key(self):
        cached = self.__dict__.get("_cached_key")
        if cached is None:
            cached = self._content()
            object.__setattr__(self, "_cached_key", cached)
        return cached

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__, self._key()))



@dataclasses.dataclass(frozen=True)
class Causal(Visibility):
    """``j <= i``: each query sees itself and the past."""

    def _pred(self, b, i, j):
        return j <= i

    def _intervals(self, i):
        return torch.full_like(i, _NEG_INF), i

    @property
    def lookahead(self) -> int:
        return 0

    @property
    def lookback(self) -> None:
        return None

    def __repr__(self) -> str:
        return "Causal()"


@dataclasses.dataclass(frozen=True)
class Full(Visibility):
    """Every query sees every key (bidirectional)."""

    def _pred(self, b, i, j):
        return (i >= 0) & (j >= 0)  # positions are never negative

    def _intervals(self, i):
        return torch.full_like(i, _NEG_INF), torch.full_like(i, _POS_INF)

    @property
    def lookahead(self) -> None:
        return None

    @property
    def lookback(self) -> None:
        return None

    def __repr__(self) -> str:
        return "Full()"


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix(_HoldsTensor):
    """``j <= i or j < n``: the first ``n`` positions see each other, the rest are causal
    (prefix-LM). ``n`` is an int, or an int ``[B]`` tensor of per-example prefix lengths.

    ``lookahead`` is ``n - 1`` (query 0 may see key ``n - 1``): a stream waits for the whole
    prefix, then runs causally.
    """

    n: int | torch.Tensor

    def __post_init__(self):
        n = self.n
        if isinstance(n, torch.Tensor):
            if n.dtype.is_floating_point or n.dtype.is_complex or n.dtype == torch.bool:
                raise ValueError(f"n must be an int or an integer [B] tensor, got dtype {n.dtype}")
            if n.dim() == 0:
                object.__setattr__(self, "n", _check_int("n", int(n), 0))
                return
            if n.dim() != 1:
                raise ValueError(f"n must be an int or a [B] tensor, got shape {list(n.shape)}")
            if n.numel() and int(n.min()) < 0:
                raise ValueError(f"n must be >= 0, got min {int(n.min())}")
            object.__setattr__(self, "n", n.detach().to(torch.int64))
        else:
            _check_int("n", n, 0)

    def _pred(self, b, i, j):
        n = self.n.to(i.device)[b] if isinstance(self.n, torch.Tensor) else self.n
        return (j <= i) | (j < n)

    def _intervals(self, i):
        if isinstance(self.n, torch.Tensor):
            hi = torch.maximum(i[None, :], self.n.to(i.device)[:, None] - 1)
        else:
            hi = torch.clamp(i, min=self.n - 1)
        return torch.full_like(hi, _NEG_INF), hi

    @property
    def batch_size(self) -> int | None:
        return self.n.shape[0] if isinstance(self.n, torch.Tensor) else None

    @property
    def lookahead(self) -> int:
        if isinstance(self.n, torch.Tensor):
            nmax = int(self.n.max()) if self.n.numel() else 0
        else:
            nmax = self.n
        return max(nmax - 1, 0)

    @property
    def lookback(self) -> None:
        return None

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
    ``lookahead`` chunks ahead (stored as ``lookahead_chunks``; the :attr:`lookahead` property,
    the largest ``j - i`` as for every spec, is ``(lookahead_chunks + 1) * size - 1``)."""

    size: int
    lookahead_chunks: int = 0

    def __init__(self, size: int, lookahead: int = 0):
        object.__setattr__(self, "size", _check_int("size", size, 1))
        object.__setattr__(self, "lookahead_chunks", _check_int("lookahead", lookahead, 0))

    def _pred(self, b, i, j):
        return (j // self.size) <= (i // self.size) + self.lookahead_chunks

    def _intervals(self, i):
        hi = (i // self.size + self.lookahead_chunks + 1) * self.size - 1
        return torch.full_like(i, _NEG_INF), hi

    @property
    def lookahead(self) -> int:
        return (self.lookahead_chunks + 1) * self.size - 1

    @property
    def lookback(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"Chunked(size={self.size}, lookahead={self.lookahead_chunks})"


@dataclasses.dataclass(frozen=True)
class Window(Visibility):
    """``i - left <= j <= i + right``: a sliding window of ``left`` past and ``right`` future
    positions (plus the query's own)."""

    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("left", self.left, 0)
        _check_int("right", self.right, 0)

    def _pred(self, b, i, j):
        return (j >= i - self.left) & (j <= i + self.right)

    def _intervals(self, i):
        return i - self.left, i + self.right

    @property
    def lookahead(self) -> int:
        return self.right

    @property
    def lookback(self) -> int:
        return self.left

    def __repr__(self) -> str:
        return f"Window(left={self.left}, right={self.right})"


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(_HoldsTensor):
    """``ids[i] == ids[j]``: documents packed in one sequence, hash buckets, modalities.

    ``ids`` is an integer ``[T]`` or ``[B, T]`` tensor indexed by **absolute** position, so it
    must cover every position an operation asks about. Usually combined: ``Segments(ids) &
    Causal()`` is per-document causal attention. Ids need not be contiguous runs (hash buckets
    are fine); contiguous runs are counted faster.
    """

    ids: torch.Tensor

    def __post_init__(self):
        ids = self.ids
        if not isinstance(ids, torch.Tensor):
            raise ValueError(
                f"ids must be an integer [T] or [B, T] tensor, got {type(ids).__name__}"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() not in (1, 2):
            raise ValueError(f"ids must be [T] or [B, T], got shape {list(ids.shape)}")
        object.__setattr__(self, "ids", ids.detach().to(torch.int64))

    def _ids(self, device) -> torch.Tensor:
        ids = self.ids if self.ids.dim() == 2 else self.ids[None]
        return ids.to(device)

    def _pred(self, b, i, j):
        ids = self.ids.to(i.device)
        if ids.dim() == 1:
            return ids[i] == ids[j]
        return ids[b, i] == ids[b, j]

    def _runs(self):
        cached = self.__dict__.get("_cached_runs")
        if cached is None:
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
            cached = (start, end, contiguous)
            object.__setattr__(self, "_cached_runs", cached)
        return cached

    def _intervals(self, i):
        start, end, contiguous = self._runs()
        if not contiguous:
            return None
        i = i.cpu()
        lo, hi = start[:, i], end[:, i]
        return (lo, hi) if self.ids.dim() == 2 else (lo[0], hi[0])

    def _covered_length(self) -> int:
        return self.ids.shape[-1]

    @property
    def batch_size(self) -> int | None:
        return self.ids.shape[0] if self.ids.dim() == 2 else None

    @property
    def lookahead(self) -> None:
        return None

    @property
    def lookback(self) -> None:
        return None

    def _content(self):
        return _tensor_key(self.ids)

    def __repr__(self) -> str:
        n_runs = sum(int((r[1:] != r[:-1]).sum()) + 1 for r in self._ids("cpu") if r.numel())
        return f"Segments(ids=<{list(self.ids.shape)}, {n_runs} runs>)"


@dataclasses.dataclass(frozen=True)
class And(Visibility):
    """Visible under both ``a`` and ``b``. Written ``a & b``."""

    a: Visibility
    b: Visibility

    def __post_init__(self):
        _merge_batch(self.a.batch_size, self.b.batch_size, repr(self))

    def _pred(self, b, i, j):
        return self.a._pred(b, i, j) & self.b._pred(b, i, j)

    def _intervals(self, i):
        ia, ib = self.a._intervals(i), self.b._intervals(i)
        if ia is None or ib is None:
            return None
        return torch.maximum(ia[0], ib[0]), torch.minimum(ia[1], ib[1])

    def _counts(self, t):
        exact = super()._counts(t)
        if exact is not None:
            return exact
        ca, cb = self.a._counts(t), self.b._counts(t)
        size = t.sizes()
        ca = torch.full((1, t.nq, t.nk), -1, dtype=torch.int64) if ca is None else ca
        cb = torch.full((1, t.nq, t.nk), -1, dtype=torch.int64) if cb is None else cb
        ca, cb = torch.broadcast_tensors(ca, cb)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == size, cb, out)
        out = torch.where(cb == size, ca, out)
        out = torch.where((ca == 0) | (cb == 0), torch.zeros_like(out), out)
        return out

    @property
    def batch_size(self) -> int | None:
        return _merge_batch(self.a.batch_size, self.b.batch_size, "&")

    @property
    def lookahead(self) -> int | None:
        return _min_opt(self.a.lookahead, self.b.lookahead)

    @property
    def lookback(self) -> int | None:
        return _min_opt(self.a.lookback, self.b.lookback)

    def _covered_length(self) -> int | None:
        return _min_opt(self.a._covered_length(), self.b._covered_length())

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


@dataclasses.dataclass(frozen=True)
class Or(Visibility):
    """Visible under ``a`` or ``b``. Written ``a | b``, e.g. ``Chunked(64) | Window(16)``: chunked
    attention whose first frames still see the end of the previous chunk."""

    a: Visibility
    b: Visibility

    def __post_init__(self):
        _merge_batch(self.a.batch_size, self.b.batch_size, repr(self))

    def _pred(self, b, i, j):
        return self.a._pred(b, i, j) | self.b._pred(b, i, j)

    def _counts(self, t):
        size = t.sizes()
        ia, ib = self.a._intervals(t.q_positions()), self.b._intervals(t.q_positions())
        if ia is not None and ib is not None:
            both = t.count_intervals(torch.maximum(ia[0], ib[0]), torch.minimum(ia[1], ib[1]))
            return t.count_intervals(*ia) + t.count_intervals(*ib) - both
        ca, cb = self.a._counts(t), self.b._counts(t)
        ca = torch.full((1, t.nq, t.nk), -1, dtype=torch.int64) if ca is None else ca
        cb = torch.full((1, t.nq, t.nk), -1, dtype=torch.int64) if cb is None else cb
        ca, cb = torch.broadcast_tensors(ca, cb)
        out = torch.full_like(ca, -1)
        out = torch.where(ca == 0, cb, out)
        out = torch.where(cb == 0, ca, out)
        out = torch.where((ca == size) | (cb == size), size.expand_as(out), out)
        return out

    @property
    def batch_size(self) -> int | None:
        return _merge_batch(self.a.batch_size, self.b.batch_size, "|")

    @property
    def lookahead(self) -> int | None:
        return _max_opt(self.a.lookahead, self.b.lookahead)

    @property
    def lookback(self) -> int | None:
        return _max_opt(self.a.lookback, self.b.lookback)

    def _covered_length(self) -> int | None:
        return _min_opt(self.a._covered_length(), self.b._covered_length())

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"

