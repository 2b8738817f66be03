"""``impl="auto"`` against every implementation it chooses between, side by side in one run.

For the linear family (per-head decay) and the delta family (beta, log-gates), ``Causal()``,
fp32, B=2, H=4, D=32, Dv=16, forward+backward (loss = sum(o * do)), T from 8 to 8192: the time
of ``reference`` (dense; skipped above --max-ref), ``chunk`` and ``auto``, and auto's ratio to
the best of them. Cases of one T are interleaved round by round; the minimum over rounds is
reported (the host is shared, and its load only ever adds time). The crossover length that
``auto`` uses (``AUTO_REFERENCE_MAX_T`` in ``ops/registry.py``, for the linear and delta
families) was read off this table.

    python benchmarks/auto.py                  # T in 8 .. 8192
    python benchmarks/auto.py --t 8 16 64 256  # chosen lengths
"""

from __future__ import annotations

import argparse
import time

import torch

from causalmix.ops import delta_attention, linear_attention
from causalmix.visibility import Causal

B, H, D, DV = 2, 4, 32, 16


def _inputs(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, t, H, D, generator=g) * 0.3).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, t, H, D, generator=g), dim=-1)
    k.requires_grad_()
    v = torch.randn(B, t, H, DV, generator=g).requires_grad_()
    extra = {
        "linear": {"decay": torch.linspace(0.9, 0.999, H)},
        "delta": {"beta": torch.rand(B, t, H, generator=g) * 0.5 + 0.25,
                  "log_gate": -torch.rand(B, t, H, generator=g) * 0.1},
    }
    do = torch.randn(B, t, H, DV, generator=g)
    return (q, k, v), extra, do


def _case(family: str, impl: str, t: int):
    (q, k, v), extra, do = _inputs(t)
    op = linear_attention if family == "linear" else delta_attention

    def run() -> None:
        o = op(q, k, v, Causal(), impl=impl, **extra[family])
        torch.autograd.grad((o * do).sum(), (q, k, v))

    return run


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, nargs="+",
                    default=[8, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-ref", type=int, default=2048, help="largest T for reference")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; fwd+bwd, Causal, B={B} H={H} D={D} "
          f"Dv={DV}; min of {args.rounds} interleaved rounds, ms")
    for family in ("linear", "delta"):
        print(f"\n{family:6s} {'T':>5s} {'reference':>10s} {'chunk':>10s} {'auto':>10s} "
              f"{'auto/best':>10s}")
        for t in args.t:
            impls = ["chunk", "auto"] + (["reference"] if t <= args.max_ref else [])
            cases = {i: _case(family, i, t) for i in impls}
            for fn in cases.values():
                fn()  # warm-up
            best = {i: float("inf") for i in impls}
            for _ in range(args.rounds):
                for i, fn in cases.items():
                    best[i] = min(best[i], _time(fn))
            fastest = min(best[i] for i in impls if i != "auto")
            ref = f"{best['reference'] * 1e3:10.2f}" if "reference" in best else f"{'-':>10s}"
            print(f"{'':6s} {t:5d} {ref} {best['chunk'] * 1e3:10.2f} "
                  f"{best['auto'] * 1e3:10.2f} {best['auto'] / fastest:10.2f}")


if __name__ == "__main__":
    main()
