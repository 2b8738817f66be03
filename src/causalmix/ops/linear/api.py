"""Public entry points of the linear attention family: validation and explicit dispatch.

Semantics (``impl="reference"`` defines them). Query at absolute position i, key at j, head h.

**Constant decay** ``lambda_h`` in (0, 1] (``decay=None``: 1, no decay)::

    o_i = sum over visible j of  lambda_h ** |i - j| * (q_i . k_j) * v_j

**Data-dependent gates** (Mamba-2 / SSD, gated linear attention, Hydra): ``log_gate g`` and
``reverse_log_gate r`` (default ``g``), ``[B, T, H]``, values ``<= 0``, indexed by the positions
of the call (``g[:, t]`` belongs to position ``k_offset + t``)::

    o_i = sum over visible j of  w_ij * (q_i . k_j) * v_j
    w_ij = prod_{s=j+1..i} exp(g_s)     for j <= i  (S_t = exp(g_t) S_{t-1} + k_t v_t^T)
    w_ij = prod_{s=i..j-1} exp(r_s)     for j > i   (the same recurrence over the flipped
                                                     sequence, Hydra's construction)

The diagonal (``j == i``, weight 1) is counted once. A constant ``decay`` gives exactly the
numbers of ``log_gate = log(decay)`` broadcast over time. Only differences of cumulative
log-gates are exponentiated (never ``exp(-cumsum)``), in fp32 (fp64 for fp64 inputs), so gates
down to -30 per token at any length stay finite. Weights for ``Full()`` on 4 positions, with
``a_s = exp(g_s)`` and ``b_s = exp(r_s)``::

        j 0          1          2          3
    i 0   1          b0         b0 b1      b0 b1 b2
      1   a1         1          b1         b1 b2
      2   a1 a2      a2         1          b2
      3   a1 a2 a3   a2 a3      a3         1

``Segments(ids) & spec`` restarts both products at document boundaries (no information crosses
a boundary in either direction); other specs zero the invisible entries.

No softmax, no normaliser, no feature map (those belong to the layer). GQA / multi-value heads:
``k, v: [B, Tk, Hkv, ...]`` with ``H % Hkv == 0`` (query head h reads kv head
``h // (H / Hkv)``); decay, gates and states are per query head.

State convention
----------------
The state is the **causal (forward) state** ``S: [B, H, D, Dv]`` (fp32; fp64 for fp64 inputs)::

    S_t = lambda * S_{t-1} + k_t v_t^T  (gates: exp(g_t) S_{t-1})   o_t = q_t S_t  (causal part)

reset to 0 at every segment start of ``Segments(ids)``. ``initial_state`` is S at the position
just before the call (``q_offset - 1``): it summarises the keys before the call and is read by
every query that may see them, with weight ``lambda ** (i - (q_offset - 1))`` (gates:
``prod_{s=q_offset..i} exp(g_s)``). ``final_state`` is S at the last position of the call.
Hence:

* ``Causal()`` (and ``Segments(ids) & Causal()``): processing [0, T) then [T, 2T) with the
  carried state (and each call's gates) equals processing [0, 2T) exactly, at any split point.
* ``Segments(ids) & X``: the carried state belongs to the segment of position ``q_offset - 1``;
  it is dropped (reset) if a new segment starts at ``q_offset``. ``final_state`` is the state of
  the segment holding the last position. At ``q_offset == 0`` a given ``initial_state`` is read
  by the first segment of the call.
* ``Chunked(s, lookahead)``, ``Prefix(n)``, ``Full()``: every query sees every earlier key of
  its segment, so ``initial_state`` is exact for the queries of the call (all earlier keys,
  summarised). What does *not* carry is the future: a call sees only its own later keys, so the
  outputs of a first call equal the whole-sequence outputs only where their visible future lies
  inside that call: for ``Chunked(s, 0)`` when the split is at a multiple of ``s``; for
  ``Chunked(s, L > 0)``, ``Prefix(n)`` (split before n) and ``Full()`` never in general. There is
  no reverse (right-context) state.
* States need ``q_offset == k_offset`` (queries and keys at the same positions): a state given or
  asked for otherwise raises ``ValueError``; so do gates.

Example, ``Chunked(2, lookahead=0)`` with decay on 4 positions (weights of key j for query i)::

        j 0    1    2    3
    i 0   1    l    .    .
      1   l    1    .    .
      2   l^2  l    1    l
      3   l^3  l^2  l    1
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from causalmix.checks import ArgumentTypeError, check_decay, check_int, check_qkv, compute_dtype
from causalmix.ops.factor import factorise
from causalmix.ops.linear.impl import chunk, recurrent, reference
from causalmix.visibility import Visibility, check_visibility

IMPLS = ("reference", "chunk", "recurrent")


class LinearOutput(NamedTuple):
    output: torch.Tensor  # [B, T, H, Dv], q's dtype
    final_state: torch.Tensor  # [B, H, D, Dv], fp32 (fp64 for fp64 inputs)


class Shapes(NamedTuple):
    b: int
    tq: int
    tk: int
    h: int
    hkv: int
    d: int
    dv: int


def check_gate(fn: str, name: str, gate: Any, shape: tuple, q: torch.Tensor) -> None:
    """``gate``: a floating ``[B, Tk, H]`` tensor on q's device, dtype q's or the compute dtype,
    values ``<= 0`` and not ``-inf`` (NaN passes: NaN in, NaN out)."""
    if not isinstance(gate, torch.Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a [B, T, H] float tensor, got "
                                f"{type(gate).__name__}")
    if not gate.dtype.is_floating_point:
        raise ValueError(f"{fn}: {name} must be a floating tensor, got dtype {gate.dtype}")
    if tuple(gate.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape [B, Tk, H] = {list(shape)} (one value per "
                         f"key position and query head), got {list(gate.shape)}")
    if gate.device != q.device:
        raise ValueError(f"{fn}: {name} must be on q's device {q.device}, got {gate.device}")
    ok = {q.dtype, compute_dtype(q)}
    if gate.dtype not in ok:
        raise ValueError(f"{fn}: {name} must have dtype {sorted(map(str, ok))} (q's or the "
                         f"compute dtype), got {gate.dtype}")
    gd = gate.detach()
    if bool((gd > 0).any()) or bool((gd == float("-inf")).any()):
        raise ValueError(f"{fn}: {name} values must be <= 0 and finite (a log-space gate, "
                         f"e.g. dt * A with A < 0), got max {float(gd.max()):.6g}, min "
                         f"{float(gd.min()):.6g}")


def _check_gates(fn, sh: Shapes, q, decay, log_gate, reverse_log_gate, q_offset, k_offset):
    if log_gate is None:
        if reverse_log_gate is not None:
            raise ValueError(f"{fn}: reverse_log_gate needs log_gate (it defaults to log_gate)")
        return
    if decay is not None:
        raise ValueError(f"{fn}: decay and log_gate are mutually exclusive (a constant decay is "
                         f"log_gate = log(decay) broadcast over time); pass one of them")
    for name, gate in (("log_gate", log_gate), ("reverse_log_gate", reverse_log_gate)):
        if gate is not None:
            check_gate(fn, name, gate, (sh.b, sh.tk, sh.h), q)
    if q_offset != k_offset:
        raise ValueError(f"{fn}: log_gate needs q_offset == k_offset (got {q_offset} and "
                         f"{k_offset}): gates are indexed by the positions of the call")


def _check_state(fn, sh: Shapes, q, initial_state, return_final_state, q_offset, k_offset):
    if not isinstance(return_final_state, bool):
        raise ArgumentTypeError(f"{fn}: return_final_state must be a bool, got "
                                f"{return_final_state!r}")
    sd = compute_dtype(q)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ArgumentTypeError(f"{fn}: initial_state must be a [B, H, D, Dv] tensor or "
                                    f"None, got {type(initial_state).__name__}")
        want = [sh.b, sh.h, sh.d, sh.dv]
        if list(initial_state.shape) != want:
            raise ValueError(f"{fn}: initial_state must have shape [B, H, D, Dv] = {want}, got "
                             f"{list(initial_state.shape)}")
        if initial_state.dtype != sd:
            raise ValueError(f"{fn}: initial_state must be {sd} (the state dtype for q of dtype "
                             f"{q.dtype}), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{fn}: initial_state must be on q's device {q.device}, got "
                             f"{initial_state.device}")
    if (initial_state is not None or return_final_state) and q_offset != k_offset:
        raise ValueError(f"{fn}: initial_state / return_final_state need q_offset == k_offset "
                         f"(got {q_offset} and {k_offset}): the state sits at one position")


def _check_common(fn, q, k, v, visibility, decay, log_gate, reverse_log_gate, q_offset,
                  k_offset, initial_state, return_final_state, chunk_size) -> Shapes:
    sh = Shapes(*check_qkv(fn, q, k, v))
    if sh.tk < sh.tq:
        raise ValueError(f"{fn}: k and v must be at least as long as q (queries are a prefix of "
                         f"the keys' span), got q {sh.tq}, k {sh.tk}")
    check_visibility(fn, visibility, sh.b, sh.tq, sh.tk, q_offset=q_offset,
                     k_offset=k_offset)
    check_int("chunk_size", chunk_size, 1)
    check_decay(fn, decay, sh.h, q.device)
    _check_gates(fn, sh, q, decay, log_gate, reverse_log_gate, q_offset, k_offset)
    _check_state(fn, sh, q, initial_state, return_final_state, q_offset, k_offset)
    return sh


def _empty(q, k, v, initial_state, return_final_state, gates):
    b, _t, h, d = q.shape
    dv = v.shape[-1]
    zero = (q.sum() + k.sum() + v.sum()) * 0
    for g in gates:
        zero = zero + g.sum() * 0 if g is not None else zero
    out = q.new_zeros(b, 0, h, dv) + zero.to(q.dtype)
    if not return_final_state:
        return out
    s = initial_state if initial_state is not None else torch.zeros(
        b, h, d, dv, dtype=compute_dtype(q), device=q.device)
    return LinearOutput(out, s + zero.to(s.dtype))


def _fast_reason(impl, visibility, q_offset, k_offset, tq, tk,
                 return_final_state) -> str | None:
    if q_offset != k_offset:
        return (f"q_offset ({q_offset}) != k_offset ({k_offset}); the chunk and recurrent forms "
                f"need queries and keys at the same positions")
    try:
        f = factorise(visibility)
    except ValueError as e:
        return str(e)
    if tk != tq:
        if tq == 0:
            return "no queries"
        if impl == "recurrent":
            return f"recurrent needs as many keys as queries (got q {tq}, k {tk})"
        if f.has_reverse:
            return (f"keys past the last query (q {tq}, k {tk}) are served only for specs "
                    f"without a reverse scan (Causal, Chunked(size, lookahead > 0), with "
                    f"Segments), not {visibility!r}")
        if return_final_state:
            return (f"with keys past the last query (q {tq}, k {tk}) chunk returns no final "
                    f"state (it is anchored at the last key)")
    return None


def available_impls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    *, q_offset: int = 0, k_offset: int = 0,
                    return_final_state: bool = False) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot."""
    tq, tk = q.shape[1], k.shape[1]
    return {"reference": None} | {
        impl: _fast_reason(impl, visibility, q_offset, k_offset, tq, tk, return_final_state)
        for impl in ("chunk", "recurrent")
    }


