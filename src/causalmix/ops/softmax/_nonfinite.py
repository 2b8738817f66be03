"""NaN in, NaN out -- the same way for every implementation.

The rule (the api applies it before and after whichever implementation runs):

* ``out[b, i, h]`` is NaN (every component) if ``q[b, i, h]`` holds a NaN or an infinity, or if a
  key ``j`` visible to query ``i`` has a non-finite ``k[b, j, g]`` or ``v[b, j, g]``
  (``g = h // (Hq / Hkv)``);
* ``lse[b, i, h]`` is NaN if ``q[b, i, h]`` or a visible ``k[b, j, g]`` is non-finite;
* non-finite values that no query sees change nothing.

The implementation then runs on inputs with the non-finite entries replaced by 0, so that NaN
never reaches a kernel whose handling of it differs (SDPA on CPU turns a NaN row into zeros).
Gradients flow through the finite outputs only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from causalmix.ops.nonfinite import bad_rows, clean, seen_by

if TYPE_CHECKING:
    from causalmix.visibility import Visibility

__all__ = ["Poison", "apply", "clean", "poison", "poison_dense"]


class Poison(NamedTuple):
    out_rows: torch.Tensor  # [B, Tq, Hq] bool: output rows that are NaN
    lse_rows: torch.Tensor  # [B, Tq, Hq] bool: lse entries that are NaN


def poison(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
           q_offset: int, k_offset: int) -> Poison:
    """The rows the rule above makes NaN (call only when some input is non-finite)."""
    group = q.shape[2] // k.shape[2]
    bad_q = bad_rows(q)
    bad_k = bad_rows(k)
    bad_kv = bad_k | bad_rows(v)
    tq = q.shape[1]
    seen_k = seen_by(visibility, bad_k, tq, q_offset, k_offset).repeat_interleave(group, 2)
    seen_kv = seen_by(visibility, bad_kv, tq, q_offset, k_offset).repeat_interleave(group, 2)
    return Poison(bad_q | seen_kv, bad_q | seen_k)


def poison_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                 q_offset: int, k_offset: int) -> Poison:
    """:func:`poison` without a host read (for ``torch.compile`` and ``torch.func``): the spec's
    dense mask times the bad keys, ``O(Tq * Tk)``; call it whatever the inputs hold."""
    group = q.shape[2] // k.shape[2]
    bad_k = bad_rows(k).float()
    bad_kv = (bad_rows(k) | bad_rows(v)).float()
    vis = visibility.mask(q.shape[1], k.shape[1], q_offset=q_offset, k_offset=k_offset,
                          device=q.device).float()  # [B', Tq, Tk]
    seen_k = (vis @ bad_k > 0).repeat_interleave(group, 2)
    seen_kv = (vis @ bad_kv > 0).repeat_interleave(group, 2)
    bad_q = bad_rows(q)
    return Poison(bad_q | seen_kv, bad_q | seen_k)


def apply(p: Poison, out: torch.Tensor, lse: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out: [B, Tq, Hq, Dv]``, ``lse: [B, Tq, Hq]`` or None, with the poisoned rows NaN."""
    out = out.masked_fill(p.out_rows[..., None], float("nan"))
    if lse is not None:
        lse = lse.masked_fill(p.lse_rows, float("nan"))
    return out, lse
