"""Sequence parallel on torchrun: every rank holds a shard of one sequence, the sharded mixers
give the single-process numbers, forward and backward, and so does a whole model's training step
(``SequenceParallel``: loss and every parameter gradient).

    torchrun --standalone --nproc-per-node 2 docs/examples/sequence_parallel.py

Exits non-zero if any difference from the single-process run exceeds 1e-10 (fp64), so the
example is a check (tests/test_docs.py runs it with 2 processes).
"""

import copy
import gc
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import causalmix
import causalmix.distributed as cmd
from causalmix import Causal, Chunked, Prefix, Segments
from causalmix.distributed import SequenceParallel
from causalmix.nn import Block, ModelConfig, SequenceModel

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

    docs = Segments(torch.arange(T) // 30) & Causal()  # packed documents
    for spec in (Causal(), Prefix(40), docs):  # sharded linear: Causal, Full, Prefix, docs
        ql, kl, vl = (cmd.shard(x, layout, rank, world) for x in (q, k, v))
        out = cmd.linear_attention(ql, kl, vl, spec, layout=layout, decay=decay)
        ref = causalmix.linear_attention(q, k, v, spec, decay=decay)
        worst = max(worst, (out - cmd.shard(ref, layout, rank, world)).abs().max().item())

    kn = torch.nn.functional.normalize(k, dim=-1)  # the delta rule: unit keys, beta, a gate
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.9 + 0.1
    gate = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    for spec in (docs, Chunked(8, lookahead=1)):  # sharded delta: every spec of the family
        full = (q, kn, v, beta, gate)
        mine = [cmd.shard(x, layout, rank, world).requires_grad_() for x in full]
        out = cmd.delta_attention(*mine[:3], spec, beta=mine[3], log_gate=mine[4], layout=layout)
        out.sum().backward()
        whole = [x.clone().requires_grad_() for x in full]
        ref = causalmix.delta_attention(*whole[:3], spec, beta=whole[3], log_gate=whole[4])
        ref.sum().backward()
        for a, b in [(out, ref)] + [(x.grad, y.grad) for x, y in zip(mine, whole, strict=True)]:
            worst = max(worst, (a - cmd.shard(b, layout, rank, world)).abs().max().item())


def model_step_difference() -> float:
    """One training step of a whole model sequence-parallel: the largest difference of the
    loss and of every parameter gradient from the same step in one process."""
    # a softmax layer under Chunked(4, 1), a linear one over packed documents, a delta
    # (Gated DeltaNet) one under Prefix(40)
    torch.manual_seed(0)  # the same parameters on every rank
    cfg = ModelConfig(vocab_size=32, d_model=32, n_heads=4, mixer="softmax",
                      visibility=(Chunked(4, lookahead=1),))
    model = SequenceModel(cfg)
    for mixer, spec in [("linear", docs), ("delta", Prefix(40))]:
        layer = ModelConfig(vocab_size=32, d_model=32, n_heads=4, mixer=mixer, visibility=(spec,))
        model.blocks.append(Block(layer.blocks[0]))
    model = model.to(torch.float64)
    one = copy.deepcopy(model)  # the one-process reference
    ids = torch.randint(0, 32, (B, T), generator=g)
    labels = torch.randint(0, 32, (B, T), generator=g)

    sp = SequenceParallel(model, layout="zigzag")  # checks every layer, agreed on every rank
    loss = sp.loss(sp(sp.shard(ids)), sp.shard(labels))  # this rank's part of the global mean
    loss.backward()
    sp.reduce_gradients()  # the parameter gradients summed over the ranks
    ref = F.cross_entropy(one(ids).flatten(0, 1), labels.flatten())
    ref.backward()
    worst = (sp.reduce(loss) - ref).abs().item()
    for mine, full in zip(model.parameters(), one.parameters(), strict=True):
        worst = max(worst, (mine.grad - full.grad).abs().max().item())
    return worst


worst = max(worst, model_step_difference())
print(f"rank {rank} of {world}: largest difference from one process {worst:.1e}")
# free every autograd graph of a sharded call before the group goes: a graph alive at exit can
# hold the group's threads past destroy_process_group (an abort at interpreter teardown)
del out, ref, mine, whole, ql, kl, vl, qf, kf, vf
gc.collect()
dist.barrier()
dist.destroy_process_group()
sys.exit(0 if worst <= 1e-10 else 1)
