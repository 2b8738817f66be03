"""What every delta-rule implementation is asked: one call of ``delta_attention``, checked once.

:func:`validate` runs every argument check of the family and builds one :class:`DeltaCall`;
each implementation in ``impl/`` answers ``can_serve(call)`` and ``run(call)`` from it
(:mod:`causalmix.ops.registry`). The names are those of the linear family:

* ``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hk, D]``, ``v: [B, Tk, Hv, Dv]``, ``heads`` their
  :class:`~causalmix.ops.heads.Heads` (``heads.out`` heads of the output, states, beta, gates);
* ``visibility`` the spec, ``factor`` its :class:`~causalmix.ops.factor.Factorisation` (or None
  and ``factor_error`` the reason: then no implementation serves the call);
* ``beta: [B, Tk, H]`` the write strengths in (0, 2]; ``log_gate: [B, Tk, H]`` (scalar, Gated
  DeltaNet) or ``[B, Tk, H, D]`` (per key dimension, KDA) the forward log-gates (``<= 0``;
  None: DeltaNet, no gate) and ``reverse_log_gate`` those of the reverse part (either shape;
  None: ``log_gate``'s); :meth:`DeltaCall.scan_gates` gives both as tensors;
* ``initial_state`` / final state: ``[B, H, D, Dv]`` in the compute dtype (fp32; fp64 for fp64).

Queries and keys sit at the same positions (``q_offset == k_offset``; beta and the gates are
indexed by them); ``Tk >= Tq``: keys past the last query (a stream's lookahead frames) are
seen by the queries whose spec reaches them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from causalmix.checks import (
    check_bool,
    check_int,
    check_log_gate,
    check_per_position,
    check_qkv,
    compute_dtype,
    values_checked,
)
from causalmix.checks import check_state as check_state_tensor
from causalmix.ops.factor import Factorisation, factorise
from causalmix.ops.heads import Heads, head_layout
from causalmix.visibility import Visibility, check_visibility

__all__ = ["MIXER", "DeltaCall", "ScanGates", "validate"]

#: The family's name in refusals of a spec (:func:`causalmix.ops.factor.factorise`).
MIXER = "delta attention"


class ScanGates(NamedTuple):
    """The log-gates the scans run on, ``[B, Tk, H]`` or ``[B, Tk, H, D]`` (per key
    dimension): forward (zeros ``[B, Tk, H]`` for DeltaNet) and reverse (the forward ones when
    no reverse gate was given); ``gated``: a gate was given."""

    log_gate: torch.Tensor
    reverse_log_gate: torch.Tensor
    gated: bool


class DeltaCall(NamedTuple):
    """A checked call of :func:`~causalmix.ops.delta.delta_attention` (names and shapes in the
    module docstring). ``q_offset == k_offset``: absolute position of the first query and
    key; ``chunk_size``: the tile length asked of ``chunk``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visibility: Visibility
    factor: Factorisation | None
    factor_error: str | None
    q_offset: int
    k_offset: int
    heads: Heads
    beta: torch.Tensor
    log_gate: torch.Tensor | None
    reverse_log_gate: torch.Tensor | None
    initial_state: torch.Tensor | None
    return_final_state: bool
    chunk_size: int

    def scan_gates(self) -> ScanGates:
        """The forward and reverse log-gates of this call, :class:`ScanGates`."""
        if self.log_gate is None:
            g = torch.zeros_like(self.beta, dtype=compute_dtype(self.q))
            return ScanGates(g, g, False)
        rev = self.log_gate if self.reverse_log_gate is None else self.reverse_log_gate
        return ScanGates(self.log_gate, rev, True)


def check_inputs(fn: str, *, q: Any, k: Any, v: Any) -> Heads:
    """``q: [B, Tq, Hq, D]``, ``k: [B, Tk, Hk, D]``, ``v: [B, Tk, Hv, Dv]`` of one dtype and
    device with ``Tk >= Tq``, heads in a served grouping; their :class:`Heads`."""
    _b, tq, tk, *_ = check_qkv(fn, q, k, v, heads=False)
    if tk < tq:
        raise ValueError(f"{fn}: k and v must be at least as long as q (queries are a prefix of "
                         f"the keys' positions), got q {tq}, k {tk}")
    return head_layout(fn, q, k, v)


