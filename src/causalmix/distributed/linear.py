"""Sequence-parallel linear attention: states, not keys, cross the ranks.

Written here for the contiguous layout, ``W`` ranks of ``n`` positions, rank ``r`` holding
``[r n, (r+1) n)``; under zigzag each rank holds two such blocks and the same formulas run over
all ``2W`` blocks (a block starting at ``a`` takes ``S_in = sum over blocks c ending by a of
lambda^(a - end_c) L_c``). With decay ``lambda`` (per head) and
``o_i = sum over visible j of lambda^|i-j| (q_i . k_j) v_j``:

* **Causal part** (keys of earlier ranks). Each rank computes its local causal state from zero,
  ``L_r = sum_t lambda^(n-1-t) k_t v_t^T``, in one matmul. One ``all_gather`` shares them all,
  and every rank evaluates the scan over ranks in closed form (no serial chain)::

      S_in(r) = sum_{s < r} lambda^(n (r-1-s)) L_s        (the state just before position r n)

  which the single-process op takes as ``initial_state`` (exact for ``Causal``, ``Full`` and
  ``Prefix``: every query sees every earlier key).
* **Reverse part** (keys of later ranks; ``Full`` and ``Prefix(m)`` only, where they are visible
  iff ``j < m``, whatever the query). Each rank also computes ``G_r = sum_t [visible]
  lambda^t k_t v_t^T`` (anchored at its first position), gathered in the same ``all_gather``::

      F(r) = sum_{s > r} lambda^(n (s-r-1)) G_s,      o_i += lambda^((r+1) n - i) q_i F(r)

Backward is autograd through these few products and the local op, with the ``all_gather`` of the
states made differentiable (its backward sums each state's gradient over the ranks with one
``all_reduce``). Every rank's result depends on the gathered states, so every rank joins that
``all_reduce`` when it backpropagates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from causalmix.distributed._agree import check_agreement, signature
from causalmix.distributed._ring import Ring, check_same_everywhere
from causalmix.distributed.layout import LAYOUTS, Run, runs
from causalmix.ops._validate import check_qkv, check_visibility
from causalmix.ops.linear import linear_attention as _local_linear
from causalmix.visibility import Causal, Full, Prefix, Visibility

SUPPORTED = ("Causal()", "Full()", "Prefix(n)")


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


def _powers(log_decay: torch.Tensor | None, exponents: torch.Tensor, h: int, dtype, device):
    """``lambda_h ** e`` as ``[len(e), H]`` (ones without decay)."""
    e = exponents.to(dtype=dtype, device=device)[:, None]
    if log_decay is None:
        return torch.ones(e.shape[0], h, dtype=dtype, device=device)
    return torch.exp(e * log_decay[None, :])


def _sl(r: Run) -> slice:
    return slice(r.local, r.local + r.length)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visibility: Visibility,
    *,
    layout: str = "contiguous",
    decay: torch.Tensor | None = None,
    group=None,
    impl: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Sequence-parallel linear attention with per-head decay, on this rank's shard.

    Every rank of ``group`` calls it with its own shard of one sequence of ``T = W * n``
    positions, laid out by ``layout`` (:mod:`causalmix.distributed.layout`).

    Args:
        q: ``[B, n, H, D]`` this rank's queries.
        k: ``[B, n, H, D]`` this rank's keys.
        v: ``[B, n, H, Dv]`` this rank's values. q, k, v share dtype and device.
        visibility: ``Causal()``, ``Full()`` or ``Prefix(n)`` (int or ``[B]`` tensor) over
            absolute positions ``[0, T)``; other specs raise ``ValueError``.
        layout: ``"contiguous"`` or ``"zigzag"`` (state passing needs contiguous blocks:
            ``"striped"`` raises ``ValueError``). Linear attention costs the same on every rank
            under these specs, so the layout does not change the balance; zigzag is there so
            that a model mixing softmax and linear layers keeps one layout.
        decay: ``[H]`` float tensor in (0, 1], or None; identical on every rank. Differentiable.
        group: the ``torch.distributed`` process group (default: the world).
        impl, chunk_size: passed to the local ``causalmix.ops.linear.linear_attention``.

    Returns:
        ``[B, n, H, Dv]`` in q's dtype: the single-process result on the full sequence, sharded.
        States are fp32 (fp64 for fp64 inputs). Differentiable; in backward every rank must
        backpropagate through its result (one ``all_reduce`` of the states' gradients).
    """
    fn = "causalmix.distributed.linear_attention"
    check_agreement(fn, group, {  # every rank, before any check or exchange can diverge
        "visibility": visibility, "layout": layout, "q": signature(q), "k": signature(k),
        "v": signature(v), "decay": decay, "requires_grad": torch.is_grad_enabled() and any(
            getattr(t, "requires_grad", False) for t in (q, k, v, decay))})
    bsz, n, _nk, h, _hkv, d, dv = check_qkv(fn, q, k, v, same_head_count=True)
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if layout == "striped":
        raise ValueError(f"{fn}: layout 'striped' is not supported by the linear mixer (state "
                         f"passing needs contiguous blocks, a stripe has none); use "
                         f"'contiguous' or 'zigzag'")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"{fn}: layout 'zigzag' needs an even number of positions per rank "
                         f"(two chunks of seq_len / (2 * world)), got {n}")
    if not isinstance(visibility, (Causal, Full, Prefix)):
        raise ValueError(f"{fn}: spec {visibility!r} is not supported by the sequence-parallel "
                         f"linear mixer; supported: {', '.join(SUPPORTED)}")
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or not decay.dtype.is_floating_point:
            raise TypeError(f"{fn}: decay must be a [H] float tensor or None, got {decay!r}")
        if tuple(decay.shape) != (h,):
            raise ValueError(f"{fn}: decay must have shape [H] = [{h}], got {list(decay.shape)}")
        dd = decay.detach()
        if not bool(((dd > 0) & (dd <= 1)).all()):
            raise ValueError(f"{fn}: decay values must lie in (0, 1], got min "
                             f"{float(dd.min()):.6g}, max {float(dd.max()):.6g}")
    ring = Ring.of(fn, group)
    world, rank = ring.world, ring.rank
    seq_len = n * world
    check_visibility(fn, visibility, bsz, seq_len, seq_len, 0, 0)
    check_same_everywhere(fn, ring, ("batch", "positions", "heads", "dim", "v dim"),
                          (bsz, n, h, d, dv), q.device)
    if n == 0:
        return _local_linear(q, k, v, visibility, decay=decay, impl=impl, chunk_size=chunk_size)
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    log_decay = None if decay is None else torch.log(decay.to(sd))
    reverse = not isinstance(visibility, Causal)
    mine = runs(layout, seq_len, rank, world)
    # every run of every rank, in the order the all_gather stacks them: [W * R]
    every = [r for rk in range(world) for r in runs(layout, seq_len, rk, world)]
    starts = torch.tensor([r.start for r in every], device=dev)
    ends = torch.tensor([r.start + r.length for r in every], device=dev)  # exclusive

    # local states of each run: causal (anchored at its last position) and, for Full/Prefix,
    # the keys that a query before the run sees (anchored at its first position)
    local = []
    for r in mine:
        kf, vf = k[:, _sl(r)].to(sd), v[:, _sl(r)].to(sd)
        t = torch.arange(r.length, device=dev)
        w_end = _powers(log_decay, r.length - 1 - t, h, sd, dev)  # [m, H]
        run_states = [torch.einsum("bthd,bthe->bhde", kf * w_end[None, :, :, None], vf)]
        if reverse:
            w_start = _powers(log_decay, t, h, sd, dev)[None]  # [1, m, H]
            if isinstance(visibility, Prefix):
                lim = visibility.n
                if isinstance(lim, torch.Tensor):
                    lim = lim.to(dev)[:, None]
                else:
                    lim = torch.tensor([[lim]], device=dev)
                w_start = w_start * ((r.start + t)[None, :] < lim).to(sd)[:, :, None]
            run_states.append(torch.einsum("bthd,bthe->bhde", kf * w_start[..., None], vf))
        local.append(torch.stack(run_states))
    # [W * R, 1 or 2, B, H, D, Dv]
    states = _AllGatherStates.apply(torch.stack(local), ring).flatten(0, 1)

    outs = []
    for r in mine:
        a, e = r.start, r.start + r.length
        # (scan, closed form) the causal state just before position a: runs ending by a,
        # decayed over the gap; zero coefficients keep every state in the graph
        coef = _powers(log_decay, (a - ends).clamp_min(0), h, sd, dev)
        coef = coef * (ends <= a).to(sd)[:, None]  # [W * R, H]
        s_in = torch.einsum("sh,sbhde->bhde", coef, states[:, 0])
        out = _local_linear(q[:, _sl(r)], k[:, _sl(r)], v[:, _sl(r)], visibility, decay=decay,
                            q_offset=a, k_offset=a, initial_state=s_in, impl=impl,
                            chunk_size=chunk_size)
        if reverse:
            # (reverse) keys of runs after the run, summarised at position e
            coef = _powers(log_decay, (starts - e).clamp_min(0), h, sd, dev)
            coef = coef * (starts >= e).to(sd)[:, None]
            f = torch.einsum("sh,sbhde->bhde", coef, states[:, 1])
            t = torch.arange(r.length, device=dev)
            w_q = _powers(log_decay, r.length - t, h, sd, dev)  # lambda^(e - i), [m, H]
            extra = torch.einsum("bthd,bhde->bthe", q[:, _sl(r)].to(sd) * w_q[None, :, :, None],
                                 f)
            out = (out.to(sd) + extra).to(q.dtype)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
