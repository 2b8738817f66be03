"""Sequence parallel for whole :mod:`causalmix.nn` models: every block's mixer sharded.

A :class:`SequenceParallel` wraps a :class:`causalmix.nn.SequenceModel` on every rank of a
process group (or one dimension of a ``DeviceMesh``). Each rank holds the positions of one
layout (``contiguous``, ``zigzag``, ``striped``; :mod:`causalmix.distributed.layout`) of every
sequence of the batch; the model runs on them with

* rotary angles and specs at the **absolute** positions of the layout (so nothing changes
  when the sequence is sharded),
* every block's mixer replaced by the sharded op of its family
  (:func:`causalmix.distributed.softmax_attention`, :func:`causalmix.distributed.linear_attention`:
  K/V around the ring, or one gather of states), everything else pointwise in time,
* the loss over the local tokens divided by the **global** number of scored tokens
  (:meth:`SequenceParallel.loss`), so that the sum of every rank's loss is the one-process mean,
  and the gradients of the parameters summed over the ranks (:meth:`reduce_gradients`),

which gives the one-process training step back, to rounding::

    model = SequenceModel(cfg)                       # the same seed on every rank
    sp = SequenceParallel(model, layout="zigzag")    # checks every layer and agrees on every rank
    ids_r, labels_r = sp.shard(ids), sp.shard(labels)        # [B, T / world]
    loss = sp.loss(sp(ids_r), labels_r)              # this rank's part of the global mean
    loss.backward()
    sp.reduce_gradients()                            # sum over the ranks (skip under FSDP2, below)
    opt.step()

Parameters with FSDP2: ``fully_shard`` the blocks and the model over the **same** ranks, then
:func:`fsdp_sums_gradients` (the FSDP modules' gradient divide factor set to 1: their
reduce-scatter then sums the ranks' partial gradients, which is what sequence parallel needs) and
do not call :meth:`reduce_gradients`; or over **another** dimension of a 2-D mesh (data parallel
over one dimension, sequence parallel over the other): FSDP averages over its dimension as
usual, and :meth:`reduce_gradients` sums over the sequence dimension.

Which mixers shard which specs with which layouts (refused at construction, on every rank):

    mixer              layouts                      specs
    softmax            contiguous, zigzag, striped  any
    linear, gated      contiguous, zigzag           Causal, Full, Prefix, Segments & Causal
    delta, kda         contiguous, zigzag           Causal, Full, Prefix, Chunked(s, L),
                                                    Segments & any of these

A layer with a short causal convolution (the delta and KDA layers) takes the ``K - 1``
positions before each of its runs from the ranks that hold them (:func:`halos`: one
differentiable ``all_gather`` of every run's last positions per layer); the layer masks the taps
that would cross a ``Segments`` boundary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from causalmix.checks import ArgumentTypeError, check_int
from causalmix.distributed._agree import checked_on_every_rank
from causalmix.distributed._ring import Ring
from causalmix.distributed.delta import _AllGather, delta_attention, sharded_delta_reason
from causalmix.distributed.layout import LAYOUTS, Span, check_layout, positions, shard, spans
from causalmix.distributed.linear import linear_attention, sharded_linear_reason
from causalmix.distributed.softmax import softmax_attention
from causalmix.visibility import Visibility

__all__ = ["SequenceParallel", "Sharding", "fsdp_sums_gradients", "halos", "sharded_mix"]


class Sharding(NamedTuple):
    """How the sequence of one call is split: ``layout`` over the ``world`` ranks of ``group``
    (None: the default group), ``seq_len`` positions in all, this ``rank``'s part."""

    layout: str
    group: Any
    seq_len: int
    rank: int
    world: int

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """This rank's absolute positions in local order, int64 ``[seq_len / world]``."""
        return positions(self.layout, self.seq_len, self.rank, self.world).to(device)