def check_beta_gates(fn: str, *, q: torch.Tensor, k: torch.Tensor, heads: Heads, beta: Any,
                     log_gate: Any, reverse_log_gate: Any, vector: bool = False) -> None:
    """``beta [B, Tk, H]`` in (0, 2], ``log_gate`` / ``reverse_log_gate`` ``<= 0`` and finite,
    each ``[B, Tk, H]`` (or ``[B, Tk, H, D]``, per key dimension, for a caller that serves
    them: ``vector``; NaN passes: NaN in, NaN out)."""
    shape = (q.shape[0], k.shape[1], heads.out)
    check_per_position(fn, "beta", beta, shape, q)
    bd = beta.detach()
    if values_checked(bd) and bool(((bd <= 0) | (bd > 2)).any()):
        raise ValueError(f"{fn}: beta values must lie in (0, 2] (the delta rule's write "
                         f"strength; above 1 the transition has a negative eigenvalue), got "
                         f"min {float(bd.min()):.6g}, max {float(bd.max()):.6g}")
    if log_gate is None and reverse_log_gate is not None:
        raise ValueError(f"{fn}: reverse_log_gate needs log_gate (it defaults to log_gate)")
    for name, gate in (("log_gate", log_gate), ("reverse_log_gate", reverse_log_gate)):
        if gate is None:
            continue
        check_log_gate(fn, name, gate, shape, q, per_dim=q.shape[-1] if vector else None)


def check_state(fn: str, *, q: torch.Tensor, v: torch.Tensor, heads: Heads,
                initial_state: Any) -> None:
    """``initial_state``: None or ``[B, H, D, Dv]`` in the compute dtype on q's device."""
    check_state_tensor(fn, initial_state, [q.shape[0], heads.out, q.shape[-1], v.shape[-1]], q)


def _factorise(visibility: Visibility) -> tuple[Factorisation | None, str | None]:
    try:
        return factorise(visibility, mixer=MIXER), None
    except ValueError as e:
        return None, str(e)


def validate(fn: str, q: Any, k: Any, v: Any, visibility: Any, *, beta: Any,
             log_gate: Any = None, reverse_log_gate: Any = None, q_offset: Any = 0,
             k_offset: Any = 0, initial_state: Any = None, return_final_state: Any = False,
             chunk_size: Any = 64) -> DeltaCall:
    """Every check of a delta-attention call (``ValueError`` naming ``fn`` and the argument),
    and the :class:`DeltaCall` built once from it."""
    heads = check_inputs(fn, q=q, k=k, v=v)
    check_visibility(fn, visibility, q.shape[0], q.shape[1], k.shape[1], q_offset=q_offset,
                     k_offset=k_offset)
    q_offset, k_offset = int(q_offset), int(k_offset)
    if q_offset != k_offset:
        raise ValueError(f"{fn}: q_offset and k_offset must be equal (got {q_offset} and "
                         f"{k_offset}): beta, the gates and the state are indexed by the "
                         f"positions of the call, the queries being its first Tq")
    chunk_size = check_int("chunk_size", chunk_size, 1)
    check_beta_gates(fn, q=q, k=k, heads=heads, beta=beta, log_gate=log_gate,
                     reverse_log_gate=reverse_log_gate, vector=True)
    check_state(fn, q=q, v=v, heads=heads, initial_state=initial_state)
    check_bool(fn, "return_final_state", return_final_state)
    factor, factor_error = _factorise(visibility)
    return DeltaCall(q, k, v, visibility, factor, factor_error, q_offset, k_offset, heads,
                     beta, log_gate, reverse_log_gate, initial_state, return_final_state,
                     chunk_size)
