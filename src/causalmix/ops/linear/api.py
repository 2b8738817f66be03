"""Public entry points of the linear attention family: validation and explicit dispatch.

Semantics (``impl="reference"`` defines them): for head h with decay ``lambda_h`` in (0, 1]
(``decay=None``: 1, no decay), query at absolute position i, key at j::

    o_i = sum over visible j of  lambda_h ** |i - j| * (q_i . k_j) * v_j

No softmax, no normaliser, no feature map (those belong to the layer).

State convention
----------------
The state is the **causal (forward) state** ``S: [B, H, D, Dv]`` (fp32; fp64 for fp64 inputs)::

    S_t = lambda * S_{t-1} + k_t v_t^T            o_t = q_t S_t   (the causal part)

reset to 0 at every segment start of ``Segments(ids)``. ``initial_state`` is S at the position
just before the call (``q_offset - 1``): it summarises the keys before the call and is read by
every query that may see them, with weight ``lambda ** (i - (q_offset - 1))``. ``final_state``
is S at the last position of the call. Hence:

* ``Causal()`` (and ``Segments(ids) & Causal()``): processing [0, T) then [T, 2T) with the
  carried state equals processing [0, 2T) exactly, at any split point.
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
  asked for otherwise raises ``ValueError``.

Example, ``Chunked(2, lookahead=0)`` with decay on 4 positions (weights of key j for query i)::

        j 0    1    2    3
    i 0   1    l    .    .
      1   l    1    .    .
      2   l^2  l    1    l
      3   l^3  l^2  l    1
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from causalmix.ops._validate import check_int, check_qkv, check_visibility
from causalmix.ops.linear.factor import factorise
from causalmix.ops.linear.impl import chunk, recurrent, reference
from causalmix.visibility import Visibility

IMPLS = ("reference", "chunk", "recurrent")


class LinearOutput(NamedTuple):
    output: torch.Tensor  # [B, T, H, Dv], q's dtype
    final_state: torch.Tensor  # [B, H, D, Dv], fp32 (fp64 for fp64 inputs)


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_common(fn, q, k, v, visibility, decay, q_offset, k_offset, initial_state,
                  return_final_state, chunk_size):
    b, tq, tk, hq, _hkv, d, dv = check_qkv(fn, q, k, v, same_head_count=True)
    if tk < tq:
        raise ValueError(f"{fn}: k and v must be at least as long as q (queries are a prefix of "
                         f"the keys' span), got q {tq}, k {tk}")
    check_visibility(fn, visibility, b, tq, tk, q_offset, k_offset)
    check_int("chunk_size", chunk_size, 1)
    if not isinstance(return_final_state, bool):
        raise TypeError(f"{fn}: return_final_state must be a bool, got {return_final_state!r}")
    if decay is not None:
        if not isinstance(decay, torch.Tensor):
            raise TypeError(f"{fn}: decay must be a [H] float tensor or None, got "
                            f"{type(decay).__name__}")
        if not decay.dtype.is_floating_point:
            raise ValueError(f"{fn}: decay must be a floating tensor, got dtype {decay.dtype}")
        if tuple(decay.shape) != (hq,):
            raise ValueError(f"{fn}: decay must have shape [H] = [{hq}], got {list(decay.shape)}")
        if decay.device != q.device:
            raise ValueError(f"{fn}: decay must be on q's device {q.device}, got {decay.device}")
        dd = decay.detach()
        if not bool(((dd > 0) & (dd <= 1)).all()):
            raise ValueError(f"{fn}: decay values must lie in (0, 1], got min "
                             f"{float(dd.min()):.6g}, max {float(dd.max()):.6g}")
    sd = _state_dtype(q)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"{fn}: initial_state must be a [B, H, D, Dv] tensor or None, got "
                            f"{type(initial_state).__name__}")
        if tuple(initial_state.shape) != (b, hq, d, dv):
            raise ValueError(f"{fn}: initial_state must have shape [B, H, D, Dv] = "
                             f"{[b, hq, d, dv]}, got {list(initial_state.shape)}")
        if initial_state.dtype != sd:
            raise ValueError(f"{fn}: initial_state must be {sd} (the state dtype for q of dtype "
                             f"{q.dtype}), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{fn}: initial_state must be on q's device {q.device}, got "
                             f"{initial_state.device}")
    if (initial_state is not None or return_final_state) and q_offset != k_offset:
        raise ValueError(f"{fn}: initial_state / return_final_state need q_offset == k_offset "
                         f"(got {q_offset} and {k_offset}): the state sits at one position")
    return b, tq, hq, d, dv


def _empty(q, k, v, initial_state, return_final_state):
    b, _t, h, d = q.shape
    dv = v.shape[-1]
    zero = (q.sum() + k.sum() + v.sum()) * 0
    out = q.new_zeros(b, 0, h, dv) + zero.to(q.dtype)
    if not return_final_state:
        return out
    s = initial_state if initial_state is not None else torch.zeros(
        b, h, d, dv, dtype=_state_dtype(q), device=q.device)
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


def available_impls(q, k, v, visibility: Visibility, *, q_offset: int = 0, k_offset: int = 0,
                    return_final_state: bool = False) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot."""
    tq, tk = q.shape[1], k.shape[1]
    return {"reference": None} | {
        impl: _fast_reason(impl, visibility, q_offset, k_offset, tq, tk, return_final_state)
        for impl in ("chunk", "recurrent")
    }


