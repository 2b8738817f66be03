"""Sequence parallel over torch.distributed: sharded == single-process, with real processes.

Each test spawns one gloo process group (CPU, 1 thread per process) and runs a batch of cases in
it; every rank checks outputs, lse and every gradient, gathered from all ranks, against the
single-process reference (tolerance from a same-precision eager baseline's own error). The harness
kills the group and fails if it does not finish within a hard timeout: nothing here can hang.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from causalmix import Causal, Chunked, Full, Prefix, Segments, Visibility, Window
from causalmix import softmax_attention as single_attention
from causalmix.checks import ArgumentTypeError
from causalmix.distributed import (
    LAYOUTS,
    linear_attention,
    positions,
    shard,
    softmax_attention,
    unshard,
    work_balance,
)
from causalmix.ops.linear import linear_attention as single_linear
from causalmix.testing import assert_close
from causalmix.visibility import KeyRange, Strided

HARD_TIMEOUT_S = 240.0  # whole process group, spawn included; the harness kills it after this
PG_TIMEOUT_S = 60.0  # torch.distributed op timeout inside a healthy group


class StrictPast(Visibility):
    """``j < i``: query 0 sees nothing (exercises empty rows: output 0, lse -inf, no NaN)."""

    def visible(self, b, i, j):
        return j < i

    def key_range(self, i):
        return KeyRange(None, i - 1)

    @property
    def lookahead_frames(self):
        return -1

    def __eq__(self, other):
        return isinstance(other, StrictPast)

    def __hash__(self):
        return hash("StrictPast")

    def __repr__(self):
        return "StrictPast()"


def make_specs(seq_len: int, batch: int) -> dict[str, Visibility]:
    g = torch.Generator().manual_seed(seq_len)
    docs = torch.sort(torch.randint(0, 4, (seq_len,), generator=g)).values
    buckets = torch.randint(0, 3, (seq_len,), generator=g)
    return {
        "causal": Causal(),
        "full": Full(),
        "prefix": Prefix(seq_len // 3),
        "prefix_batch": Prefix(torch.tensor([1, seq_len // 2 + 1][:batch])),
        "window": Window(5, 2),
        "chunked": Chunked(5, lookahead=1),
        "docs_causal": Segments(docs) & Causal(),
        "buckets_causal": Segments(buckets) & Causal(),  # not interval-shaped
        "chunk_or_window": Chunked(4) | Window(3),
        "strict_past": StrictPast(),
    }


# ------------------------------------------------------------------------------- the harness


def _worker(rank, world, store, job, args, results):
    torch.set_num_threads(1)
    try:
        timeout = datetime.timedelta(seconds=args.get("pg_timeout", PG_TIMEOUT_S))
        if job == "never_joins":
            t0 = time.monotonic()
            try:
                dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                        world_size=world, timeout=timeout)
            except RuntimeError as e:
                results.put((rank, "raised", f"{time.monotonic() - t0:.1f}s: {e}"))
                return
            results.put((rank, "error", "init_process_group returned without the other rank"))
            return
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timeout)
        try:
            out = JOBS[job](rank, world, **args.get("kwargs", {}))
        finally:
            if job != "dead_rank":
                dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # report everything to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_group(tmp_path, world, job, *, ranks=None, hard_timeout=HARD_TIMEOUT_S, **args):
    """Run ``JOBS[job]`` on ``ranks`` (default: all) of a ``world``-process gloo group; returns
    ``{rank: (status, payload)}`` and the exit codes. Kills everything after ``hard_timeout``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path / f"store_{job}_{world}")
    ranks = list(range(world)) if ranks is None else ranks
    procs = {r: ctx.Process(target=_worker, args=(r, world, store, job, args, results))
             for r in ranks}
    for p in procs.values():
        p.start()
    deadline = time.monotonic() + hard_timeout
    got = {}
    try:
        while len(got) < len(ranks):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
                got[rank] = (status, payload)
            except Exception:  # queue.Empty: check whether everyone still alive reported
                if all(not p.is_alive() for p in procs.values()):
                    # a last message may still be in the pipe
                    try:
                        while True:
                            rank, status, payload = results.get(timeout=0.5)
                            got[rank] = (status, payload)
                    except Exception:
                        break
        for p in procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in procs.items() if p.is_alive()]
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"ranks {hung} of job {job!r} were still running after {hard_timeout}s"
    return got, {r: p.exitcode for r, p in procs.items()}


