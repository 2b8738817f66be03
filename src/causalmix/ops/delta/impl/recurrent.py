"""Recurrent delta attention: one position at a time (decode, and a second oracle).

Forward recurrence over the keys (local t; restarts at segment starts,
:mod:`causalmix.ops.delta.regions`)::

    S_t = [t continues its segment] exp(g_t) S_{t-1}     (diag(exp(g_t)) for a [B, T, H, D] gate)
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T,        o_t = S_t^T q_t

Each reverse pass (restarts where its regions end)::

    R_t = [t + 1 in t's region] exp(r_t) R_{t+1};   o_t += [t takes this pass] R_t^T q_t
    R_t = R_t + k_t (beta_t (v_t - R_t^T k_t))^T

Heads stay grouped (``[B, Hk, G, ...]`` views broadcast against each other), never repeated.
Autograd runs through the loop (memory grows with T: fine for decode and tests). The loop
computes in fp64 (it is the second oracle); a single decode step (``Tk == 1``, no segments, no
reverse part) computes in the compute dtype.
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.delta.call import DeltaCall
from causalmix.ops.delta.regions import regions


def can_serve(call: DeltaCall) -> str | None:
    """Every call with a supported spec."""
    return call.factor_error


def _grouped(x: torch.Tensor, hk: int, cd) -> torch.Tensor:
    """``[B, T, Hx, *F]`` -> ``[T, B, Hk, Hx / Hk, *F]`` in ``cd`` (a view before the cast)."""
    b, t, hx = x.shape[:3]
    return x.reshape(b, t, hk, hx // hk, *x.shape[3:]).to(cd).movedim(1, 0)


def _step(s, kt, vt, bt):
    """The delta update ``S += k (beta (v - S^T k))^T``; ``s [B, Hk, G, D, Dv]``, ``kt [B, Hk,
    Gk, D]``, ``vt [B, Hk, Gv, Dv]``, ``bt [B, Hk, G]``."""
    pred = (kt[..., None, :] @ s)[..., 0, :]  # S^T k: [B, Hk, G, Dv]
    return s + kt[..., :, None] * (bt[..., None] * (vt - pred))[..., None, :]


def _decay(gt):
    """``exp(g_t)`` against ``s [B, Hk, G, D, Dv]``: ``gt [B, Hk, G]`` (scalar) or ``[B, Hk,
    G, D]`` (per key dimension: ``diag(exp(g_t)) S``)."""
    return torch.exp(gt)[..., None] if gt.dim() == 4 else torch.exp(gt)[..., None, None]


def _read(s, qt):
    return (qt[..., None, :] @ s)[..., 0, :]  # S^T q: [B, Hk, G, Dv]


def run(call: DeltaCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output [B, Tq, H, Dv] in q's dtype, final state [B, H, D, Dv] or None)``."""
    b, tq, _, d = call.q.shape
    tk, dv, hk = call.k.shape[1], call.v.shape[-1], call.heads.k
    sd = compute_dtype(call.q)
    f = call.factor
    single = tk == 1 and f.segments is None
    cd = sd if single else torch.float64
    gates = call.scan_gates()
    q, k, v = (_grouped(x, hk, cd) for x in (call.q, call.k, call.v))
    beta, g, r = (_grouped(x, hk, cd) for x in (call.beta, gates.log_gate,
                                                 gates.reverse_log_gate))
    reg = regions(f, tk, call.k_offset, call.q.device)
    g_out = call.heads.out // hk
    s = torch.zeros(b, hk, g_out, d, dv, dtype=cd, device=call.q.device)
    if call.initial_state is not None:
        s = call.initial_state.to(cd).view(b, hk, g_out, d, dv)
    outs = []
    for t in range(tk):
        keep = (reg.start[:, t] < t).to(cd).view(-1, 1, 1, 1, 1)  # 0 at a segment start
        s = _step(keep * _decay(g[t]) * s, k[t], v[t], beta[t])
        if t < tq:
            outs.append(_read(s, q[t]))
    for p in reg.passes:
        rs = torch.zeros_like(s)
        for t in range(tk - 1, -1, -1):
            cont = (p.end[:, t] >= t + 1).to(cd).view(-1, 1, 1, 1, 1)
            rs = cont * _decay(r[t]) * rs
            if t < tq:
                take = 1.0 if p.queries is None else p.queries[:, t].to(cd).view(-1, 1, 1, 1)
                outs[t] = outs[t] + take * _read(rs, q[t])
            rs = _step(rs, k[t], v[t], beta[t])
    if outs:
        o = torch.stack(outs, 1).reshape(b, tq, call.heads.out, dv)
    else:
        o = call.q.new_zeros(b, 0, call.heads.out, dv, dtype=cd)
    final = s.reshape(b, call.heads.out, d, dv).to(sd) if call.return_final_state else None
    return o.to(call.q.dtype), final
