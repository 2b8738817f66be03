"""Chunked linear attention (causalmix) measured side by side in one run.

For T in 2048 .. 65536 and the specs Causal / Full / Prefix(T/2), all with per-head decay
(0.9 .. 0.9999), fp32, B=1, H=4, D=Dv=64: time per token of ``chunk`` forward and
forward+backward, the naive quadratic reference (``impl="reference"``, dense masked, fp32) where
it fits, the achieved GFLOP/s of the chunk algorithm (the matmul FLOPs it executes) as a ratio of
the machine's matmul GFLOP/s measured in the same run, and peak memory of forward+backward.

Timing: each case is run once to warm up, then ``--reps`` times; the minimum is reported (the
2-core host is shared, and its load only ever adds time). Cases of one T are interleaved
repetition by repetition so that their ratios are measured side by side. The T-scaling ratio
(65536 vs 2048) comes from a separate section that interleaves all lengths round by round.

Memory: every memory case runs in a fresh subprocess that imports torch, warms up on a tiny
problem, reads its resident set (``/proc/self/statm``), allocates q, k, v, runs forward and
backward (loss = sum(o * do)) and reads ``VmHWM`` from ``/proc/self/status`` (the kernel's
high-water mark of this process's resident set; not ``ru_maxrss``, which Linux carries over
from the parent across fork/exec). The figure is ``VmHWM - RSS before the inputs``:
everything the case itself held at its peak, inputs included. It is compared with the bytes
of q, k, v, o, do and dq, dk, dv (8 tensors of ``[B, T, H, 64]`` fp32), the "memory of q,
k, v, o and their gradients".

The naive reference at T=8192 is run one head at a time (the same FLOPs as all four at once,
summed; a 4-head [4, T, T] fp32 graph would need several GB on a machine shared with others).

    python benchmarks/linear.py                 # the full table (several minutes)
    python benchmarks/linear.py --quick         # T in 2048, 8192; memory at 8192 only
    python benchmarks/linear.py --threads 1     # torch threads (default: torch's own)
    python benchmarks/linear.py --gated-only --threads 1   # only the gated section
    python benchmarks/linear.py --gla-only --threads 1     # only the GLA section

Gated section (issue 12): per-token log-gates ``log_gate`` (differentiated) against the
constant decay, ``Full()`` with a reverse gate, and a straightforward PyTorch chunked form with
autograd (the peer: the pure-PyTorch chunked simple-GLA / SSD form that gated-linear-attention
libraries ship, e.g. flash-linear-attention's ``torch_simple_gla``: chunk-local cumsum, masked
``exp(g_i - g_j)`` tiles, per-chunk states written into a preallocated tensor; and, for
context, the same with the states appended to a list and stacked). Contenders are interleaved
round by round; ratios are per round, reported as median [min, max].

GLA section (issue 21): per key dimension log-gates ``log_gate: [B, T, H, D]`` (gated linear
attention, differentiated) against the scalar gate ``[B, T, H]`` (both causal, fwd+bwd), and
against a plain PyTorch chunked GLA with autograd (the peer, written here in the form
gated-linear libraries ship as their CPU reference, e.g. flash-linear-attention's naive chunk
GLA: chunk-local cumulative sums, ``q * exp(b)`` and ``k * exp(-b)`` inside a chunk -- which
overflows for strong gates, harmless for the mild ones measured here --, ``k * exp(B - b)``
into per-chunk states written into a preallocated tensor; and, for context, the same with the
states appended to a list and stacked). Rounds interleaved; per-token T=32768 / T=2048 as for
the gated rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from causalmix.ops.linear import linear_attention
from causalmix.visibility import Causal, Full, Prefix

B, H, D = 1, 4, 64
DECAY = (0.9, 0.99, 0.999, 0.9999)


def spec_for(name: str, t: int):
    return {"causal": Causal(), "full": Full(), "prefix": Prefix(t // 2)}[name]


def inputs(t: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, t, H, D, generator=g).requires_grad_(grad) for _ in range(3))
    do = torch.randn(B, t, H, D, generator=g)
    return q, k, v, do


def step(q, k, v, do, spec, *, grad: bool, impl: str, c: int):
    dec = torch.tensor(DECAY)
    if not grad:
        with torch.no_grad():
            linear_attention(q, k, v, spec, decay=dec, impl=impl, chunk_size=c)
        return
    o = linear_attention(q, k, v, spec, decay=dec, impl=impl, chunk_size=c)
    o.backward(do)
    q.grad = k.grad = v.grad = None


def chunk_flops(t: int, c: int, name: str, grad: bool) -> float:
    """Matmul FLOPs the chunk algorithm executes (per head, summed over chunks)."""
    n = -(-t // c)
    tile = 2 * c * c * D  # one [C, C] x [C, D] product
    state = 2 * c * D * D  # one [C, D] x [D, D] product
    fwd, bwd = 2 * tile + 2 * state, 5 * tile + 4 * state  # causal part
    live = {"causal": 0.0, "full": 1.0, "prefix": 0.5}[name]  # chunks with a reverse part
    fwd_r, bwd_r = 2 * state, 5 * state
    per_chunk = fwd + live * fwd_r + ((bwd + live * bwd_r) if grad else 0)
    return n * per_chunk * H * B


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def tile_ceiling(c: int, t: int = 8192) -> float:
    """GFLOP/s of the chunk algorithm's products at their best: every ``[C, C] x [C, D]`` and
    ``[C, D] x [D, D]`` product of T / C chunks and H heads in ONE batched matmul each (no
    per-chunk Python, no masks, no weights), measured here; compared with :func:`matmul_gflops`
    it is the ceiling the small tiles leave on this machine."""
    n = B * H * -(-t // c)
    att, vv = torch.randn(n, c, c), torch.randn(n, c, D)
    qq, ss = torch.randn(n, c, D), torch.randn(n, D, D)
    flops = 2 * n * c * c * D + 2 * n * c * D * D

    def both():
        torch.bmm(att, vv)
        torch.bmm(qq, ss)

    both()
    return flops / min(_time(both) for _ in range(5)) / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def naive_time(t: int, name: str, grad: bool) -> float:
    """Reference (dense O(T^2)) time, one head at a time, summed."""
    spec = spec_for(name, t)
    total = 0.0
    for h in range(H):
        g = torch.Generator().manual_seed(h)
        q, k, v = (torch.randn(B, t, 1, D, generator=g).requires_grad_(grad) for _ in range(3))
        do = torch.randn(B, t, 1, D, generator=g)
        dec = torch.tensor(DECAY[h:h + 1])

        def run(q=q, k=k, v=v, do=do, dec=dec):
            if grad:
                linear_attention(q, k, v, spec, decay=dec, impl="reference").backward(do)
            else:
                with torch.no_grad():
                    linear_attention(q, k, v, spec, decay=dec, impl="reference")

        total += _time(run)
    return total


def memory_case(t: int, name: str, c: int, threads: int) -> dict:
    code = f"""
