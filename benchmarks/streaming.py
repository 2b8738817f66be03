"""Streaming vs parallel: what a stream costs, and whether its per-push cost stays flat.

1. Total time of streaming a T-frame sequence (T = 8192) in pushes of 1, 16 and 256 frames,
   against one parallel call of the same op over the whole sequence (ratios stream / parallel).
2. Per-push time at the start vs the end of a long stream (65536 frames) for the bounded specs
   (softmax under a window, linear attention): the end pushes of the long stream and the start
   pushes of a fresh stream are timed *interleaved*, push by push, so host-load drift hits both
   alike; medians are compared. Cache bytes at both points are shown too.
3. Measured latency per output (``LatencyStats``): the algorithmic wait (frames the spec makes
   an output wait for, at the frame rate) plus the compute (wall time of the push that released
   it), p50 / p95 / max, for softmax, linear (constant decay) and gated (per-frame log-gates)
   streams at realistic push sizes. Assumed front end: 16 kHz audio, 25 ms windows at a 10 ms
   hop, one stream frame per hop (no subsampling; the window's own 15 ms of lookahead is not
   counted); a push every 10 ms (1 frame) or every 40 ms (4 frames). Frames of one push also
   wait for the push to fill (up to 3 frames at 40 ms): shown apart as "fill", not in the
   measured figure. Wall-clock times (``time.perf_counter``, what a user waits for) on a shared
   host: read the spread, not the digits.

Every time is the best of several rounds, parallel and streamed runs alternating within a round:
on a shared CPU only ratios measured side by side mean anything. Times are this process's CPU
time (``time.process_time``; ``--wall`` for wall-clock): on a host shared with other jobs the
wall clock mostly measures the neighbours. Torch runs single-threaded by default (then CPU time
is compute time): with two OpenMP threads on a loaded two-core host, tiny copies stall for
milliseconds.

    python benchmarks/streaming.py [--quick] [--threads N] [--wall]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from causalmix.ops.linear import linear_attention
from causalmix.ops.softmax import softmax_attention
from causalmix.stream import LatencyStats, LinearStream, SoftmaxStream
from causalmix.visibility import Causal, Chunked, Window

B, H, D = 1, 4, 64
DONE_TOTAL = 1.3  # pushes of 256 vs parallel, window and linear specs
HOP_S = 0.010  # one stream frame per 10 ms hop of a 16 kHz front end
PUSHES = (("10 ms", 1), ("40 ms", 4))
DONE_FLAT = 1.2  # per-push time, end vs start of a long stream, bounded specs


def cases():
    decay = torch.full((H,), 0.99)
    return [
        # (mixer, spec, kwargs, bounded, counts for the "done when" ratios)
        ("softmax", Window(256, 16), {}, True, True),
        ("softmax", Chunked(64, lookahead=1) & Window(512), {}, True, True),
        ("softmax", Causal(), {}, False, False),
        ("linear", Causal(), {"decay": decay}, True, True),
        ("linear", Chunked(64, lookahead=1), {"decay": decay}, True, True),
    ]


def parallel(mixer, vis, kw, q, k, v):
    if mixer == "softmax":
        return softmax_attention(q, k, v, vis)
    return linear_attention(q, k, v, vis, **kw)


def new_stream(mixer, vis, kw):
    return SoftmaxStream(vis) if mixer == "softmax" else LinearStream(vis, **kw)


def stream_all(mixer, vis, kw, q, k, v, n):
    s = new_stream(mixer, vis, kw)
    t = q.shape[1]
    for p in range(0, t, n):
        s.push(q[:, p : p + n], k[:, p : p + n], v[:, p : p + n])
    s.flush()


CLOCK = time.process_time  # --wall: time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def total_time_table(t: int, rounds: int, sizes=(1, 16, 256)):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, t, H, D) for _ in range(3))
    print(f"\n== 1. total time, T={t} frames, B={B} H={H} D={D}: median over {rounds} rounds of "
          f"(stream time / parallel time) measured back to back (push=1: 1 round) ==")
    head = f"{'mixer':8} {'spec':58} {'parallel':>9}" + "".join(
        f" {'push=' + str(n):>8}" for n in sizes
    )
    print(head)
    done = []
    for mixer, vis, kw, _bounded, counts in cases():
        ratios: dict[int, list[float]] = {n: [] for n in sizes}
        pars = []
        parallel(mixer, vis, kw, q, k, v)  # warm-up
        # large pushes first, over several rounds; push=1 (thousands of pushes) once, last
        schedule = [n for _ in range(rounds) for n in sorted(sizes, reverse=True) if n > 1]
        schedule += [n for n in sizes if n == 1]
        for n in schedule:
            par = timed(lambda: parallel(mixer, vis, kw, q, k, v))  # noqa: B023
            st = timed(lambda: stream_all(mixer, vis, kw, q, k, v, n))  # noqa: B023
            pars.append(par)
            ratios[n].append(st / par)
        med = {n: statistics.median(ratios[n]) for n in sizes}
        print(f"{mixer:8} {vis!r:58} {statistics.median(pars) * 1e3:7.1f}ms"
              + "".join(f" {f'x{med[n]:.2f}':>8}" for n in sizes), flush=True)
        if counts:
            done.append((f"{mixer} {vis!r}", med[256]))
    return done


def flat_table(t_long: int, push: int, window: int, group: int = 16):
    torch.manual_seed(1)
    print(f"\n== 2. per-push time, start vs end of a {t_long}-frame stream, pushes of {push} "
          f"frames: {window} pushes each, interleaved; median over groups of {group} pushes ==")
    print(f"{'mixer':8} {'spec':58} {'start':>9} {'end':>9} {'end/start':>9} "
          f"{'cache bytes start -> end':>26}")
    pool = [torch.randn(B, push, H, D) for _ in range(8)]
    done = []
    for mixer, vis, kw, bounded, counts in cases():
        if not bounded:
            continue
        warm = (vis.lookback_frames or 0) + vis.lookahead_frames
        skip = max(8, 2 * -(-warm // push) + 8)  # start measured once the window is full
        long = new_stream(mixer, vis, kw)
        n_long = t_long // push - window
        for i in range(n_long):
            long.push(pool[i % 8], pool[(i + 1) % 8], pool[(i + 2) % 8])
        fresh = new_stream(mixer, vis, kw)
        for i in range(skip):
            fresh.push(pool[i % 8], pool[(i + 1) % 8], pool[(i + 2) % 8])
        bytes_start = fresh.cache_nbytes()
        t_start, t_end = [], []
        for i in range(window):
            a, b_, c = pool[i % 8], pool[(i + 3) % 8], pool[(i + 5) % 8]
            t_start.append(timed(lambda: fresh.push(a, b_, c)))  # noqa: B023
            t_end.append(timed(lambda: long.push(a, b_, c)))  # noqa: B023
        assert long.frames_in == t_long

        def per_push(ts):
            return statistics.median(
                sum(ts[i : i + group]) / group for i in range(0, len(ts), group)
            )

        s, e = per_push(t_start), per_push(t_end)
        print(f"{mixer:8} {vis!r:58} {s * 1e6:7.0f}us {e * 1e6:7.0f}us {e / s:9.2f} "
              f"{bytes_start:>12} -> {long.cache_nbytes():<11}", flush=True)
        if counts:
            done.append((f"{mixer} {vis!r}", e / s))
    return done


def latency_cases():
    decay = torch.full((H,), 0.99)
    return [
        # (mixer, spec, kwargs): right context of 20 ms, or 40 ms chunks with one chunk ahead
        ("softmax", Window(256, 2), {}),
        ("softmax", Chunked(4, lookahead=1), {}),
        ("linear", Causal(), {"decay": decay}),
        ("linear", Chunked(4, lookahead=1), {"decay": decay}),
        ("gated", Causal(), {}),
        ("gated", Chunked(4, lookahead=1), {}),
    ]


def stream_measured(mixer, vis, kw, frames: int, push: int, warm: int):
    """Stream ``frames`` frames in pushes of ``push``; returns the stream's LatencyStats over
    the outputs after the first ``warm``, the worst fill wait (frames), and the real-time factor
    (summed push time / audio time)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(B, frames, H, D) for _ in range(3))
    g = -torch.rand(B, frames, H) * 0.1
    s = LinearStream(vis, **kw) if mixer != "softmax" else SoftmaxStream(vis, **kw)
    released: list[int] = []  # per output: the last frame of the push that released it
    busy = 0.0
    for p in range(0, frames, push):
        sl = slice(p, p + push)
        gates = {"log_gate": g[:, sl]} if mixer == "gated" else {}
        t0 = time.perf_counter()
        out = s.push(q[:, sl], k[:, sl], v[:, sl], **gates)
        busy += time.perf_counter() - t0
        released += [min(p + push, frames) - 1] * out.shape[1]
    s.flush()
    released += [frames - 1] * (s.frames_out - len(released))
    lat, comp = s.latency[warm:], s.compute_seconds[warm:]
    fill = torch.tensor(released[warm:]) - s.ready_at[warm:]
    return (LatencyStats.of(lat, comp, frame_seconds=HOP_S), int(fill.max()),
            busy / (frames * HOP_S))


