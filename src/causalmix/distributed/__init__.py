"""Sequence parallel over ``torch.distributed``: layouts, ring exchange, sharded mixers.

Shard a sequence with a layout (``contiguous``, ``zigzag``, ``striped``), call the sharded mixer
on every rank of a process group, get exactly the single-process result (forward and backward)::

    q_r = shard(q, "zigzag", rank, world)            # [B, T / world, H, D]
    out_r = softmax_attention(q_r, k_r, v_r, Causal(), layout="zigzag")
    out_r = linear_attention(q_r, k_r, v_r, Full(), layout="contiguous", decay=decay)
"""

from causalmix.distributed.balance import BalanceReport, work_balance
from causalmix.distributed.layout import LAYOUTS, positions, shard, unshard
from causalmix.distributed.linear import linear_attention
from causalmix.distributed.softmax import softmax_attention

__all__ = [
    "LAYOUTS",
    "BalanceReport",
    "linear_attention",
    "positions",
    "shard",
    "softmax_attention",
    "unshard",
    "work_balance",
]