def expect_ok(got, world):
    errors = [f"rank {r}: {payload}" for r, (status, payload) in sorted(got.items())
              if status != "ok"]
    assert not errors, "\n".join(errors)
    assert sorted(got) == list(range(world)), f"ranks that reported: {sorted(got)}"
    return {r: payload for r, (_, payload) in got.items()}


# ------------------------------------------------------------------------------- jobs (in ranks)


def _eager_baseline(q, k, v, spec, scale):
    """Plain attention in the inputs' own dtype: the error budget of a same-precision kernel."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, 2).transpose(1, 2)
    vv = v.repeat_interleave(group, 2).transpose(1, 2)
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    m = spec.mask(q.shape[1], k.shape[1])[:, None]
    lowest = torch.finfo(q.dtype).min
    p = torch.softmax(s.masked_fill(~m, lowest), dim=-1) * m
    lse = torch.logsumexp(s.masked_fill(~m, lowest), dim=-1)
    lse = torch.where(m.any(-1), lse, torch.full_like(lse, float("-inf")))
    return (p @ vv).transpose(1, 2), lse.transpose(1, 2)


def _loss(out, lse, w_out, w_lse):
    """A loss touching every output and every finite lse (fp32, fp64 for fp64 weights)."""
    dt = w_out.dtype
    finite = torch.where(torch.isfinite(lse), lse.to(dt), torch.zeros((), dtype=dt))
    return (out.to(dt) * w_out).sum() + (finite * w_lse).sum()


def _gather(x, world, layout, group=None):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, layout)


def _check_softmax_case(rank, world, layout, spec_name, seq_len, dtype, b=2, hq=4, hkv=2, d=8,
                        dv=6, group=None):
    spec = make_specs(seq_len, b)[spec_name]
    g = torch.Generator().manual_seed(1000 * seq_len + world)
    q = torch.randn(b, seq_len, hq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, seq_len, hkv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, seq_len, hkv, dv, generator=g).to(dtype).requires_grad_()
    w_out = torch.randn(b, seq_len, hq, dv, generator=g)
    w_lse = torch.randn(b, seq_len, hq, generator=g)
    scale = 1 / math.sqrt(d)
    full = (q, k, v)

    # truth: the dense definition in fp64 (the fp32 reference op agrees with it to fp32 accuracy;
    # measuring against it would count its own rounding as our error); baseline: the same dense
    # computation in the inputs' dtype
    wide = [t.detach().double().requires_grad_() for t in full]
    ref_o, ref_l = _eager_baseline(*wide, spec, scale)
    g_ref = torch.autograd.grad(_loss(ref_o, ref_l, w_out.double(), w_lse.double()), wide)
    base_o, base_l = _eager_baseline(q, k, v, spec, scale)
    g_base = torch.autograd.grad(_loss(base_o, base_l, w_out, w_lse), full)
    single_o = single_attention(q, k, v, spec, impl="reference")
    assert_close(single_o, ref_o, base_o, name="the single-process reference op itself")

    local = [shard(t.detach(), layout, rank, world).requires_grad_() for t in full]
    o, lse = softmax_attention(*local, spec, layout=layout, group=group, return_lse=True)
    if group is not None:  # also the plain call: the same output, no lse
        plain = softmax_attention(*local, spec, layout=layout, group=group)
        assert torch.equal(plain, o)
    assert o.dtype == dtype and o.shape == (b, seq_len // world, hq, dv)
    assert lse.dtype == torch.float32 and lse.shape == (b, seq_len // world, hq)
    sh = {"layout": layout, "rank": rank, "world": world}
    loss = _loss(o, lse, shard(w_out, **sh), shard(w_lse, **sh))
    g_loc = torch.autograd.grad(loss, local)

    # gather everything before asserting, so that a failing rank leaves no rank waiting
    o, lse, *g_all = (_gather(t, world, layout, group) for t in (o, lse, *g_loc))
    what = f"{layout} {spec_name} T={seq_len} W={world} {dtype}"
    assert_close(o, ref_o, base_o, name=f"{what} output")
    assert_close(lse, ref_l, base_l, name=f"{what} lse", dtype=dtype)
    for name, a, r, bl in zip("qkv", g_all, g_ref, g_base, strict=True):
        assert not torch.isnan(a).any(), f"{what}: NaN in d{name}"
        assert_close(a, r, bl, name=f"{what} d{name}")


def _check_shape_mismatch(rank, world):
    n = 4 if rank == 0 else 6
    x = torch.randn(1, n, 2, 8)
    try:
        softmax_attention(x, x, x, Causal(), layout="contiguous")
    except ValueError as e:
        assert "ranks disagree" in str(e) and "positions" in str(e), str(e)
        return "raised"
    raise AssertionError("mismatched shard lengths were accepted")


def _expect_disagreement(call, *names):
    try:
        call()
    except ValueError as e:
        msg = str(e)
        assert "ranks disagree" in msg, msg
        for name in names:
            assert f"{name} (rank 0: " in msg, (name, msg)
        return msg
    raise AssertionError(f"ranks passing different {names} were accepted")


def _check_argument_mismatch(rank, world):
    """Every argument that must agree, differing on one rank: every rank raises the same
    ValueError before any exchange, and the group stays usable afterwards."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 8, 2, 4, generator=g)
    ids = torch.arange(8 * world) // 3
    other = ids.clone()
    other[3] = 0 if rank == 1 else other[3]  # one boundary moved: as many runs
    sm, lin = softmax_attention, linear_attention
    cases = [
        (lambda: sm(x, x, x, Causal(), layout=("zigzag", "contiguous")[rank]), ["layout"]),
        (lambda: sm(x, x, x, Prefix(3 + rank), layout="striped"), ["visibility"]),
        # same repr, different content: compared by value, not by repr
        (lambda: sm(x, x, x, Segments(other) & Causal(), layout="contiguous"), ["visibility"]),
        (lambda: sm(x, x, x.to((torch.float32, torch.float64)[rank]), Causal(),
                    layout="contiguous"), ["v"]),
        (lambda: sm(x, x, x, Causal(), layout="contiguous", scale=(None, 0.5)[rank]), ["scale"]),
        (lambda: sm(x.clone().requires_grad_(rank == 0), x, x, Causal(), layout="contiguous"),
         ["requires_grad"]),
        # a bad argument on one rank only: all raise together (none waits for the other)
        (lambda: sm(x, x, x, Causal(), layout=("contiguous", "ring")[rank]), ["layout"]),
        (lambda: sm(x, x[:, : 8 - 2 * rank], x[:, : 8 - 2 * rank], Window(2 + rank),
                    layout="contiguous"), ["visibility", "k", "v"]),
        (lambda: lin(x, x, x, Causal(), decay=torch.tensor([0.5, 0.9 + 0.1 * rank])),
         ["decay"]),
        (lambda: lin(x, x, x, (Causal(), Full())[rank], layout="zigzag"), ["visibility"]),
    ]
    for call, names in cases:
        _expect_disagreement(call, *names)
    # the group is still in step: an agreeing call runs
    out = sm(x, x, x, Segments(ids) & Causal(), layout="contiguous")
    assert out.shape == x.shape


