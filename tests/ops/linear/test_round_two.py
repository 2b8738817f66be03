"""Round two (issue 19) for the linear family: valid input that used to crash deep inside,
extreme gates, specs modified in place, empty batches, meta tensors.

* batch-dependent specs (per-row ``Segments``, per-row ``Prefix``) with no gates, a constant
  decay or gates, on ``chunk`` and ``recurrent``: the reference's numbers (outputs, states,
  every gradient);
* finite log-gates of -1e30 / -1e38 (fp32) and -1e308 (fp64), alone or mixed with ordinary
  gates: every impl equals an fp64 oracle that builds each weight as a running product of
  ``exp(g)`` (so such a gate is a hard reset, weight exactly 0);
* a spec whose tensor was modified in place is refused by every impl; B = 0 gives right-shaped
  empty outputs and states; meta tensors give the right shapes.
"""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.linear import LinearOutput, linear_attention
from causalmix.stream import LinearStream
from causalmix.testing import assert_all_close, assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

B, H, D, DV = 2, 3, 4, 5


def _row_ids(total: int) -> torch.Tensor:
    """``[2, total]`` contiguous segment ids that differ between the rows."""
    pos = torch.arange(total)
    return torch.stack([pos // 5, (pos + 3) // 7])


def _batch_specs(total: int, off: int) -> dict:
    ids = _row_ids(total)
    return {
        "seg_causal": Segments(ids) & Causal(),
        "seg_chunked_la": Segments(ids) & Chunked(2, 1),
        "seg_prefix_before_call": Segments(ids) & Prefix(max(off - 3, 0)),
        "seg_prefix": Segments(ids) & Prefix(off + 9),
        "seg_full": Segments(ids),
        "seg_chunked": Segments(ids) & Chunked(3),
        "prefix_rows": Prefix(torch.tensor([off + 2, off + 30])),
    }


def _inputs(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, t, H, D, generator=g), "k": torch.randn(B, t, H, D, generator=g),
            "v": torch.randn(B, t, H, DV, generator=g),
            "log_gate": -1.5 * torch.rand(B, t, H, generator=g),
            "reverse_log_gate": -1.5 * torch.rand(B, t, H, generator=g),
            "decay": torch.tensor([0.5, 0.9, 0.99]),
            "s0": torch.randn(B, H, D, DV, generator=g),
            "do": torch.randn(B, t, H, DV, generator=g),
            "ds": torch.randn(B, H, D, DV, generator=g)}


def _run(impl, x, spec, *, mode, off, dtype):
    """Output, final state and the gradients of every differentiable input."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")]
    kw, extra = {}, []
    if mode == "decay":
        kw["decay"] = x["decay"].detach().to(sd).requires_grad_()
        extra = [kw["decay"]]
    elif mode == "gates":
        kw["log_gate"] = x["log_gate"].detach().to(sd).requires_grad_()
        kw["reverse_log_gate"] = x["reverse_log_gate"].detach().to(sd).requires_grad_()
        extra = [kw["log_gate"], kw["reverse_log_gate"]]
    s0 = x["s0"].detach().to(sd).requires_grad_()
    out, state = linear_attention(*leaves, spec, q_offset=off, k_offset=off, initial_state=s0,
                                  return_final_state=True, impl=impl, chunk_size=4, **kw)
    loss = (out.to(sd) * x["do"].to(sd)).sum() + (state * x["ds"].to(sd)).sum()
    grads = torch.autograd.grad(loss, leaves + extra + [s0], allow_unused=True,
                                materialize_grads=True)
    return [out, state, *grads]


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("mode", ["none", "decay", "gates"])
@pytest.mark.parametrize("name", list(_batch_specs(10, 5)))
@pytest.mark.parametrize("t,off", [(1, 4), (7, 0), (37, 11)])
def test_batch_dependent_specs_match_the_reference(impl, mode, name, t, off):
    """Per-row specs (a [B, T] Segments, a [B] Prefix) on the fast paths: valid input that
    crashed ``chunk`` with a broadcast error (issue 19.5), now the reference's numbers."""
    spec = _batch_specs(off + t + 8, off)[name]
    x = _inputs(t, seed=t + off)
    truth = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float64)
    base = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float32)
    got = _run(impl, x, spec, mode=mode, off=off, dtype=torch.float32)
    names = ["out", "state", "dq", "dk", "dv"] + {"none": [], "decay": ["ddecay"],
                                                 "gates": ["dg", "dr"]}[mode] + ["ds0"]
    assert_all_close(names, got, truth, base, label=f"{impl} {name} {mode} T={t}")


