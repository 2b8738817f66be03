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

**Per key dimension gates** (gated linear attention, GLA): either gate may be ``[B, T, H, D]``;
then ``w_ij`` is a vector over the key dimension, from the products of ``exp(g_s[..., d])``, and
``o_i = sum over visible j of ((q_i * w_ij) . k_j) v_j``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t
v_t^T``. A ``[B, T, H]`` gate broadcast over D gives the scalar numbers.

No softmax, no normaliser, no feature map (those belong to the layer). GQA / multi-value heads:
``k, v: [B, Tk, Hkv, ...]`` with ``H % Hkv == 0`` (query head h reads kv head
``h // (H / Hkv)``); decay, gates and states are per query head.

Dispatch (:mod:`causalmix.ops.registry`): :func:`linear_attention` validates once into a
:class:`~causalmix.ops.linear.call.LinearCall`; :data:`REGISTRY` holds the implementations
``reference``, ``chunk`` and ``recurrent`` (``impl/``), each answering ``can_serve(call)`` and
``run(call)``.

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

from typing import NamedTuple

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.linear.call import LinearCall, check_gate, validate
from causalmix.ops.linear.impl import chunk, recurrent, reference
from causalmix.ops.nonfinite import run_guarded
from causalmix.ops.registry import AUTO_REFERENCE_MAX_T, Registry, by_cost  # noqa: F401 (re-exported)
from causalmix.visibility import Visibility

__all__ = ["REGISTRY", "LinearOutput", "available_impls", "check_gate", "chunk_linear_attention",
           "linear_attention", "recurrent_linear_attention"]


#: The linear family's implementations (:mod:`causalmix.ops.registry`).
REGISTRY = Registry("linear", {"reference": reference, "chunk": chunk, "recurrent": recurrent},
                    auto=by_cost(chunk), traceable=("reference", "recurrent"))


class LinearOutput(NamedTuple):
    """What :func:`linear_attention` returns with ``return_final_state=True``."""

    output: torch.Tensor  # [B, T, H, Dv], q's dtype
    final_state: torch.Tensor  # [B, H, D, Dv], fp32 (fp64 for fp64 inputs)


def _empty(call: LinearCall) -> torch.Tensor | LinearOutput:
    """Nothing to compute (no batch row, or no query and no key) or nothing to read (meta
    tensors): a right-shaped output of zeros (and the initial state, or zeros, as the final
    state), connected to the inputs' graph."""
    q, h = call.q, call.heads.out
    b, d, dv = q.shape[0], q.shape[-1], call.v.shape[-1]
    zero = (q.sum() + call.k.sum() + call.v.sum()) * 0
    for x in (call.decay, call.log_gate, call.reverse_log_gate):
        zero = zero + x.sum() * 0 if x is not None else zero
    out = q.new_zeros(b, q.shape[1], h, dv) + zero.to(q.dtype)
    if not call.return_final_state:
        return out
    s = call.initial_state if call.initial_state is not None else torch.zeros(
        b, h, d, dv, dtype=compute_dtype(q), device=q.device)
    return LinearOutput(out, s + zero.to(s.dtype))


def available_impls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    *, q_offset: int = 0, k_offset: int = 0,
                    return_final_state: bool = False) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot
    (the call is checked as :func:`linear_attention` checks it)."""
    call = validate("available_impls", q, k, v, visibility, q_offset=q_offset,
                    k_offset=k_offset, return_final_state=return_final_state)
    return REGISTRY.reasons(call)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility, *,
    decay: torch.Tensor | None = None, log_gate: torch.Tensor | None = None,
    reverse_log_gate: torch.Tensor | None = None, q_offset: int = 0, k_offset: int = 0,
    initial_state: torch.Tensor | None = None, return_final_state: bool = False,
    impl: str = "auto", chunk_size: int = 64,
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
        log_gate: ``[B, Tk, H]`` per-token forward log-gates ``<= 0``, or ``[B, Tk, H, D]``
            per key dimension (GLA) (q's dtype or fp32; fp64 for fp64 inputs), or None.
            Exclusive with ``decay``; needs ``q_offset == k_offset``. Differentiable.
        reverse_log_gate: ``[B, Tk, H]`` or ``[B, Tk, H, D]`` log-gates of the reverse (j > i)
            part, default ``log_gate``. Differentiable.
        q_offset, k_offset: absolute positions of the first query / key. ``chunk`` and
            ``recurrent`` need them equal.
        initial_state: ``[B, H, D, Dv]`` fp32 causal state of the keys before the call (see the
            module docstring for what it means under each spec), or None (zeros).
        return_final_state: also return the causal state at the last position.
        impl: ``"auto"`` (``recurrent`` for T == 1, the reference up to
            ``AUTO_REFERENCE_MAX_T`` = 128 keys, else ``chunk``; the reference under compile and
            torch.func), ``"reference"`` (dense, O(T^2), the definition), ``"chunk"`` or
            ``"recurrent"``. An explicit impl that cannot serve the call raises ``ValueError``
            listing those that can; ``auto`` serves exactly the specs ``chunk`` serves (it
            raises for others, never a quiet switch to the quadratic reference).
        chunk_size: tile length of ``chunk`` (>= 1; 64-256 are fast on CPU); clamped to T.

    Returns:
        ``[B, T, H, Dv]`` in q's dtype, or ``LinearOutput(output, final_state)`` with
        ``final_state: [B, H, D, Dv]`` fp32 when ``return_final_state``.
    """
    fn = "linear_attention"
    call = validate(fn, q, k, v, visibility, decay=decay, log_gate=log_gate,
                    reverse_log_gate=reverse_log_gate, q_offset=q_offset, k_offset=k_offset,
                    initial_state=initial_state, return_final_state=return_final_state,
                    chunk_size=chunk_size)
    name = REGISTRY.resolve(fn, impl, call)
    if q.shape[0] == 0 or q.shape[1] == k.shape[1] == 0 or q.is_meta:
        return _empty(call)  # meta tensors: the right shapes, nothing computed
    out, state = run_guarded(REGISTRY[name].run, call)
    return LinearOutput(out, state) if return_final_state else out


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
