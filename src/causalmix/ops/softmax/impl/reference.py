"""Reference softmax attention: dense, eager, fp32 inside (fp64 for fp64 inputs). This module
*defines* correctness. (NaN/inf inputs are handled before any impl runs: ``_nonfinite``.)

For query i (absolute position ``q_offset + i``), key j (``k_offset + j``), head h, and the
key/value head g(h) = h // (Hq / Hkv) it reads:

    (1)  s_ij = scale * q_i . k_j                       if visible(i, j), else -inf
    (2)  lse_i = log sum_j exp(s_ij)                     (-inf when query i sees no key)
    (3)  o_i = sum_j exp(s_ij - lse_i) v_j               (0 when query i sees no key)
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.softmax._call import Call


def can_serve(call: Call) -> str | None:
    return None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hkv, D]``, ``v: [B, Tk, Hkv, Dv]`` ->
    ``(out [B, Tq, Hq, Dv] in q.dtype, lse [B, Tq, Hq] in the compute dtype)``."""
    q, k, v, visibility = call.q, call.k, call.v, call.visibility
    q_offset, k_offset, scale = call.q_offset, call.k_offset, call.scale
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    cd = compute_dtype(q)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    kf = kf.repeat_interleave(group, dim=2)  # [B, Tk, Hq, D]: query head h reads kv head h//group
    vf = vf.repeat_interleave(group, dim=2)

    # (1) scores, with invisible pairs at -inf
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale  # [B, Hq, Tq, Tk]
    visible = visibility.mask(tq, tk, q_offset=q_offset, k_offset=k_offset, device=q.device)
    visible = visible[:, None]  # [B', 1, Tq, Tk]
    s = s.masked_fill(~visible, float("-inf"))

    # (2) log-sum-exp, stable: subtract the (detached) row max; rows that see no key (max -inf)
    # keep max 0. A +inf or NaN score makes the row NaN (inf - inf), as in every impl.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)  # exp(-inf) = 0 on invisible pairs
    denom = p.sum(dim=-1, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(safe))

    # (3) normalised weights times values
    o = torch.einsum("bhqk,bkhd->bqhd", p / safe, vf)
    return o.to(q.dtype), lse.squeeze(-1).transpose(1, 2).contiguous()