def sharded_mix(op: str, sharding: Sharding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                visibility: Visibility, **kwargs: Any) -> torch.Tensor:
    """The sharded op of family ``op`` (``"softmax"`` / ``"linear"`` / ``"delta"``) on this
    rank's shards
    ``q, k: [B, n, H, D]``, ``v: [B, n, Hkv, Dv]``; ``kwargs`` as for
    :func:`causalmix.nn.mix` (``scale``; ``decay``, gates, ``impl``, ``chunk_size``)."""
    where = {"layout": sharding.layout, "group": sharding.group}
    if op == "softmax":
        kwargs.pop("impl", None)  # the ring runs blocks on every visible tile pair
        return softmax_attention(q, k, v, visibility, **where, **kwargs)
    if op == "linear":
        return linear_attention(q, k, v, visibility, **where, **kwargs)
    if op == "delta":
        return delta_attention(q, k, v, visibility, **where, **kwargs)
    raise ValueError(f"sharded_mix: op must be 'softmax', 'linear' or 'delta', got {op!r}")


def halos(x: torch.Tensor, sharding: Sharding, width: int) -> list[tuple[Span, torch.Tensor]]:
    """For each run (:class:`~causalmix.distributed.layout.Span`) of this rank's shard ``x:
    [B, n, C]`` (local order), the run and the ``width`` positions just before it, ``[B,
    width, C]`` (oldest first; zeros before position 0), taken from the ranks that hold them
    with one ``all_gather`` of every run's last ``min(width, run length)`` positions.
    Differentiable: in backward the gradient of a halo reaches the rank that holds it (one
    ``all_reduce``; every rank must backpropagate through its result). Collective."""
    ring = Ring.of("halos", sharding.group)
    mine = spans(sharding.layout, sharding.seq_len, sharding.rank, sharding.world)
    every = [r for rk in range(sharding.world)
             for r in spans(sharding.layout, sharding.seq_len, rk, sharding.world)]
    m = min(width, mine[0].length)
    tails = torch.stack([x[:, r.local + r.length - m:r.local + r.length] for r in mine])
    gathered = _AllGather.apply(tails, ring).flatten(0, 1)  # [W * R, B, m, C]
    # every rank's result depends on the gather (a where that never selects it), so every rank
    # joins its backward all_reduce
    never = torch.zeros((), dtype=torch.bool, device=x.device)
    zero = torch.where(never, gathered[0, :, :1], 0.0)
    out = []
    for r in mine:
        cols = []
        for p in range(r.start - width, r.start):
            owner = [i for i, c in enumerate(every) if c.start <= p < c.start + c.length]
            if p < 0 or not owner:
                cols.append(x.new_zeros(x.shape[0], 1, x.shape[2]))
                continue
            c = every[owner[0]]
            cols.append(gathered[owner[0], :, m - (c.start + c.length - p)][:, None])
        out.append((r, (torch.cat(cols, 1) if cols else x[:, :0]) + zero))
    return out


