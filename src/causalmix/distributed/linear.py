"""Sequence-parallel linear attention: states, not keys, cross the ranks.

Written here for the contiguous layout, ``W`` ranks of ``n`` positions, rank ``r`` holding
``[r n, (r+1) n)``; under zigzag each rank holds two such blocks and the same formulas run over
all ``2W`` blocks. With per-token log-gates ``g`` (forward) and ``r`` (reverse) -- a constant
decay is ``g = r = log(lambda)`` -- and ``o_i = sum over visible j of w_ij (q_i . k_j) v_j``
(``w_ij = prod_{s=j+1..i} exp(g_s)`` for ``j <= i``, ``prod_{s=i..j-1} exp(r_s)`` for
``j > i``, see :mod:`causalmix.ops.linear`):

* **Causal part** (keys of earlier blocks). Each block c computes its local causal state from
  zero, ``L_c = sum_t exp(G_end - G_t) k_t v_t^T`` (``G``: cumulative ``g`` in the block), and
  its total log-gate ``A_c``. One ``all_gather`` shares them all, and every rank evaluates the
  scan over blocks in closed form (no serial chain)::

      S_in(a) = sum over blocks c ending by a of  exp(sum of A_m over the blocks m between) L_c

  (the state just before position a: it carries the product of the gates in between), which
  the single-process op takes as ``initial_state`` (exact for ``Causal``, ``Full`` and
  ``Prefix``: every query sees every earlier key).
* **Reverse part** (keys of later blocks; ``Full`` and ``Prefix(m)`` only, where they are
  visible iff ``j < m``, whatever the query). Each block also computes ``F_c = sum_t [visible]
  exp(E_t) k_t v_t^T`` (``E``: exclusive cumulative ``r`` from its first position) and its total
  reverse log-gate ``Ar_c``::

      R(e) = sum over blocks c starting at or after e of  exp(sum of Ar_m between) F_c,
      o_i += exp(r_i + .. + r_{e-1}) q_i R(e)

Per key dimension gates (``[B, n, H, D]``, GLA) run the same formulas with every total and
weight a vector over the key dimension, multiplying the states' rows. Only sums of log-gates
(<= 0) are exponentiated. Backward is autograd through these few products
and the local op, with the ``all_gather`` of the states and totals made differentiable (its
backward sums each gradient over the ranks with one ``all_reduce``). Every rank's result depends
on the gathered states, so every rank joins that ``all_reduce`` when it backpropagates.

Stages: :func:`_check_arguments` (every rank, agreed before any exchange) -> :func:`_shard` ->
:func:`_local_states` -> :func:`_incoming_state` (and :func:`_reverse_part`) -> :func:`_output`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from causalmix.checks import check_decay, check_int, check_qkv, compute_dtype
from causalmix.distributed._agree import agreed_fields, checked_on_every_rank
from causalmix.distributed._ring import Ring
from causalmix.distributed.layout import LAYOUTS, Span, spans
from causalmix.ops.factor import factorise
from causalmix.ops.linear import REGISTRY, available_impls, check_gate
from causalmix.ops.linear import linear_attention as _local_linear
from causalmix.visibility import Causal, Full, Prefix, Visibility, check_spec, check_visibility

#: the specs the sequence-parallel linear mixer serves
SHARDED_LINEAR_SPECS = ("Causal()", "Full()", "Prefix(n)",
                        "Segments(ids) & Causal() (ids in contiguous runs: packed documents)")


class _AllGatherStates(torch.autograd.Function):
    """``x: [...]`` on each rank -> ``[W, ...]`` (rank order), differentiable."""

    @staticmethod
    def forward(ctx, x, ring: Ring):
        parts = [torch.empty_like(x) for _ in range(ring.world)]
        dist.all_gather(parts, x.contiguous(), group=ring.group)
        ctx.ring = ring
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.ring.group)  # sum over every rank's use of each state
        return grad[ctx.ring.rank], None


class Shard(NamedTuple):
    """What the stages need of one call: inputs, gates, geometry and dtypes."""

    q: torch.Tensor
    k: torch.Tensor  # [B, n, H, D]: kv heads repeated for the state computation
    v: torch.Tensor
    visibility: Visibility
    gf: torch.Tensor  # [B', n, H, 1 | D] forward log-gates of the shard (D: per key dimension)
    gr: torch.Tensor
    reverse: bool
    mine: list
    every: list  # every span of every rank, in all_gather order
    sd: torch.dtype
    starts: torch.Tensor | None  # [B', T] bool: a document starts at p (Segments & Causal)


def _sl(r: Span) -> slice:
    return slice(r.local, r.local + r.length)


class LinearArgs(NamedTuple):
    """The arguments of one sharded linear call, as passed."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visibility: Visibility
    layout: str
    decay: torch.Tensor | None
    log_gate: torch.Tensor | None
    reverse_log_gate: torch.Tensor | None
    impl: str
    chunk_size: int