def _run(fn, impl, q, k, v, visibility, decay, q_offset, k_offset, initial_state,
         return_final_state, chunk_size):
    if impl == "reference":
        out, s = reference.linear_attention(
            q, k, v, visibility, decay=decay, q_offset=q_offset, k_offset=k_offset,
            initial_state=initial_state, return_final_state=return_final_state)
    else:
        reason = _fast_reason(impl, visibility, q_offset, k_offset, q.shape[1], k.shape[1],
                              return_final_state)
        if reason is not None:
            ok = [name for name, why in available_impls(
                q, k, v, visibility, q_offset=q_offset, k_offset=k_offset,
                return_final_state=return_final_state).items() if why is None]
            raise ValueError(f"{fn}: impl={impl!r} cannot serve this call: {reason}; "
                             f"implementations that can: {ok}")
        f = factorise(visibility)
        if impl == "chunk":
            out, s = chunk.linear_attention(q, k, v, f, decay=decay, offset=q_offset,
                                            initial_state=initial_state, chunk_size=chunk_size)
        else:
            out, s = recurrent.linear_attention(q, k, v, f, decay=decay, offset=q_offset,
                                                initial_state=initial_state)
    return LinearOutput(out, s) if return_final_state else out


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    decay: torch.Tensor | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
):
    """Linear attention with per-head decay under a visibility spec.

    Args:
        q: ``[B, T, H, D]`` queries at absolute positions ``q_offset + [0, T)``.
        k: ``[B, Tk, H, D]`` keys at ``k_offset + [0, Tk)``, usually ``Tk == T``. ``Tk > T``
            (keys past the last query, e.g. a stream's lookahead frames) is served by
            ``reference`` and, for specs without a reverse scan and without
            ``return_final_state``, by ``chunk``.
        v: ``[B, Tk, H, Dv]`` values. q, k, v share dtype and device; math is fp32 inside
            (fp64 for fp64 inputs).
        visibility: ``Causal()``, ``Full()``, ``Prefix(n)`` (int or per-batch ``[B]`` tensor),
            ``Chunked(size, lookahead)``, ``Segments(ids) & any of these``; other specs raise
            ``ValueError`` for ``chunk``/``recurrent`` (the reference takes any spec).
        decay: ``[H]`` float tensor with values in (0, 1], or None (no decay). Differentiable.
        q_offset, k_offset: absolute positions of the first query / key. ``chunk`` and
            ``recurrent`` need them equal.
        initial_state: ``[B, H, D, Dv]`` fp32 causal state of the keys before the call (see the
            module docstring for what it means under each spec), or None (zeros).
        return_final_state: also return the causal state at the last position.
        impl: ``"auto"`` (``recurrent`` for T == 1, else ``chunk``), ``"reference"`` (dense,
            O(T^2), the definition), ``"chunk"`` or ``"recurrent"``. An explicit impl that cannot
            serve the call raises ``ValueError`` listing those that can; ``auto`` never falls
            back to the quadratic reference: it raises when the spec is not supported.
        chunk_size: tile length of ``chunk`` (>= 1; 64-256 are fast on CPU).

    Returns:
        ``[B, T, H, Dv]`` in q's dtype, or ``LinearOutput(output, final_state)`` with
        ``final_state: [B, H, D, Dv]`` fp32 when ``return_final_state``.
    """
    fn = "linear_attention"
    _check_common(fn, q, k, v, visibility, decay, q_offset, k_offset, initial_state,
                  return_final_state, chunk_size)
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {['auto', *IMPLS]}, got {impl!r}")
    if q.shape[1] == 0 and k.shape[1] == 0:
        return _empty(q, k, v, initial_state, return_final_state)
    if impl == "auto":
        impl = "recurrent" if q.shape[1] == k.shape[1] == 1 else "chunk"
        reason = _fast_reason(impl, visibility, q_offset, k_offset, q.shape[1], k.shape[1],
                              return_final_state)
        if reason is not None:
            raise ValueError(f"{fn}: no fast implementation can serve this call: {reason}; "
                             f"pass impl='reference' for the dense O(T^2) definition")
    return _run(fn, impl, q, k, v, visibility, decay, q_offset, k_offset, initial_state,
                return_final_state, chunk_size)


def chunk_linear_attention(q, k, v, visibility: Visibility, *, decay=None, q_offset: int = 0,
                           k_offset: int = 0, initial_state=None, return_final_state: bool = False,
                           chunk_size: int = 64):
    """:func:`linear_attention` with ``impl="chunk"``: Lightning Attention-2 tiling, O(T * C)
    time, memory linear in T forward and backward. Shapes and dtypes as there."""
    return linear_attention(q, k, v, visibility, decay=decay, q_offset=q_offset,
                            k_offset=k_offset, initial_state=initial_state,
                            return_final_state=return_final_state, impl="chunk",
                            chunk_size=chunk_size)


def recurrent_linear_attention(q, k, v, visibility: Visibility, *, decay=None,
                               q_offset: int = 0, k_offset: int = 0, initial_state=None,
                               return_final_state: bool = False):
    """:func:`linear_attention` with ``impl="recurrent"``: one position at a time. With T == 1,
    ``Causal()`` and a carried state it is one decode step,
    ``S = lambda * S0 + k v^T, o = q S``::

        out, state = recurrent_linear_attention(q1, k1, v1, Causal(), q_offset=t,
                                                k_offset=t, initial_state=state,
                                                return_final_state=True)
    """
    return linear_attention(q, k, v, visibility, decay=decay, q_offset=q_offset,
                            k_offset=k_offset, initial_state=initial_state,
                            return_final_state=return_final_state, impl="recurrent")
