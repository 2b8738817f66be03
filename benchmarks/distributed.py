"""Sequence parallel: work balance of the layouts, and measured ring wall time on 2 processes.

1. Balance report (exact counts from the spec, no timing): visible (query, key) pairs of the
   busiest rank for world 2, 4, 8, 16, specs Causal() and Prefix(T/4), each layout; max/mean
   imbalance and the busiest rank's work relative to the contiguous layout.
2. Wall time of ``causalmix.distributed.softmax_attention`` forward + backward on a 2-process gloo
   group (1 torch thread each), Causal(), T=16384 (``--quick``: 4096), contiguous vs zigzag vs
   striped, and the single-process ``softmax_attention(impl="blocks")`` on 1 thread for reference.
   Layouts are timed interleaved, best of ``--reps``, in one run: compare ratios, not absolute
   times across runs (the CPU is shared).

3. Whole-model training step (``causalmix.distributed.SequenceParallel``): a 4-layer model
   (softmax, linear, gated, softmax under Causal(), d_model 64), forward + loss + backward +
   gradient reduction on gloo groups of world 2 and 4 (1 torch thread per process) for each
   layout the model shards with, against the same step in one process, and the bytes every rank
   sends or receives per step through ``torch.distributed`` (counted, not estimated).
   Processes beyond the 2 cores of this machine share them: world 4 shows the exchange cost,
   not a speed-up.

    .venv/bin/python benchmarks/distributed.py [--quick] [--seq-len T] [--reps N]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import tempfile
import time

import torch
import torch.distributed as dist

from causalmix import Causal, Prefix, softmax_attention
from causalmix.distributed import LAYOUTS, shard, work_balance
from causalmix.distributed import softmax_attention as ring_attention

B, H, D = 1, 2, 64


def balance_table(seq_len: int) -> dict:
    print(f"## Work balance (visible pairs, exact), T={seq_len}")
    print(f"{'spec':<12} {'world':>5} {'layout':<11} {'max rank pairs':>15} {'max/mean':>9} "
          f"{'max vs contiguous':>18}")
    figures = {}
    for spec in (Causal(), Prefix(seq_len // 4)):
        for world in (2, 4, 8, 16):
            cont = work_balance(spec, "contiguous", world, seq_len).max_pairs
            for layout in LAYOUTS:
                rep = work_balance(spec, layout, world, seq_len)
                rel = rep.max_pairs / cont
                figures[(repr(spec), world, layout)] = rel
                print(f"{spec!r:<12} {world:>5} {layout:<11} {rep.max_pairs:>15,} "
                      f"{rep.max_over_mean:>9.3f} {rel:>17.3f}x")
    return figures


def _inputs(seq_len: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, seq_len, H, D, generator=g)
    k = torch.randn(B, seq_len, H, D, generator=g)
    v = torch.randn(B, seq_len, H, D, generator=g)
    return q, k, v


def _fwd_bwd(fn, q, k, v) -> float:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    out = fn(q, k, v)
    out.sum().backward()
    return time.perf_counter() - t0


def _rank_main(rank, world, store, seq_len, reps, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        full = _inputs(seq_len)
        best = {layout: float("inf") for layout in LAYOUTS}
        cpu = {layout: float("inf") for layout in LAYOUTS}
        for it in range(reps + 1):  # first round warms up (plans, allocator)
            for layout in LAYOUTS:
                local = [shard(t, layout, rank, world) for t in full]
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                _fwd_bwd(lambda q, k, v, lay=layout: ring_attention(q, k, v, Causal(), layout=lay),
                         *local)
                c1 = time.process_time()
                dist.barrier()  # wall time of the group: until the slowest rank is done
                if it > 0:
                    best[layout] = min(best[layout], time.perf_counter() - t0)
                    cpu[layout] = min(cpu[layout], c1 - c0)
        results.put((rank, (best, cpu)))
    finally:
        dist.destroy_process_group()


def ring_times(seq_len: int, reps: int, world: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, store, seq_len, reps, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    wall = got[0][0]
    cpu = {layout: max(got[r][1][layout] for r in got) for layout in LAYOUTS}
    return wall, cpu


def single_time(seq_len: int, reps: int) -> tuple[float, float]:
    """Best wall and CPU seconds of the single-process forward + backward, 1 thread."""
    torch.set_num_threads(1)
    q, k, v = _inputs(seq_len)

    def fn(q, k, v):
        return softmax_attention(q, k, v, Causal(), impl="blocks")

    _fwd_bwd(fn, q, k, v)
    wall = cpu = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        wall = min(wall, _fwd_bwd(fn, q, k, v))
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


_COUNTED = ("all_gather", "all_reduce", "batch_isend_irecv", "all_gather_into_tensor",
            "reduce_scatter_tensor", "broadcast")  # P2POps are counted in batch_isend_irecv


def _count_bytes(counter: list) -> None:
    """Wrap torch.distributed's collectives so that they add the bytes of their tensors."""
    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(y) for y in x)
        return nbytes(getattr(x, "tensor", None)) if hasattr(x, "tensor") else 0

    for name in _COUNTED:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapped(*args, _real=real, **kwargs):
            counter[0] += sum(nbytes(a) for a in args)
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)