def test_batch_dependent_segments_stream_equals_parallel():
    """``LinearStream.push`` under a per-row ``Segments & Causal`` (runs chunk per push)."""
    t = 29
    spec = Segments(_row_ids(t)) & Causal()
    x = _inputs(t, 3)
    par = linear_attention(x["q"], x["k"], x["v"], spec, decay=x["decay"], impl="reference")
    truth = linear_attention(*(x[n].double() for n in "qkv"), spec, decay=x["decay"].double(),
                             impl="reference")
    s = LinearStream(spec, decay=x["decay"], chunk_size=4)
    outs, a = [], 0
    for n in (1, 6, 13, 9):
        outs.append(s.push(x["q"][:, a:a + n], x["k"][:, a:a + n], x["v"][:, a:a + n]))
        a += n
    outs.append(s.flush())
    assert_close(torch.cat(outs, 1), truth, par, name="stream", factor=4.0, ulps=64)


# ------------------------------------------------------------------ extreme gates


def _products_oracle(x: dict, spec, dtype):
    """Dense oracle in ``dtype``: w_ij = prod_{s=j+1..i} exp(g_s) (j <= i) and prod_{s=i..j-1}
    exp(r_s) (j > i) as running products (no cumulative sums, so exp(-1e30) = 0 makes every
    product across it exactly 0), where visible; the initial state with weight prod_{s<=i}
    exp(g_s) where the spec shows position 0; the final state at the last position."""
    q, k, v, lg, rg, s0 = (x[n] for n in ("q", "k", "v", "log_gate", "reverse_log_gate", "s0"))
    t = q.shape[1]
    a, r = torch.exp(lg.to(dtype)), torch.exp(rg.to(dtype))  # [B, T, H]
    eye = torch.eye(t, dtype=dtype)
    rows, prev = [], torch.zeros(B, H, t, dtype=dtype)
    for i in range(t):  # forward: row i = row i-1 * a_i, plus 1 on the diagonal
        prev = prev * a[:, i, :, None] + eye[i]
        rows.append(prev)
    fwd = torch.stack(rows, 2)  # [B, H, i, j], j <= i
    rows, nxt = [None] * t, torch.zeros(B, H, t, dtype=dtype)
    for i in range(t - 1, -1, -1):  # reverse: row i = (row i+1 + [j = i+1]) * r_i
        nxt = (nxt + (eye[i + 1] if i + 1 < t else 0)) * r[:, i, :, None]
        rows[i] = nxt
    rev = torch.stack(rows, 2)  # j > i
    vis = spec.mask(t, t).to(dtype)[:, None]  # [B', 1, T, T]
    w = (fwd + rev) * vis
    qd, kd, vd, s0d = (y.to(dtype) for y in (q, k, v, s0))
    o = torch.einsum("bhij,bihd,bjhd,bjhe->bihe", w, qd, kd, vd)
    init = torch.cumprod(a, 1)  # prod_{s <= i} exp(g_s)
    seen0 = vis[:, 0, :, 0]  # [B', T]: query i sees position 0
    o = o + torch.einsum("bihd,bhde->bihe", qd, s0d) * (init * seen0[..., None])[..., None]
    last = fwd[:, :, -1] * vis[:, 0, -1][:, None]  # [B, H, T]
    state = torch.einsum("bhj,bjhd,bjhe->bhde", last, kd, vd) \
        + s0d * (init[:, -1] * seen0[:, -1:])[..., None, None]
    return o, state


