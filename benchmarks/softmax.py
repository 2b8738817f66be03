"""Block-sparse softmax attention vs its peers, measured side by side in one run.

For each T and spec: ``blocks`` (causalmix), SDPA with a dense boolean mask (computes every tile),
SDPA ``is_causal`` (causal only), and FlexAttention (compiled; forward only on CPU). Prints time,
*useful* GFLOP/s (visible pairs only: 4*D flops per pair forward, 14*D forward+backward), and the
ratios the foundation issue asks for, plus the machine's matmul GFLOP/s measured in the same run.

    python benchmarks/softmax.py                 # T in 1024..8192, all specs, Flex included
    python benchmarks/softmax.py --quick         # T in 1024, 2048, no Flex
    python benchmarks/softmax.py --t 8192 --modes fwd+bwd --no-flex
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from causalmix import Causal, Chunked, Prefix, Segments, Window, softmax_attention


def specs_for(t: int) -> dict:
    ids = torch.arange(t) * 4 // t  # 4 equal documents
    return {
        "causal": Causal(),
        "prefix T/4": Prefix(t // 4),
        "chunked 64 la1": Chunked(64, lookahead=1),
        "window 256": Window(256),
        "4 segs & causal": Segments(ids) & Causal(),
    }


def timed(fn, reps: int) -> float:
    """Best of ``reps`` after a warm-up (plans, caches, compilation): the least disturbed run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    secs = timed(lambda: a @ b, 5)
    return 2 * 2048**3 / secs / 1e9


def run_case(t, name, spec, mode, args, results, flex_only=False):
    b, h, d = 1, args.heads, args.dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, h, d, generator=g)
    k = torch.randn(b, t, h, d, generator=g)
    v = torch.randn(b, t, h, d, generator=g)
    grad = mode == "fwd+bwd"
    pairs = int(spec.count_visible(t, t).sum())
    flops = (14 if grad else 4) * pairs * d * h * b

    def step(attn):
        def go():
            qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
            with torch.set_grad_enabled(grad):
                o = attn(qq, kk, vv)
                if grad:
                    o.backward(torch.ones_like(o))

        return go

    impls = {}
    if flex_only:
        impls["flex"] = lambda qq, kk, vv: softmax_attention(qq, kk, vv, spec, impl="flex")
    else:
        impls["blocks"] = lambda qq, kk, vv: softmax_attention(qq, kk, vv, spec, impl="blocks")
    mask = spec.mask(t, t)[:, None]  # [1, 1, T, T]

    def sdpa_mask(qq, kk, vv):
        o = F.scaled_dot_product_attention(
            qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask
        )
        return o.transpose(1, 2)

    if not flex_only:
        impls["sdpa mask"] = sdpa_mask
    if name == "causal" and not flex_only:
        impls["sdpa is_causal"] = lambda qq, kk, vv: F.scaled_dot_product_attention(
            qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True
        ).transpose(1, 2)

    row = results.setdefault((t, name, mode), {})
    for impl, fn in impls.items():
        secs = timed(step(fn), args.reps)
        row[impl] = secs
        print(f"{t:>6} {name:<16} {mode:<8} {impl:<15} {secs * 1e3:10.1f} ms "
              f"{flops / secs / 1e9:8.1f} useful GFLOP/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--t", type=int, nargs="*", default=None)
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    p.add_argument("--specs", nargs="*", default=None, help="subset of spec names")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    args = p.parse_args()
    lengths = args.t or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
    if args.quick:
        args.flex = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, "
          f"H={args.heads}, D={args.dim}")
    mm_before = matmul_gflops()
    print(f"matmul 2048^3 fp32: {mm_before:.1f} GFLOP/s\n")
    results: dict = {}
    for t in lengths:
        for name, spec in specs_for(t).items():
            if args.specs and name not in args.specs:
                continue
            for mode in args.modes:
                run_case(t, name, spec, mode, args, results)
    if args.flex and "fwd" in args.modes:
        # Last, on their own: compiling spawns worker processes that would disturb the rest.
        print("\nFlexAttention (compiled once per shape and spec; forward only on CPU):")
        for t in lengths:
            for name, spec in specs_for(t).items():
                if not args.specs or name in args.specs:
                    run_case(t, name, spec, "fwd", args, results, flex_only=True)
    mm_after = matmul_gflops()
    print(f"\nmatmul 2048^3 fp32: {mm_before:.1f} GFLOP/s before, {mm_after:.1f} after\n")

    print("speed-up of blocks (time of peer / time of blocks; > 1 means blocks is faster)")
    print(f"{'T':>6} {'spec':<16} {'mode':<8} {'vs sdpa mask':>13} {'vs is_causal':>13} "
          f"{'vs flex':>9}")
    for (t, name, mode), row in results.items():
        def ratio(peer, row=row):
            return f"{row[peer] / row['blocks']:.2f}x" if peer in row else "-"

        print(f"{t:>6} {name:<16} {mode:<8} {ratio('sdpa mask'):>13} "
              f"{ratio('sdpa is_causal'):>13} {ratio('flex'):>9}")

    targets = {"prefix T/4": 1.5, "chunked 64 la1": 1.5, "4 segs & causal": 1.5,
               "window 256": 8.0}
    tmax = max(lengths)
    print(f"\ntargets at T={tmax}, fwd+bwd:")
    for name, want in targets.items():
        row = results.get((tmax, name, "fwd+bwd"))
        if row:
            got = row["sdpa mask"] / row["blocks"]
            print(f"  {name:<16} blocks vs sdpa mask {got:5.2f}x (target >= {want}x): "
                  f"{'ok' if got >= want else 'MISSED'}")
    row = results.get((tmax, "causal", "fwd+bwd"))
    if row:
        slow = row["blocks"] / row["sdpa is_causal"]
        print(f"  causal           blocks / sdpa is_causal time {slow:5.2f}x (target <= 1.3x): "
              f"{'ok' if slow <= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
