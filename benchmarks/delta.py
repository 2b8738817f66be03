"""Delta-rule attention (causalmix ``chunk``) against transformers' CPU path and the naive
recurrence, measured side by side in one run.

Gated DeltaNet, fp32, B=1, H=4, D=Dv=64, unit keys, beta in (0, 1), log-gates in [-0.1, 0], and
every input differentiated (q, k, v, beta, log_gate); one fwd+bwd is ``o.backward(do)``.
Contenders at each T:

* ``causal``, ``full``: ``delta_attention(..., Causal() | Full(), impl="chunk")``;
* ``causal qwen``: Qwen3-Next's head grouping (value heads twice the query / key heads: q, k
  with 2 heads, v, beta, gates with 4; Qwen3-Next has 16 and 32);
* ``hf chunk`` (``hf chunk qwen``): transformers' ``torch_chunk_gated_delta_rule`` (the CPU path
  of Qwen3-Next's Gated DeltaNet when flash-linear-attention is absent) with autograd, when
  transformers is installed; it scales q by ``D^-1/2`` itself, so ours gets ``q * D^-1/2``;
* ``naive``: the recurrence one token at a time in plain PyTorch with autograd.

Contenders of one T are interleaved round by round; ratios are taken per round and reported
as median [min, max] (the host is shared: its load only ever adds time, and hits neighbours in
a round alike). transformers' chunk form and the naive recurrence are timed up to ``--peer-max``
(default 8192: at T=32768 transformers' backward alone takes minutes, its in-place per-chunk
writes costing O(T^2 / C)).

KDA (``--section kda`` runs only this part): the per-key-dimension gate ``log_gate [B, T, H, D]``
(Kimi Delta Attention) against the scalar-gated chunk, causal fwd+bwd at T=8192, interleaved:
``kda`` with gates in [-0.1, 0] per token and dimension (the scalar contender's distribution:
the chunk's moderate-gate shortcut), ``kda strong`` with gates in [-2, 0] (chunks decay by
more than e^60 in some dimension: the sub-chunked form); and KDA's per-token time T=32768 /
T=2048.

Per-token scaling: causal fwd+bwd at every T, interleaved; a short T runs max(T) / T times
back to back and its total is taken, so every T of a round sees the host for the same wall
time. Memory: as ``benchmarks/linear.py`` (a fresh subprocess per case, ``VmHWM`` minus the
resident set before the inputs), against the bytes of q, k, v, beta, log_gate, o and their
gradients.

    python benchmarks/delta.py --threads 1          # T in 2048, 8192, 32768 (several minutes)
    python benchmarks/delta.py --quick --threads 1  # T in 2048, 8192, fewer rounds
    python benchmarks/delta.py --section kda --threads 1  # the KDA part only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from causalmix import Causal, Full, delta_attention

B, H, D = 1, 4, 64
QWEN = (2, 2, 4)  # heads of q, k, v: Qwen3-Next's value grouping (16, 16, 32), scaled down


def inputs(t: int, heads=(H, H, H), seed: int = 0, ours: bool = True, gate: float = 0.0):
    """``(q, k, v, beta, log_gate)`` leaves (grad) and ``do``; q pre-scaled by ``D^-1/2`` for
    causalmix and the naive loop (``ours``), as transformers' function scales it inside.
    ``gate > 0``: a KDA gate ``[B, T, H, D]`` in ``[-gate, 0]``."""
    g = torch.Generator().manual_seed(seed)
    hq, hk, hv = heads
    q = torch.randn(B, t, hq, D, generator=g) * (D ** -0.5 if ours else 1.0)
    k = torch.nn.functional.normalize(torch.randn(B, t, hk, D, generator=g), dim=-1)
    v = torch.randn(B, t, hv, D, generator=g)
    beta = torch.sigmoid(torch.randn(B, t, hv, generator=g))
    lg = -0.1 * torch.rand(B, t, hv, generator=g)
    if gate:
        lg = -gate * torch.rand(B, t, hv, D, generator=g)
    do = torch.randn(B, t, hv, D, generator=g)
    return [x.requires_grad_() for x in (q, k, v, beta, lg)], do


def naive(q, k, v, beta, lg):
    """The recurrence one token at a time (autograd through the loop)."""
    group = v.shape[2] // k.shape[2]
    q, k = q.repeat_interleave(group, 2), k.repeat_interleave(group, 2)
    s = q.new_zeros(q.shape[0], v.shape[2], D, v.shape[-1])
    a = lg.exp()
    outs = []
    for t in range(q.shape[1]):
        s = s * a[:, t, :, None, None]
        kt = k[:, t]
        pred = (kt[..., None, :] @ s)[..., 0, :]
        s = s + kt[..., :, None] * (beta[:, t, :, None] * (v[:, t] - pred))[..., None, :]
        outs.append((q[:, t, :, None, :] @ s)[..., 0, :])
    return torch.stack(outs, 1)


def _hf():
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next as qn
    except ImportError:
        return None
    return qn.torch_chunk_gated_delta_rule


def forward(kind: str, leaves, c: int):
    q, k, v, beta, lg = leaves
    if kind.startswith("hf chunk"):
        return _hf()(q, k, v, g=lg, beta=beta, chunk_size=64)[0]
    if kind == "naive":
        return naive(q, k, v, beta, lg)
    spec = Full() if kind == "full" else Causal()
    return delta_attention(q, k, v, spec, beta=beta, log_gate=lg, impl="chunk", chunk_size=c)


def step(kind: str, data, c: int) -> None:
    leaves, do = data
    forward(kind, leaves, c).backward(do)
    for x in leaves:
        x.grad = None


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


#: The KDA contenders' gate strengths (``inputs(gate=...)``).
KDA = {"kda": 0.1, "kda strong": 2.0}


def time_round_robin(t: int, kinds, reps: int, c: int) -> dict:
    """fwd+bwd seconds of every kind at length t, round by round: {kind: [per round]}."""
    data = {kind: inputs(t, QWEN if "qwen" in kind else (H, H, H), ours="hf" not in kind,
                         gate=KDA.get(kind, 0.0))
            for kind in kinds}
    for kind in kinds:
        step(kind, data[kind], c)  # warm-up
    out: dict = {kind: [] for kind in kinds}
    for rnd in range(reps):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            out[kind].append(_time(lambda kind=kind: step(kind, data[kind], c)))
    return out


def time_scaling(ts, reps: int, c: int, kind: str = "causal") -> dict:
    """Causal fwd+bwd us/token at every T, round by round ({T: [per round]}); ``kind``:
    ``causal`` or a KDA one."""
    data = {t: inputs(t, gate=KDA.get(kind, 0.0)) for t in ts}
    for t in ts:
        step(kind, data[t], c)
    out: dict = {t: [] for t in ts}
    for rnd in range(reps):
        for t in ts if rnd % 2 == 0 else ts[::-1]:
            runs = max(1, max(ts) // t)
            total = _time(lambda t=t, runs=runs: [step(kind, data[t], c)
                                                  for _ in range(runs)])
            out[t].append(total / (runs * t) * 1e6)
    return out


def memory_case(t: int, kind: str, c: int, threads: int) -> dict:
    code = f"""
