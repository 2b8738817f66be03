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
from causalmix.ops.factor import Factorisation, PositionArrays
from causalmix.ops.linear.call import LinearCall


def can_serve(call: LinearCall) -> str | None:
    """Queries and keys at the same positions, a spec that factorises, as many keys as
    queries."""
    if call.q_offset != call.k_offset:
        return (f"q_offset ({call.q_offset}) != k_offset ({call.k_offset}); the chunk and "
                f"recurrent forms need queries and keys at the same positions")
    if call.factor is None:
        return call.factor_error
    tq, tk = call.q.shape[1], call.k.shape[1]
    if tk != tq:
        if tq == 0:
            return "no queries"
        return f"recurrent needs as many keys as queries (got q {tq}, k {tk})"
    return None


def _decode_step(q, k, v, log_gate, initial_state, cd):
    """T == 1: ``S = exp(g_0) S0 + k v^T``, ``o = q S`` (nothing in the future of one token)."""
    k1, v1 = k.to(cd)[:, 0, :, :, None], v.to(cd)[:, 0, :, None, :]  # [B, H, D, 1], [B, H, 1, Dv]
    if initial_state is None:
        s = k1 * v1
    else:
        lam = torch.exp(log_gate.to(cd)[:, 0]).view(log_gate.shape[0], -1, 1, 1)
        s = torch.addcmul(lam * initial_state.to(cd), k1, v1)
    o = torch.matmul(q.to(cd)[:, 0, :, None, :], s).transpose(1, 2)  # [B, 1, H, Dv]
    return o.to(q.dtype), s


def _band(outs: list, qf, reverse_log_gate, where: tuple, chunk_states: dict) -> None:
    """Chunked(s, L > 0): query t reads the chunk states ``W`` of the next L chunks.
    ``where``: the call's factorisation, position arrays and offset."""
    f, arr, offset = where
    t = qf.shape[1]
    # E_t = r_0 + .. + r_{t-1}
    e = torch.nn.functional.pad(reverse_log_gate[:, :-1], (0, 0, 1, 0)).cumsum(1)
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


def _forward(outs: list, qkv: tuple, lam, arr: PositionArrays, s):
    """(1) the forward recurrence from state ``s``; appends each output, returns the last S."""
    qf, kf, vf = qkv
    for i in range(qf.shape[1]):
        keep = (arr.start[:, i] < i).to(qf.dtype).view(-1, 1, 1, 1)  # 0 at a segment start
        s = keep * lam[:, i] * s + kf[:, i, :, :, None] * vf[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", qf[:, i], s))
    return s


def _reverse(outs: list, qkv: tuple, reverse_log_gate, f: Factorisation, arr: PositionArrays,
             offset: int) -> None:
    """(2) the reverse recurrence (and the band of ``Chunked(s, L > 0)``), added to ``outs``."""
    qf, kf, vf = qkv
    t, dev, cd = qf.shape[1], qf.device, qf.dtype
    end, key_ok = arr.end, arr.key_ok
    band = f.base == "chunked" and f.lookahead_chunks > 0
    if band:
        # own chunk through the reverse recurrence (reset at chunk and segment ends)
        pos = torch.arange(t, device=dev)
        chunk_end = ((pos + offset) // f.chunk + 1) * f.chunk - 1 - offset
        end = torch.minimum(arr.seg_end, chunk_end[None])
    if end is None:
        return
    rlam = torch.exp(reverse_log_gate)[..., None, None]
    r = torch.zeros(qf.shape[0], qf.shape[2], qf.shape[3], vf.shape[3], dtype=cd, device=dev)
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
        _band(outs, qf, reverse_log_gate, (f, arr, offset), chunk_states)


def run(call: LinearCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(o [B, T, H, Dv] q.dtype, S_final [B, H, D, Dv] or None)``."""
    q, f = call.q, call.factor
    gates = call.scan_gates()
    k, v = _expand(call)
    sd = compute_dtype(q)  # state dtype handed back
    if q.shape[1] == 1 and f.segments is None:
        o, s = _decode_step(q, k, v, gates.log_gate, call.initial_state, sd)
        return o, (s if call.return_final_state else None)
    b, t, h, d = q.shape
    dev, cd = q.device, torch.float64
    arr = f.arrays(t, call.q_offset, dev)
    qkv = (q.to(cd), k.to(cd), v.to(cd))
    lam = torch.exp(gates.log_gate.to(cd))[..., None, None]  # [B', T, H, 1, 1]
    s = torch.zeros(b, h, d, v.shape[-1], dtype=cd, device=dev) if call.initial_state is None \
        else call.initial_state.to(cd)
    outs: list = []
    s = _forward(outs, qkv, lam, arr, s)
    _reverse(outs, qkv, gates.reverse_log_gate.to(cd), f, arr, call.q_offset)
    o = torch.stack(outs, dim=1)
    return o.to(q.dtype), (s.to(sd) if call.return_final_state else None)


def _expand(call: LinearCall):
    """GQA: repeat each kv head for its group of query heads (gradients sum back)."""
    group = call.heads.out // call.k.shape[2]
    if group == 1:
        return call.k, call.v
    return call.k.repeat_interleave(group, dim=2), call.v.repeat_interleave(group, dim=2)