def _model_step_job(rank, world, seq_len, layout, reps):
    from causalmix import Causal
    from causalmix.distributed import SequenceParallel
    from causalmix.testing import build_hybrid_model

    model = build_hybrid_model(("softmax", "linear", "gated", "softmax"), (Causal(),) * 4,
                               d_model=64, n_heads=4, dtype=torch.float32)
    sp = SequenceParallel(model, layout=layout)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (1, seq_len), generator=g)
    ids_r = sp.shard(ids)
    counter = [0]
    best = float("inf")
    for rep in range(reps + 1):
        if rep == 1:
            _count_bytes(counter)  # the warm-up step is not counted
        dist.barrier()
        t0 = time.perf_counter()
        loss = sp.loss(sp(ids_r), ids_r)
        loss.backward()
        sp.reduce_gradients()
        dist.barrier()
        if rep:
            best = min(best, time.perf_counter() - t0)
        model.zero_grad()
    return best, counter[0] / max(reps, 1)


def _one_process_step(seq_len: int, reps: int) -> float:
    import torch.nn.functional as F

    from causalmix import Causal
    from causalmix.testing import build_hybrid_model

    torch.set_num_threads(1)
    model = build_hybrid_model(("softmax", "linear", "gated", "softmax"), (Causal(),) * 4,
                               d_model=64, n_heads=4, dtype=torch.float32)
    ids = torch.randint(0, 11, (1, seq_len), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        if rep:
            best = min(best, time.perf_counter() - t0)
        model.zero_grad()
    return best


def model_step_table(seq_len: int, reps: int) -> None:
    from causalmix.testing import run_process_group

    print(f"## Whole-model training step (4 layers: softmax, linear, gated, softmax; Causal; "
          f"d_model 64), T={seq_len}, fp32, best of {reps}")
    print(f"{'run':<32} {'wall s':>8} {'one process/this':>17} {'MB sent+received per rank':>26}")
    single = _one_process_step(seq_len, reps)
    print(f"{'1 process, 1 thread':<32} {single:>8.3f}")
    for world in (2, 4):
        for layout in ("contiguous", "zigzag"):
            with tempfile.TemporaryDirectory() as tmp:
                res = run_process_group(_model_step_job, world, tmp, seq_len=seq_len,
                                        layout=layout, reps=reps)
            wall = max(t for t, _ in res.values())
            mb = max(b for _, b in res.values()) / 2**20
            print(f"{f'{world} processes, {layout}':<32} {wall:>8.3f} {single / wall:>16.2f}x "
                  f"{mb:>26.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=4096 for the timing, 1 rep")
    ap.add_argument("--seq-len", type=int, default=None, help="timed sequence length")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (best of)")
    args = ap.parse_args()
    seq_len = args.seq_len or (4096 if args.quick else 16384)
    reps = args.reps or (1 if args.quick else 2)

    fig = balance_table(16384)
    print()
    print("## Done-when figures (Causal, busiest rank's visible pairs vs contiguous)")
    for world in (4, 16):
        z, s = fig[("Causal()", world, "zigzag")], fig[("Causal()", world, "striped")]
        ok = "OK" if max(z, s) <= 0.6 else "NOT MET"
        print(f"world {world:>2}: zigzag {z:.3f}x, striped {s:.3f}x of contiguous "
              f"(target <= 0.6x at world 4: {ok if world == 4 else 'n/a'})")

    print()
    print(f"## Wall time, Causal(), T={seq_len}, B={B}, H={H}, D={D}, fp32, forward + backward, "
          f"best of {reps}")
    print("(wall: group time between barriers; busiest-rank CPU: the largest per-rank process CPU "
          "time, which host load inflates far less than wall time)")
    single, single_cpu = single_time(seq_len, reps)
    ring, ring_cpu = ring_times(seq_len, reps)
    print(f"{'run':<34} {'wall s':>8} {'contiguous/this':>16} {'busiest CPU s':>14} "
          f"{'contiguous/this':>16}")
    print(f"{'1 process, 1 thread (blocks)':<34} {single:>8.3f} {'':>16} {single_cpu:>14.3f}")
    for layout in LAYOUTS:
        t, c = ring[layout], ring_cpu[layout]
        print(f"{'2 processes x 1 thread, ' + layout:<34} {t:>8.3f} "
              f"{ring['contiguous'] / t:>15.2f}x {c:>14.3f} {ring_cpu['contiguous'] / c:>15.2f}x")
    print()
    print(f"contiguous / striped, 2 processes: wall {ring['contiguous'] / ring['striped']:.2f}x, "
          f"busiest-rank CPU {ring_cpu['contiguous'] / ring_cpu['striped']:.2f}x; contiguous / "
          f"zigzag: wall {ring['contiguous'] / ring['zigzag']:.2f}x, CPU "
          f"{ring_cpu['contiguous'] / ring_cpu['zigzag']:.2f}x; single process: wall "
          f"{single:.3f} s, CPU {single_cpu:.3f} s")
    print()
    model_step_table(1024 if args.quick else 4096, reps)


if __name__ == "__main__":
    main()
