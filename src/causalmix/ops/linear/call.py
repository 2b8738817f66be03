"""What every linear implementation is asked: one call of ``linear_attention``, checked once.

:func:`validate` runs every argument check of the family and builds one :class:`LinearCall`;
each implementation in ``impl/`` answers ``can_serve(call)`` and ``run(call)`` from it
(:mod:`causalmix.ops.registry`). Nothing is checked or factorised twice.

One name per quantity, from the public op to the kernels:

* ``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hk, D]``, ``v: [B, Tk, Hv, Dv]``, ``heads`` their
  :class:`~causalmix.ops.heads.Heads` (``heads.out`` heads of the output, states, gates, decay);
* ``visibility`` the spec, ``factor`` its :class:`~causalmix.ops.factor.Factorisation` (or None
  and ``factor_error`` the reason: then only ``reference`` serves the call);
* ``decay: [H]`` a constant per-head decay, or ``log_gate: [B, Tk, H]`` the forward log-gates
  (``<= 0``) and ``reverse_log_gate`` those of the reverse part (None: ``log_gate``'s); either
  gate may also be per key dimension, ``[B, Tk, H, D]`` (gated linear attention, GLA): then
  :meth:`LinearCall.scan_gates` gives both as ``[B, Tk, H, D]`` (a scalar one broadcast);
  :meth:`LinearCall.scan_gates` gives both as log-gates for the scans (a decay is ``log_gate =
  log(decay)`` broadcast over time);
* ``initial_state / final state: [B, H, D, Dv]`` in the compute dtype (fp32; fp64 for fp64).

**Gate floor.** A log-gate below :data:`LOG_GATE_FLOOR` (``-1024``) is a hard reset: its
``exp`` is exactly 0 in every compute dtype (fp32 underflows below about -104, fp64 below
-745), so every weight across it is exactly 0. :func:`validate` clamps log-gates to that
floor (finite values of any size are accepted: ``-1e30``, ``-1e38`` in fp32, ``-1e308`` in
fp64), which changes no weight and no gradient (both are exactly 0 below it) and keeps every
cumulative sum finite and exact enough: the implementations sum log-gates in fp64, chunk-locally
where they can.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from causalmix.checks import (
    ArgumentTypeError,
    check_decay,
    check_int,
    check_qkv,
    compute_dtype,
)
from causalmix.checks import check_log_gate as check_gate
from causalmix.checks import check_state as check_state_tensor
from causalmix.ops.factor import Factorisation, factorise
from causalmix.ops.heads import Heads, head_layout
from causalmix.visibility import Visibility, check_visibility

__all__ = ["LOG_GATE_FLOOR", "LinearCall", "ScanGates", "check_gate", "validate"]

#: Log-gates are clamped to this floor at the boundary: ``exp`` of it, and of anything below,
#: is exactly 0 in fp32 and fp64 (a hard reset), so clamping changes no weight.
LOG_GATE_FLOOR = -1024.0


class ScanGates(NamedTuple):
    """The log-gates a scan runs on, ``[B', Tk, H]`` (``B'`` 1 or B): ``log_gate`` (forward)
    and ``reverse_log_gate`` (the reverse part; ``log_gate`` when none was given).
    ``constant``: they are a decay, constant in time (weights may be reused across calls);
    ``wide_states``: carry the states in fp64 (a differentiated decay, whose gradient sums
    products of long-carried states that fp32 rounding would dominate)."""

    log_gate: torch.Tensor
    reverse_log_gate: torch.Tensor
    constant: bool
    wide_states: bool

    @property
    def vector(self) -> bool:
        """Per key dimension gates, ``[B', Tk, H, D]`` (GLA)."""
        return self.log_gate.dim() == 4


class LinearCall(NamedTuple):
    """A checked call of :func:`~causalmix.ops.linear.linear_attention` (see the module
    docstring for the names and shapes). ``q_offset``, ``k_offset``: absolute positions of
    the first query and key; ``chunk_size``: the tile length asked of ``chunk``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visibility: Visibility
    factor: Factorisation | None
    factor_error: str | None
    q_offset: int
    k_offset: int
    heads: Heads
    decay: torch.Tensor | None
    log_gate: torch.Tensor | None  # clamped to LOG_GATE_FLOOR
    reverse_log_gate: torch.Tensor | None  # clamped to LOG_GATE_FLOOR; None: log_gate's
    initial_state: torch.Tensor | None
    return_final_state: bool
    chunk_size: int

    def scan_refusal(self) -> str | None:
        """Why the scan forms (chunk, recurrent) cannot serve this call by its positions or
        its spec (queries and keys at different positions, a spec that does not factorise, keys
        without queries);
        None when they can."""
        if self.q_offset != self.k_offset:
            return (f"q_offset ({self.q_offset}) != k_offset ({self.k_offset}); the chunk and "
                    f"recurrent forms need queries and keys at the same positions")
        if self.factor is None:
            return self.factor_error
        if self.q.shape[1] == 0 and self.k.shape[1] > 0:
            return "no queries"
        return None

    @property
    def vector_gates(self) -> bool:
        """Whether a gate is per key dimension (``[B, Tk, H, D]``, GLA)."""
        return any(x is not None and x.dim() == 4
                   for x in (self.log_gate, self.reverse_log_gate))

    def scan_gates(self) -> ScanGates:
        """The forward and reverse log-gates of this call, :class:`ScanGates`; with a per key
        dimension gate both are ``[B, Tk, H, D]`` (a scalar one broadcast over D, a view)."""
        if self.log_gate is not None:
            rev = self.log_gate if self.reverse_log_gate is None else self.reverse_log_gate
            if self.vector_gates:
                d = self.q.shape[-1]
                g, rev = (x if x.dim() == 4 else x[..., None].expand(*x.shape, d)
                          for x in (self.log_gate, rev))
                return ScanGates(g, rev, False, False)
            return ScanGates(self.log_gate, rev, False, False)
        q, tk, h = self.q, self.k.shape[1], self.heads.out
        cd = compute_dtype(q)
        if self.decay is None:
            g = torch.zeros(1, 1, h, dtype=cd, device=q.device).expand(1, tk, h)
            return ScanGates(g, g, True, False)
        wide = self.decay.requires_grad and torch.is_grad_enabled()
        g = torch.log(self.decay.to(cd))
        g = (g.to(torch.float64) if wide else g).view(1, 1, h).expand(1, tk, h)
        return ScanGates(g, g, True, wide)


def check_inputs(fn: str, *, q: Any, k: Any, v: Any) -> Heads:
    """q, k, v of one call (4-D tensors of one dtype and device, keys at least as long as the
    queries); their :class:`Heads`."""
    _b, tq, tk, *_ = check_qkv(fn, q, k, v, heads=False)
    if tk < tq:
        raise ValueError(f"{fn}: k and v must be at least as long as q (queries are a prefix of "
                         f"the keys' span), got q {tq}, k {tk}")
    return head_layout(fn, q, k, v)


def check_gates(fn: str, *, q: torch.Tensor, k: torch.Tensor, heads: Heads,
                decay: Any, log_gate: Any, reverse_log_gate: Any,
                offsets: tuple[int, int]) -> None:
    """``decay`` (``[H]`` in (0, 1]) or ``log_gate`` / ``reverse_log_gate`` (``[B, Tk, H]`` or,
    per key dimension, ``[B, Tk, H, D]``), exclusive; gates need ``q_offset == k_offset``."""
    check_decay(fn, decay, heads.out, q.device)
    if log_gate is None:
        if reverse_log_gate is not None:
            raise ValueError(f"{fn}: reverse_log_gate needs log_gate (it defaults to log_gate)")
        return
    if decay is not None:
        raise ValueError(f"{fn}: decay and log_gate are mutually exclusive (a constant decay is "
                         f"log_gate = log(decay) broadcast over time); pass one of them")
    shape = (q.shape[0], k.shape[1], heads.out)
    for name, gate in (("log_gate", log_gate), ("reverse_log_gate", reverse_log_gate)):
        if gate is not None:
            check_gate(fn, name, gate, shape, q, per_dim=q.shape[-1])
    if offsets[0] != offsets[1]:
        raise ValueError(f"{fn}: log_gate needs q_offset == k_offset (got {offsets[0]} and "
                         f"{offsets[1]}): gates are indexed by the positions of the call")


def check_state(fn: str, *, q: torch.Tensor, v: torch.Tensor, heads: Heads,
                initial_state: Any, return_final_state: Any,
                offsets: tuple[int, int]) -> None:
    """``initial_state``: None or ``[B, H, D, Dv]`` in the compute dtype on q's device;
    ``return_final_state`` a bool; states need ``q_offset == k_offset``."""
    if not isinstance(return_final_state, bool):
        raise ArgumentTypeError(f"{fn}: return_final_state must be a bool, got "
                                f"{return_final_state!r}")
    check_state_tensor(fn, initial_state, [q.shape[0], heads.out, q.shape[-1], v.shape[-1]], q)
    if (initial_state is not None or return_final_state) and offsets[0] != offsets[1]:
        raise ValueError(f"{fn}: initial_state / return_final_state need q_offset == k_offset "
                         f"(got {offsets[0]} and {offsets[1]}): the state sits at one position")


def _factorise(visibility: Visibility) -> tuple[Factorisation | None, str | None]:
    try:
        return factorise(visibility), None
    except ValueError as e:
        return None, str(e)


def validate(fn: str, q: Any, k: Any, v: Any, visibility: Any, *,
             decay: Any = None, log_gate: Any = None, reverse_log_gate: Any = None,
             q_offset: Any = 0, k_offset: Any = 0, initial_state: Any = None,
             return_final_state: Any = False, chunk_size: Any = 64) -> LinearCall:
    """Every check of a linear-attention call (``ValueError`` naming ``fn`` and the argument),
    and the :class:`LinearCall` built once from it."""
    heads = check_inputs(fn, q=q, k=k, v=v)
    check_visibility(fn, visibility, q.shape[0], q.shape[1], k.shape[1], q_offset=q_offset,
                     k_offset=k_offset)
    check_int("chunk_size", chunk_size, 1)
    offsets = (q_offset, k_offset)
    check_gates(fn, q=q, k=k, heads=heads, decay=decay, log_gate=log_gate,
                reverse_log_gate=reverse_log_gate, offsets=offsets)
    check_state(fn, q=q, v=v, heads=heads, initial_state=initial_state,
                return_final_state=return_final_state, offsets=offsets)
    if log_gate is not None:  # a hard reset stays one (see LOG_GATE_FLOOR)
        log_gate = log_gate.clamp_min(LOG_GATE_FLOOR)
    if reverse_log_gate is not None:
        reverse_log_gate = reverse_log_gate.clamp_min(LOG_GATE_FLOOR)
    factor, factor_error = _factorise(visibility)
    return LinearCall(q, k, v, visibility, factor, factor_error, q_offset, k_offset, heads,
                      decay, log_gate, reverse_log_gate, initial_state, return_final_state,
                      chunk_size)
