"""NaN in, NaN out, for every family and implementation: which outputs a non-finite input
reaches, decided from the spec alone, and the inputs with the non-finite entries replaced so
that no kernel's own handling of NaN (a masked product ``0 * NaN``, a cumulative sum that
carries a NaN gate past a document boundary, a triangular solve over several documents) decides
what else turns NaN.

The softmax family's rule is in :mod:`causalmix.ops.softmax._nonfinite`. The linear-state
families (linear attention, the delta rule) follow :func:`guard_state_call`:

* ``out[b, i, h]`` is NaN (every component) if ``q[b, i]`` of the query head ``h`` reads holds
  a NaN or an infinity, or if a key position ``j`` visible to query ``i`` has a non-finite
  ``k`` or ``v`` (of the heads ``h`` reads) or a non-finite ``beta[b, j, h]`` (delta rule);
* a NaN gate (any key dimension) reaches exactly the outputs whose weights hold it: a forward
  gate at ``s`` the queries ``i >= s`` that see a key before ``s`` (``j < s <= i``: the key
  ``s - 1``) or read the initial state; a reverse gate at ``s`` the queries ``i <= s`` that
  see a key after ``s`` (``i <= s < j``: the key ``s + 1``); a reverse gate defaults to the
  forward one, as in the ops;
* ``final_state[b, h]``, the causal state at the last key position ``l``, is NaN if ``l``
  sees a bad k / v / beta, or a forward gate's key ``s - 1`` (or reads the initial state with
  a NaN gate at or before ``l``);
* non-finite values that no query sees change nothing: a NaN in one packed document leaves
  the others' outputs exactly what they are without it.

This holds for the specs the scan forms serve (they factorise, :mod:`causalmix.ops.factor`:
each query sees a contiguous run of keys that holds it, so every gate between a visible key and
the query is at a visible position). For other specs (the linear reference's arbitrary masks)
and where values cannot be read (``torch.compile``, ``torch.func``, meta tensors) the inputs
run as given: NaN still gives NaN, possibly in more outputs than the rule names. A
non-finite ``initial_state[b, h]`` makes NaN exactly the outputs (and the final state) of that
batch and head that read it: the queries that see the key ``k_offset - 1`` (the first key when
``k_offset`` is 0), and so with documents only the document it continues.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from causalmix.checks import values_checked

_COLS = 512  # keys tested at a time against the spec


def clean(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` with NaN/inf entries replaced by ``fill`` (differentiable in the finite entries)."""
    return torch.where(torch.isfinite(x), x, torch.full((), fill, dtype=x.dtype,
                                                         device=x.device))


