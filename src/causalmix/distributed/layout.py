"""Sequence layouts: which absolute positions each rank of a process group holds.

A sequence of ``T`` positions is split over ``W`` ranks in one of three ways (``W = 2``,
``T = 8``; the digit is the rank that holds the position)::

    position     0 1 2 3 4 5 6 7
    contiguous   0 0 0 0 1 1 1 1      rank r holds [r*T/W, (r+1)*T/W)          T % W == 0
    zigzag       0 0 1 1 1 1 0 0      rank r holds chunks r and 2W-1-r of 2W    T % (2W) == 0
    striped      0 1 0 1 0 1 0 1      rank r holds r, r+W, r+2W, ...            T % W == 0

Every rank holds ``T / W`` positions. Under ``Causal()`` the contiguous layout leaves the last rank
with almost all the work; zigzag and striped balance it (Brandon et al. 2023, Striped Attention).

Internally a rank's positions are a short list of :class:`Span` (arithmetic progressions), which is
what lets the sharded mixers call the single-process ops on exact position sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from causalmix.checks import ArgumentTypeError, check_int

__all__ = ["LAYOUTS", "Span", "check_layout", "positions", "spans", "shard", "unshard"]

#: The layouts :func:`shard` knows, the ``layout=`` values of the sharded ops.
LAYOUTS = ("contiguous", "zigzag", "striped")


class Span(NamedTuple):
    """Absolute positions ``start + stride * t`` for ``t`` in ``[0, length)``, held at local
    indices ``[local, local + length)`` of the shard."""

    start: int
    stride: int
    length: int
    local: int


def check_layout(layout: str, seq_len: int, world: int) -> int:
    """Check that ``seq_len`` splits over ``world`` ranks as ``layout`` needs; returns the number
    of positions per rank. Raises ``ValueError`` naming the layout and the divisibility needed."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    check_int("seq_len", seq_len, 0)
    check_int("world", world, 1)
    parts = 2 * world if layout == "zigzag" else world
    if seq_len % parts:
        raise ValueError(
            f"layout {layout!r} needs the sequence length to be a multiple of "
            f"{'2 * world' if layout == 'zigzag' else 'world'} = {parts} (world={world}), got "
            f"seq_len={seq_len}"
        )
    return seq_len // world


def spans(layout: str, seq_len: int, rank: int, world: int) -> list[Span]:
    """The positions of ``rank`` as spans (see :class:`Span`); empty spans are dropped."""
    n = check_layout(layout, seq_len, world)
    check_int("rank", rank, 0)
    if rank >= world:
        raise ValueError(f"rank must be < world={world}, got {rank}")
    if n == 0:
        return []
    if layout == "contiguous":
        return [Span(rank * n, 1, n, 0)]
    if layout == "striped":
        return [Span(rank, world, n, 0)]
    c = n // 2
    return [Span(rank * c, 1, c, 0), Span((2 * world - 1 - rank) * c, 1, c, c)]


def positions(layout: str, seq_len: int, rank: int, world: int) -> torch.Tensor:
    """Absolute positions held by ``rank``, in local order: int64 ``[seq_len / world]``."""
    held = spans(layout, seq_len, rank, world)
    parts = [r.start + r.stride * torch.arange(r.length) for r in held]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def shard(x: torch.Tensor, layout: str, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """The part of a full sequence ``x`` (sequence along ``dim``, e.g. ``[B, T, H, D]``) that
    ``rank`` holds: ``[B, T / world, H, D]``, a copy (contiguous) in local order."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"shard: x must be a torch.Tensor, got {type(x).__name__}")
    dim = check_int("dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"shard: dim={dim} is out of range for a {x.dim()}-D tensor")
    rs = spans(layout, x.shape[dim], rank, world)
    pieces = []
    for r in rs:
        end = r.start + r.stride * (r.length - 1) + 1
        pieces.append(x.narrow(dim, r.start, end - r.start)[
            (slice(None),) * (dim % x.dim()) + (slice(None, None, r.stride),)
        ])
    if not pieces:
        return x.narrow(dim, 0, 0).contiguous()
    return torch.cat(pieces, dim=dim).contiguous()


def unshard(shards: Sequence[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: ``shards[r]`` is rank ``r``'s part (``[B, T / W, ...]``);
    returns the full sequence ``[B, T, ...]``. ``W = len(shards)``."""
    if isinstance(shards, torch.Tensor) or not isinstance(shards, Sequence) or not shards:
        raise ArgumentTypeError("unshard: shards must be a non-empty list of tensors, one per "
                                "rank")
    world = len(shards)
    first = shards[0]
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise ArgumentTypeError(f"unshard: shards[{r}] must be a torch.Tensor, got "
                                    f"{type(s).__name__}")
        if s.shape != first.shape:
            raise ValueError(
                f"unshard: every shard must have one shape, got {list(first.shape)} for rank 0 "
                f"and {list(s.shape)} for rank {r}"
            )
    dim = check_int("dim", dim)
    if not -first.dim() <= dim < first.dim():
        raise ValueError(f"unshard: dim={dim} is out of range for a {first.dim()}-D tensor")
    dim = dim % first.dim()
    seq_len = first.shape[dim] * world
    shape = list(first.shape)
    shape[dim] = seq_len
    out = first.new_empty(shape)
    for r, s in enumerate(shards):
        idx = positions(layout, seq_len, r, world).to(first.device)
        out.index_copy_(dim, idx, s)
    return out
