"""Train a tiny model sequence-parallel and check it against one process -- the example is a test.

Run on CPU with gloo (2 or 4 processes)::

    torchrun --standalone --nproc-per-node 2 examples/train_sequence_parallel.py
    torchrun --standalone --nproc-per-node 4 examples/train_sequence_parallel.py --fsdp

Every rank builds the same fp64 model (a softmax, a linear and a gated layer under
``Chunked(4, 1)``, packed documents and ``Prefix``), trains it for a few Adam steps with its
sequence sharded by :class:`causalmix.distributed.SequenceParallel` (``--fsdp``: parameters
sharded by FSDP2 over the same ranks), and also runs the same steps in one process. Rank 0 prints
the largest difference of the loss, of every parameter gradient and of the parameters after the
steps; the script exits non-zero if any exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from causalmix import Causal, Chunked, Prefix, Segments
from causalmix.testing import sequence_parallel_check

TOL = 1e-10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=32, help="a multiple of 2 * world")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = args.seq_len
    docs = Segments(torch.arange(t) * 3 // t) & Causal()  # three packed documents
    try:
        worst = sequence_parallel_check(
            rank, world, mixers=("softmax", "linear", "gated"),
            visibility=(Chunked(4, 1), docs, Prefix(t // 3)), layout=args.layout,
            steps=args.steps, fsdp=args.fsdp, seq_len=t)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(f"world {world}, layout {args.layout}, fsdp {args.fsdp}, {args.steps} steps, "
              f"T={t}: largest difference vs one process -- loss {worst['loss']:.2e}, "
              f"gradients {worst['grad']:.2e}, parameters {worst['param']:.2e} (fp64)")
    ok = max(worst.values()) <= TOL
    if not ok:
        print(f"rank {rank}: difference above {TOL}: {worst}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
