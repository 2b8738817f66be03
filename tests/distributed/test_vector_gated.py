"""Sequence-parallel linear attention with per key dimension gates (``[B, n, H, D]``, GLA) ==
the single-process op, on real gloo process groups: contiguous and zigzag layouts, every spec
the sharded op serves, outputs and the gradients of q, k, v and both gates."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from causalmix.distributed import linear_attention
from causalmix.ops.linear import linear_attention as single_linear
from causalmix.testing import assert_sharded_linear_matches, run_process_group
from causalmix.visibility import Causal, Full, Prefix, Segments

pytestmark = pytest.mark.distributed

CASES = [  # (spec, seq_len per world unit, layout, reverse gate kind, kv heads)
    ("causal", 7, "contiguous", None, 3),
    ("full", 7, "contiguous", "vector", 1),
    ("prefix", 9, "contiguous", "vector", 3),
    ("docs", 8, "contiguous", None, 3),
    ("causal", 10, "zigzag", None, 1),
    ("full", 6, "zigzag", "scalar", 3),
    ("prefix_batch", 10, "zigzag", "vector", 3),
    ("docs", 8, "zigzag", None, 1),
]


def _spec(name, seq_len):
    ids = torch.arange(seq_len) // 5
    return {"causal": Causal(), "full": Full(), "prefix": Prefix(seq_len // 2 + 1),
            "prefix_batch": Prefix(torch.tensor([3, seq_len - 2])),
            "docs": Segments(ids) & Causal()}[name]


def _case(rank, world, name, unit, layout, reverse, hkv, b=2, h=3, d=8, dv=6):
    seq_len = world * unit
    spec = _spec(name, seq_len)
    g = torch.Generator().manual_seed(100 * unit + world)
    q = torch.randn(b, seq_len, h, d, generator=g)
    k = torch.randn(b, seq_len, hkv, d, generator=g)
    v = torch.randn(b, seq_len, hkv, dv, generator=g)
    lg = -2 * torch.rand(b, seq_len, h, d, generator=g)
    lgr = None if reverse is None else -2 * torch.rand(
        b, seq_len, h, *((d,) if reverse == "vector" else ()), generator=g)
    assert_sharded_linear_matches(rank, world, spec, layout, (q, k, v, lg, lgr), name=name)


def _job(rank, world):
    for case in CASES:
        _case(rank, world, *case)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_vector_gated_sharded_equals_single_process(tmp_path, world):
    assert all(run_process_group(_job, world, str(tmp_path)).values())


def test_vector_gated_sharded_checks(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        x = torch.randn(1, 4, 2, 3)
        lg = -torch.rand(1, 4, 2, 3)
        with pytest.raises(ValueError, match=r"log_gate must have shape \[B, Tk, H\] or "
                                             r"\[B, Tk, H, D\] = \[1, 4, 2\] or \[1, 4, 2, 3\]"):
            linear_attention(x, x, x, Causal(), log_gate=lg[..., :2])
        with pytest.raises(ValueError, match="log_gate values must be <= 0"):
            linear_attention(x, x, x, Causal(), log_gate=-lg)
        # a world of one is the single-process op
        out = linear_attention(x, x, x, Full(), log_gate=lg, reverse_log_gate=lg[..., 0] * 2)
        ref = single_linear(x, x, x, Full(), log_gate=lg, reverse_log_gate=lg[..., 0] * 2)
        torch.testing.assert_close(out, ref)
    finally:
        dist.destroy_process_group()


def _model_job(rank, world):
    from causalmix.testing import sequence_parallel_check
    out = {}
    for layout in ("contiguous", "zigzag"):
        out[layout] = sequence_parallel_check(rank, world, mixers=("gla", "gla"),
                                              visibility=(Full(), Causal()), layout=layout,
                                              seq_len=16)
    return out


def test_gla_model_sequence_parallel_equals_one_process(tmp_path):
    """A two-layer GLA model (Full, then Causal): a few Adam steps sequence-parallel == one
    process (loss, every parameter gradient, the parameters after the steps) to 1e-10."""
    for rank, per_layout in run_process_group(_model_job, 2, str(tmp_path)).items():
        for layout, worst in per_layout.items():
            assert max(worst.values()) <= 1e-10, (rank, layout, worst)