def _as_gates(q, tk, decay, log_gate, reverse_log_gate):
    """The forward / reverse log-gates ``[B', Tk, H]`` of a call, and whether the chunk states
    must be fp64 (a differentiated constant decay). A constant decay becomes
    ``log(decay)`` broadcast over time: the very numbers a caller's ``log_gate`` would give."""
    if log_gate is not None:
        return log_gate, log_gate if reverse_log_gate is None else reverse_log_gate, False
    h, cd = q.shape[2], compute_dtype(q)
    if decay is None:
        g = torch.zeros(1, 1, h, dtype=cd, device=q.device).expand(1, tk, h)
        return g, g, False
    wide = decay.requires_grad and torch.is_grad_enabled()
    g = torch.log(decay.to(cd))
    g = (g.to(torch.float64) if wide else g).view(1, 1, h).expand(1, tk, h)
    return g, g, wide


def _expand_kv(k, v, h):
    """GQA: repeat each kv head for its group of query heads (gradients sum back)."""
    group = h // k.shape[2]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def _run(fn, impl, q, k, v, visibility, decay, log_gate, reverse_log_gate, q_offset, k_offset,
         initial_state, return_final_state, chunk_size):
    k, v = _expand_kv(k, v, q.shape[2])
    if impl == "reference":
        out, s = reference.linear_attention(
            q, k, v, visibility, decay=decay, q_offset=q_offset, k_offset=k_offset,
            initial_state=initial_state, return_final_state=return_final_state,
            log_gate=log_gate, reverse_log_gate=reverse_log_gate)
        return LinearOutput(out, s) if return_final_state else out
    reason = _fast_reason(impl, visibility, q_offset, k_offset, q.shape[1], k.shape[1],
                          return_final_state)
    if reason is not None:
        ok = [name for name, why in available_impls(
            q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
            return_final_state=return_final_state).items() if why is None]
        raise ValueError(f"{fn}: impl={impl!r} cannot serve this call: {reason}; "
                         f"implementations that can: {ok}")
    f = factorise(visibility)
    gf, gr, wide = _as_gates(q, k.shape[1], decay, log_gate, reverse_log_gate)
    if impl == "chunk":
        out, s = chunk.linear_attention(q, k, v, f, log_gate=gf, reverse_log_gate=gr,
                                        offset=q_offset, initial_state=initial_state,
                                        chunk_size=chunk_size, wide_states=wide,
                                        constant=log_gate is None)
    else:
        out, s = recurrent.linear_attention(q, k, v, f, log_gate=gf, reverse_log_gate=gr,
                                            offset=q_offset, initial_state=initial_state)
    return LinearOutput(out, s) if return_final_state else out


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    decay: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    reverse_log_gate: torch.Tensor | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor | LinearOutput:
    """Linear attention with per-head decay or per-token gates under a visibility spec.

    Args:
        q: ``[B, T, H, D]`` queries at absolute positions ``q_offset + [0, T)``.
        k: ``[B, Tk, Hkv, D]`` keys at ``k_offset + [0, Tk)``, usually ``Tk == T``; ``H % Hkv
            == 0`` (GQA). ``Tk > T`` (keys past the last query, e.g. a stream's lookahead
            frames) is served by ``reference`` and, for specs without a reverse scan and without
            ``return_final_state``, by ``chunk``.
        v: ``[B, Tk, Hkv, Dv]`` values. q, k, v share dtype and device; math is fp32 inside
            (fp64 for fp64 inputs).
        visibility: ``Causal()``, ``Full()``, ``Prefix(n)`` (int or per-batch ``[B]`` tensor),
            ``Chunked(size, lookahead)``, ``Segments(ids) & any of these``; other specs raise
            ``ValueError`` for ``chunk``/``recurrent`` (the reference takes any spec).
        decay: ``[H]`` float tensor with values in (0, 1], or None (no decay). Differentiable.
        log_gate: ``[B, Tk, H]`` per-token forward log-gates ``<= 0`` (q's dtype or fp32; fp64
            for fp64 inputs), or None. Exclusive with ``decay``; needs ``q_offset ==
            k_offset``. Differentiable.
        reverse_log_gate: ``[B, Tk, H]`` log-gates of the reverse (j > i) part, default
            ``log_gate``. Differentiable.
        q_offset, k_offset: absolute positions of the first query / key. ``chunk`` and
            ``recurrent`` need them equal.
        initial_state: ``[B, H, D, Dv]`` fp32 causal state of the keys before the call (see the
            module docstring for what it means under each spec), or None (zeros).
        return_final_state: also return the causal state at the last position.
        impl: ``"auto"`` (``recurrent`` for T == 1, else ``chunk``), ``"reference"`` (dense,
            O(T^2), the definition), ``"chunk"`` or ``"recurrent"``. An explicit impl that cannot
            serve the call raises ``ValueError`` listing those that can; ``auto`` never falls
            back to the quadratic reference: it raises when the spec is not supported.
        chunk_size: tile length of ``chunk`` (>= 1; 64-256 are fast on CPU); clamped to T.

    Returns:
        ``[B, T, H, Dv]`` in q's dtype, or ``LinearOutput(output, final_state)`` with
        ``final_state: [B, H, D, Dv]`` fp32 when ``return_final_state``.
    """
    fn = "linear_attention"
    _check_common(fn, q, k, v, visibility, decay, log_gate, reverse_log_gate, q_offset,
                  k_offset, initial_state, return_final_state, chunk_size)
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {['auto', *IMPLS]}, got {impl!r}")
    if q.shape[1] == 0 and k.shape[1] == 0:
        return _empty(q, k, v, initial_state, return_final_state, (log_gate, reverse_log_gate))
    if impl == "auto":
        impl = "recurrent" if q.shape[1] == k.shape[1] == 1 else "chunk"
        reason = _fast_reason(impl, visibility, q_offset, k_offset, q.shape[1], k.shape[1],
                              return_final_state)
        if reason is not None:
            raise ValueError(f"{fn}: no fast implementation can serve this call: {reason}; "
                             f"pass impl='reference' for the dense O(T^2) definition")
    return _run(fn, impl, q, k, v, visibility, decay, log_gate, reverse_log_gate, q_offset,
                k_offset, initial_state, return_final_state, chunk_size)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           visibility: Visibility, *, decay: torch.Tensor | None = None,
                           log_gate: torch.Tensor | None = None,
                           reverse_log_gate: torch.Tensor | None = None, q_offset: int = 0,
                           k_offset: int = 0, initial_state: torch.Tensor | None = None,
                           return_final_state: bool = False,
                           chunk_size: int = 64) -> torch.Tensor | LinearOutput:
    """:func:`linear_attention` with ``impl="chunk"``: Lightning Attention-2 / GLA tiling,
    O(T * C) time, memory linear in T forward and backward. Shapes and dtypes as there."""
    return linear_attention(q, k, v, visibility, decay=decay, log_gate=log_gate,
                            reverse_log_gate=reverse_log_gate, q_offset=q_offset,
                            k_offset=k_offset, initial_state=initial_state,
                            return_final_state=return_final_state, impl="chunk",
                            chunk_size=chunk_size)


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               visibility: Visibility, *, decay: torch.Tensor | None = None,
                               log_gate: torch.Tensor | None = None,
                               reverse_log_gate: torch.Tensor | None = None,
                               q_offset: int = 0, k_offset: int = 0,
                               initial_state: torch.Tensor | None = None,
                               return_final_state: bool = False
                               ) -> torch.Tensor | LinearOutput:
    """:func:`linear_attention` with ``impl="recurrent"``: one position at a time. With T == 1,
    ``Causal()`` and a carried state it is one decode step,
    ``S = exp(g) S0 + k v^T, o = q S`` (``g = log(lambda)`` for a constant decay)::

        out, state = recurrent_linear_attention(q1, k1, v1, Causal(), log_gate=g1,
                                                q_offset=t, k_offset=t, initial_state=state,
                                                return_final_state=True)
    """
    return linear_attention(q, k, v, visibility, decay=decay, log_gate=log_gate,
                            reverse_log_gate=reverse_log_gate, q_offset=q_offset,
                            k_offset=k_offset, initial_state=initial_state,
                            return_final_state=return_final_state, impl="recurrent")
