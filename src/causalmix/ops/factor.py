"""How a visibility spec factorises for the linear-state mixers (shared by the linear and the
delta-rule families and their fast implementations, streams and sharded ops).

Every spec that linear attention supports lets a query see *every earlier key of its own
segment* (all of them contain ``Causal()`` inside a segment), plus a contiguous run of later keys
``(i, h(i)]``. So the output always splits into a **forward scan** (the causal part, with the
state reset at segment starts) and a **future part**:

==============================  =========================================================
spec                            future part of query i (keys j > i it also sees)
==============================  =========================================================
``Causal()``                    none
``Full()``                      ``(i, end of segment]``: a reverse scan
``Prefix(n)``                   ``(i, end of segment]`` restricted to keys ``j < n``: a reverse
                                scan over the prefix keys (``n`` int or per-batch ``[B]``)
``Chunked(s, 0)``               ``(i, min(end of chunk, end of segment)]``: a reverse scan
                                reset at chunk and segment boundaries
``Chunked(s, L > 0)``           ``(i, min(end of chunk + L chunks, end of segment)]``: a band
                                of width ``(L + 1) * s - 1`` past the query
==============================  =========================================================

``Segments(ids)`` may be combined (``&``) with any of these, and alone means
``Segments(ids) & Full()``. Its ids must form contiguous runs (one run per id over the positions
used), because the state is *reset* at segment starts. Anything else (``Window``, ``|``,
non-contiguous ids, two ``Segments``) is refused with an error naming the spec.

Positions here are *local* to one call (``t = position - offset``); ``-1`` stands for "before
this call" (the carried ``initial_state``).
"""

from __future__ import annotations

import dataclasses

import torch

from causalmix.visibility import And, Causal, Chunked, Full, Prefix, Segments, Visibility

SUPPORTED = (
    "Causal(), Full(), Prefix(n), Chunked(size, lookahead), and Segments(ids) & any of these "
    "(ids in contiguous runs)"
)


@dataclasses.dataclass(frozen=True)
class Factorisation:
    """A supported spec, reduced to a base pattern and an optional segmentation."""

    spec: Visibility
    base: str  # "causal" | "full" | "prefix" | "chunked"
    prefix: int | torch.Tensor | None = None
    chunk: int | None = None
    lookahead_chunks: int = 0
    segments: Segments | None = None

    @property
    def has_reverse(self) -> bool:
        """Future part computed by a reverse scan."""
        return self.base in ("full", "prefix") or (
            self.base == "chunked" and self.lookahead_chunks == 0
        )

    @property
    def band(self) -> int:
        """Width (largest ``j - i``) of the future band, 0 when there is none."""
        if self.base == "chunked" and self.lookahead_chunks > 0:
            return (self.lookahead_chunks + 1) * self.chunk - 1
        return 0

    def arrays(self, length: int, offset: int, device: torch.device) -> PositionArrays:
        return _arrays(self, length, offset, device)


@dataclasses.dataclass(frozen=True)
class PositionArrays:
    """Per-position integers of one call, local coordinates, each ``[B', T]`` (B' = 1 or B).

    ``start[t]``: first local position of the forward region (segment) holding t, ``-1`` if it
    began before the call (then the carried state is read). ``end[t]``: last local position the
    reverse scan may reach from t (``None`` without a reverse scan). ``key_ok[t]``: whether key
    t enters the reverse scan (``None`` = all; ``Prefix``: ``t + offset < n``). ``seg_end[t]``:
    last local position of t's segment (``T - 1`` without segments).
    """

    start: torch.Tensor
    end: torch.Tensor | None
    key_ok: torch.Tensor | None
    seg_end: torch.Tensor


def _unsupported(spec: Visibility, why: str, mixer: str) -> ValueError:
    extra = f" ({why})" if why else ""
    return ValueError(f"{mixer} does not support visibility {spec!r}{extra}; "
                      f"supported: {SUPPORTED}")