def _same_error_everywhere(call, *must_contain, kind=ValueError):
    """``call()`` must raise ``kind`` on this rank with a message naming ``must_contain``; every
    rank must raise the same type with the same message. Returns the message."""
    try:
        call()
    except ValueError as e:
        got = (type(e).__name__, str(e))
    else:
        got = ("no error", "")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, got)
    assert all(x == everyone[0] for x in everyone), everyone
    assert got[0] == kind.__name__, got
    for text in must_contain:
        assert text in got[1], (text, got[1])
    return got[1]


def _dense_gated(q, k, v, spec, lg, lgr):
    """The gated linear mixer by its definition, in fp64: ``w_ij = prod_{s=j+1..i} exp(g_s)``
    (j <= i), ``prod_{s=i..j-1} exp(r_s)`` (j > i), each weight its own product, so a NaN
    gate reaches exactly the weights it is a factor of; invisible pairs are left out."""
    t = q.shape[1]
    g, r = lg.double(), lgr.double()
    w = torch.ones(g.shape[0], t, t, g.shape[2], dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            if j < i:
                w[:, i, j] = torch.exp(g[:, j + 1: i + 1].sum(1))
            elif j > i:
                w[:, i, j] = torch.exp(r[:, i:j].sum(1))
    vis = spec.mask(t, t)[..., None]  # [B', T, T, 1]
    s = torch.einsum("bihd,bjhd->bijh", q.double(), k.double())
    a = torch.where(vis, w * s, torch.zeros((), dtype=torch.float64))
    return torch.einsum("bijh,bjhe->bihe", a, v.double()).to(q.dtype)


def _check_nan_gates(rank, world, reverse=False):
    """NaN in a gate is not refused (NaN in, NaN out): exactly the outputs whose weights hold
    the NaN gate are NaN (the dense definition, each weight a product of the gates in between),
    and no other: nothing leaks to a rank or a query that cannot see it."""
    g = torch.Generator().manual_seed(12)
    seq_len = 8 * world
    q, k, v = (torch.randn(2, seq_len, 2, 4, generator=g) for _ in range(3))
    cases = [  # (spec, layout, position of a NaN forward gate, of a NaN reverse gate)
        (Causal(), "contiguous", 10, None),
        (Causal(), "zigzag", 3, None),
        (Full(), "contiguous", 12, None),
        (Full(), "zigzag", 2, None),
        (Prefix(torch.tensor([5, 14])), "contiguous", 13, None),
    ]
    if reverse:  # NaN reverse gates (their weights run to later keys)
        cases = [
            (Full(), "contiguous", None, 12),
            (Prefix(5), "zigzag", None, 12),  # the reverse gate past the prefix is never used
            (Prefix(torch.tensor([5, 14])), "contiguous", None, 3),
        ]
    for spec, layout, at_f, at_r in cases:
        lg, lgr = (-torch.rand(2, seq_len, 2, generator=g) for _ in range(2))
        if at_f is not None:
            lg[:, at_f, 0] = float("nan")
        if at_r is not None:
            lgr[:, at_r, 1] = float("nan")
        rev = None if isinstance(spec, Causal) else lgr
        ref = _dense_gated(q, k, v, spec, lg, lgr)
        sh = {"layout": layout, "rank": rank, "world": world}
        out = linear_attention(*(shard(t, **sh) for t in (q, k, v)), spec, layout=layout,
                               log_gate=shard(lg, **sh),
                               reverse_log_gate=None if rev is None else shard(rev, **sh))
        got = _gather(out, world, layout)
        what = f"{spec!r} {layout} NaN at {at_f, at_r}"
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), what
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-4, atol=1e-5, msg=what)


