"""Comparison helpers used by the test suites: tolerances from a baseline's own error.

A fast path may err against the fp32 reference at most ``factor`` (2) times what a same-precision
eager baseline errs, plus a floor of a few units in the last place of the dtype (so that a
baseline that happens to be exact does not demand bit-exactness)::

    assert_close(fast, ref, baseline, name="dq")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["assert_all_close", "assert_close", "assert_decode_equals_parallel",
           "assert_layer_matches", "assert_sharded_linear_matches",
           "assert_stream_equals_parallel", "check_softmax_impl",
           "grads_of", "layer_outputs_and_grads", "make_qkv",
           "build_hybrid_model", "max_error", "run_process_group", "sequence_parallel_check",
           "softmax_eager"]


def _floor(ref: torch.Tensor, dtype: torch.dtype, ulps: float) -> float:
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(1.0, scale)


def max_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference over positions finite in ``ref``; ``inf`` if the non-finite positions
    (e.g. lse = -inf of empty rows) differ, or if ``actual`` has a NaN."""
    actual, ref = actual.detach().float(), ref.detach().float()
    if actual.shape != ref.shape:
        raise AssertionError(f"shape {list(actual.shape)} != reference {list(ref.shape)}")
    if torch.isnan(actual).any():
        return float("inf")
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(actual)) or not torch.equal(actual[~fin], ref[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    return float((actual[fin] - ref[fin]).abs().max())


def assert_close(
    actual: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    *,
    name: str = "tensor",
    factor: float = 2.0,
    ulps: float = 8.0,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert ``max|actual - ref| <= factor * max|baseline - ref| + ulps * eps(dtype) * max|ref|``.

    ``dtype`` (default: ``actual``'s) sets the floor's eps. NaN anywhere, or a mismatch in where
    ``ref`` is infinite, fails.
    """
    dtype = dtype or actual.dtype
    err = max_error(actual, ref)
    base = max_error(baseline, ref)
    if base == float("inf"):
        raise AssertionError(f"{name}: the baseline itself disagrees with the reference on inf/NaN")
    tol = factor * base + _floor(ref.detach().float(), dtype, ulps)
    if not err <= tol:
        raise AssertionError(
            f"{name}: max error {err:.3g} exceeds {factor} x baseline error {base:.3g} + floor "
            f"({tol:.3g} in all)"
        )


def layer_outputs_and_grads(fn: Any, layer: torch.nn.Module, x: torch.Tensor,
                            dtype: torch.dtype, *, seed: int = 1):
    """``fn(layer', x')`` on copies of ``layer`` and ``x`` in ``dtype``: ``([output, *the
    gradient of every parameter], parameter names)``, the gradients of ``(output * w).sum()``
    for a fixed random ``w`` (``seed``)."""
    import copy

    mod = copy.deepcopy(layer).to(dtype)
    out = fn(mod, x.to(dtype))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    names, params = zip(*mod.named_parameters(), strict=True)
    return [out, *torch.autograd.grad((out * w).sum(), params)], list(names)


def assert_layer_matches(fast: Any, eager: Any, layer: torch.nn.Module, x: torch.Tensor, *,
                         label: str = "", fast_layer: torch.nn.Module | None = None) -> list[str]:
    """A layer's forward ``fast(layer, x)`` (on ``fast_layer`` if given: the same weights with
    another config) against its eager formula ``eager(layer, x)`` in fp64: the output and every
    parameter's gradient, each within :func:`assert_close` of the fp32 eager run's own error.
    Returns the parameter names."""
    got, names = layer_outputs_and_grads(fast, fast_layer or layer, x, torch.float32)
    ref, _ = layer_outputs_and_grads(eager, layer, x, torch.float64)
    base, _ = layer_outputs_and_grads(eager, layer, x, torch.float32)
    for name, a, r, bl in zip(["out", *names], got, ref, base, strict=True):
        assert_close(a, r, bl, name=f"{label} {name}".strip())
    return names


def assert_stream_equals_parallel(model: torch.nn.Module, ids: torch.Tensor, push: int, *,
                                  name: str = "stream") -> None:
    """A :class:`causalmix.nn.SequenceModel` streamed through
    :class:`~causalmix.stream.ModelStream` in pushes of ``push`` tokens (then flushed) equals
    its parallel forward on ``ids: [B, T]``, within :func:`assert_close` of the fp32 parallel
    run's own error against fp64."""
    import copy

    from causalmix.stream import ModelStream

    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids)
        base = model(ids)
        s = ModelStream(model)
        got = torch.cat([s.push(ids[:, a:a + push]) for a in range(0, ids.shape[1], push)]
                        + [s.flush()], 1)
    assert_close(got, ref, base, name=name)


def assert_decode_equals_parallel(model: torch.nn.Module, ids: torch.Tensor, prompt: int, *,
                                  name: str = "decode") -> None:
    """``ModelStream.step`` over a prompt of ``prompt`` tokens, then one token at a time, equals
    the parallel forward on ``ids: [B, T]`` (tolerance as :func:`assert_stream_equals_parallel`)."""
    import copy

    from causalmix.stream import ModelStream

    with torch.no_grad():
        ref, base = copy.deepcopy(model).double()(ids), model(ids)
        s = ModelStream(model)
        got = torch.cat([s.step(ids[:, :prompt])]
                        + [s.step(ids[:, i:i + 1]) for i in range(prompt, ids.shape[1])], 1)
    assert_close(got, ref, base, name=name)


def assert_sharded_linear_matches(rank: int, world: int, spec: Any, layout: str,
                                  inputs: Sequence[torch.Tensor | None], *, name: str = "",
                                  chunk_size: int = 4) -> None:
    """Inside a process group: :func:`causalmix.distributed.linear_attention` on this rank's
    shards of ``inputs = (q, k, v, log_gate, reverse_log_gate or None)`` (the whole sequences,
    the same on every rank) equals the single-process op -- the output and the gradients of
    every input, gathered from every rank, each within :func:`assert_close` of the fp32
    reference's own error against fp64."""
    import torch.distributed as dist

    from causalmix.distributed import linear_attention, shard, unshard
    from causalmix.ops.linear import linear_attention as single

    full = [x for x in inputs if x is not None]
    reverse = len(full) == 5
    out_shape = (*inputs[0].shape[:3], inputs[2].shape[-1])
    w = torch.randn(out_shape, generator=torch.Generator().manual_seed(world))

    def run(fn, xs, weight, **kw):
        o = fn(*xs[:3], spec, log_gate=xs[3], reverse_log_gate=xs[4] if reverse else None,
               **kw)
        return [o, *torch.autograd.grad((o * weight.to(o.dtype)).sum(), xs)]

    truth, base = (run(single, [x.to(dt).requires_grad_() for x in full], w, impl="reference")
                   for dt in (torch.float64, torch.float32))
    local = [shard(x, layout, rank, world).requires_grad_() for x in full]
    got = []
    for x in run(linear_attention, local, shard(w, layout, rank, world), layout=layout,
                 chunk_size=chunk_size):  # gather every rank's shard before asserting
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        got.append(unshard(parts, layout))
    names = ["out", "dq", "dk", "dv", "dlog_gate", "dreverse"]
    for nm, a, r, bl in zip(names, got, truth, base, strict=False):
        assert_close(a, r, bl, name=f"{layout} {name} W={world} {nm}")


def assert_all_close(
    names: list[str],
    actual: Sequence[torch.Tensor],
    ref: Sequence[torch.Tensor],
    baseline: Sequence[torch.Tensor],
    *,
    label: str = "",
) -> None:
    """:func:`assert_close` for each named output (outputs, states, gradients) of a fast path,
    against the reference and a same-precision baseline; fp64 results get fp32's floor (the
    reference computes them in fp64 too)."""
    if not (len(names) == len(actual) == len(ref) == len(baseline)):
        raise AssertionError(f"{label}: {len(names)} names for {len(actual)} results, "
                             f"{len(ref)} references, {len(baseline)} baselines")
    for name, a, r, bl in zip(names, actual, ref, baseline, strict=True):
        assert_close(a, r, bl, name=f"{label} {name}",
                     dtype=a.dtype if a.dtype != torch.float64 else torch.float32)


# ---------------------------------------------------------------------------- softmax helpers
def make_qkv(b: int, tq: int, tk: int, *, hq: int, hkv: int, d: int, dv: int,
             dtype: torch.dtype = torch.float32, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q: [b, tq, hq, d]``, ``k: [b, tk, hkv, d]``, ``v: [b, tk, hkv, dv]`` (leaves that
    require grad), drawn in fp32 from a fixed seed and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, tk, hkv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, tk, hkv, dv, generator=g).to(dtype).requires_grad_()
    return q, k, v


def softmax_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, *, q_offset: int = 0,
                  k_offset: int = 0, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain masked softmax attention in the inputs' own dtype, ``(out, lse)``: the error budget
    of a same-precision kernel."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, 2).transpose(1, 2)
    vv = v.repeat_interleave(group, 2).transpose(1, 2)
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    m = spec.mask(q.shape[1], k.shape[1], q_offset=q_offset, k_offset=k_offset)[:, None]
    lowest = torch.finfo(q.dtype).min
    p = torch.softmax(s.masked_fill(~m, lowest), dim=-1) * m
    seen = m.any(-1)
    lse = torch.logsumexp(s.masked_fill(~m, lowest), dim=-1)
    lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    return (p @ vv).transpose(1, 2), lse.transpose(1, 2)


def grads_of(out: torch.Tensor, lse: torch.Tensor | None, inputs: Sequence[torch.Tensor],
             seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Gradients w.r.t. ``inputs`` of a random loss touching every output and every finite lse."""
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum()
    if lse is not None:
        wl = torch.randn(lse.shape, generator=g)
        loss = loss + (torch.where(torch.isfinite(lse), lse.float(), 0) * wl).sum()
    return torch.autograd.grad(loss, inputs)


def check_softmax_impl(impl: str, spec, *, b: int = 2, tq: int, tk: int, hq: int = 4,
                       hkv: int = 2, d: int = 16, dv: int = 24, q_offset: int = 0,
                       k_offset: int = 0, dtype: torch.dtype = torch.float32,
                       with_lse: bool = True, backward: bool = True) -> None:
    """``softmax_attention(..., impl=impl)`` against ``impl="reference"``: output, lse and the
    gradients of q, k, v, each within :func:`assert_close` of the eager baseline's error."""
    from causalmix.ops.softmax import softmax_attention

    q, k, v = make_qkv(b, tq, tk, hq=hq, hkv=hkv, d=d, dv=dv, dtype=dtype)
    kw = dict(q_offset=q_offset, k_offset=k_offset)
    ref_o, ref_l = softmax_attention(q, k, v, spec, impl="reference", return_lse=True, **kw)
    base_o, base_l = softmax_eager(q, k, v, spec, scale=d ** -0.5, **kw)
    if with_lse:
        o, lse = softmax_attention(q, k, v, spec, impl=impl, return_lse=True, **kw)
        assert lse.dtype == torch.float32 and lse.shape == (b, tq, hq)
        assert_close(lse, ref_l, base_l, name=f"{impl} lse", dtype=dtype)
    else:
        o = softmax_attention(q, k, v, spec, impl=impl, **kw)
        lse = ref_l = base_l = None
    assert o.dtype == dtype and o.shape == (b, tq, hq, dv)
    assert not torch.isnan(o).any()
    assert_close(o, ref_o, base_o, name=f"{impl} output")
    if not backward:
        return
    inputs = (q, k, v)
    for name, a, r, bl in zip("qkv", grads_of(o, lse, inputs), grads_of(ref_o, ref_l, inputs),
                              grads_of(base_o, base_l, inputs), strict=True):
        assert not torch.isnan(a).any(), f"NaN in d{name}"
        assert_close(a, r, bl, name=f"{impl} d{name}")


# ---------------------------------------------------------------------------- process groups
def _group_worker(rank: int, world: int, store: str, target: Any, kwargs: dict,
                  results: Any) -> None:
    """Body of one spawned rank: a gloo group, ``target(rank, world, **kwargs)``, the result
    (or the traceback) put on ``results``."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        try:
            results.put((rank, "ok", target(rank, world, **kwargs)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_process_group(target: Any, world: int, store_dir: str, *, timeout: float = 240.0,
                      **kwargs: Any) -> dict[int, Any]:
    """Run ``target(rank, world, **kwargs)`` (an importable module-level function) on every rank
    of a ``world``-process gloo group on this machine, one thread each; returns ``{rank:
    result}``. Raises ``AssertionError`` with every failing rank's traceback, and kills the group
    after ``timeout`` seconds: nothing hangs."""
    import multiprocessing as mp
    import os
    import queue
    import time
    import uuid

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = os.path.join(store_dir, f"store_{uuid.uuid4().hex}")
    procs = [ctx.Process(target=_group_worker, args=(r, world, store, target, kwargs, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, status, payload = results.get(timeout=1.0)
                got[rank] = (status, payload)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}: {payload}" for r, (status, payload) in sorted(got.items())
              if status != "ok"]
    missing = sorted(set(range(world)) - set(got))
    assert not errors and not missing, "\n".join(errors + [f"ranks {missing} did not report "
                                                           f"within {timeout}s"] * bool(missing))
    return {r: payload for r, (_, payload) in got.items()}


# ---------------------------------------------------------------------------- sequence parallel
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def build_hybrid_model(mixers: Sequence[str], visibility: Sequence[Any], *, seed: int = 0,
                       vocab_size: int = 11, d_model: int = 16, n_heads: int = 2,
                       dtype: torch.dtype = torch.float64) -> Any:
    """A :class:`causalmix.nn.SequenceModel` whose layer ``l`` is of kind ``mixers[l]``
    (``"softmax"``, ``"linear"``, ``"gated"``) under ``visibility[l]``, seeded, in ``dtype``."""
    from causalmix.nn import Block, ModelConfig, SequenceModel

    torch.manual_seed(seed)
    cfgs = [ModelConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, mixer=m,
                        visibility=(spec,), feature_dim=4) for m, spec in zip(mixers, visibility,
                                                                               strict=True)]
    model = SequenceModel(cfgs[0])
    for layer in range(1, len(cfgs)):
        model.blocks.append(Block(cfgs[layer].blocks[0]))
    return model.to(dtype)


def sequence_parallel_check(rank: int, world: int, *, mixers: Sequence[str],
                            visibility: Sequence[Any], layout: str, steps: int = 2,
                            fsdp: bool = False, seq_len: int = 16, batch: int = 2,
                            seed: int = 0) -> dict[str, float]:
    """Train the same fp64 model for ``steps`` Adam steps in one process and sequence-parallel
    (:class:`causalmix.distributed.SequenceParallel`, optionally with FSDP2 over the same
    ranks) on this rank of the current process group; returns the largest differences of the
    loss, of every parameter gradient and of the parameters after the steps."""
    import copy

    import torch.nn.functional as F

    from causalmix.distributed import SequenceParallel, fsdp_sums_gradients

    model = build_hybrid_model(mixers, visibility, seed=seed)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 11, (batch, seq_len), generator=g)
    labels = torch.randint(0, 11, (batch, seq_len), generator=g)
    labels[:, ::5] = -100  # unscored tokens: the mean is over the scored ones of every rank
    sp = SequenceParallel(model, layout=layout)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        fsdp_sums_gradients(model)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for _ in range(steps):
        loss_ref = F.cross_entropy(ref(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss_ref.backward()
        loss = sp.loss(sp(sp.shard(ids)), sp.shard(labels))
        loss.backward()
        if not fsdp:
            sp.reduce_gradients()
        worst["loss"] = max(worst["loss"], _max_diff(sp.reduce(loss), loss_ref))
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            worst["grad"] = max(worst["grad"], _max_diff(p.grad, q.grad))
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        worst["param"] = max(worst["param"], _max_diff(p, q))
    return worst
