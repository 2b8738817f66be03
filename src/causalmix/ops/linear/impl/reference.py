"""Reference linear attention: dense, eager, fp32 inside. This module *defines* correctness.

For query i (absolute position ``q_offset + i``), key j (``k_offset + j``), head h with decay
``lambda_h`` (1 when no decay is given):

    (1)  w_ij = lambda_h ** |i - j|               if visible(i, j), else 0
    (2)  o_i  = sum_j w_ij (q_i . k_j) v_j         (no softmax, normaliser or feature map)
    (3)  with an initial state S0 (the causal state of the keys before the call, anchored at
         position a = k_offset - 1):  o_i += lambda_h ** (i - a) * q_i S0   if visible(i, a')
         where a' = max(a, 0)
    (4)  final state, anchored at the last key position l:
         S = sum_j [visible(l, j)] lambda_h ** (l - j) k_j v_j^T
             + [visible(l, a')] lambda_h ** (l - a) S0

(3)-(4) are the causal recurrence ``S_t = lambda S_{t-1} + k_t v_t^T`` restarted where the
spec says the past is not visible (segment starts). States require ``q_offset == k_offset``.
"""

from __future__ import annotations

import torch

from causalmix.visibility import Visibility


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_attention(q, k, v, visibility: Visibility, *, decay, q_offset: int, k_offset: int,
                     initial_state, return_final_state: bool):
    """``q: [B, Tq, H, D]``, ``k: [B, Tk, H, D]``, ``v: [B, Tk, H, Dv]``, ``decay: [H]`` or None
    -> ``(out [B, Tq, H, Dv] in q.dtype, final_state [B, H, D, Dv] or None)``."""
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    cd = compute_dtype(q)
    dev = q.device
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    g = torch.zeros(h, dtype=cd, device=dev) if decay is None else torch.log(decay.to(cd))
    i = torch.arange(q_offset, q_offset + tq, device=dev)
    j = torch.arange(k_offset, k_offset + tk, device=dev)
    nb = visibility.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1)

    # (1) weights: lambda ** |i - j| (exponent <= 0) where visible
    dist = (i[:, None] - j[None, :]).abs().to(cd)  # [Tq, Tk]
    visible = visibility.mask(tq, tk, q_offset=q_offset, k_offset=k_offset, device=dev)
    w = torch.exp(g[:, None, None] * dist)[None] * visible[:, None].to(cd)  # [B', H, Tq, Tk]

    # (2) masked, decayed scores times values
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * w
    o = torch.einsum("bhij,bjhd->bihd", s, vf)

    anchor = k_offset - 1
    if initial_state is not None:
        # (3) the carried causal state, seen where the spec lets query i see position a'
        s0 = initial_state.to(cd)
        seen = visibility.visible(bidx, i[None, :], torch.tensor(max(anchor, 0), device=dev))
        seen = seen.expand(nb, tq).to(cd)  # [B', Tq]
        w0 = torch.exp(g[None, :] * (i - anchor).to(cd)[:, None])  # [Tq, H]
        o = o + torch.einsum("bihd,bhde->bihe", qf, s0) * (w0[None] * seen[..., None])[..., None]

    final = None
    if return_final_state:
        # (4) the causal state at the last key position
        last = k_offset + tk - 1
        row = visibility.visible(bidx, torch.tensor(last, device=dev), j[None, :])
        row = row.expand(nb, tk).to(cd)  # [B', Tk]
        wl = torch.exp(g[None, :] * (last - j).to(cd)[:, None]) * row[..., None]  # [B', Tk, H]
        final = torch.einsum("bjhd,bjhe->bhde", kf * wl[..., None], vf)
        if initial_state is not None:
            seen = visibility.visible(bidx, torch.tensor(last, device=dev),
                                    torch.tensor(max(anchor, 0), device=dev))
            seen = seen.reshape(nb, 1, 1, 1).to(cd)
            final = final + initial_state.to(cd) * torch.exp(g * (last - anchor)).view(
                1, h, 1, 1
            ) * seen
    return o.to(q.dtype), final
