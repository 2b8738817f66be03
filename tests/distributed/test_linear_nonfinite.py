"""Sequence-parallel linear attention over packed documents (``Segments & Causal``): a NaN in
one document's k, v or forward gate reaches exactly the outputs of that document that see it,
on every rank and layout, and every other output equals the run with a finite value there (a
state handed from rank to rank carries no NaN into a later document)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from causalmix import Causal, Segments
from causalmix.distributed import linear_attention, shard, unshard
from causalmix.testing import run_process_group

UNIT = 8  # positions per rank


def _ids(seq_len: int) -> torch.Tensor:
    # documents [0, 5), [5, 11), [11, T): the middle one crosses the ranks' boundary at 8
    return torch.tensor([0] * 5 + [1] * 6 + [2] * (seq_len - 11))[None].expand(2, seq_len)


def _gather(x, layout, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return unshard(parts, layout)


def _job(rank, world):
    seq_len = UNIT * world
    spec = Segments(_ids(seq_len)) & Causal()
    failures = []
    for kind in ("v", "k", "gate", "vector gate"):
        for layout in ("contiguous", "zigzag"):
            g = torch.Generator().manual_seed(7)
            q, k, v = (torch.randn(2, seq_len, 2, 3, generator=g) for _ in range(3))
            gate = (2, seq_len, 2, 3) if kind == "vector gate" else (2, seq_len, 2)
            lg = -torch.rand(*gate, generator=g) if "gate" in kind else None
            at = 7  # inside document 1, the last position of rank 0's contiguous shard
            outs = []
            name = "log_gate" if "gate" in kind else kind
            for fill in (float("nan"), -0.3 if "gate" in kind else 0.25):
                x = {"q": q, "k": k.clone(), "v": v.clone()}
                if lg is not None:
                    x["log_gate"] = lg.clone()
                x[name][:, at, 0] = fill
                local = {n: shard(t, layout, rank, world) for n, t in x.items()}
                o = linear_attention(local.pop("q"), local.pop("k"), local.pop("v"), spec,
                                     layout=layout, **local)
                outs.append(_gather(o, layout, world))
            got, ref = outs
            i = torch.arange(seq_len)
            # a value / key at 7: the queries 7..10 of its document; a forward gate at 7: the
            # queries i >= 7 that see the key 6, the same ones
            rows = (i >= at) & (i < 11)
            poisoned = torch.zeros_like(got, dtype=torch.bool)
            poisoned[:, rows, 0] = True
            ok = (torch.isnan(got[poisoned]).all() and torch.isfinite(got[~poisoned]).all()
                  and torch.allclose(got[~poisoned], ref[~poisoned], atol=1e-5, rtol=1e-4))
            if not ok:
                failures.append((kind, layout))
    return failures


def test_nan_stays_in_its_document(tmp_path):
    for world in (2, 3):
        results = run_process_group(_job, world, str(tmp_path))
        assert all(r == [] for r in results.values()), results
