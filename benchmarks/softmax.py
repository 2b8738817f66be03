"""Block-sparse softmax attention vs its peers, contenders interleaved round by round.

For each T, mode and spec, every round times each contender once, in turn (A, B, C, A, B, C...):

* ``blocks``: causalmix of this tree;
* ``before``: ``blocks`` of the commit ``--before`` names (default: main when issue 24 started),
  checked out by ``git worktree add --detach`` under the system's temp folder and run in a child
  process that times one call whenever this one asks, so that the rounds still interleave;
* ``sdpa mask``: SDPA with a dense boolean mask (computes every tile);
* ``sdpa is_causal``: the fused kernel, run in every spec's rounds as the yardstick;
* ``kernel alone`` (packed documents and windows only): the same kernel on inputs already laid
  out the way it wants them, no causalmix code: the 4 documents as a batch of 4 causal
  sequences, the window as row blocks of 256 queries x 512 keys with an additive band mask
  (contiguous copies made once, outside the timing). No composition of PyTorch's CPU kernel
  does better, so it is the ceiling ``blocks`` can reach with it.

Ratios are taken within a round and summarised by their median and spread (min..max) over the
rounds. *Useful* GFLOP/s count visible pairs only (4*D flops per pair forward, 14*D
forward+backward); the figure of merit is a spec's useful GFLOP/s as a fraction of SDPA
``is_causal``'s in the same round. FlexAttention (compiled; forward only on CPU) runs last, its
compile time reported apart, interleaved with ``blocks`` forward. The load average is printed
before and after: other work on the machine moves every figure.

    python benchmarks/softmax.py --t 4096 8192 --modes fwd+bwd --no-flex   # the issue-24 figure
    python benchmarks/softmax.py --quick                       # T=2048, no Flex
    python benchmarks/softmax.py --before main~3               # "before" = another commit
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import causalmix

#: The default ``--before``: main when issue 24 started (the mixer-contract issue's result).
BEFORE = "d6d8ea6"
TARGETS = {"causal": 0.85, "prefix T/4": 0.85, "chunked 64 la1": 0.85, "4 segs & causal": 0.85,
           "window 256": 0.7}


def specs_for(t: int) -> dict:
    ids = torch.arange(t) * 4 // t  # 4 equal documents
    return {
        "causal": causalmix.Causal(),
        "prefix T/4": causalmix.Prefix(t // 4),
        "chunked 64 la1": causalmix.Chunked(64, lookahead=1),
        "window 256": causalmix.Window(256),
        "4 segs & causal": causalmix.Segments(ids) & causalmix.Causal(),
    }


def _git(*args: str, cwd: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


class Before:
    """``blocks`` of another commit, timed in a child process: a detached git worktree of the
    commit (made once, kept under the temp folder) whose ``src`` leads the child's
    ``PYTHONPATH``. The child runs this script with ``--serve`` and answers one line per
    request: ``case T NAME MODE`` builds that case's inputs (the same seed as here) and warms it
    up; ``time`` runs it once and answers the seconds. Only one process computes at a time, so
    the rounds interleave exactly as in-process contenders do."""

    def __init__(self, commit: str, args):
        here = os.path.dirname(os.path.abspath(__file__))
        sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}", cwd=here)
        path = os.path.join(tempfile.gettempdir(), f"cm-before-{sha[:12]}")
        if not os.path.isdir(os.path.join(path, "src", "causalmix")):
            _git("worktree", "add", "--detach", path, sha, cwd=here)
        env = dict(os.environ, PYTHONPATH=os.path.join(path, "src"))
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--heads", str(args.heads),
               "--dim", str(args.dim)] + (["--threads", str(args.threads)] if args.threads else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        where = self._ask("where")
        assert where.startswith(path), (where, path)
        self.label = f"{commit} = {sha[:12]} ({where})"

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"the 'before' process died on {line!r}")
        return answer

    def case(self, t: int, name: str, mode: str):
        self._ask(f"case {t} {mode} {name}")
        return lambda: float(self._ask("time"))


def serve(args) -> None:
    """The child side of :class:`Before` (stdin / stdout, one line each)."""
    go = None
    for line in sys.stdin:
        cmd, *rest = line.split(maxsplit=3)
        if cmd == "where":
            answer = os.path.dirname(causalmix.__file__)
        elif cmd == "case":
            t, mode, name = int(rest[0]), rest[1], rest[2].strip()
            spec = specs_for(t)[name]
            q, k, v = inputs(t, args)
            go = step(lambda a, b, c, s=spec: causalmix.softmax_attention(a, b, c, s,
                                                                          impl="blocks"),
                      q, k, v, mode == "fwd+bwd")
            go()
            answer = "ok"
        else:
            t0 = time.perf_counter()
            go()
            answer = repr(time.perf_counter() - t0)
        print(answer, flush=True)


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


def _kernel_alone(name: str, t: int, args):
    """The fused kernel on inputs laid out for it, made once (see the module docstring), or
    None for specs without such a layout. It ignores the inputs it is called with."""
    h, d = args.heads, args.dim
    mask, causal = None, False
    if name == "4 segs & causal" and t % 4 == 0:
        shapes, causal = [(4, h, t // 4, d)] * 3, True
    elif name == "window 256" and t % 256 == 0:
        rows, w = 256, 256
        shapes = [(t // rows, h, rows, d)] + [(t // rows, h, rows + w, d)] * 2
        i, j = torch.arange(rows)[:, None] + w, torch.arange(rows + w)[None, :]
        mask = torch.zeros(rows, rows + w).masked_fill(~((j <= i) & (j >= i - w)), -torch.inf)
    else:
        return None
    g = torch.Generator().manual_seed(1)
    q0, k0, v0 = (torch.randn(sh, generator=g).requires_grad_() for sh in shapes)
    return lambda q, k, v: F.scaled_dot_product_attention(q0, k0, v0, attn_mask=mask,
                                                          is_causal=causal)


def contenders(spec, t, args, name: str = "") -> dict:
    out = {"blocks": lambda q, k, v: causalmix.softmax_attention(q, k, v, spec, impl="blocks")}
    if args.mask_sdpa:
        out["sdpa mask"] = _sdpa(mask=spec.mask(t, t)[:, None])
    out["sdpa is_causal"] = _sdpa(causal=True)
    alone = _kernel_alone(name, t, args)
    if alone is not None:
        out["kernel alone"] = alone
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
    """Seconds per call of each contender, one call each per round, after one warm-up each. A
    contender that returns a float (the "before" child) reports its own time."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            own = f()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
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
    fns = {n: step(f, q, k, v, grad) for n, f in contenders(spec, t, args, name).items()}
    if args.before_run is not None:
        fns = {"blocks": fns.pop("blocks"), "before": args.before_run.case(t, name, mode), **fns}
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
        "blocks": step(lambda a, b, c: causalmix.softmax_attention(a, b, c, spec, impl="blocks"),
                       q, k, v, False),
        "flex": step(lambda a, b, c: causalmix.softmax_attention(a, b, c, spec, impl="flex"),
                     q, k, v, False),
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
    p.add_argument("--before", default=BEFORE, metavar="COMMIT",
                   help=f"the commit whose blocks is the 'before' column (default {BEFORE})")
    p.add_argument("--no-before", dest="before", action="store_const", const=None)
    p.add_argument("--no-mask-sdpa", dest="mask_sdpa", action="store_false")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # Before's child
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args)
    args.before_run = Before(args.before, args) if args.before else None
    lengths = args.t or ([2048] if args.quick else [2048, 8192])
    if args.quick:
        args.flex = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, "
          f"H={args.heads}, D={args.dim}, {args.rounds} interleaved rounds; {uptime()}")
    if args.before_run is not None:
        print(f"before: blocks of {args.before_run.label}")
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
        alone = f"kernel alone {summary(row['kernel alone'])}" if "kernel alone" in row else ""
        print(f"{t:>6} {name:<16} {mode:<8} blocks {summary(row['blocks'])}  {before}  {alone}"
              f"  {verdict}")
    if args.flex:
        print("\nFlexAttention (compiled once per shape and spec; forward only on CPU):")
        for t in lengths:
            for name, spec in specs_for(t).items():
                if not args.specs or name in args.specs:
                    run_flex(t, name, spec, args)
        print(uptime())


if __name__ == "__main__":
    main()
