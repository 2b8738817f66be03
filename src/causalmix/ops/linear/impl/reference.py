"""Reference linear attention: dense, eager, fp32 inside. This module *defines* correctness.

For query i (absolute position ``q_offset + i``), key j (``k_offset + j``), output head h (which
reads q / k / v heads as :class:`~causalmix.ops.heads.Heads` says; here by indexing).

Constant decay ``lambda_h`` (1 when no decay is given):

    (1)  w_ij = lambda_h ** |i - j|               if visible(i, j), else 0

Data-dependent gates (``log_gate`` ``g``, ``reverse_log_gate`` ``r``, both ``[B, Tk, H]`` at the
key positions, ``<= 0``; queries and keys at the same positions; or per key dimension,
``[B, Tk, H, D]``, GLA: then every weight below is a vector over the key dimension d, from the
cumulative sums of ``g[..., d]``, and (2) reads ``sum_d q_id w_ijd k_jd``)::

    (1') w_ij = exp(G_i - G_j)     j <= i,  G_t = g_0 + ... + g_t   (prod_{s=j+1..i} exp(g_s))
         w_ij = exp(E_j - E_i)     j >  i,  E_t = r_0 + ... + r_{t-1} (prod_{s=i..j-1} exp(r_s))
         where visible(i, j), else 0: only differences of cumulative log-gates are
         exponentiated, so every exponent is <= 0. A gate whose exp is 0 in the compute dtype
         (e.g. -1e30) is a hard reset: every weight across it is 0, and it enters no sum.

    (2)  o_i  = sum_j w_ij (q_i . k_j) v_j         (no softmax, normaliser or feature map;
                                                    per key dimension: (q_i * w_ij) . k_j)
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

from typing import NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.linear.call import LinearCall


def can_serve(call: LinearCall) -> str | None:
    """The reference serves every call (any spec, offsets, keys past the last query)."""
    return None


class _Weights(NamedTuple):
    """Weights of one call: ``pair [B'', H, Tq, Tk]`` (1)/(1'), ``init [B', Tq, H]`` of the
    initial state for each query (3), ``last [B', Tk, H]`` of key j and ``last_init [B', H, 1,
    1]`` of the initial state in the final state (4)."""

    pair: torch.Tensor
    init: torch.Tensor
    last: torch.Tensor
    last_init: torch.Tensor


def _cumulative(gate: torch.Tensor, cd, *, exclusive: bool):
    """``[B', Tk, H]`` log-gates -> their cumulative sums in ``cd`` over the gates that are not
    hard resets, and the cumulative count of resets (inclusive ``g_0 + .. + g_t``, or exclusive
    ``r_0 + .. + r_{t-1}``). A reset is a gate whose ``exp`` is exactly 0 in ``cd``: every
    product across it is 0, whatever the other gates (no huge value enters a sum)."""
    g = gate.to(cd)
    reset = torch.exp(g) == 0
    g = torch.where(reset, torch.zeros_like(g), g)
    if exclusive:  # shift by one position (dim 1), for [B', Tk, H] and [B', Tk, H, D]
        g = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)
        reset = torch.cat([torch.zeros_like(reset[:, :1]), reset[:, :-1]], dim=1)
    return g.cumsum(1), reset.cumsum(1)


def _per_dim(x: torch.Tensor, vector: bool) -> torch.Tensor:
    """A ``[..., Tq, Tk]`` mask broadcast against per key dimension weights (``[..., D]``)."""
    return x[..., None] if vector else x


def _log_weights(cum: tuple, visible, tq: int, cd) -> torch.Tensor:
    """(1') ``cum``: ``(G, E)`` with their reset counts, each ``[B', Tk, H]`` (or ``[B', Tk, H,
    D]``); ``visible: [B', Tq, Tk]`` -> ``log w: [B'', H, Tq, Tk]`` (or ``[B'', H, Tq, Tk, D]``;
    ``-inf`` where invisible or across a reset)."""
    (gc, nf), (e, nr) = ((x.transpose(1, 2) for x in pair) for pair in cum)  # [B', H, Tk(, D)]
    vector = gc.dim() == 4
    tk, dev = gc.shape[2], gc.device
    i = torch.arange(tq, device=dev)[:, None]
    j = torch.arange(tk, device=dev)[None, :]
    fwd = gc[:, :, :tq, None] - gc[:, :, None, :]  # G_i - G_j
    fwd = fwd.masked_fill(nf[:, :, :tq, None] != nf[:, :, None, :], -torch.inf)
    rev = e[:, :, None, :] - e[:, :, :tq, None]  # E_j - E_i
    rev = rev.masked_fill(nr[:, :, None, :] != nr[:, :, :tq, None], -torch.inf)
    logw = torch.where(_per_dim(j <= i, vector), fwd, rev)
    return torch.where(_per_dim(visible[:, None], vector), logw,
                       torch.tensor(-torch.inf, dtype=cd, device=dev))


def _gated_weights(call: LinearCall, visible: torch.Tensor, cd) -> _Weights:
    """(1') and the state weights of (3)-(4) from the cumulative log-gates; a hard reset (a
    gate whose ``exp`` is 0 in ``cd``, e.g. ``-1e30``) zeroes every weight across it."""
    if call.vector_gates:  # both [B', Tk, H, D] (a scalar one broadcast over D)
        g, gr = call.scan_gates()[:2]
    else:
        g = call.log_gate
        gr = g if call.reverse_log_gate is None else call.reverse_log_gate
    tq, h = call.q.shape[1], call.heads.out
    gcum, nf = _cumulative(g, cd, exclusive=False)  # G
    pair = torch.exp(_log_weights(((gcum, nf), _cumulative(gr, cd, exclusive=True)), visible,
                                  tq, cd))
    zero = torch.zeros((), dtype=cd, device=g.device)
    init = torch.where(nf[:, :tq] == 0, torch.exp(gcum[:, :tq]), zero)  # no reset in [0, i]
    last = torch.where(nf[:, -1:] == nf, torch.exp(gcum[:, -1:] - gcum), zero)
    last_init = torch.where(nf[:, -1] == 0, torch.exp(gcum[:, -1]), zero)
    last_init = last_init.view(-1, h, 1, 1) if g.dim() == 3 else last_init[..., None]
    return _Weights(pair, init, last, last_init)


def _decay_weights(call: LinearCall, visible: torch.Tensor, cd) -> _Weights:
    """(1) ``lambda ** |i - j|`` (exponent <= 0) and the state weights of (3)-(4)."""
    h, dev = call.heads.out, call.q.device
    tq, tk = call.q.shape[1], call.k.shape[1]
    i = torch.arange(call.q_offset, call.q_offset + tq, device=dev)
    j = torch.arange(call.k_offset, call.k_offset + tk, device=dev)
    anchor, last = call.k_offset - 1, call.k_offset + tk - 1
    g = torch.zeros(h, dtype=cd, device=dev) if call.decay is None \
        else torch.log(call.decay.to(cd))
    dist = (i[:, None] - j[None, :]).abs().to(cd)  # [Tq, Tk]
    pair = torch.exp(g[:, None, None] * dist)[None] * visible[:, None].to(cd)
    init = torch.exp(g[None, :] * (i - anchor).to(cd)[:, None])[None]  # [1, Tq, H]
    lastw = torch.exp(g[None, :] * (last - j).to(cd)[:, None])[None]  # [1, Tk, H]
    return _Weights(pair, init, lastw, torch.exp(g * (last - anchor)).view(1, h, 1, 1))


def _final_state(call: LinearCall, w: _Weights, kf, vf, cd) -> torch.Tensor:
    """(4) the causal state at the last key position."""
    vis, dev = call.visibility, call.q.device
    tk = call.k.shape[1]
    nb = vis.batch_size or 1
    bidx = torch.arange(nb, device=dev).view(nb, 1)
    last = torch.tensor(call.k_offset + tk - 1, device=dev)
    j = torch.arange(call.k_offset, call.k_offset + tk, device=dev)
    row = vis.visible(bidx, last, j[None, :]).expand(nb, tk).to(cd)  # [B', Tk]
    wl = w.last * (row[..., None] if w.last.dim() == 3 else row[..., None, None])
    final = torch.einsum("bjhd,bjhe->bhde", kf * (wl[..., None] if wl.dim() == 3 else wl), vf)
    if call.initial_state is not None:
        seen = vis.visible(bidx, last, torch.tensor(max(call.k_offset - 1, 0), device=dev))
        final = final + call.initial_state.to(cd) * w.last_init * seen.reshape(nb, 1, 1, 1).to(cd)
    return final


def run(call: LinearCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Tq, H, Dv] in q.dtype, final_state [B, H, D, Dv] or None)``."""
    q, vis = call.q, call.visibility
    tq, tk = q.shape[1], call.k.shape[1]
    cd, dev = compute_dtype(q), q.device
    # heads: each output head reads its q / k / v head (indexing; the fast paths use views)
    qf = q.to(cd)[:, :, call.heads.index("q", dev)]
    kf = call.k.to(cd)[:, :, call.heads.index("k", dev)]
    vf = call.v.to(cd)[:, :, call.heads.index("v", dev)]
    visible = vis.mask(tq, tk, q_offset=call.q_offset, k_offset=call.k_offset, device=dev)
    # (1) weights where visible: lambda ** |i - j|, or (1') the gated ones
    w = (_gated_weights if call.log_gate is not None else _decay_weights)(call, visible, cd)
    # (2) masked, decayed scores times values
    if call.log_gate is not None and call.vector_gates:  # (2) per key dimension
        s = torch.einsum("bihd,bjhd,bhijd->bhij", qf, kf, w.pair)
    else:
        s = torch.einsum("bihd,bjhd->bhij", qf, kf) * w.pair
    o = torch.einsum("bhij,bjhd->bihd", s, vf)
    if call.initial_state is not None:
        # (3) the carried causal state, seen where the spec lets query i see position a'
        nb = vis.batch_size or 1
        i = torch.arange(call.q_offset, call.q_offset + tq, device=dev)
        a = torch.tensor(max(call.k_offset - 1, 0), device=dev)
        seen = vis.visible(torch.arange(nb, device=dev).view(nb, 1), i[None, :], a)
        seen = seen.expand(nb, tq).to(cd)  # [B', Tq]
        if w.init.dim() == 4:  # per key dimension: the weight enters before the sum over d
            qw = qf * (w.init * seen[..., None, None])
            o = o + torch.einsum("bihd,bhde->bihe", qw, call.initial_state.to(cd))
        else:
            o = o + torch.einsum("bihd,bhde->bihe", qf, call.initial_state.to(cd)) * \
                (w.init * seen[..., None])[..., None]
    final = _final_state(call, w, kf, vf, cd) if call.return_final_state else None
    return o.to(q.dtype), final