def _extreme(t: int, dtype, value: float, kind: str, seed: int) -> dict:
    x = _inputs(t, seed)
    x = {n: y.to(dtype) for n, y in x.items()}
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("log_gate", "reverse_log_gate"):
        where = torch.ones(B, t, H, dtype=torch.bool) if kind == "alone" else \
            torch.rand(B, t, H, generator=g) < 0.2
        x[name] = torch.where(where, torch.tensor(value, dtype=dtype), x[name])
    return x


def _grads_of(fn, x: dict):
    leaves = {n: x[n].detach().clone().requires_grad_()
              for n in ("q", "k", "v", "log_gate", "reverse_log_gate", "s0")}
    o, s = fn(leaves)
    sd = o.dtype if o.dtype == torch.float64 else torch.float32
    loss = (o.to(sd) * x["do"].to(sd)).sum() + (s.to(sd) * x["ds"].to(sd)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                materialize_grads=True)
    return [o.detach(), s.detach(), *grads]


EXTREME_SPECS = {"causal": lambda t: Causal(), "full": lambda t: Full(),
                 "chunked": lambda t: Chunked(3), "chunked_la": lambda t: Chunked(4, 1),
                 "prefix": lambda t: Prefix(9),
                 "seg_full": lambda t: Segments(torch.arange(t) // 6)}
EXTREME_CASES = [(torch.float32, -1e30), (torch.float32, -1e38), (torch.float64, -1e308)]


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("kind", ["alone", "mixed"])
@pytest.mark.parametrize("dtype,value", EXTREME_CASES, ids=["f32-1e30", "f32-1e38", "f64-1e308"])
@pytest.mark.parametrize("name", list(EXTREME_SPECS))
def test_extreme_gates_are_hard_resets(impl, kind, dtype, value, name):
    """A finite log-gate far below exp's range is a hard reset on every impl (issue 19.5):
    outputs, final states and every gradient equal the running-product oracle; finite."""
    t = 23
    spec = EXTREME_SPECS[name](t)
    x = _extreme(t, dtype, value, kind, seed=7)

    def op(leaves):
        return linear_attention(leaves["q"], leaves["k"], leaves["v"], spec,
                                log_gate=leaves["log_gate"],
                                reverse_log_gate=leaves["reverse_log_gate"],
                                initial_state=leaves["s0"], return_final_state=True,
                                impl=impl, chunk_size=4)

    got = _grads_of(op, x)
    truth = _grads_of(lambda y: _products_oracle(y, spec, torch.float64), x)
    names = ["out", "state", "dq", "dk", "dv", "dg", "dr", "ds0"]
    assert all(bool(torch.isfinite(y).all()) for y in got), impl
    if dtype == torch.float64:
        for nm, a, r in zip(names, got, truth, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * (1 + float(r.abs().max())),
                                       msg=lambda m, nm=nm: f"{impl} {name} {nm}: {m}")
    else:
        base = _grads_of(lambda y: _products_oracle(y, spec, torch.float32), x)
        assert_all_close(names, got, truth, base, label=f"{impl} {name} {kind} {value}")
    if kind == "alone":  # every gate a reset: each query sees only its own key
        diag = torch.einsum("bihd,bihd,bihe->bihe", x["q"], x["k"], x["v"])
        torch.testing.assert_close(got[0], diag.to(got[0].dtype), rtol=1e-5, atol=1e-5)


def test_extreme_gate_weights_are_exactly_zero():
    """Across a -1e30 gate nothing leaks, exactly: changing every input before the reset
    leaves the outputs after it bit-identical, on every impl and spec side."""
    t, cut = 20, 9
    x = _extreme(t, torch.float32, -1.0, "mixed", seed=2)
    lg = x["log_gate"].clone()
    lg[:, cut] = -1e30
    alt = {n: x[n].clone() for n in "qkv"}
    for n in "kv":
        alt[n][:, :cut] = torch.randn_like(alt[n][:, :cut])
    for impl in ("reference", "chunk", "recurrent"):
        a = linear_attention(x["q"], x["k"], x["v"], Causal(), log_gate=lg, impl=impl,
                             chunk_size=4)
        b = linear_attention(alt["q"], alt["k"], alt["v"], Causal(), log_gate=lg, impl=impl,
                             chunk_size=4)
        assert torch.equal(a[:, cut:], b[:, cut:]), impl
        assert not torch.equal(a[:, :cut], b[:, :cut])


# ------------------------------------------------------------------ modified specs, B = 0, meta


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent", "auto"])
@pytest.mark.parametrize("which", ["segments", "prefix"])
def test_a_spec_modified_in_place_is_refused_by_every_impl(impl, which):
    x = _inputs(6, 0)
    ids, n = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([2, 4])
    spec = Segments(ids) & Causal() if which == "segments" else Prefix(n)
    linear_attention(x["q"], x["k"], x["v"], spec, impl=impl)
    (spec.a.ids if which == "segments" else spec.n).add_(1)
    with pytest.raises(ValueError, match="modified in place"):
        linear_attention(x["q"], x["k"], x["v"], spec, impl=impl)
    with pytest.raises(ValueError, match="modified in place"):
        linear_attention(x["q"], x["k"], x["v"], spec, impl=impl, log_gate=x["log_gate"])


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent", "auto"])
@pytest.mark.parametrize("mode", ["none", "decay", "gates"])
@pytest.mark.parametrize("spec", [Causal(), Full(), Chunked(4, 1), Prefix(3)], ids=repr)
def test_empty_batch_gives_right_shaped_outputs(impl, mode, spec):
    """B = 0: outputs ``[0, T, H, Dv]`` and states ``[0, H, D, Dv]`` (right-shaped, empty), and
    backward runs to every input."""
    t = 9
    q, k = torch.randn(0, t, H, D, requires_grad=True), torch.randn(0, t, H, D, requires_grad=True)
    v = torch.randn(0, t, H, DV, requires_grad=True)
    kw = {"decay": torch.tensor([0.5, 0.9, 0.99])} if mode == "decay" else \
        {"log_gate": torch.zeros(0, t, H, requires_grad=True)} if mode == "gates" else {}
    res = linear_attention(q, k, v, spec, impl=impl, return_final_state=True,
                           initial_state=torch.zeros(0, H, D, DV), **kw)
    assert isinstance(res, LinearOutput)
    assert res.output.shape == (0, t, H, DV) and res.final_state.shape == (0, H, D, DV)
    assert res.output.dtype == torch.float32 and res.final_state.dtype == torch.float32
    grads = torch.autograd.grad(res.output.sum() + res.final_state.sum(), [q, k, v])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_empty_batch_still_checks_the_impl():
    """B = 0 is served, but an impl that cannot serve the call still raises."""
    q = torch.randn(0, 5, H, D)
    with pytest.raises(ValueError, match="q_offset"):
        linear_attention(q, q, q, Causal(), q_offset=1, k_offset=0, impl="chunk")


@pytest.mark.parametrize("impl", ["reference", "chunk", "auto"])
def test_meta_tensors_give_shapes(impl):
    """Meta tensors (sizing, deferred init): the right shapes and dtypes, nothing computed."""
    q = torch.randn(2, 5, H, D, device="meta")
    for kw in ({}, {"log_gate": torch.zeros(2, 5, H, device="meta")}):
        out, state = linear_attention(q, q, q, Causal(), impl=impl, return_final_state=True,
                                      **kw)
        assert out.is_meta and state.is_meta
        assert out.shape == (2, 5, H, D) and out.dtype == q.dtype
        assert state.shape == (2, H, D, D) and state.dtype == torch.float32