def _check_refusals(rank, world):
    """A bad argument on one rank (or on all), or an option that differs: every rank raises the
    same error before any exchange, naming the rank and the reason; the group stays in step."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 8, 2, 4, generator=g)
    lg = -torch.rand(1, 8, 2, generator=g)
    bad_lg = lg.clone()
    bad_lg[0, 3, 1] = 0.5 if rank == 1 else bad_lg[0, 3, 1]
    inf_lg = lg.clone()
    inf_lg[0, 0, 0] = float("-inf") if rank == 0 else inf_lg[0, 0, 0]
    nan_decay = torch.tensor([0.5, float("nan") if rank == 1 else 0.9])
    mine = (0, 1)[rank]
    sm, lin = softmax_attention, linear_attention
    refused = "rank 1 refused its arguments"
    cases = [
        # linear: a per-rank value its checks refuse
        (lambda: lin(x, x, x, Causal(), log_gate=bad_lg),
         [refused, "log_gate values must be <= 0"]),
        (lambda: lin(x, x, x, Full(), log_gate=inf_lg, layout="zigzag"),
         ["rank 0 refused its arguments", "finite"]),
        (lambda: lin(x, x, x, Causal(), decay=nan_decay), ["ranks disagree", "decay (rank 0: ",
                                                          refused, "(0, 1]"]),
        (lambda: lin(x, x, x, Causal(), decay=torch.tensor([0.5, float("nan")])),
         ["ranks [0, 1] refused their arguments", "(0, 1]"]),
        # linear: a wrong shape on one rank
        (lambda: lin(x, x, x, Causal(), log_gate=lg[:, : 8 - mine]),
         ["ranks disagree", "log_gate (rank 0: ", refused, "log_gate must have shape"]),
        (lambda: lin(x if rank == 0 else x[0], x, x, Causal()),
         ["ranks disagree", "q (rank 0: ", refused, "q must be 4-D"]),
        # linear: options that differ, or are bad everywhere
        (lambda: lin(x, x, x, Causal(), impl=("chunk", "reference")[rank]), ["impl (rank 0: "]),
        (lambda: lin(x, x, x, Causal(), chunk_size=(16, 8)[rank]), ["chunk_size (rank 0: "]),
        (lambda: lin(x, x, x, Causal(), chunk_size=(16, 0)[rank]),
         ["chunk_size (rank 0: ", refused, "chunk_size must be >= 1"]),
        (lambda: lin(x, x, x, Causal(), impl="nope"),
         ["ranks [0, 1] refused their arguments", "impl must be"]),
        (lambda: lin(x, x, x, Prefix(torch.tensor([2, 3])), layout="zigzag"),
         ["ranks [0, 1] refused their arguments", "is for batch size 2"]),
        # softmax: the same classes
        (lambda: sm(x, x, x, Causal(), layout="contiguous", scale=(0.5, float("nan"))[rank]),
         ["scale (rank 0: ", refused, "scale must be finite"]),
        (lambda: sm(x, x, x, Causal(), layout="striped", scale=(0.5, 0.6)[rank]),
         ["scale (rank 0: "]),
        (lambda: sm(x, x, x[..., :3], Causal(), layout="contiguous", return_lse=(True, 1)[rank]),
         [refused, "return_lse must be a bool"], ArgumentTypeError),
        (lambda: sm(x, x[..., : 4 - mine], x, Causal(), layout="contiguous"),
         ["k (rank 0: ", refused, "head dims differ"]),
        (lambda: sm(x[:, :7], x[:, :7], x[:, :7], Causal(), layout="zigzag"),
         ["ranks [0, 1] refused their arguments", "even number of positions"]),
        (lambda: sm(x, x, x, Segments(torch.arange(8 * world - rank)), layout="striped"),
         ["visibility (rank 0: ", refused, "defines positions"]),
    ]
    for call, texts, *kind in cases:
        _same_error_everywhere(call, *texts, kind=kind[0] if kind else ValueError)
    # a wrong type on every rank, all agreeing: the type error (also a ValueError) everywhere
    _same_error_everywhere(lambda: lin(x, x, x, Causal(), decay="0.9"),
                           "ranks [0, 1] refused their arguments",
                           "decay must be", kind=ArgumentTypeError)
    _check_nan_gates(rank, world)
    # the group is still in step: agreeing calls run
    assert sm(x, x, x, Causal(), layout="zigzag").shape == x.shape
    assert lin(x, x, x, Full(), log_gate=lg, layout="zigzag").shape == x.shape


def job_dead_rank(rank, world):
    if rank == world - 1:
        os._exit(3)  # dies without a word, mid-job
    x = torch.randn(1, 8, 2, 8)
    t0 = time.monotonic()
    try:
        softmax_attention(x, x, x, Causal(), layout="zigzag")
        out = softmax_attention(x, x, x, Causal(), layout="zigzag")
        out.sum()
    except RuntimeError as e:  # gloo reports a closed connection or a timeout
        return f"raised after {time.monotonic() - t0:.1f}s: {type(e).__name__}"
    raise AssertionError("a ring with a dead rank returned a result")


def _check_linear_case(rank, world, spec_name, seq_len, dtype, with_decay, layout="contiguous",
                       b=2, h=3, d=8, dv=6, group=None):
    spec = make_specs(seq_len, b)[spec_name]
    g = torch.Generator().manual_seed(2000 * seq_len + world)
    q = torch.randn(b, seq_len, h, d, generator=g).to(dtype) / math.sqrt(d)
    k = torch.randn(b, seq_len, h, d, generator=g).to(dtype)
    v = torch.randn(b, seq_len, h, dv, generator=g).to(dtype)
    decay = torch.tensor([0.9, 0.99, 1.0][:h]) if with_decay else None
    w_out = torch.randn(b, seq_len, h, dv, generator=g)

    def run(inputs, dec, impl):
        out = single_linear(*inputs, spec, decay=dec, impl=impl)
        wanted = [*inputs] + ([dec] if dec is not None else [])
        return out, torch.autograd.grad((out.float() * w_out).sum(), wanted)

    def leaves(ts, dt):
        return [t.to(dt).requires_grad_() for t in ts]

    wide = torch.float64
    ref_o, g_ref = run(leaves((q, k, v), wide), leaves((decay,), wide)[0] if with_decay else None,
                       "reference")
    base_o, g_base = run(leaves((q, k, v), dtype),
                         leaves((decay,), torch.float32)[0] if with_decay else None, "reference")

    local = [shard(t, layout, rank, world).requires_grad_() for t in (q, k, v)]
    dec = decay.clone().requires_grad_() if with_decay else None
    o = linear_attention(*local, spec, layout=layout, decay=dec, group=group, chunk_size=4)
    assert o.dtype == dtype and o.shape == (b, seq_len // world, h, dv)
    loss = (o.float() * shard(w_out, layout, rank, world)).sum()
    g_loc = torch.autograd.grad(loss, [*local] + ([dec] if with_decay else []))

    # gather everything before asserting, so that a failing rank leaves no rank waiting
    o, *g_all = (_gather(t, world, layout, group) for t in (o, *g_loc[:3]))
    if with_decay:  # each rank holds its own loss's d(decay): the total is their sum
        total = g_loc[3].clone()
        dist.all_reduce(total, group=group)
    what = f"linear {layout} {spec_name} T={seq_len} W={world} {dtype} decay={with_decay}"
    assert_close(o, ref_o, base_o, name=f"{what} output")
    for name, a, r, bl in zip("qkv", g_all, g_ref[:3], g_base[:3], strict=True):
        assert_close(a, r, bl, name=f"{what} d{name}")
    if with_decay:
        assert_close(total, g_ref[3], g_base[3], name=f"{what} d(decay)", dtype=dtype)


def _check_subgroups(rank, world):
    """Two rings in one world, {0, 2} and {1, 3}: group ranks differ from global ranks."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    grank = rank // 2
    _check_softmax_case(grank, 2, "striped", "docs_causal", 2 * 9, torch.float32, group=mine)
    _check_softmax_case(grank, 2, "zigzag", "prefix", 2 * 10, torch.float32, group=mine)
    _check_linear_case(grank, 2, "full", 2 * 10, torch.float32, True, "zigzag", group=mine)


