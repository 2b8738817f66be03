"""Reference linear attention: dense, eager, fp32 inside. This module *defines* correctness.

For query i (absolute position ``q_offset + i``), key j (``k_offset + j``), head h.

Constant decay ``lambda_h`` (1 when no decay is given):

    (1)  w_ij = lambda_h ** |i - j|               if visible(i, j), else 0

Data-dependent gates (``log_gate`` ``g``, ``reverse_log_gate`` ``r``, both ``[B, Tk, H]`` at the
key positions, ``<= 0``; queries and keys at the same positions)::

    (1') w_ij = exp(G_i - G_j)     j <= i,  G_t = g_0 + ... + g_t   (prod_{s=j+1..i} exp(g_s))
         w_ij = exp(E_j - E_i)     j >  i,  E_t = r_0 + ... + r_{t-1} (prod_{s=i..j-1} exp(r_s))
         where visible(i, j), else 0: only differences of cumulative log-gates are
         exponentiated, so every exponent is <= 0.

    (2)  o_i  = sum_j w_ij (q_i . k_j) v_j         (no softmax, normaliser or feature map)
    (3)  with an initial state S0 (the causal state of the keys before the call, anchored at
         position a = k_offset - 1):  o_i += lambda_h ** (i - a) * q_i S0 (gates: exp(G_i))
         if visible(i, a') where a' = max(a, 0)
    (4)  final state, anchored at the last key position l:
         S = sum_{j <= l} [visible(l, j)] w_lj k_j v_j^T + [visible(l, a')] w_la S0

(3)-(4) are the causal recurrence ``S_t = lambda S_{t-1} + k_t v_t^T`` (gates:
``S_t = exp(g_t) S_{t-1} + k_t v_t^T``) restarted where the spec says the past is not visible
(segment starts). States require ``q_offset == k_offset``.
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.visibility import Visibility


def _log_weights(g, gr, visible, tq: int, cd) -> torch.Tensor:
    """(1') ``g, gr: [B', Tk, H]``, ``visible: [B', Tq, Tk]`` -> ``log w: [B'', H, Tq, Tk]``."""
    tk = g.shape[1]
    gc = g.to(cd).cumsum(1).transpose(1, 2)  # G: [B', H, Tk]
    e = torch.nn.functional.pad(gr.to(cd)[:, :-1], (0, 0, 1, 0)).cumsum(1).transpose(1, 2)
    i = torch.arange(tq, device=g.device)[:, None]
    j = torch.arange(tk, device=g.device)[None, :]
    fwd = gc[:, :, :tq, None] - gc[:, :, None, :]  # G_i - G_j
    rev = e[:, :, None, :] - e[:, :, :tq, None]  # E_j - E_i
    logw = torch.where(j <= i, fwd, rev)
    return torch.where(visible[:, None], logw, torch.tensor(-torch.inf, dtype=cd,
                                                             device=g.device))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                     *, decay: torch.Tensor | None, q_offset: int, k_offset: int,
                     initial_state: torch.Tensor | None, return_final_state: bool,
                     log_gate: torch.Tensor | None = None,
                     reverse_log_gate: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q: [B, Tq, H, D]``, ``k: [B, Tk, H, D]``, ``v: [B, Tk, H, Dv]``, ``decay: [H]`` or None,
    or ``log_gate / reverse_log_gate: [B, Tk, H]`` (then ``q_offset == k_offset``) ->
    ``(out [B, Tq, H, Dv] in q.dtype, final_state [B, H, D, Dv] or None)``."""
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    cd = compute_dtype(q)
    dev = q.device
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    i = torch.arange(q_offset, q_offset + tq, device=dev)
    j = torch.arange(k_offset, k_offset + tk, device=dev)
    nb = visibility.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1)
    visible = visibility.mask(tq, tk, q_offset=q_offset, k_offset=k_offset, device=dev)
    gated = log_gate is not None
    anchor = k_offset - 1
    last = k_offset + tk - 1

    # (1) weights where visible: lambda ** |i - j| (exponent <= 0), or (1') the gated ones
    if gated:
        gr = log_gate if reverse_log_gate is None else reverse_log_gate
        w = torch.exp(_log_weights(log_gate, gr, visible, tq, cd))  # [B'', H, Tq, Tk]
        gcum = log_gate.to(cd).cumsum(1)  # [B', Tk, H]
        w0 = torch.exp(gcum[:, :tq])  # weight of the initial state, [B', Tq, H]
        wl = torch.exp(gcum[:, -1:] - gcum)  # key j in the final state, [B', Tk, H]
        wl0 = torch.exp(gcum[:, -1]).view(-1, h, 1, 1)  # S0 in the final state
    else:
        g = torch.zeros(h, dtype=cd, device=dev) if decay is None else torch.log(decay.to(cd))
        dist = (i[:, None] - j[None, :]).abs().to(cd)  # [Tq, Tk]
        w = torch.exp(g[:, None, None] * dist)[None] * visible[:, None].to(cd)
        w0 = torch.exp(g[None, :] * (i - anchor).to(cd)[:, None])[None]  # [1, Tq, H]
        wl = torch.exp(g[None, :] * (last - j).to(cd)[:, None])[None]  # [1, Tk, H]
        wl0 = torch.exp(g * (last - anchor)).view(1, h, 1, 1)

    # (2) masked, decayed scores times values
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * w
    o = torch.einsum("bhij,bjhd->bihd", s, vf)

    if initial_state is not None:
        # (3) the carried causal state, seen where the spec lets query i see position a'
        s0 = initial_state.to(cd)
        seen = visibility.visible(bidx, i[None, :], torch.tensor(max(anchor, 0), device=dev))
        seen = seen.expand(nb, tq).to(cd)  # [B', Tq]
        o = o + torch.einsum("bihd,bhde->bihe", qf, s0) * (w0 * seen[..., None])[..., None]

    final = None
    if return_final_state:
        # (4) the causal state at the last key position
        row = visibility.visible(bidx, torch.tensor(last, device=dev), j[None, :])
        row = row.expand(nb, tk).to(cd)  # [B', Tk]
        final = torch.einsum("bjhd,bjhe->bhde", kf * (wl * row[..., None])[..., None], vf)
        if initial_state is not None:
            seen = visibility.visible(bidx, torch.tensor(last, device=dev),
                                      torch.tensor(max(anchor, 0), device=dev))
            final = final + initial_state.to(cd) * wl0 * seen.reshape(nb, 1, 1, 1).to(cd)
    return o.to(q.dtype), final