def _leaves(spec: Visibility) -> list[Visibility]:
    if isinstance(spec, And):
        return _leaves(spec.a) + _leaves(spec.b)
    return [spec]


def factorise(spec: Visibility, *, mixer: str = "linear attention") -> Factorisation:
    """Reduce ``spec`` to a :class:`Factorisation`, or raise ``ValueError`` naming the spec, the
    mixer (``mixer``, e.g. ``"delta attention"``) and the supported specs."""
    segs: list[Segments] = []
    bases: list[Visibility] = []
    for leaf in _leaves(spec):
        if isinstance(leaf, Segments):
            segs.append(leaf)
        elif isinstance(leaf, (Causal, Full, Prefix, Chunked)):
            bases.append(leaf)
        else:
            raise _unsupported(spec, f"{leaf!r} has no exact linear-state factorisation", mixer)
    if len(segs) > 1:
        raise _unsupported(spec, "combine segment ids into one Segments spec", mixer)
    bases = [b for b in bases if not isinstance(b, Full)]
    if any(isinstance(b, Causal) for b in bases):
        base: Visibility = Causal()  # Causal & (Prefix | Chunked | Causal) == Causal
    elif len(bases) == 0:
        base = Full()
    elif len(bases) == 1:
        base = bases[0]
    else:
        raise _unsupported(spec, "intersection of several non-causal patterns", mixer)
    seg = segs[0] if segs else None
    if seg is not None and not _contiguous(seg):
        raise _unsupported(spec, "Segments ids must form contiguous runs: the state is reset at "
                                 "segment starts", mixer)
    if isinstance(base, Causal):
        return Factorisation(spec, "causal", segments=seg)
    if isinstance(base, Full):
        return Factorisation(spec, "full", segments=seg)
    if isinstance(base, Prefix):
        return Factorisation(spec, "prefix", prefix=base.n, segments=seg)
    assert isinstance(base, Chunked)
    return Factorisation(spec, "chunked", chunk=base.size, lookahead_chunks=base.lookahead,
                         segments=seg)


def _contiguous(seg: Segments) -> bool:
    return seg.spans()[2]


def _arrays(f: Factorisation, length: int, offset: int, device) -> PositionArrays:
    t = torch.arange(length, device=device)
    if f.segments is not None:
        ids = f.segments.ids.to(device)
        ids = ids if ids.dim() == 2 else ids[None]
        cur = ids[:, offset:offset + length]
        # the position before the call: ids[offset - 1]; at offset 0 the carried state is taken to
        # continue the first segment
        prev = ids[:, offset - 1:offset] if offset > 0 else cur[:, :1]
        ext = torch.cat([prev, cur], dim=1)
        new = ext[:, 1:] != ext[:, :-1]  # [B', T]: a segment starts at t
        start = torch.where(new, t, torch.full_like(t, -1)).cummax(dim=1).values
        last = torch.ones_like(new)
        last[:, :-1] = new[:, 1:]  # t is the last position of its segment inside the call
        seg_end = torch.where(last, t, torch.full_like(t, length)).flip(1).cummin(dim=1).values
        seg_end = seg_end.flip(1)
    else:
        start = torch.full((1, length), -1, dtype=torch.int64, device=device)
        seg_end = torch.full((1, length), length - 1, dtype=torch.int64, device=device)
    end = key_ok = None
    if f.has_reverse:
        end = seg_end
        if f.base == "chunked":
            chunk_end = ((t + offset) // f.chunk + 1) * f.chunk - 1 - offset
            end = torch.minimum(end, chunk_end[None])
        if f.base == "prefix":
            n = f.prefix
            if isinstance(n, torch.Tensor):
                key_ok = (t[None] + offset) < n.to(device)[:, None]
            else:
                key_ok = ((t + offset) < n)[None]
    return PositionArrays(start, end, key_ok, seg_end)