SECTIONS = {
    "subgroups": _check_subgroups,
    "softmax": _check_softmax_case,
    "linear": _check_linear_case,
    "shape_mismatch": _check_shape_mismatch,
    "argument_mismatch": _check_argument_mismatch,
    "refusals": _check_refusals,
    "nan_reverse_gates": lambda rank, world: _check_nan_gates(rank, world, reverse=True),
}


def job_sections(rank, world, sections):
    """Run every section's cases; ``{section: None (passed) or the first failure}``. A failure
    may leave the ranks out of step, so the remaining sections are not run (reported)."""
    report = {}
    for name, cases in sections.items():
        if any(report.values()):
            report[name] = "not run: an earlier section failed"
            continue
        try:
            for case in cases:
                SECTIONS[name](rank, world, *case)
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
    return report


JOBS = {
    "sections": job_sections,
    "dead_rank": job_dead_rank,
}

# ------------------------------------------------------------------------------- the tests

SPEC_NAMES = list(make_specs(8, 2))


LINEAR_SPECS = ["causal", "full", "prefix", "prefix_batch", "docs_causal"]


def _sections(world):
    """Every case for one process group of ``world`` ranks (one spawn per world size)."""
    softmax = []
    for layout in LAYOUTS:
        # odd per-rank lengths where the layout allows them (zigzag: odd chunks)
        odd = 2 * world * 7 if layout == "zigzag" else world * 13
        softmax += [(layout, spec, odd, torch.float32) for spec in SPEC_NAMES]
        softmax.append((layout, "docs_causal", 2 * world * 12, torch.bfloat16))
    if world == 2:
        softmax += [(layout, "causal", 2 * 2 * 25, torch.bfloat16) for layout in LAYOUTS]
        softmax += [("striped", "window", 2, torch.float32),
                    ("contiguous", "causal", 2, torch.float32),
                    ("striped", "docs_causal", 2 * 113, torch.float32),
                    ("zigzag", "buckets_causal", 2 * 2 * 63, torch.float32),
                    ("contiguous", "prefix_batch", 2 * 250, torch.float32)]
    else:
        softmax += [("zigzag", "causal", 4 * 2 * 16, torch.bfloat16),
                    ("striped", "prefix", 4 * 31, torch.bfloat16),
                    ("contiguous", "window", 4 * 63, torch.float32),
                    ("striped", "chunked", 4 * 113, torch.float32)]
    linear = [(spec, world * n, torch.float32, dec) for spec in LINEAR_SPECS
              for n in (1, 7) for dec in (False, True)]
    linear += [(spec, world * 2 * n, torch.float32, dec, "zigzag") for spec in LINEAR_SPECS
               for n in (1, 5) for dec in (False, True)]
    linear += [(spec, world * 14, torch.bfloat16, True, layout) for spec in ("causal", "full")
               for layout in ("contiguous", "zigzag")]
    linear += [("prefix", world * 63, torch.float32, True),
               ("prefix_batch", world * 2 * 25, torch.float32, True, "zigzag")]
    sections = {"softmax": softmax, "linear": linear}
    if world == 2:
        sections["shape_mismatch"] = [()]
        sections["argument_mismatch"] = [()]
        sections["refusals"] = [()]
        sections["nan_reverse_gates"] = [()]  # last: it fails until the local op is exact
    else:
        sections["subgroups"] = [()]
    return sections