def bad_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, T, H]`` bool: the row holds a NaN or an infinity."""
    return ~torch.isfinite(x.detach()).all(dim=-1)


def seen_by(visibility, bad: torch.Tensor, tq: int, q_offset: int, k_offset: int,
            side: int = 0) -> torch.Tensor:
    """``bad: [B, Tk, H]`` bool (keys) -> ``[B, Tq, H]`` bool: some key visible to the query
    is bad (``side`` -1 / +1: only keys before / after the query's position count). Only the
    columns holding a bad key are asked of the spec."""
    b, _, h = bad.shape
    dev = bad.device
    cols = bad.any(dim=2).any(dim=0).nonzero().flatten()
    hit = torch.zeros(b, tq, h, device=dev)
    nb = visibility.batch_size or 1
    bi = torch.arange(nb, device=dev).view(nb, 1, 1)
    i = torch.arange(q_offset, q_offset + tq, device=dev).view(1, tq, 1)
    for c in cols.split(_COLS):
        j = (c + k_offset).view(1, 1, -1)
        vis = visibility.visible(bi, i, j)
        if side:
            vis = vis & ((j < i) if side < 0 else (j > i))
        vis = vis.expand(vis.shape[0], tq, c.numel()).float()  # [B', Tq, n]
        hit += vis @ bad[:, c].float()  # [B, Tq, H]
    return hit > 0


class StatePoison(NamedTuple):
    out_rows: torch.Tensor  # [B, Tq, H] bool: output rows that are NaN
    state: torch.Tensor | None  # [B, H] bool: final states that are NaN (None: none asked)

    def apply(self, out: torch.Tensor, state: torch.Tensor | None):
        out = out.masked_fill(self.out_rows[..., None], float("nan"))
        if state is not None and self.state is not None:
            state = state.masked_fill(self.state[..., None, None], float("nan"))
        return out, state


def _nan_gate(g: torch.Tensor) -> torch.Tensor:
    """``[B, Tk, H]`` or ``[B, Tk, H, D]`` log-gates -> ``[B, Tk, H]`` bool: NaN (any dim)."""
    nan = torch.isnan(g.detach())
    return nan.any(-1) if nan.dim() == 4 else nan


def _gates(call: Any) -> list[torch.Tensor]:
    return [g for g in (call.log_gate, call.reverse_log_gate) if g is not None]


def _gate_poison(call: Any, rows: torch.Tensor, state: torch.Tensor | None):
    """``rows`` / ``state`` with the outputs the NaN gates of ``call`` reach (module docstring):
    a forward gate at ``s`` through the key ``s - 1`` (seen from later queries) and the initial
    state, a reverse one through the key ``s + 1`` (seen from earlier queries)."""
    dev, vis = call.q.device, call.visibility
    tq, tk, q0, k0 = call.q.shape[1], call.k.shape[1], call.q_offset, call.k_offset
    last = k0 + tk - 1
    fwd = _nan_gate(call.log_gate)  # [B, Tk, H]
    rev = fwd if call.reverse_log_gate is None else _nan_gate(call.reverse_log_gate)
    before = torch.zeros_like(fwd)
    before[:, :-1] = fwd[:, 1:]  # key s - 1 of a bad forward gate at s
    after = torch.zeros_like(rev)
    after[:, 1:] = rev[:, :-1]  # key s + 1 of a bad reverse gate at s
    rows = rows | seen_by(vis, before, tq, q0, k0, -1) | seen_by(vis, after, tq, q0, k0, 1)
    if state is not None:
        state = state | seen_by(vis, before, 1, last, k0, -1)[:, 0]
    if call.initial_state is not None:  # S0 is read with every gate up to the query
        upto = fwd.cumsum(dim=1) > 0  # [B, Tk, H]: a bad gate at or before t
        reads, reads_l = _reads_initial(call)
        rows = rows | (reads & upto[:, torch.arange(q0 - k0, q0 - k0 + tq, device=dev)])
        if state is not None:
            state = state | (reads_l & upto[:, -1])
    return rows, state


def _reads_initial(call: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Who reads the initial state (the state just before ``k_offset``, anchored at the key
    ``k_offset - 1``, or at 0 when that is the first): ``[B', Tq, 1]`` for the queries and
    ``[B', 1]`` for the final state at the last key."""
    dev, vis = call.q.device, call.visibility
    tq, tk, q0, k0 = call.q.shape[1], call.k.shape[1], call.q_offset, call.k_offset
    anchor = torch.tensor(max(k0 - 1, 0), device=dev)
    nb = vis.batch_size or 1
    bi = torch.arange(nb, device=dev).view(nb, 1)
    at = torch.arange(q0, q0 + tq, device=dev)
    reads = vis.visible(bi, at[None, :], anchor).expand(nb, tq)[..., None]
    reads_l = vis.visible(bi, torch.tensor(k0 + tk - 1, device=dev), anchor).view(nb, 1)
    return reads, reads_l


def guard_state_call(call: Any) -> tuple[Any, StatePoison | None]:
    """A checked linear or delta call (``LinearCall`` / ``DeltaCall``) -> the call to run and
    what to poison afterwards (None: nothing to do, the call runs as given). See the module
    docstring for the rule; ``q``, ``k``, ``v`` are cleaned to 0, gates to 0 (no decay), beta
    to 1, so a cleaned position writes nothing (its key is 0) and the rows that see it are NaN
    anyway."""
    beta = getattr(call, "beta", None)
    inputs = [call.q, call.k, call.v, *([beta] if beta is not None else []), *_gates(call)]
    if call.factor is None or not values_checked(*inputs):
        return call, None
    s0 = call.initial_state
    ok = [torch.isfinite(x.detach()).all() for x in inputs[:3 + (beta is not None)]]
    ok += [~torch.isnan(g.detach()).any() for g in _gates(call)]
    ok += [torch.isfinite(s0.detach()).all()] if s0 is not None else []
    if bool(torch.stack(ok).all()):
        return call, None
    dev, heads, vis = call.q.device, call.heads, call.visibility
    tq, tk, q0, k0 = call.q.shape[1], call.k.shape[1], call.q_offset, call.k_offset
    bad_q = bad_rows(call.q)[:, :, heads.index("q", dev)]  # [B, Tq, H]
    bad = bad_rows(call.k)[:, :, heads.index("k", dev)] | \
        bad_rows(call.v)[:, :, heads.index("v", dev)]  # [B, Tk, H]: k, v, beta
    if beta is not None:
        bad = bad | ~torch.isfinite(beta.detach())
    rows = bad_q | seen_by(vis, bad, tq, q0, k0)
    last = k0 + tk - 1
    state = seen_by(vis, bad, 1, last, k0)[:, 0] if call.return_final_state else None
    if call.log_gate is not None:
        rows, state = _gate_poison(call, rows, state)
    fixed = {"q": clean(call.q), "k": clean(call.k), "v": clean(call.v)}
    if s0 is not None:  # a non-finite S0 of (b, h): the queries (and final state) reading it
        bad_s0 = ~torch.isfinite(s0.detach()).flatten(2).all(-1)  # [B, H]
        reads, reads_l = _reads_initial(call)
        rows = rows | (reads & bad_s0[:, None, :])
        if state is not None:
            state = state | (reads_l & bad_s0)
        fixed["initial_state"] = clean(s0)
    for name in ("log_gate", "reverse_log_gate"):
        g = getattr(call, name)
        if g is not None:
            fixed[name] = torch.where(torch.isnan(g), torch.zeros((), dtype=g.dtype,
                                                                  device=g.device), g)
    if beta is not None:
        fixed["beta"] = clean(beta, 1.0)
    return call._replace(**fixed), StatePoison(rows, state)


def run_guarded(run, call: Any):
    """``run(call) -> (out, state)`` under :func:`guard_state_call`: the kernel sees the
    cleaned inputs and the outputs (and the final state) the rule names come back NaN."""
    call, poisoned = guard_state_call(call)
    out, state = run(call)
    return (out, state) if poisoned is None else poisoned.apply(out, state)
