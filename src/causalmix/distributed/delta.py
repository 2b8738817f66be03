"""Sequence-parallel delta attention (DeltaNet / Gated DeltaNet / KDA): states and their
transitions, not keys, cross the ranks.

**The recurrence is affine in the state.** Per head (:mod:`causalmix.ops.delta.api`), with
``M_t = exp(g_t) (I - beta_t k_t k_t^T)`` (``[D, D]``; the scalar gate commutes)::

    S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
        = M_t S_{t-1} + beta_t k_t v_t^T

A per-key-dimension gate ``g_t: [D]`` (KDA) makes ``M_t = (I - beta_t k_t k_t^T)
diag(exp(g_t))``: the recurrence stays affine in the state and acts on each value column alone,
so everything below holds with these ``M_t`` unchanged (the transitions are full ``[D, D]``
matrices either way). Only the reverse read moves: ``(diag(exp(r_i)) R_{i+1})^T q_i = R_{i+1}^T
(exp(r_i) * q_i)``, so a vector reverse gate scales the queries (repeated to the output heads
under value grouping) before the reverse call instead of scaling its outputs after.

so a run of positions ``a..e`` maps the state entering it to the state leaving it by ``S_e =
A S_{a-1} + U`` with the *transition* ``A = M_e .. M_a`` (``[D, D]``, zero when a segment
starts inside the run: the recurrence restarts) and the *update* ``U`` (``[D, Dv]``, the state
the run builds from zero). Runs compose associatively, ``(A2, U2) o (A1, U1) = (A2 A1, A2 U1 +
U2)``, and a query reads the entering state linearly: ``o_i = o_i^0 + (Phi_i^T q_i)^T S_{a-1}``
(``o^0`` from a zero state, ``Phi_i = M_i .. M_a`` the transition up to i).

**Each span (a contiguous run of positions a rank holds: one under ``contiguous``, two under
``zigzag``) computes its pair locally with one call of the single-process op** over the values
``[v | 0]`` (``Dv + D`` columns) from the initial state ``[0 | I]``: the recurrence acts on each
column alone, so the first ``Dv`` columns give ``o^0`` and ``U``, the last ``D`` give ``Phi_i^T
q_i`` and ``A`` -- one chunked scan, all differentiable (q, k, v, beta, gates), with the op's
own segment restarts. The spec's forward part (``Causal()``, ``& Segments`` when it has them)
is used for it: every served spec sees every earlier key of the query's segment.

**Reverse parts** (``Full``, ``Prefix``, ``Chunked``): the reverse recurrence ``R_j = exp(r_j)
(I - beta_j k_j k_j^T) R_{j+1} + beta_j k_j v_j^T``, read as ``(exp(r_i) R_{i+1})^T q_i``, is a
forward recurrence on the flipped sequence, run per *region* (the keys one reverse recurrence
covers: :mod:`causalmix.ops.delta.regions`, computed over the whole sequence, so they cross span
boundaries where the spec does). Per span and reverse pass, one op call over the flipped span
with a zero key in front (a key of zero changes no state, so the query of key ``i`` reads the
state of key ``i + 1``: the strict read), ``Segments(region ids) & Causal()`` for the restarts,
the same ``[v | 0]`` / ``[0 | I]`` columns. Its final state is the span's reverse pair
``R_a = A' R_{e+1} + U'``.

**Exchange**: one differentiable ``all_gather`` of every span's forward and reverse pairs; each
rank composes them in order (forward from the initial state, or zero, and the first span;
reverse from the last: ``W`` or ``2W`` small matmuls per pass), and adds ``(Phi^T q) S_in``
(forward) and ``exp(r_i) (Phi'^T q) R_in`` (reverse) to its local outputs; the forward chain's
last state is the final state. Where a segment (a reverse region) starts inside a span, the
span does not carry the entering state through, and a query whose segment starts inside its
span does not read it: both are ``where`` selections, never products with zero, so a NaN of an
earlier document reaches no later one through the chain.

Backward is autograd through the local op calls and these products; the gather's backward sums
each gradient over the ranks with one ``all_reduce``, so every rank must backpropagate through
its output. Cost per span: one scan with ``Dv + D`` value columns, plus
one per reverse pass (one for ``Full`` / ``Prefix`` / ``Chunked(s, 0)``, up to ``L + 2`` for
``Chunked(s, L)``); per rank ``W x spans x passes`` states of ``[B, H, D, Dv + D]`` gathered.

Every spec the family serves is served (``Causal``, ``Full``, ``Prefix``, ``Chunked(size,
lookahead)``, ``Segments & any of these``), layouts ``contiguous`` and ``zigzag``; others raise
on every rank, naming the spec.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from causalmix.checks import check_bool, check_int, compute_dtype
from causalmix.distributed._agree import agreed_fields, checked_on_every_rank
from causalmix.distributed._ring import Ring
from causalmix.distributed.layout import LAYOUTS, Span, spans
from causalmix.ops.delta import REGISTRY
from causalmix.ops.delta import delta_attention as _local_delta
from causalmix.ops.delta.call import MIXER, check_beta_gates, check_inputs, check_state
from causalmix.ops.delta.regions import regions
from causalmix.ops.factor import Factorisation, factorise
from causalmix.ops.linear import LinearOutput
from causalmix.visibility import Causal, Segments, Visibility, check_spec, check_visibility

__all__ = ["SHARDED_DELTA_SPECS", "delta_attention", "sharded_delta_reason"]

#: the specs the sequence-parallel delta mixer serves
SHARDED_DELTA_SPECS = ("Causal()", "Full()", "Prefix(n)", "Chunked(size, lookahead)",
                       "Segments(ids) & any of these")


class _AllGather(torch.autograd.Function):
    """``x: [...]`` on each rank -> ``[W, ...]`` (rank order), differentiable: the backward
    sums the gradient over every rank's use with one ``all_reduce``."""

    @staticmethod
    def forward(ctx, x, ring: Ring):
        parts = [torch.empty_like(x) for _ in range(ring.world)]
        dist.all_gather(parts, x.contiguous(), group=ring.group)
        ctx.ring = ring
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.ring.group)
        return grad[ctx.ring.rank], None


