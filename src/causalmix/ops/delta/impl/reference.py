"""Reference delta attention: dense, eager, in the compute dtype. This module *defines*
correctness.

The recurrences (queries and keys at the same positions, local index t; head h implicit)::

    forward   S_t = exp(g_t) S_{t-1};   S_t += k_t (beta_t (v_t - S_t^T k_t))^T;   o_t = S_t^T q_t
    reverse   R_j = exp(r_j) R_{j+1};   R_j += k_j (beta_j (v_j - R_j^T k_j))^T,
              run from R_{hi+1} = 0 down to j = i + 1, read as (exp(r_i) R_{i+1})^T q_i

are solved here in closed form, each over the keys the spec's dense mask shows (no
factorisation is consulted: the fast implementations read the same regions from it). Writing
``u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t)`` for the value the forward step actually adds,
``S_t = sum_{j <= t} exp(G_t - G_j) k_j u_j^T`` (``G`` the cumulative log-gate), so the ``u`` solve
a unit lower-triangular system; the reverse part likewise with ``E_m = r_0 + .. + r_{m-1}`` and
a unit upper-triangular one. A per-key-dimension gate (``[B, T, H, D]``, KDA:
``S_t = diag(exp(g_t)) S_{t-1}``) makes every ``exp(G_t - G_j)`` a diagonal matrix: products
``a . b`` below become ``sum_d a_d b_d exp(G_td - G_jd)`` and ``exp(G) K S0`` is ``(exp(G) * K)
S0``. Steps:

    (1) M = visible(t, j) over the keys; G_t = g_0 + .. + g_t, E_t = r_0 + .. + r_{t-1}
    (2) forward values: (I + L) U = beta (V - [reads S0] exp(G) K S0),
        L_tj = beta_t exp(G_t - G_j) (k_t . k_j) for j < t with M_tj
    (3) forward part: o_i = sum_{j <= i, M_ij} exp(G_i - G_j) (q_i . k_j) u_j
                            + [reads S0] exp(G_i) S0^T q_i
    (4) reverse part of query i (keys i < m <= hi(i) = max{m: M_im}; queries sharing hi share
        one recurrence): (I + Lr) W = beta V over those keys, Lr_mn = beta_m exp(E_n - E_m)
        (k_m . k_n) for n > m; o_i += sum_{i < m <= hi} exp(E_m - E_i) (q_i . k_m) w_m
    (5) final state at the last key l: S_l = sum_{j <= l, M_lj} exp(G_l - G_j) k_j u_j^T
                                            + [reads S0] exp(G_l) S0

"reads S0": the key / query sees position ``max(offset - 1, 0)`` (its segment continues from
before the call). Every exponent is a difference of cumulative log-gates over visible pairs,
``<= 0``; masked entries are selected away, never multiplied by zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.delta.call import DeltaCall

_NEG_INF = float("-inf")


def can_serve(call: DeltaCall) -> str | None:
    """Every call with a supported spec (the definition needs its regions contiguous)."""
    return call.factor_error


def _heads(call: DeltaCall, cd):
    """q, k, v with one head per output head (``[B, T, H, *]``, compute dtype): the
    reference may repeat heads; the fast paths never do."""
    dev = call.q.device
    return tuple(x.index_select(2, call.heads.index(n, dev)).to(cd)
                 for n, x in (("q", call.q), ("k", call.k), ("v", call.v)))


class Dense(NamedTuple):
    """One call's inputs with one head per output head, ``[B, H, Tk, *]`` in the compute dtype
    (q padded with zeros to Tk: every key position is also read as a query)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor


def _gram(x, y, decay):
    """``sum_d x_td y_jd decay_tjd`` ``[.., T, J]``; ``decay [.., T, J, Dg]`` (``Dg = 1``: a
    scalar gate, the plain product)."""
    if decay.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * decay[..., 0]
    return torch.einsum("...td,...jd,...tjd->...tj", x, y, decay)


def _forward(x: Dense, g, m, reads, s0):
    """(2), (3), (5): forward outputs ``[B, H, Tk, Dv]`` and the final state. ``g: [B, H, Tk,
    Dg]`` (``Dg``: 1 or D), ``m: [B', Tk, Tk]``, ``reads: [B', Tk]`` (bool), ``s0: [B, H, D,
    Dv]`` or None."""
    q, k, v, beta = x
    tk = k.shape[2]
    idx = torch.arange(tk, device=k.device)
    low = m & (idx[None, :, None] >= idx[None, None, :])  # visible, j <= t
    strict = low & (idx[None, :, None] > idx[None, None, :])
    gc = g.cumsum(-2)  # G: [B, H, Tk, Dg]
    decay = torch.where(low[:, None, ..., None], gc[..., :, None, :] - gc[..., None, :, :],
                        _NEG_INF).exp()  # [B, H, Tk, Tk, Dg]
    lmat = torch.where(strict[:, None], beta[..., :, None] * _gram(k, k, decay), 0.0)
    rhs = v
    if s0 is not None:
        w0 = torch.where(reads[:, None, :, None], gc.exp(), 0.0)  # [B, H, Tk, Dg]
        rhs = v - (w0 * k) @ s0
    u = torch.linalg.solve_triangular(lmat, beta[..., None] * rhs, upper=False,
                                      unitriangular=True)
    o = _gram(q, k, decay) @ u
    row = decay[..., -1, :, :]  # exp(G_l - G_j) on visible pairs of the last key
    final = (k * row).transpose(-1, -2) @ u
    if s0 is not None:
        o = o + (w0 * q) @ s0
        final = final + w0[:, :, -1, :, None] * s0
    return o, final


