"""Per-key-dimension log-gates (KDA: ``log_gate [B, T, H, D]``, ``S_t = diag(exp(g_t)) S_{t-1}``
then the delta update) in every implementation of the delta family: chunk against the
reference over every spec x awkward lengths x chunk sizes x offsets x fp32 / bf16 x every
gradient, chunk == recurrent == reference, a broadcast scalar gate == the scalar gate, the
plain per-query oracle, split-and-carry, strong gates (both forms of the chunk's within-chunk
decays: the moderate-gate shortcut and the sub-chunked form), NaN, bad shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from causalmix.ops.delta import chunk_delta_attention, delta_attention
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

SPEC_NAMES = ["causal", "full", "prefix", "prefix_batch", "chunked", "chunked_la", "seg_causal",
              "seg_full", "seg_prefix", "seg_chunked", "seg_chunked_la"]
IMPLS = ["reference", "chunk", "recurrent"]


def _grid(delta, t: int, name: str) -> None:
    off = 0 if t % 2 else 37
    spec = delta.specs(off + t + 64)[name]
    # fp32, separate reverse gate, chunk size that does not divide T, initial state, GQA;
    # moderate gates: the chunk's shortcut
    delta.check("chunk", delta.Inputs(t, 0, heads=(4, 2, 2), vector=True), spec,
                dtype=torch.float32, off=off, c=16)
    # bf16, reverse gate = log_gate, chunk size that divides T, other offset, no state, value
    # grouping; gates down to -8 per token: the sub-chunked form for chunks of 21 and more
    delta.check("chunk", delta.Inputs(t, 1, heads=(2, 2, 4), reverse=False, state=False,
                                      vector=True, strength=8.0), spec,
                dtype=torch.bfloat16, off=37 - off, c=delta.DIVISOR[t])


@pytest.mark.parametrize("t", [1, 7, 63, 113,
                               pytest.param(500, marks=pytest.mark.slow)])  # 10-30 s each
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_chunk_matches_reference_vector_gate(delta, name, t):
    """(T = 500: the dense reference's ``[B, H, T, T, D]`` weights make it slow.)"""
    _grid(delta, t, name)


@pytest.mark.parametrize("name", ["full", "seg_chunked_la"])
def test_chunk_matches_reference_vector_gate_500(delta, name):
    """T = 500 in the default suite, one head group: fp32 (shortcut) and bf16 (sub-chunked)."""
    spec = delta.specs(600)[name]
    delta.check("chunk", delta.Inputs(500, 0, heads=(1, 1, 1), vector=True), spec,
                dtype=torch.float32, off=37, c=64)
    delta.check("chunk", delta.Inputs(500, 1, heads=(1, 1, 1), vector=True, strength=8.0),
                spec, dtype=torch.bfloat16, off=0, c=50)


@pytest.mark.parametrize("t", [1, 7, 63])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_recurrent_matches_reference_vector_gate(delta, name, t):
    off = 0 if t % 2 else 5
    spec = delta.specs(off + t + 64)[name]
    delta.check("recurrent", delta.Inputs(t, 2, heads=(4, 2, 2), vector=True), spec,
                dtype=torch.float32, off=off)


@pytest.mark.parametrize("c", [1, 3, 64, 128, 10**9])
@pytest.mark.parametrize("strength", [1.0, 4.0, 30.0])
def test_chunk_sizes_vector_gate(delta, c, strength):
    """Chunk sizes that do and do not divide T and larger than T, under the three forms of the
    within-chunk decays: gates to -1 (the shortcut), -4 (sub-chunks of 16 split at their
    middle; of 113 for C = T = 113) and -30 (explicit sub-chunks of 8, of 1 for C = 113)."""
    for name in ("causal", "full", "seg_chunked", "chunked_la"):
        delta.check("chunk", delta.Inputs(113, 3, vector=True, strength=strength),
                    delta.specs(200)[name], dtype=torch.float32, off=5, c=c)


@pytest.mark.parametrize("name", ["causal", "full", "seg_chunked_la", "prefix_batch"])
def test_strong_vector_gates(delta, name):
    """Gates down to -30 per token and dimension: finite, and equal to the reference (all
    gradients), next to gates near 0 in the other dimensions."""
    x = delta.Inputs(300, 4, vector=True, strength=30.0)
    weak = torch.arange(delta.D) % 2 == 0
    x.log_gate[..., weak] *= 1e-3
    delta.check("chunk", x, delta.specs(300)[name], dtype=torch.float32, off=0, c=64)


def _finite(t: int) -> None:
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, t, 2, 16, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    beta = torch.rand(1, t, 2, generator=g).clamp_min(1e-3).requires_grad_()
    lg = (-30 * torch.rand(1, t, 2, 16, generator=g) ** 4).requires_grad_()
    for spec in (Causal(), Full()):
        out = chunk_delta_attention(q, k, v, spec, beta=beta, log_gate=lg, chunk_size=64)
        grads = torch.autograd.grad(out.float().sum(), [q, k, v, beta, lg])
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.slow  # 5-15 s
def test_bf16_long_strong_vector_gates_finite():
    """bf16 at T = 65536, gates from 0 down to -30 per token and dimension: outputs and every
    gradient finite."""
    _finite(65536)


def test_bf16_strong_vector_gates_finite_short():
    """The same at T = 4096 (default suite)."""
    _finite(4096)


@pytest.mark.parametrize("spec", [Causal(), Full(), Chunked(3, lookahead=1),
                                  Segments(torch.tensor([0] * 5 + [1] * 6)) & Prefix(7)])
@pytest.mark.parametrize("strength", [1.0, 30.0])
def test_gradcheck_chunk_vector_gate_fp64(spec, strength):
    """The hand-written backward with vector gates (q, k, v, beta, both gates, the state)
    against finite differences, chunks of 8 (the shortcut, or explicit sub-chunks of 8)."""
    _gradcheck(spec, 11, strength, 8)


@pytest.mark.parametrize("spec", [Causal(), Full()])
def test_gradcheck_chunk_vector_gate_split_subchunks(spec):
    """The same with gates to -4 and chunks of 32: sub-chunks of 16 split at their middle (for
    these inputs, forward and reverse; the shortcut does not hold)."""
    _gradcheck(spec, 40, 4.0, 32)


def _gradcheck(spec, t: int, strength: float, c: int) -> None:
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, t, 2, 3, generator=g), torch.randn(1, t, 2, 3, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(1, t, 2, 2, generator=g)
    beta = 0.1 + 1.8 * torch.rand(1, t, 2, generator=g)
    lg, lgr = (-strength * torch.rand(1, t, 2, 3, generator=g) for _ in range(2))
    s0 = torch.randn(1, 2, 3, 2, generator=g)
    xs = [x.double().requires_grad_() for x in (q, k, v, beta, lg, lgr, s0)]

    def f(q, k, v, beta, lg, lgr, s0):
        return tuple(delta_attention(q, k, v, spec, beta=beta, log_gate=lg, reverse_log_gate=lgr,
                                     initial_state=s0, return_final_state=True, impl="chunk",
                                     chunk_size=c))

    assert torch.autograd.gradcheck(f, xs)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # `delta` is stateless
@given(st.integers(1, 60), st.integers(0, 9), st.sampled_from(["causal", "full", "prefix",
       "chunked", "chunked_la", "seg_full", "seg_chunked_la"]), st.integers(1, 40),
       st.booleans(), st.sampled_from([1.0, 10.0]), st.integers(0, 10**6))
def test_property_vector_gate_impls_agree(delta, t, off, name, c, reverse, strength, seed):
    """fp64: chunk == recurrent == reference with random vector gates (outputs, states,
    gradients)."""
    spec = delta.specs(off + t + 40)[name]
    x = delta.Inputs(t, seed, reverse=reverse, vector=True, strength=strength)
    ref = delta.run("reference", x, spec, off=off, c=c, dtype=torch.float64)
    for impl in ("chunk", "recurrent"):
        got = delta.run(impl, x, spec, off=off, c=c, dtype=torch.float64)
        for i, (a, r) in enumerate(zip(got, ref, strict=True)):
            scale = 1 + float(r.detach().abs().max())
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * scale,
                                       msg=lambda m, i=i, impl=impl: f"{impl} #{i}: {m}")


