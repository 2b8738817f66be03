"""Public entry points of the delta-rule family (DeltaNet, Gated DeltaNet): validation and
explicit dispatch.

Semantics (``impl="reference"`` defines them). State ``S: [B, H, D, Dv]`` per output head, the
convention of flash-linear-attention and transformers, with log-gates ``g`` (``log_gate``, None:
DeltaNet, ``g = 0``) and write strengths ``beta`` in (0, 2]::

    S_t = exp(g_t) S_{t-1};   S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T;   o_t = S_t^T q_t

No scale, no normalisation inside the op: L2-normalising q and k and any scale belong to the
layer. A gate ``[B, T, H, D]`` (one log-gate per key dimension: Kimi Delta Attention, KDA)
makes the decay diagonal, ``S_t = diag(exp(g_t)) S_{t-1}``, everywhere below (the reverse
part's ``exp(r_j)`` likewise); a ``[B, T, H]`` gate is the same with ``g_t`` repeated over D.
The recurrence is stable when ``beta_t ||k_t||^2 <= 2`` (unit keys: the transition ``I - beta k
k^T`` has eigenvalues 1 and ``1 - beta`` in [-1, 1); ``beta > 1`` allows the negative one).

* **Forward part** of query i: ``S_i^T q_i``, the recurrence over the keys visible to i from the
  start of i's segment (restarted at every ``Segments`` start) up to i itself.
* **Reverse part**, where the spec lets i see keys ``j > i``: with ``hi(i)`` the last key i sees,
  ``R`` is the same recurrence run backwards over keys ``hi(i), hi(i) - 1, .., i + 1`` with
  ``reverse_log_gate r`` (default ``log_gate``) and the same beta, from ``R_{hi+1} = 0``::

      R_j = exp(r_j) R_{j+1};   R_j = R_j + k_j (beta_j (v_j - R_j^T k_j))^T

  and the reverse part is ``(exp(r_i) R_{i+1})^T q_i``: the state *before* key i's update
  (strict; key i is in the forward part). Without the delta correction (``R_j += beta_j k_j
  v_j^T``) this is exactly the linear family's reverse weight ``prod_{s=i..j-1} exp(r_s)``.
* ``o_i = forward part + reverse part``. ``Causal()``, ``Segments & Causal()``: no reverse part.
  ``Full()``: ``hi`` = the last key of i's segment. ``Prefix(n)``: ``hi = n - 1`` (within the
  segment) for ``i < n``, no reverse part after. ``Chunked(size, lookahead)``: ``hi`` = the
  last key of chunk ``i // size + lookahead`` (within the segment): every query chunk has its
  own reverse start, so the reverse part costs one reverse scan for ``lookahead = 0`` and up to
  ``lookahead + 1`` for ``lookahead > 0``. Other specs raise ``ValueError``.

``Chunked(2, lookahead=1)`` on 6 positions: the forward part runs up from key 0 (``>``) to the
query's own key (``q``), the reverse part down from ``hi`` (``<``) to the key after it::

        keys  0  1  2  3  4  5      hi
    query 0   q  <  <  <  .  .      3
          1   >  q  <  <  .  .      3
          2   >  >  q  <  <  <      5
          3   >  >  >  q  <  <      5
          4   >  >  >  >  q  <      5
          5   >  >  >  >  >  q      5

State convention (as the linear family's): the state is the **causal (forward) state** ``S``,
fp32 (fp64 for fp64 inputs). ``initial_state`` is S at the position just before the call
(``q_offset - 1``), read by the segment that continues across it (dropped if a segment starts
at ``q_offset``; at ``q_offset == 0`` read by the first segment); ``final_state`` is S at the
last key of the call. Hence under ``Causal()`` and ``Segments & Causal()`` processing [0, T)
then [T, 2T) with the carried state equals processing [0, 2T) at any split. Under ``Full`` /
``Prefix`` / ``Chunked`` the forward parts carry exactly; the reverse parts see only the
call's own keys, so a first call's outputs equal the whole sequence's only where their visible
future lies inside that call (``Chunked(s, 0)`` split at a multiple of s). There is no reverse
state.

Heads (:mod:`causalmix.ops.heads`): GQA (``k``, ``v`` with ``Hk`` heads, ``q`` with ``g * Hk``)
or value grouping (Gated DeltaNet / Qwen3-Next: ``q``, ``k`` with ``Hk`` heads, ``v`` with
``g * Hk``); ``beta``, the gates, the states and the output have the output's heads. The fast
paths never repeat heads.
"""

from __future__ import annotations

import torch

from causalmix.checks import compute_dtype
from causalmix.ops.delta.call import DeltaCall, validate
from causalmix.ops.delta.impl import chunk, recurrent, reference
from causalmix.ops.linear import LinearOutput
from causalmix.ops.nonfinite import run_guarded
from causalmix.ops.registry import AUTO_REFERENCE_MAX_T, Registry, by_cost  # noqa: F401 (re-exported)
from causalmix.visibility import Visibility

__all__ = ["REGISTRY", "available_impls", "chunk_delta_attention", "delta_attention",
           "recurrent_delta_attention"]


#: The delta family's implementations (:mod:`causalmix.ops.registry`).
REGISTRY = Registry("delta", {"reference": reference, "chunk": chunk, "recurrent": recurrent},
                    auto=by_cost(chunk), traceable=("reference", "recurrent"))


