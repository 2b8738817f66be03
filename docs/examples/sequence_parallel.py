"""Sequence parallel on torchrun: every rank holds a shard of one sequence, the sharded mixers
give the single-process numbers, forward and backward.

    torchrun --standalone --nproc-per-node 2 docs/examples/sequence_parallel.py

Exits non-zero if any difference from the single-process run exceeds 1e-10 (fp64), so the
example is a check (tests/test_docs.py runs it with 2 processes).
"""

import sys

import torch
import torch.distributed as dist

import causalmix
import causalmix.distributed as cmd
from causalmix import Causal, Chunked, Prefix, Segments

dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()

B, T, H, D = 2, 96, 4, 16
g = torch.Generator().manual_seed(0)  # the same full sequence on every rank
q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
decay = torch.tensor([0.9, 0.95, 0.99, 1.0], dtype=torch.float64)
worst = 0.0

for layout in ("contiguous", "zigzag"):
    for spec in (Causal(), Prefix(40), Chunked(8, lookahead=1), Segments(torch.arange(T) // 30)):
        ql, kl, vl = (cmd.shard(x, layout, rank, world).requires_grad_() for x in (q, k, v))
        out = cmd.softmax_attention(ql, kl, vl, spec, layout=layout)
        out.sum().backward()
        qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
        ref = causalmix.softmax_attention(qf, kf, vf, spec)
        ref.sum().backward()
        for mine, full in [(out, ref), (ql.grad, qf.grad), (kl.grad, kf.grad), (vl.grad, vf.grad)]:
            worst = max(worst, (mine - cmd.shard(full, layout, rank, world)).abs().max().item())

    for spec in (Causal(), Prefix(40)):  # the sharded linear mixer: Causal, Full, Prefix
        ql, kl, vl = (cmd.shard(x, layout, rank, world) for x in (q, k, v))
        out = cmd.linear_attention(ql, kl, vl, spec, layout=layout, decay=decay)
        ref = causalmix.linear_attention(q, k, v, spec, decay=decay)
        worst = max(worst, (out - cmd.shard(ref, layout, rank, world)).abs().max().item())

print(f"rank {rank} of {world}: largest difference from one process {worst:.1e}")
dist.destroy_process_group()
sys.exit(0 if worst <= 1e-10 else 1)
