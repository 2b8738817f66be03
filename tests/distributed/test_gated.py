"""Sequence-parallel linear attention with per-token gates == the single-process op, on real
gloo process groups (contiguous and zigzag layouts; outputs and the gradients of q, k, v and
both gates), and the gated argument checks of the sharded op."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback

import pytest
import torch
import torch.distributed as dist

from causalmix.distributed import linear_attention
from causalmix.ops.linear import linear_attention as single_linear
from causalmix.testing import assert_sharded_linear_matches
from causalmix.visibility import Causal, Full, Prefix

CASES = [  # (spec, seq_len per world unit, layout, reverse gate, kv heads)
    ("causal", 7, "contiguous", False, 3),
    ("full", 7, "contiguous", True, 1),
    ("prefix", 9, "contiguous", True, 3),
    ("causal", 10, "zigzag", False, 1),
    ("full", 6, "zigzag", True, 3),
    ("prefix_batch", 10, "zigzag", True, 3),
]


def _spec(name, seq_len):
    return {"causal": Causal(), "full": Full(), "prefix": Prefix(seq_len // 2 + 1),
            "prefix_batch": Prefix(torch.tensor([3, seq_len - 2]))}[name]


def _case(rank, world, name, unit, layout, reverse, hkv, b=2, h=3, d=8, dv=6):
    seq_len = world * unit
    spec = _spec(name, seq_len)
    g = torch.Generator().manual_seed(100 * unit + world)
    q = torch.randn(b, seq_len, h, d, generator=g)
    k = torch.randn(b, seq_len, hkv, d, generator=g)
    v = torch.randn(b, seq_len, hkv, dv, generator=g)
    lg = -2 * torch.rand(b, seq_len, h, generator=g)
    lgr = -2 * torch.rand(b, seq_len, h, generator=g) if reverse else None
    assert_sharded_linear_matches(rank, world, spec, layout, (q, k, v, lg, lgr), name=name)


def _worker(rank, world, store, results):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            for case in CASES:
                _case(rank, world, *case)
        finally:
            dist.destroy_process_group()
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.distributed
def test_gated_sharded_equals_single_process(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "store"), results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=240) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {e}" for r, e in sorted(got.items()) if e is not None]
    assert not errors, "\n".join(errors)


def test_gated_sharded_checks(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        x = torch.randn(1, 4, 2, 3)
        lg = -torch.rand(1, 4, 2)
        with pytest.raises(ValueError, match="mutually exclusive"):
            linear_attention(x, x, x, Causal(), log_gate=lg, decay=torch.ones(2))
        with pytest.raises(ValueError, match="log_gate values must be <= 0"):
            linear_attention(x, x, x, Causal(), log_gate=-lg)
        with pytest.raises(ValueError, match=r"log_gate must have shape \[B, Tk, H\]"):
            linear_attention(x, x, x, Causal(), log_gate=lg[:, :3])
        with pytest.raises(ValueError, match="reverse_log_gate needs log_gate"):
            linear_attention(x, x, x, Full(), reverse_log_gate=lg)
        with pytest.raises(ValueError, match="decay must be a"):
            linear_attention(x, x, x, Causal(), decay="0.9")
        # a world of one is the single-process op
        out = linear_attention(x, x, x, Full(), log_gate=lg, reverse_log_gate=lg * 2)
        ref = single_linear(x, x, x, Full(), log_gate=lg, reverse_log_gate=lg * 2)
        torch.testing.assert_close(out, ref)
    finally:
        dist.destroy_process_group()
