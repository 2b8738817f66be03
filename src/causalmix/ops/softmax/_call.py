"""What every softmax implementation is asked: one call's inputs and options, checked."""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.visibility import Visibility


class Call(NamedTuple):
    """A checked call of ``softmax_attention``; ``can_serve(call)`` of each impl reads it.

    ``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]`` (already free of
    NaN/inf: the api replaces them and marks the outputs they reach). ``score_bound`` is an upper
    bound on every ``|scale * q_i . k_j|`` (``scale * max|q| * max|k| * D``): fused kernels that
    cannot represent it refuse, so that a huge score overflows in one agreed way.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visibility: Visibility
    q_offset: int
    k_offset: int
    scale: float
    needs_lse: bool
    score_bound: float


def overflow_reason(call: Call, name: str) -> str | None:
    """Why a fused kernel computing scores in the inputs' dtype may overflow them, or None."""
    if call.scale <= 0:
        return f"{name} needs scale > 0 (got {call.scale!r})"
    limit = torch.finfo(call.q.dtype).max / 2
    if not call.score_bound < limit:
        return (f"{name} may overflow: scores bounded by {call.score_bound:.3g} reach "
                f"{call.q.dtype}'s range ({limit:.3g})")
    return None


class SpecKey:
    """A spec as (part of) a cache key that never raises and never serves a stale entry.

    A tensor-holding spec whose tensor was modified in place raises on every use, ``==`` and
    ``hash`` included; kept as a plain dict key, it would make every later lookup of an equal
    *new* spec raise (the cache poisoned). This key hashes the spec once, when it is made (at the
    public boundary, after ``check_visibility`` found it unmodified), and is equal to another
    only if both specs are still unmodified and equal: an entry whose spec was modified since is
    simply never found again (the LRU evicts it in time)."""

    __slots__ = ("spec", "_hash")

    def __init__(self, spec: Visibility):
        self.spec = spec
        self._hash = hash(spec)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpecKey):
            return NotImplemented
        if not (_unmodified(self.spec) and _unmodified(other.spec)):
            return False
        return self.spec is other.spec or self.spec == other.spec

    def __repr__(self) -> str:
        return f"SpecKey({self.spec!r})"


def _unmodified(spec: Visibility) -> bool:
    try:
        spec.check_unmodified()
    except ValueError:
        return False
    return True