def _reverse_group(x: Dense, e, qs, hi: int):
    """(4) for the queries ``qs`` (indices) whose reverse part reads keys ``(i, hi]``: their
    reverse outputs ``[B, H, len(qs), Dv]``. ``e: [B, H, Tk, Dg]`` (E)."""
    q, k, v, beta = x
    lo = int(qs[0])
    ks, vs, bs, es = k[:, :, lo + 1:hi + 1], v[:, :, lo + 1:hi + 1], beta[:, :, lo + 1:hi + 1], \
        e[:, :, lo + 1:hi + 1]
    n = hi - lo
    idx = torch.arange(n, device=k.device)
    upper = idx[None, :] > idx[:, None]  # n > m
    dec = torch.where(upper[..., None], es[..., None, :, :] - es[..., :, None, :], _NEG_INF)
    lr = torch.where(upper, bs[..., :, None] * _gram(ks, ks, dec.exp()), 0.0)
    w = torch.linalg.solve_triangular(lr, bs[..., None] * vs, upper=True, unitriangular=True)
    keys = torch.arange(lo + 1, hi + 1, device=k.device)
    seen = keys[None, :] > qs[:, None]  # [len(qs), n]: key m > i
    eq = e[:, :, qs]
    wgt = torch.where(seen[..., None], es[..., None, :, :] - eq[..., :, None, :], _NEG_INF)
    return _gram(q[:, :, qs], ks, wgt.exp()) @ w


def _reverse(o, x: Dense, r, m, tq: int):
    """(4): adds the reverse parts of the first ``tq`` queries to ``o [B, H, Tk, Dv]``."""
    tk = x.k.shape[2]
    e = torch.nn.functional.pad(r[..., :-1, :], (0, 0, 1, 0)).cumsum(-2)  # E (exclusive)
    idx = torch.arange(tk, device=x.k.device)
    hi = torch.where(m, idx, -1).amax(-1)  # [B', Tk]: last visible key of each query
    parts = []
    for b in range(m.shape[0]):
        sl = slice(None) if m.shape[0] == 1 else slice(b, b + 1)
        rows = o[sl]
        for h in sorted(set(hi[b, :tq][hi[b, :tq] > idx[:tq]].tolist())):
            qs = torch.nonzero((hi[b, :tq] == h) & (idx[:tq] < h)).flatten()
            add = _reverse_group(Dense(*(y[sl] for y in x)), e[sl], qs, h)
            rows = rows.index_add(2, qs, add)
        parts.append(rows)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def run(call: DeltaCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output [B, Tq, H, Dv] in q's dtype, final state [B, H, D, Dv] or None)``."""
    cd = compute_dtype(call.q)
    dev, off = call.q.device, call.k_offset
    tq, tk = call.q.shape[1], call.k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in _heads(call, cd))  # [B, H, T, *]
    q = torch.nn.functional.pad(q, (0, 0, 0, tk - tq))  # every key position read as a query
    gates = call.scan_gates()
    beta = call.beta.to(cd).transpose(1, 2)
    # gates as [B, H, Tk, Dg]: Dg = 1 (scalar) or D (per key dimension)
    g, r = (x.to(cd).reshape(*x.shape[:3], -1).transpose(1, 2) for x in
            (gates.log_gate, gates.reverse_log_gate))
    # (1) the spec's mask over the keys (each key position also read as a query)
    m = call.visibility.mask(tk, tk, q_offset=off, k_offset=off, device=dev)  # [B', Tk, Tk]
    nb = m.shape[0]
    anchor = torch.tensor(max(off - 1, 0), device=dev)
    pos = torch.arange(off, off + tk, device=dev)
    reads = call.visibility.visible(torch.arange(nb, device=dev)[:, None], pos[None], anchor)
    reads = reads.expand(nb, tk)
    s0 = None if call.initial_state is None else call.initial_state.to(cd)
    x = Dense(q, k, v, beta)
    o, final = _forward(x, g, m, reads, s0)
    if call.factor is None or call.factor.base != "causal":  # a causal spec has no future
        o = _reverse(o, x, r, m, tq)  # (a data-dependent loop: not traceable by compile)
    out = o[:, :, :tq].transpose(1, 2).to(call.q.dtype)
    return out, (final if call.return_final_state else None)