def _group_of(group: Any, mesh_dim: Any) -> Any:
    """A process group from ``group`` (a ProcessGroup, a DeviceMesh or None)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - very old torch
        DeviceMesh = ()  # noqa: N806
    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"SequenceParallel: a {group.ndim}-D DeviceMesh needs mesh_dim= "
                             f"(the dimension the sequence is sharded over)")
        return group.get_group(mesh_dim if mesh_dim is not None else 0)
    if mesh_dim is not None:
        raise ValueError("SequenceParallel: mesh_dim= needs group= to be a DeviceMesh")
    return group


def _layer_reason(block: nn.Module, layout: str) -> str | None:
    """Why the sharded ops cannot run this block, or None."""
    attn = getattr(block, "attn", None)
    op = getattr(attn, "op", None)
    if op == "softmax":
        return None
    if op == "linear":
        return sharded_linear_reason(block.visibility, layout)
    if op == "delta":
        return sharded_delta_reason(block.visibility, layout)
    return (f"its mixer {type(attn).__name__} has no sharded op (softmax, linear-family and "
            f"delta layers shard)")


class SequenceParallel(nn.Module):
    """A :class:`causalmix.nn.SequenceModel` (the same instance, its parameters shared) run with
    its sequence sharded over the ranks of ``group``.

    Args:
        model: the model (built identically on every rank).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (see the table in
            :mod:`causalmix.distributed.model`).
        group: a process group, a ``DeviceMesh`` (with ``mesh_dim``), or None (the world).
        mesh_dim: the mesh dimension the sequence is sharded over (a 2-D mesh: data x sequence).

    Raises ``ValueError`` on every rank, at construction, for a layer whose spec or mixer the
    sharded ops cannot run under ``layout``, or when the ranks disagree on the layout, the
    specs, the mixers or the parameter shapes.
    """

    def __init__(self, model: nn.Module, *, layout: str = "zigzag", group: Any = None,
                 mesh_dim: Any = None) -> None:
        super().__init__()
        from causalmix.nn import SequenceModel

        fn = "SequenceParallel"
        if not isinstance(model, SequenceModel):
            raise ArgumentTypeError(f"{fn}: model must be a causalmix.nn.SequenceModel, got "
                                    f"{type(model).__name__}")
        self.group = _group_of(group, mesh_dim)
        self.model, self.layout = model, layout
        agreed = {"layout": layout, "visibility": tuple(b.visibility for b in model.blocks),
                  "mixers": tuple(type(b.attn).__name__ for b in model.blocks),
                  "parameters": tuple((n, tuple(p.shape)) for n, p in model.named_parameters())}
        ring, _ = checked_on_every_rank(fn, self.group, agreed, lambda world: self._check(fn))
        self.rank, self.world = ring.rank, ring.world

    def _check(self, fn: str) -> None:
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            raise ValueError(f"{fn}: layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        for i, block in enumerate(self.model.blocks):
            reason = _layer_reason(block, self.layout)
            if reason is not None:
                raise ValueError(f"{fn}: layer {i} ({block.cfg.attention.mixer}, "
                                 f"{block.visibility!r}) cannot be sharded with layout "
                                 f"{self.layout!r}: {reason}")

    def sharding(self, seq_len: int) -> Sharding:
        """The :class:`Sharding` of a sequence of ``seq_len`` positions over this group."""
        check_layout(self.layout, check_int("seq_len", seq_len, 1), self.world)
        return Sharding(self.layout, self.group, seq_len, self.rank, self.world)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a full-sequence tensor (sequence along ``dim``): inputs, labels,
        masks. ``[B, T, ...] -> [B, T / world, ...]``."""
        return shard(x, self.layout, self.rank, self.world, dim=dim)

    def forward(self, inputs: torch.Tensor, *,
                visibility: tuple[Visibility, ...] | None = None) -> torch.Tensor:
        """``inputs``: this rank's shard ``[B, n]`` (tokens) or ``[B, n, input_dim]`` of
        sequences of ``n * world`` positions -> this rank's outputs ``[B, n, output_dim]``."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            raise ArgumentTypeError(f"SequenceParallel: inputs must be this rank's [B, n] (or "
                                    f"[B, n, input_dim]) shard, got {type(inputs).__name__}")
        sharding = self.sharding(inputs.shape[1] * self.world)
        return self.model(inputs, visibility=visibility, sharding=sharding)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, *,
             ignore_index: int = -100) -> torch.Tensor:
        """Cross-entropy of this rank's ``logits [B, n, V]`` against ``labels [B, n]`` (int64,
        ``ignore_index`` unscored), divided by the number of scored tokens of **every** rank:
        the ranks' losses sum to the one-process mean (0 when nothing is scored)."""
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"SequenceParallel.loss: logits must be [B, n, V] and labels "
                             f"[B, n], got {list(logits.shape)} and {list(labels.shape)}")
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                ignore_index=ignore_index)
        count = (labels != ignore_index).sum().to(torch.float64).reshape(1)
        dist.all_reduce(count, group=self.group)
        return total / count.clamp_min(1).to(total.dtype)[0]

    def reduce(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a detached scalar or tensor (e.g. the global loss)."""
        out = value.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the ranks of the group (each rank holds the
        gradient of its own tokens' loss). Parameters without a gradient are skipped on every
        rank alike (their set is agreed at construction)."""
        for p in self.model.parameters():
            if p.grad is None:
                continue
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(local, group=self.group)


def fsdp_sums_gradients(module: nn.Module) -> int:
    """For FSDP2 over the same ranks as the sequence: set the gradient divide factor of every
    FSDP module inside ``module`` to 1, so that FSDP's reduce-scatter sums the ranks' partial
    gradients (sequence parallel) instead of averaging them (data parallel). Returns how many
    FSDP modules were set."""
    n = 0
    for m in module.modules():
        setter = getattr(m, "set_gradient_divide_factor", None)
        if callable(setter) and type(m).__name__.startswith("FSDP"):
            setter(1.0)
            n += 1
    return n