def measured_table(frames: int, warm: int = 64):
    print(f"\n== 3. measured latency per output = algorithmic wait + compute of the releasing "
          f"push; {frames} frames of 10 ms ({frames * HOP_S:.0f} s of audio), B={B} H={H} "
          f"D={D}, outputs after the first {warm}; ms ==")
    print(f"{'mixer':8} {'spec':29} {'push':>5} {'wait p50/max':>13} "
          f"{'compute p50/p95/max':>21} {'measured p50/p95/max':>22} {'fill':>5} {'RTF':>6}")
    for mixer, vis, kw in latency_cases():
        for label, push in PUSHES:
            st, fill, rtf = stream_measured(mixer, vis, kw, frames, push, warm)
            c, m = st.compute, st.measured
            print(f"{mixer:8} {vis!r:29} {label:>5} {st.p50 * 10:6.0f}/{st.max * 10:<6.0f} "
                  f"{c.p50 * 1e3:6.2f}/{c.p95 * 1e3:6.2f}/{c.max * 1e3:<7.2f} "
                  f"{m.p50 * 1e3:6.1f}/{m.p95 * 1e3:6.1f}/{m.max * 1e3:<8.1f} "
                  f"{fill * 10:5.0f} {rtf:6.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=2048, a 16384-frame long stream")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--wall", action="store_true",
                    help="time wall-clock instead of this process's CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    t, t_long, rounds, window = (2048, 16384, 3, 128) if args.quick else (8192, 65536, 5, 256)
    print(f"causalmix streaming benchmark: torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {'quick' if args.quick else 'full'}, "
          f"{'wall-clock' if args.wall else 'process CPU'} time")
    total = total_time_table(t, rounds)
    flat = flat_table(t_long, 16, window)
    measured_table(1000 if args.quick else 3000)
    print("\n== done when ==")
    for title, rows, goal in (
        (f"pushes of 256 frames / one parallel call, T={t}", total, DONE_TOTAL),
        (f"per-push time, end / start of a {t_long}-frame stream", flat, DONE_FLAT),
    ):
        print(f"{title} (goal <= {goal}):")
        for name, ratio in rows:
            print(f"    {name:66} x{ratio:.2f}  {'MET' if ratio <= goal else 'NOT MET'}")


if __name__ == "__main__":
    main()