import json, sys, torch
sys.path.insert(0, {repr(sys.path[0])})
torch.set_num_threads({threads})
from delta import inputs, step
step({kind!r}, inputs(64), {c})
page = 4096
before = int(open("/proc/self/statm").read().split()[1]) * page
data = inputs({t})
step({kind!r}, data, {c})
peak = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(json.dumps({{"before": before, "peak": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    used = res["peak"] - res["before"]
    # q, k, v, o and their gradients (8 x [B, T, H, D]) and beta, log_gate and theirs (4 x
    # [B, T, H]), fp32
    tensors = (8 * B * t * H * D + 4 * B * t * H) * 4
    return {"used_mb": used / 2**20, "tensors_mb": tensors / 2**20, "ratio": used / tensors}


def _ratio(a: list, b: list) -> str:
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    return f"{statistics.median(r):.2f} [{r[0]:.2f}, {r[-1]:.2f}]"


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def check_agreement(c: int) -> None:
    """The contenders compute the same thing (T = 256, forward)."""
    leaves, _ = inputs(256)
    with torch.no_grad():
        ours = forward("causal", leaves, c)
        ref = forward("naive", leaves, c)
        line = f"agreement at T=256: |chunk - naive| max {float((ours - ref).abs().max()):.1e}"
        if _hf() is not None:
            hf = forward("hf chunk", inputs(256, ours=False)[0], c)
            line += f", |chunk - hf chunk| max {float((ours - hf).abs().max()):.1e}"
    print(line)


def timing_section(ts, reps: int, c: int, peer_max: int) -> dict:
    print(f"\nfwd+bwd us/token (median over {reps} interleaved rounds) and per-round ratios "
          f"median [min, max]; load before: {_load()}")
    peers = (["hf chunk", "hf chunk qwen"] if _hf() is not None else []) + ["naive"]
    res = {}
    for t in ts:
        kinds = ["causal", "full", "causal qwen"] + (peers if t <= peer_max else [])
        res[t] = r = time_round_robin(t, kinds, reps, c)
        cells = "  ".join(f"{k} {statistics.median(v) / t * 1e6:.1f}" for k, v in r.items())
        print(f"  T={t}: {cells}")
        print(f"    full / causal {_ratio(r['full'], r['causal'])}")
        for peer, ours in (("hf chunk", "causal"), ("hf chunk qwen", "causal qwen"),
                           ("naive", "causal")):
            if peer in r:
                print(f"    {peer} / {ours} {_ratio(r[peer], r[ours])}")
    print(f"  load after: {_load()}")
    return res


def kda_section(ts, reps: int, c: int) -> None:
    """KDA (vector gate) against the scalar-gated chunk at T=8192, and KDA's per-token
    scaling."""
    print(f"\nKDA: causal fwd+bwd, per-key-dimension gate vs scalar gate, T=8192 ({reps} "
          f"interleaved rounds); load before: {_load()}")
    r = time_round_robin(8192, ["causal", "kda", "kda strong"], reps, c)
    cells = "  ".join(f"{k} {statistics.median(v) / 8192 * 1e6:.1f}" for k, v in r.items())
    print(f"  us/token: {cells}")
    print(f"  kda / causal (scalar gate): {_ratio(r['kda'], r['causal'])}  (goal <= 2)")
    print(f"  kda strong / causal (scalar gate): {_ratio(r['kda strong'], r['causal'])}")
    lo, hi = ts[0], ts[-1]
    sc = time_scaling([lo, hi], reps, c, kind="kda")
    print(f"  kda per-token T={hi} / T={lo} (interleaved): {_ratio(sc[hi], sc[lo])}  (goal "
          f"<= 1.25) [median us/token {statistics.median(sc[lo]):.1f} -> "
          f"{statistics.median(sc[hi]):.1f}]")
    print(f"  load after: {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in 2048, 8192; fewer rounds")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--section", choices=["all", "kda"], default="all",
                    help="kda: only the KDA (vector gate) part")
    ap.add_argument("--peer-max", type=int, default=8192,
                    help="longest T at which transformers' chunk and the naive loop run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ts = [2048, 8192] if args.quick else [2048, 8192, 32768]
    reps = args.reps or (3 if args.quick else 5)
    c = args.chunk_size
    print(f"delta attention benchmark: B={B} H={H} D=Dv={D} fp32, chunk_size={c}, torch "
          f"threads={torch.get_num_threads()}, transformers "
          f"{'present' if _hf() is not None else 'absent'}")
    if args.section == "kda":
        kda_section(ts, reps, c)
        return
    check_agreement(c)
    res = timing_section(ts, reps, c, args.peer_max)
    sc = time_scaling([ts[0], ts[-1]], reps, c)
    lo, hi = ts[0], ts[-1]
    print(f"\ncausal per-token T={hi} / T={lo} (interleaved): {_ratio(sc[hi], sc[lo])}  "
          f"[median us/token {statistics.median(sc[lo]):.1f} -> {statistics.median(sc[hi]):.1f}]")
    print("\npeak memory, fwd+bwd (fresh subprocess, VmHWM - RSS before the inputs)")
    mem = {kind: memory_case(8192, kind, c, torch.get_num_threads()) for kind in ("causal",
                                                                                  "full")}
    for kind, m in mem.items():
        print(f"  T=8192 {kind}: {m['used_mb']:.0f} MB / {m['tensors_mb']:.0f} MB of inputs, "
              f"outputs and gradients = {m['ratio']:.2f}")
    r8 = res[8192]
    print("\ndone-when (issue 20), T=8192 unless stated:")
    if "hf chunk" in r8:
        print(f"  hf chunk / causal chunk: {_ratio(r8['hf chunk'], r8['causal'])}  (goal >= 3)")
    if "naive" in r8:
        print(f"  naive / causal chunk: {_ratio(r8['naive'], r8['causal'])}  (goal >= 20)")
    print(f"  causal per-token T={hi} / T={lo}: {_ratio(sc[hi], sc[lo])}  (goal <= 1.25)")
    print(f"  full / causal: {_ratio(r8['full'], r8['causal'])}  (goal <= 2.2)")
    print(f"  peak memory causal / tensors: {mem['causal']['ratio']:.2f}  (goal <= 2)")
    kda_section(ts, reps, c)


if __name__ == "__main__":
    main()