_GROUPS: dict = {}


@pytest.fixture(scope="module")
def group_report(tmp_path_factory):
    """Runs each world size's process group once (lazily) and hands out its section report."""

    def get(world):
        if world not in _GROUPS:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            got, _ = run_group(tmp, world, "sections", kwargs={"sections": _sections(world)})
            _GROUPS[world] = expect_ok(got, world)
        return _GROUPS[world]

    yield get
    _GROUPS.clear()


def expect_section(reports, section):
    failures = [f"rank {r}: {rep[section]}" for r, rep in sorted(reports.items())
                if rep[section] is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_softmax_sharded_equals_single_process_every_layout_and_spec(group_report, world):
    expect_section(group_report(world), "softmax")


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_linear_contiguous_and_zigzag_equal_single_process(group_report, world):
    expect_section(group_report(world), "linear")


@pytest.mark.distributed
def test_mismatched_shards_raise_on_every_rank(group_report):
    expect_section(group_report(2), "shape_mismatch")


@pytest.mark.distributed
def test_mismatched_arguments_raise_on_every_rank_before_any_exchange(group_report):
    expect_section(group_report(2), "argument_mismatch")


@pytest.mark.distributed
def test_a_bad_argument_on_one_rank_raises_the_same_error_on_every_rank(group_report):
    expect_section(group_report(2), "refusals")


@pytest.mark.distributed
def test_nan_reverse_gates_reach_exactly_the_outputs_that_hold_them(group_report):
    expect_section(group_report(2), "nan_reverse_gates")


@pytest.mark.distributed
def test_rings_on_subgroups_equal_single_process(group_report):
    expect_section(group_report(4), "subgroups")


def test_world_of_one_equals_single_process(tmp_path):
    """A one-process group (in this process): the ring degenerates to the local op."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        for layout in LAYOUTS:
            _check_softmax_case(0, 1, layout, "docs_causal", 14, torch.float32)
        _check_linear_case(0, 1, "prefix", 7, torch.float32, True)
        _check_linear_case(0, 1, "full", 8, torch.float32, True, "zigzag")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    got, codes = run_group(tmp_path, 2, "dead_rank", pg_timeout=5, hard_timeout=120)
    assert codes[1] == 3
    assert got.get(0, (None,))[0] == "ok", got
    assert got[0][1].startswith("raised"), got[0][1]


@pytest.mark.distributed
def test_rank_that_never_joins_makes_init_fail_not_hang(tmp_path):
    got, _ = run_group(tmp_path, 2, "never_joins", ranks=[0], pg_timeout=3, hard_timeout=120)
    assert got.get(0, (None,))[0] == "raised", got


# ------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(layout, world):
    per = 2 * 5 if layout == "zigzag" else 7
    seq_len = world * per
    x = torch.randn(3, seq_len, 2)
    shards = [shard(x, layout, r, world) for r in range(world)]
    assert torch.equal(unshard(shards, layout), x)
    held = torch.cat([positions(layout, seq_len, r, world) for r in range(world)])
    assert torch.equal(torch.sort(held).values, torch.arange(seq_len))
    for r in range(world):
        assert torch.equal(shards[r], x[:, positions(layout, seq_len, r, world)])
    assert torch.equal(shard(x.transpose(0, 1), layout, 1 % world, world, dim=0),
                       shards[1 % world].transpose(0, 1))


def test_layout_positions_are_as_documented():
    assert positions("contiguous", 8, 1, 2).tolist() == [4, 5, 6, 7]
    assert positions("zigzag", 8, 0, 2).tolist() == [0, 1, 6, 7]
    assert positions("zigzag", 8, 1, 2).tolist() == [2, 3, 4, 5]
    assert positions("striped", 8, 1, 2).tolist() == [1, 3, 5, 7]


@pytest.mark.parametrize(("layout", "seq_len", "world", "need"), [
    ("contiguous", 10, 4, "multiple of world = 4"),
    ("striped", 7, 2, "multiple of world = 2"),
    ("zigzag", 12, 4, r"multiple of 2 \* world = 8"),
])
def test_lengths_that_do_not_divide_raise(layout, seq_len, world, need):
    with pytest.raises(ValueError, match=need):
        shard(torch.zeros(1, seq_len), layout, 0, world)
    with pytest.raises(ValueError, match=need):
        positions(layout, seq_len, 0, world)
    with pytest.raises(ValueError, match=need):
        work_balance(Causal(), layout, world, seq_len)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="zigzag.*even number of positions per rank"):
        softmax_attention(x, x, x, Causal(), layout="zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        softmax_attention(x, x, x, Causal(), layout="ring")
    with pytest.raises(TypeError, match="visibility"):
        work_balance("causal", "striped", 2, 8)
    with pytest.raises(ValueError, match="rank must be < world"):
        shard(torch.zeros(1, 8), "striped", 2, 2)
    with pytest.raises(RuntimeError, match="not initialised"):
        softmax_attention(x, x, x, Causal(), layout="striped")
    with pytest.raises(ValueError, match="layout 'striped' is not supported by the linear mixer"):
        linear_attention(x, x, x, Causal(), layout="striped")
    with pytest.raises(ValueError, match="zigzag.*even number of positions per rank"):
        linear_attention(x, x, x, Causal(), layout="zigzag")
    with pytest.raises(ValueError, match=r"Window\(left=3, right=0\).*supported: Causal"):
        linear_attention(x, x, x, Window(3), layout="contiguous")
    with pytest.raises(ValueError, match=r"decay must have shape \[H\] = \[2\]"):
        linear_attention(x, x, x, Causal(), decay=torch.ones(3))


def test_wrong_types_raise_argument_type_errors():
    """Wrong types raise ArgumentTypeError (a TypeError that is also a ValueError) in every
    public function of causalmix.distributed; checked before torch.distributed is asked."""
    x = torch.randn(1, 4, 2, 8)
    cases = [
        lambda: shard("x", "striped", 0, 2),
        lambda: unshard("x", "striped"),
        lambda: unshard([x, "y"], "striped"),
        lambda: work_balance("causal", "striped", 2, 8),
        lambda: softmax_attention(x, x, "v", Causal(), layout="striped"),
        lambda: softmax_attention(x, x, x, Causal(), layout="striped", scale="big"),
        lambda: softmax_attention(x, x, x, Causal(), layout="striped", return_lse="yes"),
        lambda: softmax_attention(x, x, x, "causal", layout="striped"),
        lambda: linear_attention(x, x, x, Causal(), decay="0.9"),
        lambda: linear_attention(x, x, x, Causal(), log_gate=[0.0]),
    ]
    for call in cases:
        with pytest.raises(ArgumentTypeError):
            call()
    for call in (lambda: shard(x, "striped", 0, 2, dim="1"),  # ints by check_int: ValueError
                 lambda: positions("striped", 8, "0", 2),
                 lambda: linear_attention(x, x, x, Causal(), chunk_size=0),
                 lambda: linear_attention(x, x, x, Causal(), impl="fast")):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("spec_name", ["causal", "full", "prefix_batch", "window", "chunked",
                                       "docs_causal", "buckets_causal", "chunk_or_window"])
@pytest.mark.parametrize(("q_start", "q_stride", "k_start", "k_stride"), [
    (0, 1, 5, 1), (1, 4, 0, 4), (3, 4, 2, 4), (2, 3, 7, 1), (0, 2, 1, 5),
])
def test_strided_spec_is_the_spec_at_the_mapped_positions(spec_name, q_start, q_stride, k_start,
                                                          k_stride):
    """The wrapper the striped layout runs on: mask and (analytic) tile counts are exact."""
    seq_len = 60
    spec = make_specs(seq_len, 2)[spec_name]
    nq = (seq_len - q_start + q_stride - 1) // q_stride
    nk = (seq_len - k_start + k_stride - 1) // k_stride
    wrapped = Strided(spec, q_start, q_stride, k_start, k_stride)
    qi = q_start + q_stride * torch.arange(nq)
    kj = k_start + k_stride * torch.arange(nk)
    want = spec.mask(seq_len, seq_len)[:, qi][:, :, kj]
    assert torch.equal(wrapped.mask(nq, nk), want)
    for bq, bk in ((4, 3), (7, 16)):
        counts = wrapped.tile_counts(nq, nk, bq, bk)
        pad = torch.nn.functional.pad(want.long(), (0, (-nk) % bk, 0, (-nq) % bq))
        dense = pad.view(pad.shape[0], -(-nq // bq), bq, -(-nk // bk), bk).sum((2, 4))
        assert torch.equal(counts, dense.expand_as(counts))


@pytest.mark.parametrize("spec_name", ["causal", "prefix", "window", "docs_causal",
                                       "buckets_causal", "chunk_or_window"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_work_balance_counts_are_exact(layout, spec_name):
    world, seq_len = 4, 48
    spec = make_specs(seq_len, 1)[spec_name]
    rep = work_balance(spec, layout, world, seq_len)
    mask = spec.mask(seq_len, seq_len).sum(0)  # [T, T] summed over the spec's batch
    for r in range(world):
        assert rep.pairs[r] == int(mask[positions(layout, seq_len, r, world)].sum())
    assert rep.total == int(mask.sum())
    assert rep.max_over_mean == pytest.approx(max(rep.pairs) / (rep.total / world))


def test_work_balance_causal_striped_and_zigzag_beat_contiguous():
    for world in (4, 16):
        cont = work_balance(Causal(), "contiguous", world, 64 * world).max_pairs
        for layout in ("zigzag", "striped"):
            assert work_balance(Causal(), layout, world, 64 * world).max_pairs <= 0.6 * cont