def _check_arguments(fn: str, a: LinearArgs, world: int | None) -> None:
    """This rank's own checks (``world``: the group's size, ``None`` outside a process group:
    then the spec's positions and the impl's local calls are not checked)."""
    bsz, n, _nk, h, _hkv, _d, _dv = check_qkv(fn, a.q, a.k, a.v)
    check_spec(f"{fn}: visibility", a.visibility)
    if not isinstance(a.layout, str) or a.layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {list(LAYOUTS)}, got {a.layout!r}")
    reason = sharded_linear_reason(a.visibility, a.layout)
    if reason is not None:
        raise ValueError(f"{fn}: {reason}")
    if a.layout == "zigzag" and n % 2:
        raise ValueError(f"{fn}: layout 'zigzag' needs an even number of positions per rank "
                         f"(two chunks of seq_len / (2 * world)), got {n}")
    check_decay(fn, a.decay, h, a.q.device)
    if a.log_gate is None and a.reverse_log_gate is not None:
        raise ValueError(f"{fn}: reverse_log_gate needs log_gate (it defaults to log_gate)")
    if a.log_gate is not None and a.decay is not None:
        raise ValueError(f"{fn}: decay and log_gate are mutually exclusive; pass one of them")
    for name in ("log_gate", "reverse_log_gate"):
        if (gate := getattr(a, name)) is not None:
            check_gate(fn, name, gate, (bsz, n, h), a.q, per_dim=a.q.shape[-1])
    check_int("chunk_size", a.chunk_size, 1)
    REGISTRY.check_name(fn, a.impl)
    if world is not None:
        check_visibility(fn, a.visibility, bsz, n * world, n * world)
        _check_impl(fn, a, world)


def sharded_linear_reason(visibility: Visibility, layout: str) -> str | None:
    """Why the sequence-parallel linear mixer cannot run ``visibility`` with ``layout`` (None:
    it can). Used by the op and, at construction, by whole-model sequence parallel."""
    if layout == "striped":
        return ("layout 'striped' is not supported by the linear mixer (state passing needs "
                "contiguous blocks, a stripe has none); use 'contiguous' or 'zigzag'")
    if isinstance(visibility, (Causal, Full, Prefix)):
        return None
    try:
        f = factorise(visibility)
    except ValueError as e:
        return str(e)
    if f.base == "causal" and f.segments is not None:
        return None
    return (f"spec {visibility!r} is not supported by the sequence-parallel linear mixer; "
            f"supported: {', '.join(SHARDED_LINEAR_SPECS)}")


def _document_starts(visibility: Visibility, seq_len: int) -> torch.Tensor | None:
    """``[B', T]`` bool, True where a document of ``Segments & Causal`` starts (position 0
    included); None for the specs without documents."""
    if isinstance(visibility, (Causal, Full, Prefix)):
        return None
    ids = factorise(visibility).segments.ids
    ids = (ids if ids.dim() == 2 else ids[None])[:, :seq_len]
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return new


def _check_impl(fn: str, a: LinearArgs, world: int) -> None:
    """An explicit ``impl`` must serve the local call of every span of every rank (spans of one
    layout differ only in their start)."""
    if a.impl == "auto" or a.q.shape[1] == 0:
        return
    seq_len = a.q.shape[1] * world
    for rank in range(world):
        for r in spans(a.layout, seq_len, rank, world):
            q = a.q[:, :r.length]
            why = available_impls(q, q, q, a.visibility, q_offset=r.start,
                                  k_offset=r.start)[a.impl]
            if why is not None:
                raise ValueError(f"{fn}: impl={a.impl!r} cannot serve the local call of rank "
                                 f"{rank}'s positions [{r.start}, {r.start + r.length}): {why}")


