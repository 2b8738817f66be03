"""Recurrent linear attention: one position at a time (decode, and a second oracle).

Forward recurrence (the causal part), reset at segment starts::

    S_t = [t continues its segment] * lambda * S_{t-1} + k_t v_t^T,      o_t = q_t S_t

Reverse recurrence (future part of ``Full`` / ``Prefix`` / ``Chunked``), strict, reset at the
end of each reverse region (segment end; chunk end for ``Chunked``)::

    o_t += [t + 1 in t's region] * lambda * q_t R_{t+1},
    R_t  = [t + 1 in t's region] * lambda * R_{t+1} + [key t enters] k_t v_t^T

``Chunked(s, L > 0)``: the reverse recurrence runs with resets at chunk (and segment)
boundaries; its state at the start of each chunk, ``W_c``, summarises chunk c (up to the segment
end), and query t of chunk c adds ``lambda ** (start(c + m) - t) q_t W_{c + m}`` for
``m = 1..L`` when its segment reaches chunk ``c + m``. All exponents are >= 0 distances.

Autograd runs through the loop: memory grows with T (one state per step), which is fine for
decode and tests; long sequences use the chunk implementation. The loop computes in fp64 (it is
the second oracle; a step-by-step fp32 recurrence would lose ~1e-6 relative in the decay
gradient at a few hundred steps); a single decode step (T == 1, no segments) computes in fp32.
"""

from __future__ import annotations

import torch

from causalmix.ops.linear.factor import Factorisation


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_attention(q, k, v, f: Factorisation, *, decay, offset: int, initial_state):
    """``q, k: [B, T, H, D]``, ``v: [B, T, H, Dv]`` -> ``(o [B, T, H, Dv] q.dtype, S_final)``."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    cd = compute_dtype(q)
    dev = q.device
    lam = torch.ones(h, dtype=cd, device=dev) if decay is None else decay.to(cd)
    lam4 = lam.view(1, h, 1, 1)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)

    if t == 1 and f.segments is None:
        # decode step: S = lambda S0 + k v^T, o = q S (+ nothing in the future of a 1-token call)
        k1, v1 = kf[:, 0, :, :, None], vf[:, 0, :, None, :]  # [B, H, D, 1], [B, H, 1, Dv]
        s = k1 * v1 if initial_state is None else torch.addcmul(
            lam4 * initial_state.to(cd), k1, v1)
        o = torch.matmul(qf[:, 0, :, None, :], s).transpose(1, 2)  # [B, 1, H, Dv]
        return o.to(q.dtype), s

    arr = f.arrays(t, offset, dev)
    sd = cd  # state dtype handed back
    cd = torch.float64
    lam, qf, kf, vf = lam.to(cd), qf.to(cd), kf.to(cd), vf.to(cd)
    lam4 = lam.view(1, h, 1, 1)
    # (1) forward recurrence
    s = torch.zeros(b, h, d, dv, dtype=cd, device=dev) if initial_state is None \
        else initial_state.to(cd)
    outs = []
    for i in range(t):
        keep = (arr.start[:, i] < i).to(cd).view(-1, 1, 1, 1)  # 0 at a segment start
        s = keep * lam4 * s + kf[:, i, :, :, None] * vf[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", qf[:, i], s))

    # (2) reverse recurrence
    end = arr.end
    key_ok = arr.key_ok
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
            outs[i] = outs[i] + torch.einsum("bhd,bhde->bhe", qf[:, i], cont * lam4 * r)
            kv = kf[:, i, :, :, None] * vf[:, i, :, None, :]
            if key_ok is not None:
                kv = kv * key_ok[:, i].to(cd).view(-1, 1, 1, 1)
            r = cont * lam4 * r + kv
            if band and (i + offset) % f.chunk == 0:
                chunk_states[(i + offset) // f.chunk] = r  # W_c
        if band:
            for i in range(t):
                c = (i + offset) // f.chunk
                for m in range(1, f.lookahead_chunks + 1):
                    start = (c + m) * f.chunk - offset
                    if start >= t:
                        break
                    reach = (arr.seg_end[:, i] >= start).to(cd).view(-1, 1, 1, 1)
                    w = (lam ** float(start - i)).view(1, h, 1, 1)  # distance > 0
                    outs[i] = outs[i] + torch.einsum(
                        "bhd,bhde->bhe", qf[:, i], reach * w * chunk_states[c + m]
                    )
    o = torch.stack(outs, dim=1)
    return o.to(q.dtype), s.to(sd)
