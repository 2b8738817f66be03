"""Block-sparse softmax attention vs its peers, contenders interleaved round by round.

For each T, mode and spec, every round times each contender once, in turn (A, B, C, A, B, C...):
``blocks`` (causalmix today), ``before`` (``benchmarks/_blocks_before.py``: ``blocks`` as it was
at the base commit of issue 15, kept only for this column), SDPA with a dense boolean mask
(computes every tile) and SDPA ``is_causal`` (the fused kernel; run in every spec's rounds as the
yardstick). Ratios are taken within a round and summarised by their median and spread
(min..max) over the rounds. *Useful* GFLOP/s count visible pairs only (4*D flops per pair
forward, 14*D forward+backward); the figure of merit is a spec's useful GFLOP/s as a fraction of
SDPA ``is_causal``'s in the same round. FlexAttention (compiled; forward only on CPU) runs last,
its compile time reported apart, interleaved with ``blocks`` forward.

    python benchmarks/softmax.py --t 8192 --modes fwd+bwd     # the issue-15 figure
    python benchmarks/softmax.py --quick                       # T=2048, no Flex
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _blocks_before  # noqa: E402
from causalmix import Causal, Chunked, Prefix, Segments, Window, softmax_attention  # noqa: E402

TARGETS = {"causal": 0.85, "prefix T/4": 0.8, "chunked 64 la1": 0.8, "4 segs & causal": 0.8,
           "window 256": 0.5}


def specs_for(t: int) -> dict:
    ids = torch.arange(t) * 4 // t  # 4 equal documents
    return {
        "causal": Causal(),
        "prefix T/4": Prefix(t // 4),
        "chunked 64 la1": Chunked(64, lookahead=1),
        "window 256": Window(256),
        "4 segs & causal": Segments(ids) & Causal(),
    }


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])
    except OSError:
        return "load average unknown"


def _sdpa(mask=None, causal=False):
    def f(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask, is_causal=causal)
        return o.transpose(1, 2)
    return f


def contenders(spec, t, args) -> dict:
    def before(q, k, v):
        return _blocks_before.attention(q, k, v, spec, q_offset=0, k_offset=0,
                                        scale=q.shape[-1] ** -0.5)[0]

    out = {"blocks": lambda q, k, v: softmax_attention(q, k, v, spec, impl="blocks")}
    if args.before:
        out["before"] = before
    if args.mask_sdpa:
        out["sdpa mask"] = _sdpa(mask=spec.mask(t, t)[:, None])
    out["sdpa is_causal"] = _sdpa(causal=True)
    return out


def step(fn, q, k, v, grad):
    def go():
        qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
        with torch.set_grad_enabled(grad):
            o = fn(qq, kk, vv)
            if grad:
                o.backward(torch.ones_like(o))
    return go


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, one call each per round, after one warm-up each."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} ({min(xs):.2f}..{max(xs):.2f})"


def inputs(t, args):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, t, args.heads, args.dim, generator=g) for _ in range(3)]


def run_case(t, name, spec, mode, args) -> dict:
    q, k, v = inputs(t, args)
    grad = mode == "fwd+bwd"
    per_pair = (14 if grad else 4) * args.dim * args.heads
    useful = per_pair * int(spec.count_visible(t, t).sum())
    causal = per_pair * t * (t + 1) // 2
    fns = {n: step(f, q, k, v, grad) for n, f in contenders(spec, t, args).items()}
    times = interleaved(fns, args.rounds)
    ref = times["sdpa is_causal"]
    row = {"times": times}
    for n, ts in times.items():
        work = causal if n == "sdpa is_causal" else useful  # is_causal computes causal pairs
        gf = [work / x / 1e9 for x in ts]
        frac = [(work / x) / (causal / c) for x, c in zip(ts, ref, strict=True)]
        row[n] = frac
        print(f"{t:>6} {name:<16} {mode:<8} {n:<15} {statistics.median(ts) * 1e3:9.1f} ms "
              f"{statistics.median(gf):7.1f} useful GFLOP/s  x is_causal {summary(frac)}",
              flush=True)
    for peer in ("before", "sdpa mask"):
        if peer in times:
            sp = [p / b for p, b in zip(times[peer], times["blocks"], strict=True)]
            print(f"{'':>33}speed-up of blocks over {peer}: {summary(sp)}")
    return row


def run_flex(t, name, spec, args) -> None:
    q, k, v = inputs(t, args)
    fns = {
        "blocks": step(lambda a, b, c: softmax_attention(a, b, c, spec, impl="blocks"), q, k, v,
                       False),
        "flex": step(lambda a, b, c: softmax_attention(a, b, c, spec, impl="flex"), q, k, v,
                     False),
    }
    t0 = time.perf_counter()
    fns["flex"]()
    compile_s = time.perf_counter() - t0
    times = interleaved(fns, args.rounds)
    sp = [f / b for f, b in zip(times["flex"], times["blocks"], strict=True)]
    print(f"{t:>6} {name:<16} fwd   blocks {statistics.median(times['blocks']) * 1e3:8.1f} ms"
          f"  flex {statistics.median(times['flex']) * 1e3:8.1f} ms  (first call incl. compile "
          f"{compile_s:5.1f} s)  flex time / blocks time {summary(sp)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--t", type=int, nargs="*", default=None)
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    p.add_argument("--specs", nargs="*", default=None, help="subset of spec names")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--no-before", dest="before", action="store_false")
    p.add_argument("--no-mask-sdpa", dest="mask_sdpa", action="store_false")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.t or ([2048] if args.quick else [2048, 8192])
    if args.quick:
        args.flex = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, "
          f"H={args.heads}, D={args.dim}, {args.rounds} interleaved rounds; {uptime()}")
    results = {}
    for t in lengths:
        for name, spec in specs_for(t).items():
            if args.specs and name not in args.specs:
                continue
            for mode in args.modes:
                results[(t, name, mode)] = run_case(t, name, spec, mode, args)
    print(f"\n{uptime()}\nuseful GFLOP/s of blocks as a fraction of SDPA is_causal's "
          "(median (min..max) over rounds)")
    for (t, name, mode), row in results.items():
        want = TARGETS.get(name) if mode == "fwd+bwd" else None
        got = statistics.median(row["blocks"])
        verdict = "" if want is None else f"target >= {want}: {'ok' if got >= want else 'MISSED'}"
        before = f"before {summary(row['before'])}" if "before" in row else ""
        print(f"{t:>6} {name:<16} {mode:<8} blocks {summary(row['blocks'])}  {before}  {verdict}")
    if args.flex:
        print("\nFlexAttention (compiled once per shape and spec; forward only on CPU):")
        for t in lengths:
            for name, spec in specs_for(t).items():
                if not args.specs or name in args.specs:
                    run_flex(t, name, spec, args)
        print(uptime())


if __name__ == "__main__":
    main()
