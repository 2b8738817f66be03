"""Sequence-parallel delta attention (DeltaNet / Gated DeltaNet) == the single-process op, on
real gloo groups of 2 and 4 ranks: outputs, final states and the gradients of q, k, v, beta,
both gates and the initial state, for every spec the family serves (Causal, Full, Prefix,
Chunked with and without lookahead, packed documents with each), contiguous and zigzag
layouts, the head groupings, awkward lengths; NaN stays in its document; refusals on every
rank."""

from __future__ import annotations

import datetime
import itertools
import re

import pytest
import torch
import torch.distributed as dist

from causalmix import Causal, Chunked, Full, Prefix, Segments, Window
from causalmix.distributed import delta_attention, shard, unshard
from causalmix.ops.delta import delta_attention as single_delta
from causalmix.testing import assert_close, run_process_group

pytestmark = pytest.mark.distributed

HEADS = {"same": (3, 3, 3), "gqa": (4, 2, 2), "value": (2, 2, 4)}  # (Hq, Hk, Hv)


def _docs(seq_len, rows):
    """Packed documents over ``seq_len`` positions: uneven, one per row set when ``rows``."""
    cut = [seq_len // 3, seq_len // 3 + max(1, seq_len // 4)]
    ids = torch.zeros(seq_len, dtype=torch.int64)
    for c in cut:
        ids[c:] += 1
    if not rows:
        return ids
    other = torch.zeros(seq_len, dtype=torch.int64)
    other[seq_len - 2:] = 1
    return torch.stack([ids, other])


def _spec(name, seq_len):
    docs = Segments(_docs(seq_len, rows=name.endswith("rows")))
    return {
        "causal": Causal(), "full": Full(), "prefix": Prefix(seq_len // 2 + 1),
        "prefix_batch": Prefix(torch.tensor([3, seq_len - 2])),
        "chunked": Chunked(3), "chunked_la": Chunked(3, lookahead=2),
        "docs_causal": docs & Causal(), "docs_full_rows": docs & Full(),
        "docs_chunked_la": docs & Chunked(4, lookahead=1), "docs_prefix": docs & Prefix(5),
    }[name]


CASES = [  # (spec, positions per world unit, layout, gates, heads, initial state)
    ("causal", 7, "contiguous", "gated", "gqa", True),
    ("causal", 1, "contiguous", "none", "same", False),
    ("full", 7, "contiguous", "reverse", "value", True),
    ("full", 4, "zigzag", "none", "same", False),
    ("prefix", 9, "contiguous", "reverse", "same", True),
    ("prefix_batch", 10, "zigzag", "gated", "gqa", False),
    ("chunked", 6, "zigzag", "reverse", "same", True),
    ("chunked_la", 7, "contiguous", "reverse", "value", False),
    ("chunked_la", 8, "zigzag", "gated", "same", True),
    ("docs_causal", 8, "zigzag", "gated", "value", True),
    ("docs_full_rows", 7, "contiguous", "reverse", "same", True),
    ("docs_chunked_la", 10, "zigzag", "reverse", "gqa", False),
    ("docs_prefix", 9, "contiguous", "gated", "same", True),
]

VECTOR_CASES = [  # KDA: per-key-dimension gates [B, T, H, D] (vreverse: both gates vector;
    # mixed: a vector forward gate with a scalar reverse one)
    ("causal", 7, "contiguous", "vector", "gqa", True),
    ("docs_causal", 8, "zigzag", "vector", "value", True),
    ("full", 7, "contiguous", "vreverse", "value", True),
    ("chunked_la", 8, "zigzag", "vreverse", "same", False),
    ("docs_full_rows", 6, "zigzag", "vector", "gqa", True),
    ("docs_chunked_la", 7, "contiguous", "mixed", "same", False),
    ("prefix_batch", 10, "zigzag", "vreverse", "value", True),
]


def _inputs(unit, world, heads, gates, init, b=2, d=5, dv=4):
    seq_len = world * unit
    hq, hk, hv = HEADS[heads]
    h = max(hq, hv)
    g = torch.Generator().manual_seed(100 * unit + world)
    x = {"q": torch.randn(b, seq_len, hq, d, generator=g),
         "k": torch.nn.functional.normalize(torch.randn(b, seq_len, hk, d, generator=g), dim=-1),
         "v": torch.randn(b, seq_len, hv, dv, generator=g),
         "beta": 0.05 + 1.9 * torch.rand(b, seq_len, h, generator=g)}  # (1, 2] included
    per_dim = (d,) if gates in ("vector", "vreverse", "mixed") else ()
    if gates != "none":
        x["log_gate"] = -2 * torch.rand(b, seq_len, h, *per_dim, generator=g)
    if gates in ("reverse", "vreverse", "mixed"):
        rev_dim = () if gates == "mixed" else per_dim
        x["reverse_log_gate"] = -2 * torch.rand(b, seq_len, h, *rev_dim, generator=g)
    if init:
        x["initial_state"] = torch.randn(b, h, d, dv, generator=g, dtype=torch.float64)
    w = torch.randn(b, seq_len, h, dv, generator=g)
    wf = torch.randn(b, h, d, dv, generator=g)
    return x, w, wf


def _call(fn, x, spec, **kw):
    qkv = [x["q"], x["k"], x["v"]]
    rest = {n: t for n, t in x.items() if n not in ("q", "k", "v")}
    return fn(*qkv, spec, **rest, return_final_state=True, **kw)


def _single(x, w, wf, spec, dtype):
    xs = {n: t.to(dtype if n != "initial_state" or dtype == torch.float64
                  else torch.float32).requires_grad_() for n, t in x.items()}
    o, s = _call(single_delta, xs, spec, impl="reference")
    loss = (o * w.to(dtype)).sum() + (s * wf.to(s.dtype)).sum()
    return [o, s, *torch.autograd.grad(loss, list(xs.values()))]


def _gather(x, layout, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return unshard(parts, layout)


def _case(rank, world, name, unit, layout, gates, heads, init, chunk_size=4):
    x, w, wf = _inputs(unit, world, heads, gates, init)
    spec = _spec(name, world * unit)
    truth, base = _single(x, w, wf, spec, torch.float64), _single(x, w, wf, spec, torch.float32)
    local = {n: (t.float() if n == "initial_state" else shard(t, layout, rank, world))
             .requires_grad_() for n, t in x.items()}
    o, s = _call(delta_attention, local, spec, layout=layout, chunk_size=chunk_size)
    loss = (o * shard(w, layout, rank, world)).sum() + (s * wf).sum() / world
    grads = dict(zip(local, torch.autograd.grad(loss, list(local.values())), strict=True))
    got = [_gather(o, layout, world), s]
    for n, gr in grads.items():
        if n == "initial_state":  # each rank holds its share
            gr = gr.clone()
            dist.all_reduce(gr)
            got.append(gr)
        else:
            got.append(_gather(gr, layout, world))
    names = ["out", "final_state", *(f"d{n}" for n in x)]
    for nm, a, r, bl in zip(names, got, truth, base, strict=True):
        assert_close(a, r, bl, name=f"{layout} {name} W={world} {nm}", dtype=torch.float32)


def _job(rank, world, cases):
    for case in cases:
        _case(rank, world, *case)
    return len(cases)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_single_process(tmp_path, world):
    cases = CASES if world == 2 else CASES[::2]
    done = run_process_group(_job, world, str(tmp_path), cases=cases)
    assert done == dict.fromkeys(range(world), len(cases))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_vector_gates_equal_single_process(tmp_path, world):
    """KDA's per-key-dimension gates: the cross-rank transitions become ``(I - beta k k^T)
    diag(exp(g))`` products, the reverse reads scale the queries per dimension."""
    cases = VECTOR_CASES if world == 2 else VECTOR_CASES[1::2]
    done = run_process_group(_job, world, str(tmp_path), cases=cases)
    assert done == dict.fromkeys(range(world), len(cases))


LONG_CASES = [  # awkward long lengths, default chunk size (64: does not divide the spans)
    ("docs_full_rows", 250, "contiguous", "reverse", "value", True),
    ("chunked_la", 250, "zigzag", "gated", "gqa", True),
]


def _long_job(rank, world):
    for case in LONG_CASES:
        _case(rank, world, *case, chunk_size=64)
    return True


@pytest.mark.slow
def test_sharded_equals_single_process_at_500(tmp_path):
    run_process_group(_long_job, 2, str(tmp_path))


def _nan_job(rank, world):
    """NaN in, NaN out: a NaN value and a NaN forward gate (scalar, or one key dimension of a
    vector gate) reach every output that reads them (a value: its document from it on under
    Causal, all of it under Full; a forward gate at s: the queries i >= s that see a key before
    s, here the query at s) and no other document, on every layout."""
    seq_len = 4 * world
    ids = _docs(seq_len, False)  # documents [0, 2), [2, 4), [4, T)
    for (spec, reached), gates in itertools.product(
            ((Segments(ids) & Full(), ([0, 1], [3])),
             (Segments(ids) & Causal(), ([1], [3]))), ("reverse", "vreverse")):
        x, _, _ = _inputs(4, world, "same", gates, True)
        x["v"][:, 1, 0, 0] = float("nan")
        x["log_gate"][(slice(None), 3, 1) + ((0,) if gates == "vreverse" else ())] = \
            float("nan")
        x["initial_state"] = x["initial_state"].float()
        for layout in ("contiguous", "zigzag"):
            local = {n: (t if n == "initial_state" else shard(t, layout, rank, world))
                     for n, t in x.items()}
            o = _gather(delta_attention(**local, visibility=spec, layout=layout), layout,
                        world)
            assert torch.isnan(o[:, reached[0], 0, 0]).all(), (spec, layout)
            assert torch.isnan(o[:, reached[1], 1]).all(), (spec, layout)
            assert torch.isfinite(o[:, 4:]).all(), (spec, layout)  # the other document
    return True


def test_nan_stays_in_its_document(tmp_path):
    run_process_group(_nan_job, 2, str(tmp_path))


def _nan_state_job(rank, world):
    """A NaN entry of ``initial_state[0, 0]`` reaches only the document it continues (the
    first), in that batch row and head; every other output equals the single-process op."""
    seq_len = 8 * world
    ids = torch.tensor([0] * 5 + [1] * 6 + [2] * (seq_len - 11))[None].expand(2, seq_len)
    spec = Segments(ids) & Causal()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, seq_len, 2, 3, generator=g) for _ in range(3))
    x = {"q": q, "k": torch.nn.functional.normalize(k, dim=-1), "v": v,
         "beta": torch.rand(2, seq_len, 2, generator=g)}
    s0 = torch.randn(2, 2, 3, 3, generator=g)
    s0[0, 0, 1, 1] = float("nan")
    ref = single_delta(**x, visibility=spec, initial_state=s0)  # fp32: the baseline
    truth = single_delta(**{n: t.double() for n, t in x.items()}, visibility=spec,
                         initial_state=s0.double())
    reached = torch.zeros_like(ref, dtype=torch.bool)
    reached[0, :5, 0] = True
    assert torch.isnan(ref[reached]).all() and torch.isfinite(ref[~reached]).all()
    for layout in ("contiguous", "zigzag"):
        local = {n: shard(t, layout, rank, world) for n, t in x.items()}
        o = _gather(delta_attention(**local, visibility=spec, layout=layout, initial_state=s0),
                    layout, world)
        assert torch.isnan(o[0, :5, 0]).any(-1).all(), layout  # every reader is reached
        assert_close(o[~reached], truth[~reached], ref[~reached], name=f"o {layout}",
                     dtype=torch.float32)  # and nothing else
    return True


def test_nan_initial_state_stays_in_its_document(tmp_path):
    for world in (2, 3):
        run_process_group(_nan_state_job, world, str(tmp_path))


REFUSALS = {  # case: what the one message every rank raises must name
    "window": r"Window\(left=2, right=1\)", "striped": "striped",
    "beta": r"beta values must lie in \(0, 2\]", "spec": "visibility"}


def _refusal_job(rank, world):
    out = {}
    for which in REFUSALS:
        x = torch.randn(1, 4, 2, 3)
        beta = torch.full((1, 4, 2), 0.5)
        spec, layout = Causal(), "contiguous"
        if which == "window":
            spec = Window(2, 1)
        elif which == "striped":
            layout = "striped"
        elif which == "beta" and rank == 1:  # one rank's bad argument
            beta = beta * 5
        elif which == "spec" and rank == 1:  # ranks that disagree
            spec = Full()
        try:
            delta_attention(x, x, x, spec, beta=beta, layout=layout)
            out[which] = None
        except ValueError as e:
            out[which] = str(e)
    return out


def test_every_rank_raises_the_same_error(tmp_path):
    results = run_process_group(_refusal_job, 2, str(tmp_path))
    for which, match in REFUSALS.items():
        messages = {r[which] for r in results.values()}
        assert len(messages) == 1 and None not in messages, (which, results)
        msg = messages.pop()
        assert "delta" in msg and re.search(match, msg), (which, msg)


def test_world_of_one_is_the_single_process_op(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        x, _, _ = _inputs(7, 1, "value", "reverse", True)
        x["initial_state"] = x["initial_state"].float()
        for spec in (Full(), Chunked(2, lookahead=1), Segments(_docs(7, True)) & Prefix(4)):
            o, s = _call(delta_attention, x, spec)
            ro, rs = _call(single_delta, x, spec)
            torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="zigzag' needs an even number"):
            delta_attention(x["q"], x["k"], x["v"], Causal(), beta=x["beta"], layout="zigzag")
        with pytest.raises(ValueError, match="initial_state must have shape"):
            delta_attention(x["q"], x["k"], x["v"], Causal(), beta=x["beta"],
                            initial_state=torch.zeros(1))
        with pytest.raises(ValueError, match="return_final_state must be a bool"):
            delta_attention(x["q"], x["k"], x["v"], Causal(), beta=x["beta"],
                            return_final_state=1)
    finally:
        dist.destroy_process_group()