def _empty(call: DeltaCall):
    """No key (and so no query), or meta tensors (shapes without values): output zeros
    ``[B, Tq, H, Dv]``, the state unchanged; the graph stays connected to every input."""
    zero = sum(x.sum() * 0 for x in (call.q, call.k, call.v, call.beta, call.log_gate,
                                     call.reverse_log_gate) if x is not None)
    b, h, dv = call.q.shape[0], call.heads.out, call.v.shape[-1]
    out = call.q.new_zeros(b, call.q.shape[1], h, dv) + zero.to(call.q.dtype)
    s = call.initial_state
    if s is None:
        s = torch.zeros(b, h, call.q.shape[-1], dv, dtype=compute_dtype(call.q),
                        device=call.q.device)
    return out, s + zero.to(s.dtype)


def available_impls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    *, beta: torch.Tensor, **options) -> dict[str, str | None]:
    """For each implementation: ``None`` if it can serve this call, else the reason it cannot
    (``options``: the keyword arguments of :func:`delta_attention` but ``impl``)."""
    return REGISTRY.reasons(validate("available_impls", q, k, v, visibility, beta=beta,
                                     **options))


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    *, beta: torch.Tensor, log_gate: torch.Tensor | None = None,
                    reverse_log_gate: torch.Tensor | None = None, q_offset: int = 0,
                    k_offset: int = 0, initial_state: torch.Tensor | None = None,
                    return_final_state: bool = False, impl: str = "auto",
                    chunk_size: int = 64) -> torch.Tensor | LinearOutput:
    """DeltaNet / Gated DeltaNet under a visibility spec (semantics: the module docstring).

    Args:
        q: ``[B, T, Hq, D]`` queries at absolute positions ``q_offset + [0, T)``.
        k: ``[B, Tk, Hk, D]`` keys at ``k_offset + [0, Tk)``, ``Tk >= T`` (keys past the last
            query, e.g. a stream's lookahead frames, are seen where the spec reaches them).
        v: ``[B, Tk, Hv, Dv]`` values; GQA (``Hk == Hv``, ``Hq = g Hk``) or value grouping
            (``Hq == Hk``, ``Hv = g Hk``). One dtype and device; fp32 math (fp64 for fp64).
        visibility: ``Causal()``, ``Full()``, ``Prefix(n)`` (int or ``[B]``), ``Chunked(size,
            lookahead)``, ``Segments(ids) & any of these``; others raise ``ValueError``.
        beta: ``[B, Tk, H]`` write strengths in (0, 2] (``H``: output heads).
        log_gate: ``[B, Tk, H]`` log-gates ``<= 0`` (Gated DeltaNet), ``[B, Tk, H, D]`` (one
            per key dimension, KDA: ``S_t = diag(exp(g_t)) S_{t-1}``), or None (DeltaNet).
        reverse_log_gate: log-gates of the reverse part (either shape), default ``log_gate``.
        q_offset, k_offset: absolute position of the first query and key (equal).
        initial_state: ``[B, H, D, Dv]`` causal state before the call (compute dtype) or None.
        return_final_state: also return the causal state at the last key.
        impl: ``"auto"`` (``recurrent`` for one token, the reference up to
            ``AUTO_REFERENCE_MAX_T`` = 128 keys and under compile / torch.func, else ``chunk``;
            it serves the specs ``chunk`` serves), ``"reference"`` (dense,
            the definition), ``"chunk"`` (WY / UT chunked, memory linear in T) or
            ``"recurrent"``; one that cannot serve the call raises, listing those that can.
        chunk_size: tile length of ``chunk`` (>= 1; clamped to Tk).

    Returns:
        ``[B, T, H, Dv]`` in q's dtype, or ``LinearOutput(output, final_state)``
        (``[B, H, D, Dv]``, compute dtype) when ``return_final_state``. Every input is
        differentiable (q, k, v, beta, both gates, the initial state).

    Examples:
        >>> import torch
        >>> from causalmix import Causal, delta_attention
        >>> q, k, v = torch.randn(3, 1, 20, 2, 8).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> beta = torch.sigmoid(torch.randn(1, 20, 2))
        >>> out, state = delta_attention(q, k, v, Causal(), beta=beta, return_final_state=True)
        >>> out.shape, state.shape
        (torch.Size([1, 20, 2, 8]), torch.Size([1, 2, 8, 8]))
    """
    fn = "delta_attention"
    call = validate(fn, q, k, v, visibility, beta=beta, log_gate=log_gate,
                    reverse_log_gate=reverse_log_gate, q_offset=q_offset, k_offset=k_offset,
                    initial_state=initial_state, return_final_state=return_final_state,
                    chunk_size=chunk_size)
    REGISTRY.check_name(fn, impl)
    if call.factor is None:
        raise ValueError(f"{fn}: {call.factor_error}")
    name = REGISTRY.resolve(fn, impl, call)
    if call.k.shape[1] == 0 or call.q.is_meta:
        out, state = _empty(call)
    else:
        out, state = run_guarded(REGISTRY[name].run, call)
    return LinearOutput(out, state) if return_final_state else out


def chunk_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          visibility: Visibility, *, beta: torch.Tensor,
                          **options) -> torch.Tensor | LinearOutput:
    """:func:`delta_attention` with ``impl="chunk"``: the WY / UT chunked form (DeltaNet's
    parallel algorithm), memory linear in T, hand-written backward. ``options``: the keyword
    arguments of :func:`delta_attention` but ``impl``."""
    return delta_attention(q, k, v, visibility, beta=beta, impl="chunk", **options)


def recurrent_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              visibility: Visibility, *, beta: torch.Tensor,
                              **options) -> torch.Tensor | LinearOutput:
    """:func:`delta_attention` with ``impl="recurrent"``: one position at a time. With one
    query, ``Causal()`` and a carried state it is one decode step::

        out, state = recurrent_delta_attention(q1, k1, v1, Causal(), beta=b1, log_gate=g1,
                                               q_offset=t, k_offset=t, initial_state=state,
                                               return_final_state=True)
    """
    return delta_attention(q, k, v, visibility, beta=beta, impl="recurrent", **options)
