"""Recurrent linear attention: one position at a time (decode, and a second oracle).

Per-position log-gates ``g_t`` (forward) and ``r_t`` (reverse), ``[B', T, H]``; a constant decay
is ``g_t = r_t = log(lambda)``. Per key dimension gates (``[B', T, H, D]``, GLA) multiply the
state's rows, ``exp(g_t) S`` read as ``diag(exp(g_t)) S``. Forward recurrence (the causal
part), reset at segment starts::

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

Heads are grouped by key head (``[B, T, K, G, ...]`` views of q, k, v, gates and states;
GQA and value grouping broadcast the input with fewer heads, never repeat it).

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
    refusal = call.scan_refusal()
    if refusal is not None:
        return refusal
    tq, tk = call.q.shape[1], call.k.shape[1]
    if tk != tq:
        return f"recurrent needs as many keys as queries (got q {tq}, k {tk})"
    return None


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, T, Hx, ...]`` -> ``[B, T, K, Hx / K, ...]`` (a view: heads grouped by key head; an
    input head read by several output heads is broadcast, never repeated)."""
    return x.unflatten(2, (groups, x.shape[2] // groups))


def _read(qt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q_t S``: ``qt [B, K, Gq, D]``, ``s [B, K, G, D, Dv]`` -> ``[B, K, G, Dv]``."""
    return (qt[..., None, :] @ s)[..., 0, :]


def _outer(kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """``k_t v_t^T``: ``[B, K, 1, D]``, ``[B, K, Gv, Dv]`` -> ``[B, K, Gv, D, Dv]``."""
    return kt[..., :, None] * vt[..., None, :]


def _factor(x: torch.Tensor, vector: bool) -> torch.Tensor:
    """``exp`` of gates ``[..., K, G]`` (or ``[..., K, G, D]`` per key dimension) as a factor
    of the states ``[..., K, G, D, Dv]``: scalar per state, or one per state row."""
    return x[..., None] if vector else x[..., None, None]


def _flags(x: torch.Tensor, dtype) -> torch.Tensor:
    """A per-row flag ``[B']`` as a factor ``[B', 1, 1, 1, 1]`` of the states."""
    return x.to(dtype).view(-1, 1, 1, 1, 1)


def _decode_step(qkv: tuple, log_gate, initial_state, cd):
    """T == 1: ``S = exp(g_0) S0 + k v^T``, ``o = q S`` (nothing in the future of one token)."""
    q, k, v = (x.to(cd)[:, 0] for x in qkv)  # [B, K, Gx, D]
    s = _outer(k, v)
    vector = log_gate.dim() == 5
    if initial_state is not None:
        s = _factor(torch.exp(log_gate.to(cd)[:, 0]), vector) * initial_state.to(cd) + s
    s = s.expand(*s.shape[:2], log_gate.shape[3], *s.shape[3:])  # every output head's state
    return _read(q, s)[:, None], s


def _band(outs: list, qf, reverse_log_gate, where: tuple, chunk_states: dict) -> None:
    """Chunked(s, L > 0): query t reads the chunk states ``W`` of the next L chunks.
    ``where``: the call's factorisation, position arrays and offset."""
    f, arr, offset = where
    t, vector = qf.shape[1], reverse_log_gate.dim() == 5
    # E_t = r_0 + .. + r_{t-1}, [B', T, K, G(, D)]
    e = torch.cat([torch.zeros_like(reverse_log_gate[:, :1]), reverse_log_gate[:, :-1]],
                  dim=1).cumsum(1)
    for i in range(t):
        c = (i + offset) // f.chunk
        for m in range(1, f.lookahead_chunks + 1):
            start = (c + m) * f.chunk - offset
            if start >= t:
                break
            reach = _flags(arr.seg_end[:, i] >= start, qf.dtype)
            w = _factor(torch.exp(e[:, start] - e[:, i]), vector)  # exponent <= 0
            outs[i] = outs[i] + _read(qf[:, i], reach * w * chunk_states[c + m])


def _forward(outs: list, qkv: tuple, lam, arr: PositionArrays, s):
    """(1) the forward recurrence from state ``s``; appends each output, returns the last S."""
    qf, kf, vf = qkv
    for i in range(qf.shape[1]):
        keep = _flags(arr.start[:, i] < i, qf.dtype)  # 0 at a segment start
        s = keep * lam[:, i] * s + _outer(kf[:, i], vf[:, i])
        outs.append(_read(qf[:, i], s))
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
    rlam = _factor(torch.exp(reverse_log_gate), reverse_log_gate.dim() == 5)
    r = torch.zeros(qf.shape[0], *rlam.shape[2:4], kf.shape[-1], vf.shape[-1], dtype=cd,
                    device=dev)
    chunk_states = {}
    for i in range(t - 1, -1, -1):
        cont = _flags(end[:, i] >= i + 1, cd)
        outs[i] = outs[i] + _read(qf[:, i], cont * rlam[:, i] * r)
        kv = _outer(kf[:, i], vf[:, i])
        if key_ok is not None:
            kv = kv * _flags(key_ok[:, i], cd)
        r = cont * rlam[:, i] * r + kv
        if band and (i + offset) % f.chunk == 0:
            chunk_states[(i + offset) // f.chunk] = r  # W_c
    if band:
        _band(outs, qf, reverse_log_gate, (f, arr, offset), chunk_states)


def run(call: LinearCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(o [B, T, H, Dv] q.dtype, S_final [B, H, D, Dv] or None)``. Every tensor is grouped by
    key head (``[B, T, K, G, ...]`` views, :func:`_grouped`)."""
    q, f, heads = call.q, call.factor, call.heads
    gates = call.scan_gates()
    sd = compute_dtype(q)  # state dtype handed back
    b, t = q.shape[:2]
    s0 = None if call.initial_state is None else call.initial_state.unflatten(1, (heads.k, -1))
    lg = _grouped(gates.log_gate, heads.k)  # [B', T, K, G]
    if t == 1 and f.segments is None:
        o, s = _decode_step(tuple(_grouped(x, heads.k) for x in (q, call.k, call.v)), lg, s0,
                            sd)
    else:
        cd = torch.float64
        arr = f.arrays(t, call.q_offset, q.device)
        qkv = tuple(_grouped(x.to(cd), heads.k) for x in (q, call.k, call.v))
        lam = _factor(torch.exp(lg.to(cd)), gates.vector)  # [B', T, K, G, D or 1, 1]
        s = torch.zeros(b, *lg.shape[2:4], q.shape[-1], call.v.shape[-1], dtype=cd,
                        device=q.device) if s0 is None else s0.to(cd)
        outs: list = []
        s = _forward(outs, qkv, lam, arr, s)
        _reverse(outs, qkv, _grouped(gates.reverse_log_gate.to(cd), heads.k), f, arr,
                 call.q_offset)
        o = torch.stack(outs, dim=1)
    o = o.flatten(2, 3).to(q.dtype)  # [B, T, H, Dv]
    return o, (s.flatten(1, 2).to(sd) if call.return_final_state else None)
