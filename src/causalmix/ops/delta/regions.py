"""Where the delta rule's recurrences run in one call: the forward regions and the reverse passes
(shared by the ``chunk`` and ``recurrent`` implementations; the reference derives the same from
the spec's dense mask, so the two readings are checked against each other).

Positions are local to the call (``t = position - offset``, over the ``Tk`` keys).

* **Forward**: ``start[t]``, the first position of t's segment, ``-1`` when it began before the
  call (the carried ``initial_state`` is read). The recurrence restarts at every start.
* **Reverse passes**: a pass is one reverse recurrence over the whole call with restarts;
  ``end[t]`` is the last key of the region holding key t (the recurrence through t starts at
  ``end[t]``; ``end[t] < t + 1``: t is the last key of its region, so the state it reads is
  zero), and ``queries[t]`` says which queries take their reverse part from this pass (None:
  every query).

  - ``Full()`` / ``Prefix(n)`` / ``Chunked(s, 0)``: one pass, ``end`` the factorisation's
    (``Prefix``: no key at or past n enters, so ``end <= n - 1``).
  - ``Chunked(s, L > 0)``: query chunk ``c`` runs its own recurrence from the last key of
    chunk ``c + L``. The regions of the query chunks ``c = rho (mod L + 1)`` are disjoint, so
    residue ``rho`` is one pass: at most ``L + 1`` passes (each a full reverse scan, so the cost
    of the reverse part grows linearly with the lookahead), fewer when the call has fewer
    query chunks; query chunks whose reach passes the last key of the call share one pass
    with ``end`` the segment end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.checks import MAX_POSITION
from causalmix.ops.factor import Factorisation

__all__ = ["Regions", "ReversePass", "regions"]


class ReversePass(NamedTuple):
    """One reverse recurrence: ``end [B', Tk]`` (int64) and ``queries [B', Tk]`` (bool) or
    None."""

    end: torch.Tensor
    queries: torch.Tensor | None

    def flipped_start(self) -> torch.Tensor:
        """``[B', Tk]``: the region starts of this pass read in the flipped frame (position
        ``t' = Tk - 1 - t``), where the reverse recurrence is a forward one."""
        tk = self.end.shape[1]
        t = torch.arange(tk, device=self.end.device)
        return (tk - 1 - torch.maximum(self.end, t)).flip(1)


class Regions(NamedTuple):
    """``start [B', Tk]`` of the forward recurrence and the reverse passes of a call."""

    start: torch.Tensor
    seg_end: torch.Tensor
    passes: tuple[ReversePass, ...]


def regions(f: Factorisation, length: int, offset: int, device) -> Regions:
    """The :class:`Regions` of a call of ``length`` keys at absolute ``offset``."""
    arr = f.arrays(length, offset, device)
    passes: tuple[ReversePass, ...] = ()
    if f.has_reverse:
        end = arr.end
        if arr.key_ok is not None:  # Prefix: keys at or past n never enter
            last_ok = arr.key_ok.sum(-1, keepdim=True) - 1
            end = torch.minimum(end, last_ok)
        passes = (ReversePass(end, None),)
    elif f.base == "chunked" and f.lookahead_chunks > 0:
        passes = _band_passes(f, arr.seg_end, length, offset)
    return Regions(arr.start, arr.seg_end, passes)


def _band_passes(f: Factorisation, seg_end: torch.Tensor, length: int,
                 offset: int) -> tuple[ReversePass, ...]:
    """``Chunked(s, L > 0)``: one pass per residue of the query chunk mod ``L + 1`` (only the
    residues present), plus one for the query chunks that reach past the last key."""
    dev = seg_end.device
    s = min(f.chunk, MAX_POSITION)
    span = min(f.lookahead_chunks, MAX_POSITION // s + 1) + 1  # chunks per region: L + 1
    t = torch.arange(length, device=dev)
    c = (t + offset) // s  # spec chunk of each position
    reach = (c + span) * s - 1 - offset  # last key a query of chunk c may see
    saturated = reach >= length - 1
    out = []
    for rho in sorted(set((c[~saturated] % span).tolist())):
        first = c - (c - rho) % span  # the query chunk of residue rho whose region holds t
        end = torch.minimum(seg_end, ((first + span) * s - 1 - offset)[None])
        out.append(ReversePass(end, ((c % span == rho) & ~saturated)[None]))
    if bool(saturated.any()):
        out.append(ReversePass(seg_end, saturated[None]))
    return tuple(out)
