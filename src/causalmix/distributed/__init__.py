"""Sequence parallel over ``torch.distributed``: layouts, ring exchange, sharded mixers.

Shard a sequence with a layout (``contiguous``, ``zigzag``, ``striped``), call the sharded mixer
on every rank of a process group, get exactly the single-process result (forward and backward)::

    q_r = shard(q, "zigzag", rank, world)            # [B, T / world, H, D]
    out_r = softmax_attention(q_r, k_r, v_r, Causal(), layout="zigzag")
    out_r = linear_attention(q_r, k_r, v_r, Full(), layout="zigzag", decay=decay)
    out_r = delta_attention(q_r, k_r, v_r, Full(), beta=b_r, log_gate=g_r, layout="zigzag")
    out = unshard(all_gathered_outputs, "zigzag")    # [B, T, H, Dv]

    mixer               layouts               specs                  exchange
    softmax_attention   all three             any                    K/V around the ring, dK/dV
    linear_attention    contiguous, zigzag    Causal, Full, Prefix   one all_gather of states
    delta_attention     contiguous, zigzag    Causal, Full, Prefix,  one all_gather of
                                              Chunked, Segments & .. (transition, update) pairs

Transport is ``torch.distributed`` only: ``batch_isend_irecv`` on the group for the ring,
``all_gather`` / ``all_reduce`` for states, so gloo (CPU) and NCCL (GPU) both work. Every rank
must call with the same spec (compared by content), layout, shapes, dtype, options (scale;
decay, impl, chunk size) and need for gradients, and with arguments its own checks accept --
both settled before any exchange with one small ``all_gather`` of digests and verdicts per
call; a mismatch or a bad argument on any rank raises the same ``ValueError`` on every rank,
naming the arguments and what each rank passed, or the rank that refused its arguments and
why -- and, in backward, backpropagate through its output. Failures surface as
errors, never hangs: a rank that dies closes its connections, and a silent one trips the process
group's ``timeout``.
:func:`work_balance` counts the exact visible pairs each rank computes under a layout.

Whole models: :class:`SequenceParallel` runs a :class:`causalmix.nn.SequenceModel` with its
sequence sharded (every block's mixer sharded, positions from the layout, a delta layer's
convolution halo from the neighbouring rank (:func:`halos`), a loss with the global mean,
gradients summed over the ranks; FSDP2 composes): see :mod:`causalmix.distributed.model`
and ``examples/train_sequence_parallel.py``, run as
``torchrun --standalone --nproc-per-node 2 examples/train_sequence_parallel.py``.
"""

from causalmix.distributed.balance import BalanceReport, work_balance
from causalmix.distributed.delta import delta_attention
from causalmix.distributed.layout import LAYOUTS, positions, shard, unshard
from causalmix.distributed.linear import linear_attention
from causalmix.distributed.model import (
    SequenceParallel,
    Sharding,
    fsdp_sums_gradients,
    halos,
    sharded_mix,
)
from causalmix.distributed.softmax import softmax_attention

__all__ = [
    "LAYOUTS",
    "BalanceReport",
    "SequenceParallel",
    "Sharding",
    "delta_attention",
    "fsdp_sums_gradients",
    "halos",
    "linear_attention",
    "positions",
    "shard",
    "sharded_mix",
    "softmax_attention",
    "unshard",
    "work_balance",
]