# ------------------------------------------------------------------ semantics
def _oracle(x, spec) -> torch.Tensor:
    """Each query's own recurrences one key at a time in fp64 from the spec's dense mask,
    with the diagonal decay ``diag(exp(g_j)) S`` (one head group, no initial state)."""
    q, k, v, beta, g, r = (t.double() for t in (x.q, x.k, x.v, x.beta, x.log_gate,
                                                 x.reverse_log_gate))
    b_, t_, h_, _ = q.shape
    m = spec.mask(t_, t_).expand(b_, t_, t_)
    out = torch.zeros(b_, t_, h_, v.shape[-1], dtype=torch.float64)

    def update(s, b, j, h):
        return s + torch.outer(k[b, j, h], beta[b, j, h] * (v[b, j, h] - s.T @ k[b, j, h]))

    for b in range(b_):
        for h in range(h_):
            for i in range(t_):
                seen = torch.nonzero(m[b, i]).flatten().tolist()
                s = torch.zeros(q.shape[-1], v.shape[-1], dtype=torch.float64)
                for j in (j for j in seen if j <= i):
                    s = update(torch.exp(g[b, j, h])[:, None] * s, b, j, h)
                rs = torch.zeros_like(s)
                for j in sorted((j for j in seen if j > i), reverse=True):
                    rs = update(torch.exp(r[b, j, h])[:, None] * rs, b, j, h)
                rev = torch.exp(r[b, i, h])[:, None] * rs
                out[b, i, h] = s.T @ q[b, i, h] + rev.T @ q[b, i, h]
    return out


