"""The public ops under ``torch.func`` (``vmap``, ``grad``, ``jacrev``) and under
``torch.compile(fullgraph=True)``: equal to loops, to autograd and to eager; implementations
that cannot be traced refuse inside a transform with the reason."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch.func import grad, jacrev, vmap

from causalmix.ops import delta_attention, linear_attention, softmax_attention
from causalmix.visibility import Causal, Chunked, Full, Prefix

B, T, H, D = 2, 7, 2, 4


def _inputs(seed: int, lead: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(*lead, B, T, H, D, generator=g, dtype=torch.float64)
         for n in ("q", "k", "v")}
    x["q"], x["k"] = x["q"] * 0.5, x["k"] * 0.5
    x["beta"] = torch.rand(*lead, B, T, H, generator=g, dtype=torch.float64) + 0.1
    x["log_gate"] = -torch.rand(*lead, B, T, H, generator=g, dtype=torch.float64)
    return x


def _delta_k(k):
    return torch.nn.functional.normalize(k, dim=-1)  # a delta rule with unit keys


#: (name, op of (q, k, v, beta, log_gate), spec): every family, causal and non-causal specs.
OPS = [
    ("softmax-prefix", lambda q, k, v, b, g, s: softmax_attention(q, k, v, s), Prefix(3)),
    ("softmax-causal", lambda q, k, v, b, g, s: softmax_attention(q, k, v, s), Causal()),
    ("linear-gated-chunked",
     lambda q, k, v, b, g, s: linear_attention(q, k, v, s, log_gate=g), Chunked(2, 1)),
    ("linear-full", lambda q, k, v, b, g, s: linear_attention(q, k, v, s), Full()),
    ("delta-causal",
     lambda q, k, v, b, g, s: delta_attention(q, _delta_k(k), v, s, beta=b, log_gate=g),
     Causal()),
    ("delta-prefix",
     lambda q, k, v, b, g, s: delta_attention(q, _delta_k(k), v, s, beta=b, log_gate=g),
     Prefix(3)),
]
IDS = [o[0] for o in OPS]


def _call(op, spec, x):
    return op(x["q"], x["k"], x["v"], x["beta"], x["log_gate"], spec)


@pytest.mark.parametrize(("name", "op", "spec"), OPS, ids=IDS)
def test_vmap_equals_a_loop(name, op, spec):
    x = _inputs(0, lead=(3,))
    names = list(x)
    out = vmap(lambda *t: _call(op, spec, dict(zip(names, t, strict=True))))(*x.values())
    loop = torch.stack([_call(op, spec, {n: x[n][i] for n in names}) for i in range(3)])
    torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "op", "spec"), OPS, ids=IDS)
def test_grad_and_jacrev_equal_autograd(name, op, spec):
    x = _inputs(1)
    w = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(q, k, v, b, g):
        return (_call(op, spec, {"q": q, "k": k, "v": v, "beta": b, "log_gate": g}) * w).sum()

    args = [x[n] for n in ("q", "k", "v", "beta", "log_gate")]
    leaves = [a.clone().requires_grad_() for a in args]
    want = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True, materialize_grads=True)
    got = grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    for n, a, b in zip("qkvbg", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{n}")

    def out_q(q):  # the Jacobian of one output row block w.r.t. q, against autograd rows
        return _call(op, spec, {**x, "q": q})[0, :, 0, 0]

    jac = jacrev(out_q)(x["q"])  # [T, B, T, H, D]
    qq = x["q"].clone().requires_grad_()
    rows = _call(op, spec, {**x, "q": qq})[0, :, 0, 0]
    for i in range(T):
        (row,) = torch.autograd.grad(rows[i], qq, retain_graph=True)
        torch.testing.assert_close(jac[i], row, rtol=1e-10, atol=1e-12)


def test_nan_rule_holds_under_vmap():
    """softmax's NaN in, NaN out: the same rows NaN under vmap (on device) as in eager."""
    x = _inputs(3, lead=(2,))
    x["v"][1, 0, 2, 1, 0] = float("nan")  # key 2 of example 0: seen by queries >= 2 (Prefix 1)
    x["q"][0, 1, 5, 0, 3] = float("inf")
    spec = Prefix(1)
    out = vmap(lambda q, k, v: softmax_attention(q, k, v, spec))(x["q"], x["k"], x["v"])
    loop = torch.stack([softmax_attention(x["q"][i], x["k"][i], x["v"][i], spec)
                        for i in range(2)])
    assert torch.equal(out.isnan(), loop.isnan())
    assert out.isnan().any()
    torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize(("fn", "impl", "delta"), [
    (softmax_attention, "blocks", False),
    (linear_attention, "chunk", False),
    (delta_attention, "chunk", True),
], ids=["softmax-blocks", "linear-chunk", "delta-chunk"])
def test_untraceable_impls_refuse_inside_transforms(fn, impl, delta):
    x = _inputs(4, lead=(2,))

    def run(q, k, v, beta):
        extra = {"beta": beta} if delta else {}
        return fn(q, k, v, Causal(), impl=impl, **extra)

    args = (x["q"], x["k"], x["v"], x["beta"])
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot serve.*torch.func transform"):
        vmap(run)(*args)
    first = [a[0] for a in args]
    with pytest.raises(ValueError, match=r"traceable: \['reference'"):
        grad(lambda q: run(q, *first[1:]).sum())(first[0])
    assert torch.isfinite(run(*first)).all()  # eager: served


@pytest.mark.parametrize(("name", "op", "spec"),
                         [o for o in OPS if o[0] != "delta-prefix"],
                         ids=[i for i in IDS if i != "delta-prefix"])
def test_ops_compile_fullgraph_without_breaks(name, op, spec):
    x = _inputs(5)
    x["q"][0, 4, 1, 2] = float("nan")  # NaN in, NaN out under compile too
    args = [x[n] for n in ("q", "k", "v", "beta", "log_gate")]

    def f(q, k, v, b, g):
        return op(q, k, v, b, g, spec)

    dynamo.reset()
    explained = dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), f(*args), rtol=1e-10, atol=1e-12,
                               equal_nan=True)
