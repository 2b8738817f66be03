"""The ring: who sends to whom, point-to-point exchanges on ``torch.distributed``, and checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from causalmix.checks import ArgumentTypeError


@dataclasses.dataclass(frozen=True)
class Ring:
    """A process group seen as a ring: ``rank`` sends to ``rank + 1`` and receives from
    ``rank - 1`` (group ranks; ``send_to`` / ``recv_from`` are the global ranks the p2p calls
    need)."""

    group: dist.ProcessGroup
    rank: int
    world: int
    send_to: int
    recv_from: int

    @staticmethod
    def of(fn: str, group: dist.ProcessGroup | None) -> Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{fn}: torch.distributed is not initialised; call "
                f"torch.distributed.init_process_group(...) first (or use the single-process op)"
            )
        if group is None:
            group = dist.group.WORLD
        elif not isinstance(group, dist.ProcessGroup):
            raise ArgumentTypeError(
                f"{fn}: group must be a torch.distributed ProcessGroup or None, got "
                f"{type(group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"{fn}: this process is not a member of the given group")
        world = dist.get_world_size(group)
        return Ring(
            group, rank, world,
            dist.get_global_rank(group, (rank + 1) % world),
            dist.get_global_rank(group, (rank - 1) % world),
        )


class Exchange:
    """Send ``tensors`` to the next rank and receive same-shaped ones from the previous rank,
    asynchronously (posted at construction; :meth:`wait` returns the received tensors)."""

    def __init__(self, ring: Ring, tensors: Sequence[torch.Tensor], tag: int) -> None:
        # keep the sent buffers alive until the exchange is waited on
        self.sent = [t.contiguous() for t in tensors]
        self.recv = [torch.empty_like(t) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, ring.send_to, ring.group, tag + n)
               for n, t in enumerate(self.sent)]
        ops += [dist.P2POp(dist.irecv, r, ring.recv_from, ring.group, tag + n)
                for n, r in enumerate(self.recv)]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.sent = []
        return self.recv
