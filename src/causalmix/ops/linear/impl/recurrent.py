"""Recurrent linear attention: one position at a time (decode, and a second oracle).

Per-position log-gates ``g_t`` (forward) and ``r_t`` (reverse), ``[B', T, H]``; a constant decay
is ``g_t = r_t = log(lambda)``. Forward recurrence (the causal part), reset at segment starts::

    S_t = [t continues its segment] * exp(g_t) * S_{t-1} + k_t v_t^T,      o_t = q_t S_t

Reverse recurrence (future part of ``Full`` / ``Prefix`` / ``Chunked``), strict, reset at the
end of each reverse region (segment end; chunk end for ``Chunked``)::

    o_t += [t + 1 in t's region] * exp(r_t) * q_t R_{t+1},
    R_t  = [t + 1 in t's region] * exp(r_t) * R_{t+1} + [key t enters] k_t v_t^T

``Chunked(s, L > 0)``: the reverse recurrence runs with resets at chunk (and segment)
boundaries; its state at the start of each chunk, ``W_c``, summarises chunk c (up to the segment
end), and query t of chunk c adds ``exp(E_start - E_t) q_t W_{c + m}`` (``E``: exclusive
cumulative sum of ``r``; ``start`` the first position of chunk ``c + m``) for ``m = 1..L`` when
its segment reaches chunk ``c + m``. All exponents are <= 0.

Autograd runs through the loop: memory grows with T (one state per step), which is fine for
decode and tests; long sequences use the chunk implementation. The loop computes in fp64 (it is
the second oracle; a step-by-step fp32 recurrence would lose ~1e-6 relative in the decay
gradient at a few hundred steps); a single decode step (T == 1, no segments) computes in fp32.
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.factor import Factorisation


def _decode_step(q, k, v, g, initial_state, cd):
    """T == 1: ``S = exp(g_0) S0 + k v^T``, ``o = q S`` (nothing in the future of one token)."""
    k1, v1 = k.to(cd)[:, 0, :, :, None], v.to(cd)[:, 0, :, None, :]  # [B, H, D, 1], [B, H, 1, Dv]
    if initial_state is None:
        s = k1 * v1
    else:
        lam = torch.exp(g.to(cd)[:, 0]).view(g.shape[0], -1, 1, 1)
        s = torch.addcmul(lam * initial_state.to(cd), k1, v1)
    o = torch.matmul(q.to(cd)[:, 0, :, None, :], s).transpose(1, 2)  # [B, 1, H, Dv]
    return o.to(q.dtype), s


def _band(outs, qf, gr, arr, f: Factorisation, offset: int, chunk_states):
    """Chunked(s, L > 0): query t reads the chunk states ``W`` of the next L chunks."""
    t = qf.shape[1]
    e = torch.nn.functional.pad(gr[:, :-1], (0, 0, 1, 0)).cumsum(1)  # E_t = r_0 + .. + r_{t-1}
    for i in range(t):
        c = (i + offset) // f.chunk
        for m in range(1, f.lookahead_chunks + 1):
            start = (c + m) * f.chunk - offset
            if start >= t:
                break
            reach = (arr.seg_end[:, i] >= start).to(qf.dtype).view(-1, 1, 1, 1)
            w = torch.exp(e[:, start] - e[:, i])[..., None, None]  # [B', H, 1, 1], exponent <= 0
            outs[i] = outs[i] + torch.einsum("bhd,bhde->bhe", qf[:, i],
                                             reach * w * chunk_states[c + m])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: Factorisation, *,
                     log_gate: torch.Tensor, reverse_log_gate: torch.Tensor, offset: int,
                     initial_state: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k: [B, T, H, D]``, ``v: [B, T, H, Dv]``, ``log_gate, reverse_log_gate: [B', T, H]``
    -> ``(o [B, T, H, Dv] q.dtype, S_final)``."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    sd = compute_dtype(q)  # state dtype handed back
    if t == 1 and f.segments is None:
        return _decode_step(q, k, v, log_gate, initial_state, sd)
    dev = q.device
    arr = f.arrays(t, offset, dev)
    cd = torch.float64
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    lam = torch.exp(log_gate.to(cd))[..., None, None]  # [B', T, H, 1, 1]
    rlam = torch.exp(reverse_log_gate.to(cd))[..., None, None]
    # (1) forward recurrence
    s = torch.zeros(b, h, d, dv, dtype=cd, device=dev) if initial_state is None \
        else initial_state.to(cd)
    outs = []
    for i in range(t):
        keep = (arr.start[:, i] < i).to(cd).view(-1, 1, 1, 1)  # 0 at a segment start
        s = keep * lam[:, i] * s + kf[:, i, :, :, None] * vf[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", qf[:, i], s))

    # (2) reverse recurrence
    end, key_ok = arr.end, arr.key_ok
    band = f.base == "chunked" and f.lookahead_chunks > 0
    if band:
        # own chunk through the reverse recurrence (reset at chunk and segment ends)
        pos = torch.arange(t, device=dev)
        chunk_end = ((pos + offset) // f.chunk + 1) * f.chunk - 1 - offset
        end = torch.minimum(arr.seg_end, chunk_end[None])
    if end is not None:
        r = torch.zeros(b, h, d, dv, dtype=cd, device=dev)
        chunk_states = {}
        for i in range(t - 1, -1, -1):
            cont = (end[:, i] >= i + 1).to(cd).view(-1, 1, 1, 1)
            outs[i] = outs[i] + torch.einsum("bhd,bhde->bhe", qf[:, i], cont * rlam[:, i] * r)
            kv = kf[:, i, :, :, None] * vf[:, i, :, None, :]
            if key_ok is not None:
                kv = kv * key_ok[:, i].to(cd).view(-1, 1, 1, 1)
            r = cont * rlam[:, i] * r + kv
            if band and (i + offset) % f.chunk == 0:
                chunk_states[(i + offset) // f.chunk] = r  # W_c
        if band:
            _band(outs, qf, reverse_log_gate.to(cd), arr, f, offset, chunk_states)
    o = torch.stack(outs, dim=1)
    return o.to(q.dtype), s.to(sd)