class DeltaArgs(NamedTuple):
    """The arguments of one sharded delta call, as passed."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visibility: Visibility
    layout: str
    beta: torch.Tensor
    log_gate: torch.Tensor | None
    reverse_log_gate: torch.Tensor | None
    initial_state: torch.Tensor | None
    impl: str
    chunk_size: int


def sharded_delta_reason(visibility: Visibility, layout: str) -> str | None:
    """Why the sequence-parallel delta mixer cannot run ``visibility`` with ``layout`` (None:
    it can). Used by the op and, at construction, by whole-model sequence parallel."""
    if layout == "striped":
        return ("layout 'striped' is not supported by the delta mixer (state passing needs "
                "contiguous runs, a stripe has none); use 'contiguous' or 'zigzag'")
    try:
        factorise(visibility, mixer=f"the sequence-parallel {MIXER}")
    except ValueError as e:
        return str(e)
    return None


def _check_arguments(fn: str, a: DeltaArgs, world: int | None) -> Factorisation:
    """This rank's own checks (``world``: the group's size, ``None`` outside a process group:
    then the spec's positions are not checked); the spec's factorisation."""
    heads = check_inputs(fn, q=a.q, k=a.k, v=a.v)
    if a.q.shape[1] != a.k.shape[1]:
        raise ValueError(f"{fn}: q, k, v must hold the same positions of the shard, got q "
                         f"{a.q.shape[1]}, k/v {a.k.shape[1]}")
    check_spec(f"{fn}: visibility", a.visibility)
    if not isinstance(a.layout, str) or a.layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {list(LAYOUTS)}, got {a.layout!r}")
    reason = sharded_delta_reason(a.visibility, a.layout)
    if reason is not None:
        raise ValueError(f"{fn}: {reason}")
    n = a.q.shape[1]
    if a.layout == "zigzag" and n % 2:
        raise ValueError(f"{fn}: layout 'zigzag' needs an even number of positions per rank "
                         f"(two chunks of seq_len / (2 * world)), got {n}")
    check_beta_gates(fn, q=a.q, k=a.k, heads=heads, beta=a.beta, log_gate=a.log_gate,
                     reverse_log_gate=a.reverse_log_gate, vector=True)
    check_state(fn, q=a.q, v=a.v, heads=heads, initial_state=a.initial_state)
    check_int("chunk_size", a.chunk_size, 1)
    REGISTRY.check_name(fn, a.impl)
    if world is not None:
        check_visibility(fn, a.visibility, a.q.shape[0], n * world, n * world)
    return factorise(a.visibility, mixer=MIXER)


class Plan(NamedTuple):
    """One call's geometry over the whole sequence (absolute positions): this rank's spans,
    every span in sequence order with the index of its pair in the gathered tensor, the
    forward segment starts ``start [B', T]`` (``-1``: the first segment, which reads the
    initial state), per reverse pass the region ids ``rid [B', T]`` (key t's region ends at
    ``rid[t]``; ``rid[t] == t``: nothing after t) and the queries that take it, the forward
    spec and the compute dtype."""

    mine: list[Span]
    order: list[tuple[Span, int]]
    start: torch.Tensor
    rid: list[torch.Tensor]
    take: list[torch.Tensor]
    forward_spec: Visibility
    sd: torch.dtype


def _plan(a: DeltaArgs, f: Factorisation, ring: Ring) -> Plan:
    seq_len, world = a.q.shape[1] * ring.world, ring.world
    mine = spans(a.layout, seq_len, ring.rank, world)
    every = [(r, i) for i, r in enumerate(r for rk in range(world)
                                          for r in spans(a.layout, seq_len, rk, world))]
    order = sorted(every, key=lambda x: x[0].start)
    reg = regions(f, seq_len, 0, a.q.device)
    t = torch.arange(seq_len, device=a.q.device)
    rid, take = [], []
    for p in reg.passes:
        r = torch.maximum(p.end, t)
        rid.append(r)
        reads = r > t  # key i + 1 lies in i's region: i has a reverse part
        take.append(reads if p.queries is None else reads & p.queries)
    fwd = Causal() if f.segments is None else f.segments & Causal()
    return Plan(mine, order, reg.start, rid, take, fwd, compute_dtype(a.q))


class SpanRun(NamedTuple):
    """One span's local results: the zero-state outputs ``o0 [B, m, H, Dv]``, the reads of
    the entering state ``read [B, m, H, D]`` (zero for the queries that do not read it, which
    ``keep [B', m]`` marks), and per reverse pass the same (already scaled by ``exp(r_i)`` and
    masked to the queries that take the pass, with the queries that read the entering reverse
    state)."""

    o0: torch.Tensor
    read: torch.Tensor
    keep: torch.Tensor
    rev: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _columns(a: DeltaArgs, sd: torch.dtype):
    """``[v | 0]`` (``Dv + D`` columns) in ``sd`` and the state ``[0 | I]`` ``[B, H, D, Dv +
    D]``."""
    b, d, dv = a.q.shape[0], a.q.shape[-1], a.v.shape[-1]
    h = a.beta.shape[2]
    vx = torch.cat([a.v.to(sd), a.v.new_zeros(*a.v.shape[:3], d, dtype=sd)], -1)
    eye = torch.eye(d, dtype=sd, device=a.q.device)
    s0 = torch.cat([torch.zeros(d, dv, dtype=sd, device=a.q.device), eye], -1)
    return vx, s0.expand(b, h, d, dv + d)


def _local(a: DeltaArgs, x: dict, spec: Visibility, offset: int, s0: torch.Tensor):
    """The single-process op over one span's tensors ``x`` (compute dtype)."""
    return _local_delta(x["q"], x["k"], x["v"], spec, beta=x["beta"], log_gate=x["g"],
                        q_offset=offset, k_offset=offset, initial_state=s0,
                        return_final_state=True, impl=a.impl, chunk_size=a.chunk_size)


def _flipped(x: dict, gate: torch.Tensor | None) -> dict:
    """The span flipped in time with one zero key in front (beta 1, gate 0: it changes no
    state), the queries flipped (query i sits at the zero key's side of key i + 1)."""
    def front(y, value):
        y = y.flip(1)
        return torch.cat([torch.full_like(y[:, :1], value), y], 1)

    return {"q": x["q"].flip(1), "k": front(x["k"], 0.0), "v": front(x["v"], 0.0),
            "beta": front(x["beta"], 1.0), "g": None if gate is None else front(gate, 0.0)}


def _mask(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x [B, m, H, E]`` where ``keep [B', m]``, else 0 (``where``: a NaN elsewhere stays
    there)."""
    return torch.where(keep[:, :, None, None], x, 0.0)


def _gated_queries(x: dict, gate: torch.Tensor) -> dict:
    """A vector gate's ``exp(r_i)`` moved onto the queries (``(diag(exp(r_i)) R)^T q_i = R^T
    (exp(r_i) * q_i)``): q (and k, under value grouping, where q has fewer heads than the
    gate) repeated to the gate's heads, then scaled per key dimension."""
    x = dict(x)
    g = gate.shape[2] // x["q"].shape[2]
    if g > 1:  # value grouping: q and k share their heads, output head h reads head h // g
        x["q"] = x["q"].repeat_interleave(g, dim=2)
        x["k"] = x["k"].repeat_interleave(g, dim=2)
    x["q"] = x["q"] * gate.exp()
    return x


def _reverse_span(a: DeltaArgs, plan: Plan, r: Span, x: dict, cols):
    """The reverse passes of span ``r``: per pass the masked reads ``(ro, rread)`` and the
    span's reverse pair (``[U' | A']``, the final state of the flipped run)."""
    sd, dv, s0 = plan.sd, a.v.shape[-1], cols[1]
    sl = slice(r.local, r.local + r.length)
    gate = a.log_gate if a.reverse_log_gate is None else a.reverse_log_gate
    gate = None if gate is None else gate[:, sl].to(sd)
    vector = gate is not None and gate.dim() == 4
    if vector:
        x = _gated_queries(x, gate)
    e = r.start + r.length - 1
    rev, pairs = [], []
    for rid, take in zip(plan.rid, plan.take, strict=True):
        ids = rid[:, r.start:e + 1]
        ids = torch.cat([ids[:, -1:], ids.flip(1)], 1)  # the zero key joins key e's region
        ids = ids[0] if ids.shape[0] == 1 else ids
        ro, rf = _local(a, _flipped(x, gate), Segments(ids) & Causal(), 0, s0)
        ro = ro.flip(1)
        if gate is not None and not vector:
            ro = ro * gate.exp()[..., None]
        tk = take[:, r.start:e + 1]
        beyond = tk & (rid[:, r.start:e + 1] > e)  # the query's region goes past the span
        rev.append((_mask(tk, ro[..., :dv]), _mask(beyond, ro[..., dv:]), beyond))
        pairs.append(rf)
    return rev, pairs


def _run_span(a: DeltaArgs, plan: Plan, r: Span, cols) -> tuple[SpanRun, list[torch.Tensor]]:
    """One span's local calls: its :class:`SpanRun` and its pairs ``[U | A]`` (``[B, H, D, Dv +
    D]``: forward, then one per reverse pass)."""
    sd, dv = plan.sd, a.v.shape[-1]
    sl = slice(r.local, r.local + r.length)
    vx, s0 = cols
    g = None if a.log_gate is None else a.log_gate[:, sl].to(sd)
    x = {"q": a.q[:, sl].to(sd), "k": a.k[:, sl].to(sd), "v": vx[:, sl],
         "beta": a.beta[:, sl].to(sd), "g": g}
    out, fin = _local(a, x, plan.forward_spec, r.start, s0)
    reads = plan.start[:, r.start:r.start + r.length] < r.start  # segment began before r
    rev, rpairs = _reverse_span(a, plan, r, x, cols) if plan.rid else ([], [])
    return SpanRun(out[..., :dv], _mask(reads, out[..., dv:]), reads, rev), [fin, *rpairs]


def _step(pair: torch.Tensor, through: torch.Tensor, s: torch.Tensor, dv: int) -> torch.Tensor:
    """``A s + U`` for ``pair = [U | A]``, the ``A s`` term selected only where the run
    carries its entering state through (``through [B']``): a restart inside the run is a
    ``where``, so a NaN of an earlier document never reaches a later one."""
    return torch.where(through[:, None, None, None], pair[..., dv:] @ s, 0.0) + pair[..., :dv]


def _chains(plan: Plan, pairs: torch.Tensor, s0: torch.Tensor, dv: int):
    """Compose the gathered pairs ``[spans, passes + 1, B, H, D, Dv + D]``: the state entering
    each span (forward, from ``s0``, the initial state or zero, and the first span), the final
    state, and, per pass, the reverse state entering each span from the right (from the last
    span), keyed by the span's start. The chains start from a state that depends on the
    gathered pairs (through a ``where`` that never selects them), so that every rank's output
    depends on the gather and every rank joins its backward ``all_reduce``."""
    never = torch.zeros((), dtype=torch.bool, device=pairs.device)
    zero = torch.where(never, pairs[0, 0, ..., :dv], 0.0)
    s_in, r_in = {}, {}
    s = zero + s0
    for r, i in plan.order:
        s_in[r.start] = s
        s = _step(pairs[i, 0], plan.start[:, r.start + r.length - 1] < r.start, s, dv)
    final = s
    for p, rid in enumerate(plan.rid):
        s = zero
        for r, i in reversed(plan.order):
            r_in[r.start, p] = s
            s = _step(pairs[i, p + 1], rid[:, r.start] > r.start + r.length - 1, s, dv)
    return s_in, r_in, final


def _read(part: torch.Tensor, state: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``part [B, m, H, D]`` read against ``state [B, H, D, Dv]`` by the queries ``keep [B',
    m]`` marks, 0 for the others (a ``where``, not the zero rows of ``part``: a NaN state of
    another document stays out of them)."""
    return _mask(keep, torch.einsum("bthd,bhde->bthe", part, state))


def _empty(a: DeltaArgs, return_final_state: bool):
    """No position on any rank: the single-process op's empty call."""
    return _local_delta(a.q, a.k, a.v, a.visibility, beta=a.beta, log_gate=a.log_gate,
                        reverse_log_gate=a.reverse_log_gate, initial_state=a.initial_state,
                        return_final_state=return_final_state, impl=a.impl,
                        chunk_size=a.chunk_size)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    *, beta: torch.Tensor, log_gate: torch.Tensor | None = None,
                    reverse_log_gate: torch.Tensor | None = None, layout: str = "contiguous",
                    initial_state: torch.Tensor | None = None,
                    return_final_state: bool = False, group: dist.ProcessGroup | None = None,
                    impl: str = "auto", chunk_size: int = 64) -> torch.Tensor | LinearOutput:
    """Sequence-parallel delta attention on this rank's shard (the maths: the module
    docstring).

    Every rank of ``group`` calls it with its own shard of one sequence of ``T = W * n``
    positions, laid out by ``layout`` (:mod:`causalmix.distributed.layout`).

    Args:
        q: ``[B, n, Hq, D]``, k: ``[B, n, Hk, D]``, v: ``[B, n, Hv, Dv]`` this rank's
            queries, keys and values (GQA or value grouping, as the single-process op).
        visibility: ``Causal()``, ``Full()``, ``Prefix(n)``, ``Chunked(size, lookahead)`` or
            ``Segments(ids) & any of these`` over absolute positions ``[0, T)``; others raise
            ``ValueError`` naming the spec.
        beta: ``[B, n, H]`` this rank's write strengths in (0, 2] (``H``: output heads).
        log_gate, reverse_log_gate: ``[B, n, H]`` (scalar, Gated DeltaNet) or ``[B, n, H,
            D]`` (per key dimension, KDA) this rank's log-gates ``<= 0`` or None, in the
            shard's local order, as for the single-process op.
        layout: ``"contiguous"`` or ``"zigzag"`` (``"striped"`` raises ``ValueError``).
        initial_state: ``[B, H, D, Dv]`` causal state before position 0 (compute dtype), the
            same on every rank, or None.
        return_final_state: also return the causal state at position ``T - 1`` (the same on
            every rank).
        group: the ``torch.distributed`` process group (default: the world).
        impl, chunk_size: passed to the local ``causalmix.ops.delta.delta_attention`` calls.

    Returns:
        ``[B, n, H, Dv]`` in q's dtype: the single-process result on the full sequence,
        sharded; or ``LinearOutput(output, final_state)``. Differentiable in q, k, v, beta,
        both gates and the initial state; in backward every rank must backpropagate through
        its result (one ``all_reduce``). The initial state's gradient on a rank is its share
        (from that rank's outputs and final state): summed over the ranks it is the
        single-process gradient, as for parameters. The final state is replicated: the
        gradients reaching it on the ranks add up, so backpropagate a loss of it once in all
        (its share on each rank, or all of it on one).

    Every rank checks every argument before any exchange, and all agree on the spec, layout,
    shapes, dtypes, impl and chunk size: a bad argument on any rank or a mismatch raises the
    same ``ValueError`` on every rank.
    """
    fn = "causalmix.distributed.delta_attention"
    a = DeltaArgs(q, k, v, visibility, layout, beta, log_gate, reverse_log_gate, initial_state,
                  impl, chunk_size)

    def check(world):
        check_bool(fn, "return_final_state", return_final_state)
        return _check_arguments(fn, a, world)

    ring, f = checked_on_every_rank(fn, group, agreed_fields(a), check)
    if q.shape[1] == 0:
        return _empty(a, return_final_state)
    out, final = _sharded(a, _plan(a, f, ring), ring)
    return LinearOutput(out, final) if return_final_state else out


def _sharded(a: DeltaArgs, plan: Plan, ring: Ring) -> tuple[torch.Tensor, torch.Tensor]:
    """The stages: local span runs -> one gather of the pairs -> the chains -> the outputs
    (``[B, n, H, Dv]``) and the final state."""
    cols = _columns(a, plan.sd)
    runs, pairs = [], []
    for r in plan.mine:
        run, p = _run_span(a, plan, r, cols)
        runs.append(run)
        pairs.append(torch.stack(p))
    gathered = _AllGather.apply(torch.stack(pairs), ring).flatten(0, 1)
    s0 = 0.0 if a.initial_state is None else a.initial_state
    s_in, r_in, final = _chains(plan, gathered, s0, a.v.shape[-1])
    outs = []
    for r, run in zip(plan.mine, runs, strict=True):
        o = run.o0 + _read(run.read, s_in[r.start], run.keep)
        for p, (ro, rread, keep) in enumerate(run.rev):
            o = o + ro + _read(rread, r_in[r.start, p], keep)
        outs.append(o.to(a.q.dtype))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), final
