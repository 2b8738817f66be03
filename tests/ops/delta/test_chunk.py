"""The chunked (WY / UT) delta scan against the reference: every spec x awkward lengths x chunk
sizes that do and do not divide T x offsets x fp32 / bf16 x every gradient (q, k, v, beta, both
gates, initial state), tolerances from the reference run in the input dtype against the
reference in fp64. Plus: chunk sizes, strong gates, long bf16 sequences, gradcheck, and random
agreement of chunk, recurrent and reference.
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


def _grid(delta, t: int, name: str) -> None:
    off = 0 if t % 2 else 37
    spec = delta.specs(off + t + 64)[name]
    # fp32, separate reverse gate, chunk size that does not divide T, initial state, GQA
    delta.check("chunk", delta.Inputs(t, 0, heads=(4, 2, 2)), spec, dtype=torch.float32,
                off=off, c=16)
    # bf16, reverse gate = log_gate, chunk size that divides T, other offset, no state, value
    # grouping (Gated DeltaNet's)
    delta.check("chunk", delta.Inputs(t, 1, heads=(2, 2, 4), reverse=False, state=False), spec,
                dtype=torch.bfloat16, off=37 - off, c=delta.DIVISOR[t])


@pytest.mark.parametrize("t", [1, 7, 63, 113, 500])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_chunk_matches_reference(delta, name, t):
    _grid(delta, t, name)


@pytest.mark.parametrize("c", [1, 3, 64, 128, 10**9])
def test_chunk_sizes(delta, c):
    """Chunk sizes that do and do not divide T, and larger than T (clamped: same numbers)."""
    for name in ("causal", "full", "prefix", "seg_chunked", "chunked_la"):
        delta.check("chunk", delta.Inputs(113, 3), delta.specs(200)[name], dtype=torch.float32,
                    off=5, c=c)


@pytest.mark.parametrize("name", ["causal", "full", "seg_chunked_la", "prefix_batch"])
def test_strong_gates(delta, name):
    """Gates down to -30 per token: finite, and equal to the reference (all gradients)."""
    delta.check("chunk", delta.Inputs(300, 4, strength=30.0), delta.specs(300)[name],
                dtype=torch.float32, off=0, c=64)


def _finite(t: int) -> None:
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, t, 2, 16, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    beta = torch.rand(1, t, 2, generator=g).clamp_min(1e-3).requires_grad_()
    lg = (-30 * torch.rand(1, t, 2, generator=g) ** 4).requires_grad_()
    for spec in (Causal(), Full()):
        out = chunk_delta_attention(q, k, v, spec, beta=beta, log_gate=lg, chunk_size=64)
        grads = torch.autograd.grad(out.float().sum(), [q, k, v, beta, lg])
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x).all() for x in grads)


def test_bf16_long_strong_gates_finite():
    """bf16 at T = 65536, gates from 0 down to -30 per token: outputs and every gradient
    finite."""
    _finite(65536)


@pytest.mark.parametrize("spec", [Causal(), Full(), Chunked(3, lookahead=1),
                                  Segments(torch.tensor([0] * 5 + [1] * 6)) & Prefix(7)])
def test_gradcheck_chunk_fp64(spec):
    """The hand-written backward (q, k, v, beta, both gates, the state) against finite
    differences."""
    t = 11
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, t, 2, 3, generator=g), torch.randn(1, t, 2, 3, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(1, t, 2, 2, generator=g)
    beta = 0.1 + 1.8 * torch.rand(1, t, 2, generator=g)
    lg, lgr = -torch.rand(1, t, 2, generator=g), -torch.rand(1, t, 2, generator=g)
    s0 = torch.randn(1, 2, 3, 2, generator=g)
    xs = [x.double().requires_grad_() for x in (q, k, v, beta, lg, lgr, s0)]

    def f(q, k, v, beta, lg, lgr, s0):
        return tuple(delta_attention(q, k, v, spec, beta=beta, log_gate=lg, reverse_log_gate=lgr,
                                     initial_state=s0, return_final_state=True, impl="chunk",
                                     chunk_size=4))

    assert torch.autograd.gradcheck(f, xs)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # `delta` is stateless
@given(st.integers(1, 60), st.integers(0, 9), st.sampled_from(["causal", "full", "prefix",
       "chunked", "chunked_la", "seg_full", "seg_chunked_la"]), st.integers(1, 20),
       st.booleans(), st.integers(0, 10**6))
def test_property_chunk_recurrent_reference_agree(delta, t, off, name, c, reverse, seed):
    """fp64: chunk == recurrent == reference with random inputs (outputs, states, gradients)."""
    spec = delta.specs(off + t + 40)[name]
    x = delta.Inputs(t, seed, reverse=reverse)
    ref = delta.run("reference", x, spec, off=off, c=c, dtype=torch.float64)
    for impl in ("chunk", "recurrent"):
        got = delta.run(impl, x, spec, off=off, c=c, dtype=torch.float64)
        for i, (a, r) in enumerate(zip(got, ref, strict=True)):
            scale = 1 + float(r.detach().abs().max())
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9 * scale,
                                       msg=lambda m, i=i, impl=impl: f"{impl} #{i}: {m}")


@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_fp64_is_computed_in_fp64(delta, impl):
    """fp64 inputs are computed in fp64: error ~1e-15, not fp32's ~1e-7."""
    x = delta.Inputs(37, 8)
    kw = dict(beta=x.beta.double(), log_gate=x.log_gate.double(),
              reverse_log_gate=x.reverse_log_gate.double(), chunk_size=8)
    q, k, v = x.q.double(), x.k.double(), x.v.double()
    for spec in (Causal(), Full(), Chunked(4, lookahead=1)):
        out = delta_attention(q, k, v, spec, impl=impl, **kw)
        ref = delta_attention(q, k, v, spec, impl="recurrent" if impl == "reference"
                              else "reference", **kw)
        assert out.dtype == torch.float64
        assert float((out - ref).abs().max()) < 1e-12 * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("n", [0, 1, 2, 30, 200])
def test_prefix_reverse_pass_stops_at_n(delta, n):
    """Prefix(n): the reverse scan runs over the first n keys only (n past the call, inside
    it, at its very start), and the numbers are the reference's."""
    x = delta.Inputs(60, 14)
    delta.check("chunk", x, Prefix(n), dtype=torch.float32, off=0, c=16)
    delta.check("chunk", x, Prefix(torch.tensor([n, 7])), dtype=torch.float32, off=3, c=16)
