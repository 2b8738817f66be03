"""Chunked delta attention: the WY / UT representation of DeltaNet's parallel algorithm
(Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"; the gates as in Gated DeltaNet), with a hand-written, memory-lean backward.

The sequence is cut into chunks of C positions. Inside a chunk the delta rule's C rank-one
updates become one unit lower-triangular solve, ``(I + A) [U0 | W] = [beta V | beta exp(b) K]``
with ``A_rj = beta_r (k_r . k_j) exp(b_r - b_j)`` (``b`` the chunk-local cumulative log-gates,
fp64, so only differences ``<= 0`` are exponentiated); across chunks only the state ``S: [D,
Dv]`` is carried: ``U = U0 - W S``, ``S' = exp(B) S + (exp(B - b) K)^T U``, ``O = exp(b) Q S +
(Q K^T * Gamma) U``. Chunks are processed a block at a time (batched triangular solves and
products), the chunk-to-chunk step being the only sequential one. See
:mod:`causalmix.ops.delta._chunk_math` (the equations), :mod:`causalmix.ops.delta._scan`
(forward) and :mod:`causalmix.ops.delta._scan_grad` (backward).

The reverse part is the same machinery on the flipped sequence with a strict read (the query
reads the state before its own key's update), one scan per reverse pass
(:mod:`causalmix.ops.delta.regions`): ``Full`` / ``Prefix`` / ``Chunked(s, 0)`` one scan with
restarts, ``Chunked(s, L > 0)`` up to ``L + 1``.

A per-key-dimension gate (KDA, ``log_gate [B, T, H, D]``, ``S_t = diag(exp(g_t)) S_{t-1}``) runs
the same scan with the decays as diagonals: row scales of Q, K and S, and the two gated
products of :mod:`causalmix.ops.delta._vgate` (secondary chunking inside a chunk, every
exponentiated factor ``<= 1``) in place of the Gamma-weighted ones.

Memory: the forward saves the inputs and one ``[B, H, D, Dv]`` state per chunk (``T / C``
states); the backward recomputes the intra-chunk quantities block by block. No ``[T, T]``
tensor, no per-token state, no repeated heads.
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.delta._scan import DeltaScan, ScanOptions
from causalmix.ops.delta.call import DeltaCall
from causalmix.ops.delta.regions import ReversePass, regions

#: Positions per block of chunks (batched intra-chunk work; bounds the temporaries).
BLOCK_POSITIONS = 512


def can_serve(call: DeltaCall) -> str | None:
    """Every call with a supported spec."""
    return call.factor_error


def _reverse_pass(q, k, v, bg, p: ReversePass, sizes: tuple[int, int, int]) -> torch.Tensor:
    """One reverse pass, ``[B, Tq, H, Dv]``: the flipped strict scan over the keys up to the
    last one any region reaches (``Prefix(n)``: the first n), zero past them and for the
    queries the pass is not for."""
    tq, tk = q.shape[1], k.shape[1]
    reach = min(tk, int(p.end.max()) + 1)
    if reach <= 1:  # no key after any query's own: no reverse part
        return q.new_zeros(q.shape[0], tq, bg.shape[2], v.shape[-1], dtype=bg.dtype)
    if reach < tk:  # keys past every region's end enter no reverse part: skip them
        p = ReversePass(p.end[:, :reach], None if p.queries is None else p.queries[:, :reach])
        q, k, v, bg = q[:, :min(tq, reach)], k[:, :reach], v[:, :reach], bg[:, :reach]
    opts = ScanOptions(p.flipped_start(), True, True, *sizes)
    rev = DeltaScan.apply(q, k, v, bg, None, opts)[0]
    if p.queries is not None:
        rev = torch.where(p.queries[:, :rev.shape[1], None, None], rev, 0.0)
    if rev.shape[1] < tq:
        rev = torch.nn.functional.pad(rev, (0, 0, 0, 0, 0, tq - rev.shape[1]))
    return rev


def _beta_gate(beta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``[B, Tk, H, 2]`` (beta, scalar log-gate) or ``[B, Tk, H, 1 + D]`` (beta, the log-gates
    of each key dimension)."""
    return torch.cat([beta[..., None], gate.reshape(*gate.shape[:3], -1)], -1)


def run(call: DeltaCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output [B, Tq, H, Dv] in q's dtype, final state [B, H, D, Dv] or None)``."""
    q, k, v = call.q, call.k, call.v
    cd = compute_dtype(q)
    tk = k.shape[1]
    c = max(1, min(call.chunk_size, tk))
    block = max(1, BLOCK_POSITIONS // c)
    reg = regions(call.factor, tk, call.k_offset, q.device)
    gates = call.scan_gates()
    beta = call.beta.to(cd)
    bg = _beta_gate(beta, gates.log_gate.to(cd))
    opts = ScanOptions(reg.start, False, False, c, block, call.heads.k)
    o, final = DeltaScan.apply(q, k, v, bg, call.initial_state, opts)[:2]
    if reg.passes:
        bgr = _beta_gate(beta, gates.reverse_log_gate.to(cd))
    for p in reg.passes:
        o = o + _reverse_pass(q, k, v, bgr, p, (c, block, call.heads.k))
    return o.to(q.dtype), (final if call.return_final_state else None)