@pytest.mark.parametrize("name", ["causal", "full", "prefix", "chunked_la", "seg_chunked"])
def test_reference_is_the_diagonal_recurrence(delta, name):
    """The reference with a vector gate is the per-query recurrence with ``diag(exp(g))``."""
    x = delta.Inputs(19, 5, state=False, vector=True)
    spec = delta.specs(19)[name]
    got = delta_attention(x.q.double(), x.k.double(), x.v.double(), spec, beta=x.beta.double(),
                          log_gate=x.log_gate.double(),
                          reverse_log_gate=x.reverse_log_gate.double(), impl="reference")
    torch.testing.assert_close(got, _oracle(x, spec), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["causal", "full", "chunked_la", "seg_prefix"])
def test_broadcast_vector_gate_is_the_scalar_gate(delta, impl, name):
    """A ``[B, T, H]`` gate expanded over D gives the scalar gate's numbers: outputs, state
    and every gradient (the vector gate's summed over D), fp32, same tolerance as chunk against
    the reference."""
    x = delta.Inputs(70, 6)
    spec = delta.specs(80)[name]
    scal = delta.run(impl, x, spec, off=3, c=16, dtype=torch.float32)
    xv = delta.Inputs(70, 6)
    xv.log_gate = x.log_gate[..., None].expand(-1, -1, -1, delta.D).contiguous()
    xv.reverse_log_gate = x.reverse_log_gate[..., None].expand(-1, -1, -1, delta.D).contiguous()
    vec = delta.run(impl, xv, spec, off=3, c=16, dtype=torch.float32)
    vec[6], vec[7] = vec[6].sum(-1), vec[7].sum(-1)  # d log_gate, d reverse_log_gate
    for i, (a, b) in enumerate(zip(vec, scal, strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * (1 + float(b.detach().abs().max())),
                                   msg=lambda m, i=i: f"#{i}: {m}")


def test_mixed_scalar_and_vector_gates(delta):
    """A scalar forward gate with a vector reverse gate (and the other way round)."""
    x = delta.Inputs(40, 7, vector=True)
    x.log_gate = x.log_gate[..., 0].contiguous()
    for spec in (Full(), Chunked(6, lookahead=1)):
        delta.check("chunk", x, spec, dtype=torch.float32, off=0, c=8)
        delta.check("recurrent", x, spec, dtype=torch.float32, off=0, c=8)
    x = delta.Inputs(40, 8, vector=True)
    x.reverse_log_gate = x.reverse_log_gate[..., 0].contiguous()
    delta.check("chunk", x, Full(), dtype=torch.float32, off=0, c=8)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_vector_gate_nan_out(delta, impl):
    """A NaN in one dimension of one position's gate reaches the outputs that read it."""
    t, pos = 20, 9
    x = delta.Inputs(t, 13, vector=True)
    x.log_gate[:, pos, :, 3] = float("nan")
    for spec in (Causal(), Full()):
        out = delta_attention(x.q, x.k, x.v, spec, beta=x.beta, log_gate=x.log_gate, impl=impl,
                              chunk_size=8)
        assert torch.isnan(out[:, pos]).all(), spec


def _call(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(beta=torch.full((1, 8, 2), 0.5))
    kw.update(over)
    q, k, v = torch.randn(3, 1, 8, 2, 4, generator=g).unbind(0)
    return delta_attention(q, k, v, Causal(), **kw)


@pytest.mark.parametrize("over,match", [
    (dict(log_gate=-torch.ones(1, 8, 2, 3)),
     r"log_gate must have shape \[B, Tk, H\] or \[B, Tk, H, D\] = \[1, 8, 2\] or \[1, 8, 2, 4\]"),
    (dict(log_gate=-torch.ones(1, 8, 2, 4), reverse_log_gate=-torch.ones(1, 8, 2, 5)),
     r"reverse_log_gate must have shape \[B, Tk, H\] or \[B, Tk, H, D\]"),
    (dict(log_gate=-torch.ones(1, 8, 2, 4, 1)), r"log_gate must have shape"),
    (dict(log_gate=torch.full((1, 8, 2, 4), 0.1)), "log_gate values must be <= 0"),
    (dict(log_gate=torch.full((1, 8, 2, 4), -float("inf"))), "log_gate values must be <= 0"),
    (dict(log_gate=-torch.ones(1, 8, 2, 4), reverse_log_gate=torch.ones(1, 8, 2, 4)),
     "reverse_log_gate values must be <= 0"),
])
def test_bad_vector_gates_raise_naming_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)