def _gates(q, decay, log_gate, reverse_log_gate, sd):
    """Forward / reverse log-gates ``[B', n, H, 1]`` in ``sd`` (a decay broadcast over time),
    or ``[B', n, H, D]`` when one of them is per key dimension (the other broadcast)."""
    if log_gate is not None:
        gr = log_gate if reverse_log_gate is None else reverse_log_gate
        width = q.shape[-1] if 4 in (log_gate.dim(), gr.dim()) else 1
        return tuple((x if x.dim() == 4 else x[..., None]).to(sd).expand(*x.shape[:3], width)
                     for x in (log_gate, gr))
    h, n = q.shape[2], q.shape[1]
    if decay is None:
        g = torch.zeros(1, n, h, 1, dtype=sd, device=q.device)
    else:
        g = torch.log(decay.to(sd)).view(1, 1, h, 1).expand(1, n, h, 1)
    return g, g


def _weighted(coef: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``sum_c coef_c * S_c``: ``coef [c, B', H, 1 | D]`` (one factor per state, or per state
    row), ``states [c, B, H, D, Dv]`` -> ``[B, H, D, Dv]``."""
    if coef.shape[-1] == 1:
        return torch.einsum("cbh,cbhde->bhde", coef[..., 0], states)
    return torch.einsum("cbhd,cbhde->bhde", coef, states)


def _local_states(x: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span: the causal state anchored at its last position and, for Full/Prefix, the keys a
    query before the span sees, anchored at its first position; and the spans' total log-gates.
    Returns ``states [R, 1 or 2, B, H, D, Dv]`` and ``totals [R, 2, B', H, 1 | D]``."""
    local, totals = [], []
    for r in x.mine:
        kf, vf = x.k[:, _sl(r)].to(x.sd), x.v[:, _sl(r)].to(x.sd)
        g, gr = x.gf[:, _sl(r)], x.gr[:, _sl(r)]  # [B', m, H, 1 | D]
        last = g_in = None
        if x.starts is not None:  # keys of earlier documents of the span reach no later query
            st = x.starts[:, r.start:r.start + r.length]
            later = st.flip(1).cumsum(1).flip(1) - st.to(torch.int64)  # starts after t
            last = (later == 0)[:, :, None, None]  # [B', m, 1, 1]: the span's last document
            # only its gates and keys enter (where, not a product: NaN in an earlier document
            # stays there)
            g_in = torch.where(last, g, 0)
        cum = (g if last is None else g_in).to(torch.float64).cumsum(1)
        w_end = torch.exp((cum[:, -1:] - cum).to(x.sd))  # prod_{s=t+1..end} exp(g_s)
        kw = kf * w_end
        if last is not None:
            kw, vf = torch.where(last, kw, 0), torch.where(last, vf, 0)
        run_states = [torch.einsum("bthd,bthe->bhde", kw, vf)]
        if x.reverse:
            e = torch.nn.functional.pad(gr[:, :-1], (0, 0, 0, 0, 1, 0)).to(torch.float64)
            e = e.cumsum(1)
            w_start = torch.exp(e.to(x.sd))  # prod_{s=start..t-1} exp(r_s)
            if isinstance(x.visibility, Prefix):
                t = torch.arange(r.length, device=x.q.device)
                seen = (r.start + t)[None, :] < _prefix_end(x)  # [B'', m]: keys before n
                # where, not a product: a NaN gate on an unseen key must not reach anything
                w_start = torch.where(seen[:, :, None, None], w_start, 0)
            run_states.append(torch.einsum("bthd,bthe->bhde", kf * w_start, vf))
        local.append(torch.stack(run_states))
        totals.append(torch.stack([g.sum(1), gr.sum(1)]))
    return torch.stack(local), torch.stack(totals)


def _prefix_end(x: Shard) -> torch.Tensor:
    """``Prefix(n)``'s ``n`` as ``[B or 1, 1]`` int64."""
    n = x.visibility.n
    return n.to(x.q.device)[:, None] if isinstance(n, torch.Tensor) \
        else torch.tensor([[n]], device=x.q.device)


def _between(x: Shard, totals, lo: int, hi: int, which: int, before: bool):
    """``exp(sum of the totals of the spans strictly inside the gap)`` for every gathered span c,
    zero for spans on the wrong side: ``before`` -- spans ending by ``lo`` (the gap from their end
    to ``lo``); else spans starting at or after ``hi`` (the gap from ``hi`` to their start).
    Returns it, ``[R_all, B', H, 1 | D]``, and the side mask ``[R_all]``. Sums and states of spans
    outside are masked out with ``where`` (never multiplied by 0), so a NaN there reaches no
    query that cannot see it."""
    dev = x.q.device
    starts = torch.tensor([r.start for r in x.every], device=dev)
    ends = torch.tensor([r.start + r.length for r in x.every], device=dev)  # exclusive
    tot = totals[:, which]  # [R_all, B', H, 1 | D]
    if before:
        side = ends <= lo
        inside = (starts[None, :] >= ends[:, None]) & (starts[None, :] < lo)  # [c, m]
    else:
        side = starts >= hi
        inside = (starts[None, :] >= hi) & (starts[None, :] < starts[:, None])
    gap = torch.where(inside[:, :, None, None, None], tot[None], 0).sum(1)  # [c, B', H, .]
    gap = torch.where(side[:, None, None, None], gap, torch.full_like(gap, -torch.inf))
    return torch.exp(gap), side


def _incoming_state(x: Shard, states, totals, r: Span) -> torch.Tensor:
    """The causal state just before position ``r.start``: ``[B, H, D, Dv]``. With documents,
    a span's state reaches ``r`` only if no document starts between its end and ``r.start``
    (a start at ``r.start`` itself is the local op's reset)."""
    coef, side = _between(x, totals, r.start, 0, 0, before=True)
    if x.starts is not None:
        ends = torch.tensor([c.start + c.length for c in x.every], device=x.q.device)
        pos = torch.arange(x.starts.shape[1], device=x.q.device)
        gap = (pos[None, :] >= ends[:, None]) & (pos[None, :] < r.start)  # [c, T]
        cut = (gap[:, None, :] & x.starts[None]).any(-1)  # [c, B']
        coef = torch.where(cut[:, :, None, None], 0, coef)
        # where, not a product: the state of a span cut off by a document start (NaN there
        # stays there) is never multiplied in
        side = side[:, None] & ~cut  # [c, B']
        s = torch.where(side[:, :, None, None, None], states[:, 0], 0)
        return _weighted(coef, s)
    s = torch.where(side[:, None, None, None, None], states[:, 0], 0)
    return _weighted(coef, s)


def _reverse_part(x: Shard, states, totals, r: Span) -> torch.Tensor:
    """Keys of later spans seen by the queries of span ``r``: ``[B, m, H, Dv]`` in ``sd``."""
    e = r.start + r.length
    coef, side = _between(x, totals, 0, e, 1, before=False)
    used = side[:, None]  # [R_all, B'']: later spans holding a key some query sees
    if isinstance(x.visibility, Prefix):
        starts = torch.tensor([c.start for c in x.every], device=x.q.device)
        used = used & (starts[:, None] < _prefix_end(x)[:, 0][None, :])
    s = torch.where(used[:, :, None, None, None], states[:, 1], 0)
    f = _weighted(torch.where(used[:, :, None, None], coef, 0), s)
    gr = x.gr[:, _sl(r)].to(torch.float64)
    suffix = gr.flip(1).cumsum(1).flip(1)  # r_i + .. + r_{e-1}
    w_q = torch.exp(suffix.to(x.sd))  # [B', m, H, 1 | D]
    part = torch.einsum("bthd,bhde->bthe", x.q[:, _sl(r)].to(x.sd) * w_q, f)
    # rows with no later key to see: exactly zero (their gates past the prefix stay unused)
    return torch.where(used.any(0)[:, None, None, None], part, 0)


def _output(x: Shard, states, totals, a: LinearArgs) -> torch.Tensor:
    """The local op on each span from its incoming state, plus the reverse part."""
    outs = []
    for r in x.mine:
        out = _local_op(a, r, _incoming_state(x, states, totals, r))
        if x.reverse:
            out = (out.to(x.sd) + _reverse_part(x, states, totals, r)).to(x.q.dtype)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    layout: str = "contiguous",
    decay: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    reverse_log_gate: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sequence-parallel linear attention with per-head decay, on this rank's shard.

    Every rank of ``group`` calls it with its own shard of one sequence of ``T = W * n``
    positions, laid out by ``layout`` (:mod:`causalmix.distributed.layout`).

    Args:
        q: ``[B, n, H, D]`` this rank's queries.
        k: ``[B, n, Hkv, D]`` this rank's keys (``H % Hkv == 0``, GQA).
        v: ``[B, n, Hkv, Dv]`` this rank's values. q, k, v share dtype and device.
        visibility: ``Causal()``, ``Full()`` or ``Prefix(n)`` (int or ``[B]`` tensor) over
            absolute positions ``[0, T)``; other specs raise ``ValueError``.
        layout: ``"contiguous"`` or ``"zigzag"`` (state passing needs contiguous blocks:
            ``"striped"`` raises ``ValueError``). Linear attention costs the same on every rank
            under these specs, so the layout does not change the balance; zigzag is there so
            that a model mixing softmax and linear layers keeps one layout.
        decay: ``[H]`` float tensor in (0, 1], or None; identical on every rank. Differentiable.
        log_gate, reverse_log_gate: ``[B, n, H]`` (or per key dimension ``[B, n, H, D]``,
            GLA) this rank's per-token log-gates (``<= 0``, in the shard's local order), as for
            the single-process op; exclusive with ``decay``.
            Differentiable (each rank's gradient is that of its own shard).
        group: the ``torch.distributed`` process group (default: the world).
        impl, chunk_size: passed to the local ``causalmix.ops.linear.linear_attention``.

    Returns:
        ``[B, n, H, Dv]`` in q's dtype: the single-process result on the full sequence, sharded.
        States are fp32 (fp64 for fp64 inputs). Differentiable; in backward every rank must
        backpropagate through its result (one ``all_reduce`` of the states' gradients).

    Every rank checks every argument before any exchange, and all agree on the spec, layout,
    shapes, dtypes, decay, impl and chunk size: a bad argument on any rank or a mismatch raises
    the same ``ValueError`` on every rank.
    """
    fn = "causalmix.distributed.linear_attention"
    a = LinearArgs(q, k, v, visibility, layout, decay, log_gate, reverse_log_gate, impl,
                   chunk_size)
    ring, _ = checked_on_every_rank(fn, group, agreed_fields(a, by_content=("decay",)),
                                    lambda world: _check_arguments(fn, a, world))
    if q.shape[1] == 0:
        return _local_linear(q, k, v, visibility, log_gate=log_gate,
                             reverse_log_gate=reverse_log_gate, decay=decay, impl=impl,
                             chunk_size=chunk_size)
    x = _shard(a, ring)
    states, totals = _local_states(x)
    states = _AllGatherStates.apply(states, ring).flatten(0, 1)  # [W * R, 1 or 2, B, H, D, Dv]
    totals = _AllGatherStates.apply(totals, ring).flatten(0, 1)  # [W * R, 2, B', H]
    return _output(x, states, totals, a)


def _shard(a: LinearArgs, ring: Ring) -> Shard:
    """The shard's inputs for the stages: kv heads repeated, gates in the state dtype, spans."""
    q, k, v = a.q, a.k, a.v
    sd = compute_dtype(q)
    gf, gr = _gates(q, a.decay, a.log_gate, a.reverse_log_gate, sd)
    group_size = q.shape[2] // k.shape[2]
    kx, vx = (k, v) if group_size == 1 else (k.repeat_interleave(group_size, 2),
                                             v.repeat_interleave(group_size, 2))
    seq_len, world = q.shape[1] * ring.world, ring.world
    starts = _document_starts(a.visibility, seq_len)
    return Shard(q, kx, vx, a.visibility, gf, gr, isinstance(a.visibility, (Full, Prefix)),
                 spans(a.layout, seq_len, ring.rank, world),
                 [r for rk in range(world) for r in spans(a.layout, seq_len, rk, world)], sd,
                 None if starts is None else starts.to(q.device))


def _local_op(a: LinearArgs, r: Span, s_in: torch.Tensor) -> torch.Tensor:
    """The single-process op on span ``r`` from its incoming causal state ``s_in``."""
    sl = _sl(r)
    gates = {} if a.log_gate is None else {
        "log_gate": a.log_gate[:, sl],
        "reverse_log_gate": None if a.reverse_log_gate is None else a.reverse_log_gate[:, sl]}
    return _local_linear(a.q[:, sl], a.k[:, sl], a.v[:, sl], a.visibility, q_offset=r.start,
                         k_offset=r.start, initial_state=s_in, decay=a.decay, impl=a.impl,
                         chunk_size=a.chunk_size, **gates)