import json, torch, sys
sys.path.insert(0, {repr(sys.path[0])})
torch.set_num_threads({threads})
from linear import inputs, step, spec_for
q, k, v, do = inputs(64, True)
step(q, k, v, do, spec_for({name!r}, 64), grad=True, impl="chunk", c={c})
del q, k, v, do
page = 4096
before = int(open("/proc/self/statm").read().split()[1]) * page
q, k, v, do = inputs({t}, True)
step(q, k, v, do, spec_for({name!r}, {t}), grad=True, impl="chunk", c={c})
peak = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(json.dumps({{"before": before, "peak": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    used = res["peak"] - res["before"]
    tensors = 8 * B * t * H * D * 4
    return {"used_mb": used / 2**20, "tensors_mb": tensors / 2**20, "ratio": used / tensors}


def time_length(t: int, names, reps: int, c: int) -> dict:
    """us/token of chunk fwd and fwd+bwd for every spec at length t, interleaved."""
    data = {(n, gr): inputs(t, gr) for n in names for gr in (False, True)}
    out: dict = {}

    def run(n, gr):
        step(*data[(n, gr)], spec_for(n, t), grad=gr, impl="chunk", c=c)

    for n in names:
        for gr in (False, True):
            run(n, gr)  # warm-up
    for _ in range(reps):
        for n in names:
            for gr in (False, True):
                secs = _time(lambda n=n, gr=gr: run(n, gr))
                out[(t, n, gr)] = min(out.get((t, n, gr), float("inf")), secs / t * 1e6)
    return out


def time_scaling(ts, reps: int, c: int) -> dict:
    """Causal fwd+bwd us/token at every T, interleaved: each round times every T once, and a
    short T is repeated (max(T) / T runs, min taken) so that every T's sample spans about the
    same wall time. Host load then hits all lengths alike, unlike the per-T table whose rows
    are minutes apart."""
    data = {t: inputs(t, True) for t in ts}
    spec = {t: spec_for("causal", t) for t in ts}
    out = {t: float("inf") for t in ts}
    for t in ts:
        step(*data[t], spec[t], grad=True, impl="chunk", c=c)  # warm-up
    for _ in range(reps):
        for t in ts:
            for _ in range(max(1, max(ts) // t)):
                secs = _time(lambda t=t: step(*data[t], spec[t], grad=True, impl="chunk", c=c))
                out[t] = min(out[t], secs / t * 1e6)
    return out


# ------------------------------------------------------------------------------- gated rows


def gated_inputs(t: int):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, t, H, D, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, t, H, D, generator=g)
    lg = (-0.1 * torch.rand(B, t, H, generator=g)).requires_grad_()  # log-gates in [-0.1, 0]
    lgr = (-0.1 * torch.rand(B, t, H, generator=g)).requires_grad_()
    return q, k, v, do, lg, lgr


def peer_chunk_gla(q, k, v, g, c: int, stack: bool = False):
    """The peer: a straightforward chunked gated linear attention in plain PyTorch (autograd),
    ``q, k, v: [B, T, H, D]``, ``g: [B, T, H]`` (T a multiple of c) -> ``[B, T, H, D]``."""
    b, t, h, d = q.shape
    n = t // c
    q, k, v = (x.transpose(1, 2).reshape(b, h, n, c, d) for x in (q, k, v))
    g = g.transpose(1, 2).reshape(b, h, n, c).cumsum(-1)
    kv = k.transpose(-1, -2) @ (v * (g[..., -1:] - g).exp()[..., None])  # [B, H, N, D, D]
    if stack:
        s = [torch.zeros_like(kv[:, :, 0])]
        for i in range(1, n):
            s.append(s[-1] * g[:, :, i - 1, -1, None, None].exp() + kv[:, :, i - 1])
        states = torch.stack(s, dim=2)
    else:
        states = torch.zeros_like(kv)
        for i in range(1, n):
            states[:, :, i] = states[:, :, i - 1].clone() * g[:, :, i - 1, -1, None, None].exp() \
                + kv[:, :, i - 1]
    inter = (q * g[..., None].exp()) @ states
    mask = torch.triu(torch.ones(c, c, dtype=torch.bool), diagonal=1)
    att = (q @ k.transpose(-1, -2)) * (g[..., :, None] - g[..., None, :]).masked_fill(
        mask, float("-inf")).exp()
    o = inter + att @ v
    return o.reshape(b, h, t, d).transpose(1, 2)


GATED_KINDS = ("decay causal", "gated causal", "gated full", "peer", "peer (stack)")


def gated_step(kind: str, data, c: int) -> None:
    q, k, v, do, lg, lgr = data
    dec = torch.tensor(DECAY)
    if kind == "decay causal":
        o = linear_attention(q, k, v, Causal(), decay=dec, chunk_size=c)
    elif kind == "gated causal":
        o = linear_attention(q, k, v, Causal(), log_gate=lg, chunk_size=c)
    elif kind == "gated full":
        o = linear_attention(q, k, v, Full(), log_gate=lg, reverse_log_gate=lgr, chunk_size=c)
    else:
        o = peer_chunk_gla(q, k, v, lg, c, stack=kind == "peer (stack)")
    o.backward(do)
    for x in (q, k, v, lg, lgr):
        x.grad = None


def time_gated(t: int, reps: int, c: int, kinds=GATED_KINDS) -> dict:
    """fwd+bwd seconds of every kind at length t, round by round: {kind: [per-round]}."""
    data = gated_inputs(t)
    for kind in kinds:
        gated_step(kind, data, c)  # warm-up
    out: dict = {kind: [] for kind in kinds}
    for _ in range(reps):
        for kind in kinds:
            out[kind].append(_time(lambda kind=kind: gated_step(kind, data, c)))
    return out


def time_gated_scaling(ts, reps: int, c: int,
                       kinds=("gated causal", "decay causal")) -> dict:
    """fwd+bwd us/token of ``kinds`` at every T, round by round. A short T runs max(T) / T
    times back to back and its *total* time is taken, so that every T of a round is exposed to
    the host's load for the same wall time (a min over many short runs would catch quiet
    moments a single long run cannot); the order alternates between rounds.
    Returns {(kind, T): [us/token per round]}."""
    data = {t: gated_inputs(t) for t in ts}
    for t in ts:
        for kind in kinds:
            gated_step(kind, data[t], c)
    out: dict = {(kind, t): [] for kind in kinds for t in ts}
    cases = [(kind, t) for t in ts for kind in kinds]
    for rnd in range(reps):
        for kind, t in cases if rnd % 2 == 0 else cases[::-1]:
            runs = max(1, max(ts) // t)
            total = _time(lambda t=t, kind=kind, runs=runs: [
                gated_step(kind, data[t], c) for _ in range(runs)])
            out[(kind, t)].append(total / (runs * t) * 1e6)
    return out


# ------------------------------------------------------------------------------- GLA rows


def gla_inputs(t: int):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, t, H, D, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, t, H, D, generator=g)
    lg = (-0.1 * torch.rand(B, t, H, generator=g)).requires_grad_()  # scalar, [-0.1, 0]
    gv = (-0.1 * torch.rand(B, t, H, D, generator=g)).requires_grad_()  # per key dimension
    return q, k, v, do, lg, gv


def peer_chunk_gla_vector(q, k, v, g, c: int, stack: bool = False):
    """The GLA peer: plain PyTorch chunked gated linear attention with autograd, ``q, k, v:
    [B, T, H, D]``, ``g: [B, T, H, D]`` (T a multiple of c) -> ``[B, T, H, D]``."""
    b, t, h, d = q.shape
    n = t // c
    q, k, v, g = (x.transpose(1, 2).reshape(b, h, n, c, d) for x in (q, k, v, g))
    g = g.cumsum(-2)  # chunk-local b_r, [B, H, N, C, D]
    qg, kg = q * g.exp(), k * (-g).exp()
    kv = (k * (g[..., -1:, :] - g).exp()).transpose(-1, -2) @ v  # [B, H, N, D, D]
    decay = g[..., -1, :].exp()  # [B, H, N, D]
    if stack:
        s = [torch.zeros_like(kv[:, :, 0])]
        for i in range(1, n):
            s.append(s[-1] * decay[:, :, i - 1, :, None] + kv[:, :, i - 1])
        states = torch.stack(s, dim=2)
    else:
        states = torch.zeros_like(kv)
        for i in range(1, n):
            states[:, :, i] = states[:, :, i - 1].clone() * decay[:, :, i - 1, :, None] \
                + kv[:, :, i - 1]
    mask = torch.triu(torch.ones(c, c, dtype=torch.bool), diagonal=1)
    att = (qg @ kg.transpose(-1, -2)).masked_fill(mask, 0.0)
    o = qg @ states + att @ v
    return o.reshape(b, h, t, d).transpose(1, 2)


GLA_KINDS = ("gla causal", "scalar causal", "peer gla", "peer gla (stack)", "gla full")


def gla_step(kind: str, data, c: int) -> None:
    q, k, v, do, lg, gv = data
    if kind == "gla causal":
        o = linear_attention(q, k, v, Causal(), log_gate=gv, chunk_size=c)
    elif kind == "gla full":  # reverse gate = log_gate
        o = linear_attention(q, k, v, Full(), log_gate=gv, chunk_size=c)
    elif kind == "scalar causal":
        o = linear_attention(q, k, v, Causal(), log_gate=lg, chunk_size=c)
    else:
        o = peer_chunk_gla_vector(q, k, v, gv, c, stack=kind == "peer gla (stack)")
    o.backward(do)
    for x in (q, k, v, lg, gv):
        x.grad = None


def time_gla(t: int, reps: int, c: int, kinds=GLA_KINDS) -> dict:
    """fwd+bwd seconds of every GLA kind at length t, round by round: {kind: [per-round]}."""
    data = gla_inputs(t)
    for kind in kinds:
        gla_step(kind, data, c)  # warm-up
    out: dict = {kind: [] for kind in kinds}
    for rnd in range(reps):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            out[kind].append(_time(lambda kind=kind: gla_step(kind, data, c)))
    return out


def time_gla_scaling(ts, reps: int, c: int) -> dict:
    """fwd+bwd us/token of GLA causal at every T, round by round, as
    :func:`time_gated_scaling`. Returns {T: [us/token per round]}."""
    data = {t: gla_inputs(t) for t in ts}
    for t in ts:
        gla_step("gla causal", data[t], c)
    out: dict = {t: [] for t in ts}
    for rnd in range(reps):
        for t in ts if rnd % 2 == 0 else ts[::-1]:
            runs = max(1, max(ts) // t)
            total = _time(lambda t=t, runs=runs: [gla_step("gla causal", data[t], c)
                                                  for _ in range(runs)])
            out[t].append(total / (runs * t) * 1e6)
    return out


def gla_section(reps: int, c: int, quick: bool) -> None:
    print("\nGLA rows (issue 21): fwd+bwd, gates differentiated, median [min, max] of "
          f"per-round ratios over {reps} interleaved rounds; loadavg: {_uptime()}")
    t = 8192
    res = time_gla(t, reps, c)
    print(f"{'T':>6} {'contender':>17} {'us/token (median)':>18}")
    for kind, secs in res.items():
        print(f"{t:>6} {kind:>17} {statistics.median(secs) / t * 1e6:18.2f}")
    g = res["gla causal"]
    per = [round(a / b, 2) for a, b in zip(g, res["scalar causal"], strict=True)]
    print(f"  per round gla / scalar: {per}")
    per = [round(a / b, 2) for a, b in zip(res["peer gla"], g, strict=True)]
    print(f"  per round peer / gla: {per}")
    print(f"  gla causal / scalar-gated causal, T={t}: {_ratio(g, res['scalar causal'])}  "
          f"(goal <= 2)")
    print(f"  peer gla / gla causal, T={t}: {_ratio(res['peer gla'], g)}  (goal >= 2.5)")
    print(f"  peer gla (stack) / gla causal, T={t}: {_ratio(res['peer gla (stack)'], g)}  "
          f"(context: the peer without in-place state writes)")
    print(f"  gla full / gla causal, T={t}: {_ratio(res['gla full'], g)}  (context: Full's "
          f"backward recomputes blocks under autograd)")
    ts = [2048, 8192] if quick else [2048, 32768]
    sc = time_gla_scaling(ts, reps, c)
    lo, hi = ts[0], ts[-1]
    print(f"  gla causal per-token T={hi} / T={lo}: per round {_ratio(sc[hi], sc[lo])}, min "
          f"over rounds {min(sc[hi]) / min(sc[lo]):.2f}  [median us/token: "
          f"{statistics.median(sc[lo]):.2f} -> {statistics.median(sc[hi]):.2f}]  (goal <= 1.25)")
    print(f"  loadavg: {_uptime()}")


def _ratio(a: list, b: list) -> str:
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    return f"{statistics.median(r):.2f} [{r[0]:.2f}, {r[-1]:.2f}]"


def gated_section(reps: int, c: int, quick: bool) -> None:
    print("\ngated rows (issue 12): fwd+bwd, gates differentiated, median [min, max] of "
          f"per-round ratios over {reps} interleaved rounds; uptime: {_uptime()}")
    t = 8192
    res = time_gated(t, reps, c)
    print(f"{'T':>6} {'contender':>14} {'us/token (median)':>18}")
    for kind, secs in res.items():
        print(f"{t:>6} {kind:>14} {statistics.median(secs) / t * 1e6:18.2f}")
    g = res["gated causal"]
    print(f"  gated causal / decay causal, T={t}: {_ratio(g, res['decay causal'])}  "
          f"(goal <= 1.3)")
    print(f"  gated full / gated causal, T={t}: {_ratio(res['gated full'], g)}  (goal <= 2.2)")
    print(f"  peer / gated causal, T={t}: {_ratio(res['peer'], g)}  (goal >= 3)")
    print(f"  peer (stack) / gated causal, T={t}: {_ratio(res['peer (stack)'], g)}  "
          f"(context: the peer without in-place state writes)")
    ts = [2048, 8192] if quick else [2048, 65536]
    sc = time_gated_scaling(ts, reps, c)
    lo, hi = ts[0], ts[-1]
    for kind in ("gated causal", "decay causal"):
        a, b = sc[(kind, hi)], sc[(kind, lo)]
        print(f"  {kind} per-token T={hi} / T={lo}: per round {_ratio(a, b)}, min over "
              f"rounds {min(a) / min(b):.2f}  [median us/token: {statistics.median(b):.2f} -> "
              f"{statistics.median(a):.2f}]" + ("  (goal <= 1.25)"
                                                if kind == "gated causal" else ""))
    print(f"  uptime: {_uptime()}")


def _uptime() -> str:
    try:
        return open("/proc/loadavg").read().split()[:3].__repr__()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in 2048, 8192 only")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--gated-only", action="store_true", help="only the gated section")
    ap.add_argument("--gla-only", action="store_true", help="only the GLA section")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.gla_only:
        print(f"GLA benchmark: B={B} H={H} D=Dv={D} fp32, chunk_size={args.chunk_size}, torch "
              f"threads={threads}")
        gla_section(args.reps or 5, args.chunk_size, args.quick)
        return
    if args.gated_only:
        print(f"gated linear attention benchmark: B={B} H={H} D=Dv={D} fp32, chunk_size="
              f"{args.chunk_size}, torch threads={threads}")
        gated_section(args.reps or 5, args.chunk_size, args.quick)
        return
    ts = [2048, 8192] if args.quick else [2048, 8192, 32768, 65536]
    reps = args.reps or (2 if args.quick else 3)
    c = args.chunk_size
    names = ["causal", "full", "prefix"]
    print(f"linear attention benchmark: B={B} H={H} D=Dv={D} fp32, decay {DECAY}, "
          f"chunk_size={c}, torch threads={threads}, reps={reps} (min reported)")
    mm = matmul_gflops()
    tc = tile_ceiling(c)
    mm = max(mm, matmul_gflops())  # the better of two reads, as the tiles' is a best of five
    print(f"matmul 2048^3 fp32: {mm:.1f} GFLOP/s (same run); the chunk's tile products batched "
          f"into one bmm each (C={c}, T=8192): {tc:.1f} GFLOP/s = {tc / mm:.2f} of matmul, the "
          f"ceiling of /matmul below\n")

    per_tok: dict = {}
    for t in ts:
        per_tok.update(time_length(t, names, reps, c))
    naive: dict = {}
    for t in [x for x in ts if x <= 8192]:
        for gr in (False, True):
            naive[(t, "causal", gr)] = min(naive_time(t, "causal", gr) for _ in range(1)) / t * 1e6

    print(f"{'T':>6} {'spec':>7} {'mode':>8} {'us/token':>9} {'GFLOP/s':>8} {'/matmul':>8} "
          f"{'naive us/tok':>13} {'naive/chunk':>12}")
    for t in ts:
        for n in names:
            for gr in (False, True):
                us = per_tok[(t, n, gr)]
                gf = chunk_flops(t, c, n, gr) / (us * t * 1e-6) / 1e9
                nv = naive.get((t, n, gr))
                nv_s = f"{nv:13.1f} {nv / us:12.1f}" if nv else f"{'-':>13} {'-':>12}"
                print(f"{t:>6} {n:>7} {'fwd+bwd' if gr else 'fwd':>8} {us:9.2f} {gf:8.1f} "
                      f"{gf / mm:8.2f} {nv_s}")

    print("\npeak memory, forward+backward (fresh subprocess per case, VmHWM - RSS before "
          "the inputs)")
    print(f"{'T':>6} {'spec':>7} {'peak MB':>9} {'q,k,v,o,grads MB':>17} {'ratio':>6}")
    mem_cases = [(8192, "causal")] if args.quick else [
        (2048, "causal"), (8192, "causal"), (32768, "causal"), (65536, "causal"),
        (65536, "full"), (65536, "prefix")]
    mem = {}
    for t, n in mem_cases:
        mem[(t, n)] = m = memory_case(t, n, c, threads)
        print(f"{t:>6} {n:>7} {m['used_mb']:9.0f} {m['tensors_mb']:17.0f} {m['ratio']:6.2f}")

    print("\ncausal fwd+bwd us/token, all T interleaved round by round (see time_scaling)")
    scaling = time_scaling(ts, reps, c)
    print("  " + "  ".join(f"T={t}: {us:.2f}" for t, us in scaling.items()))

    print("\ndone-when ratios (issue 3):")
    t_lo, t_hi = ts[0], ts[-1]
    r = scaling[t_hi] / scaling[t_lo]
    print(f"  causal fwd+bwd us/token T={t_hi} / T={t_lo} (interleaved): {r:.2f}  (goal <= 1.25)")
    r = per_tok[(t_hi, "causal", True)] / per_tok[(t_lo, "causal", True)]
    print(f"  (same from the per-T table, rows minutes apart: {r:.2f})")
    if (8192, "causal", True) in naive:
        r = naive[(8192, "causal", True)] / per_tok[(8192, "causal", True)]
        print(f"  naive reference / chunk, causal fwd+bwd T=8192: {r:.1f}x  (goal >= 10)")
    t_mid = 32768 if 32768 in ts else ts[-1]
    for n in ("full", "prefix"):
        r = per_tok[(t_mid, n, True)] / per_tok[(t_mid, "causal", True)]
        print(f"  {n} / causal fwd+bwd T={t_mid}: {r:.2f}  (goal <= 2.2)")
    t_mem = max(t for t, _ in mem)
    print(f"  peak memory causal fwd+bwd T={t_mem} / memory of q,k,v,o and grads: "
          f"{mem[(t_mem, 'causal')]['ratio']:.2f}  (goal <= 2)")
    gated_section(max(reps, 5), c, args.quick)
    gla_section(max(reps, 5), c, args.quick)


if __name__ == "__main__":
    main()
