"""The delta-rule family's semantics: the reference against a plain per-query recurrence (and its
reduction to linear attention without the delta correction), against transformers' Gated
DeltaNet, recurrent == reference over every spec, head groupings, states, documents, bad input.
"""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.delta import (
    REGISTRY,
    LinearOutput,
    available_impls,
    delta_attention,
    recurrent_delta_attention,
)
from causalmix.ops.linear import linear_attention
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments, Window

SPEC_NAMES = ["causal", "full", "prefix", "prefix_batch", "chunked", "chunked_la", "seg_causal",
              "seg_full", "seg_prefix", "seg_chunked", "seg_chunked_la"]
HEADS = {"mha": (4, 4, 4), "gqa": (4, 2, 2), "value": (2, 2, 4)}


# ------------------------------------------------------------------ the definition, spelled out
def _oracle(x, spec, *, delta_rule: bool = True) -> torch.Tensor:
    """Each query's own recurrences, one key at a time in fp64, from the spec's dense mask:
    forward over the visible keys up to i, reverse from hi(i) down to i + 1 (one head group,
    no initial state). ``delta_rule=False``: additive updates ``beta_j k_j v_j^T``."""
    q, k, v, beta, g, r = (t.double() for t in (x.q, x.k, x.v, x.beta, x.log_gate,
                                                 x.reverse_log_gate))
    b_, t_, h_, _ = q.shape
    m = spec.mask(t_, t_).expand(b_, t_, t_)
    out = torch.zeros(b_, t_, h_, v.shape[-1], dtype=torch.float64)

    def update(s, b, j, h):
        if not delta_rule:
            return s + beta[b, j, h] * torch.outer(k[b, j, h], v[b, j, h])
        return s + torch.outer(k[b, j, h], beta[b, j, h] * (v[b, j, h] - s.T @ k[b, j, h]))

    for b in range(b_):
        for h in range(h_):
            for i in range(t_):
                seen = torch.nonzero(m[b, i]).flatten().tolist()
                s = torch.zeros(q.shape[-1], v.shape[-1], dtype=torch.float64)
                for j in (j for j in seen if j <= i):
                    s = update(torch.exp(g[b, j, h]) * s, b, j, h)
                rs = torch.zeros_like(s)
                for j in sorted((j for j in seen if j > i), reverse=True):
                    rs = update(torch.exp(r[b, j, h]) * rs, b, j, h)
                out[b, i, h] = s.T @ q[b, i, h] + (torch.exp(r[b, i, h]) * rs).T @ q[b, i, h]
    return out


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_reference_is_the_recurrence_and_reduces_to_linear(delta, name):
    """The reference equals each query's own recurrences; without the delta correction those
    are linear attention with values ``beta v`` (forward weight ``prod exp(g)``, reverse weight
    ``prod_{s=i..j-1} exp(r_s)``, the linear family's)."""
    t = 13
    spec = delta.specs(t)[name]
    x = delta.Inputs(t, 0, heads=(2, 2, 2), state=False)
    ref = delta_attention(x.q.double(), x.k.double(), x.v.double(), spec, beta=x.beta.double(),
                          log_gate=x.log_gate.double(),
                          reverse_log_gate=x.reverse_log_gate.double(), impl="reference")
    torch.testing.assert_close(ref, _oracle(x, spec), rtol=1e-12, atol=1e-12)
    lin = linear_attention(x.q.double(), x.k.double(), x.v.double() * x.beta.double()[..., None],
                           spec,
                           log_gate=x.log_gate.double(),
                           reverse_log_gate=x.reverse_log_gate.double(), impl="reference")
    torch.testing.assert_close(lin, _oracle(x, spec, delta_rule=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads", [(4, 4, 4), (2, 2, 4)])
def test_reference_matches_transformers_gated_delta_rule(delta, heads):
    """Causal Gated DeltaNet as transformers runs it (its recurrent torch path, which scales q
    by D^-1/2 itself), incl. the value grouping of Qwen3-Next and a carried state."""
    pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    x = delta.Inputs(40, 1, heads=heads, beta_range=(0.05, 1.0))
    theirs, their_state = qn.torch_recurrent_gated_delta_rule(
        x.q, x.k, x.v, g=x.log_gate, beta=x.beta, initial_state=x.initial_state,
        output_final_state=True)
    ours, state = delta_attention(x.q * delta.D ** -0.5, x.k, x.v, Causal(), beta=x.beta,
                                  log_gate=x.log_gate, initial_state=x.initial_state,
                                  return_final_state=True, impl="reference")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, their_state, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ recurrent == reference
@pytest.mark.parametrize("t", [1, 7, 63])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_recurrent_matches_reference(delta, name, t):
    off = 0 if t % 2 else 37
    spec = delta.specs(off + t + 64)[name]
    delta.check("recurrent", delta.Inputs(t, 2), spec, dtype=torch.float32, off=off)
    delta.check("recurrent", delta.Inputs(t, 3, heads=HEADS["value"], reverse=False,
                                          state=False), spec, dtype=torch.bfloat16,
                off=37 - off)


@pytest.mark.slow
@pytest.mark.parametrize("t", [113, 500])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_recurrent_matches_reference_long(delta, name, t):
    spec = delta.specs(t + 20)[name]
    delta.check("recurrent", delta.Inputs(t, 4, heads=HEADS["gqa"]), spec, dtype=torch.float32,
                off=13)


@pytest.mark.parametrize("grouping", list(HEADS))
@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
def test_head_groupings_equal_repeated_heads(delta, impl, grouping):
    """GQA and value grouping give the numbers of the same call with the shared heads repeated."""
    x = delta.Inputs(30, 5, heads=HEADS[grouping])
    hq, hk, hv = HEADS[grouping]
    hout = max(hq, hv)
    rep = [t.repeat_interleave(hout // t.shape[2], 2) for t in (x.q, x.k, x.v)]
    for spec in (Causal(), Full(), Chunked(4, lookahead=1)):
        kw = dict(beta=x.beta, log_gate=x.log_gate, reverse_log_gate=x.reverse_log_gate,
                  initial_state=x.initial_state, return_final_state=True, impl=impl)
        a = delta_attention(x.q, x.k, x.v, spec, **kw)
        b = delta_attention(*rep, spec, **kw)
        torch.testing.assert_close(a.output, b.output, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.final_state, b.final_state, rtol=1e-6, atol=1e-6)


def test_beta_above_one_negative_eigenvalues(delta):
    """beta in (1, 2] (negative eigenvalues of the transition): finite, and the impls agree."""
    x = delta.Inputs(63, 6, beta_range=(1.0001, 2.0))
    for impl in ("chunk", "recurrent"):
        for name in ("causal", "full", "chunked_la"):
            delta.check(impl, x, delta.specs(63)[name], dtype=torch.float32, off=0)
    x.beta[:] = 2.0  # the edge: a reflection
    delta.check("chunk", x, Full(), dtype=torch.float32, off=0)


def test_no_gate_is_deltanet(delta):
    """``log_gate=None`` is DeltaNet: the numbers of zero gates."""
    x = delta.Inputs(20, 7)
    for impl in REGISTRY:
        a = delta_attention(x.q, x.k, x.v, Full(), beta=x.beta, impl=impl)
        z = torch.zeros_like(x.beta)
        b = delta_attention(x.q, x.k, x.v, Full(), beta=x.beta, log_gate=z, impl=impl)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ states and boundaries
@pytest.mark.parametrize("impl", ["reference", "chunk", "recurrent"])
@pytest.mark.parametrize("name,cuts", [("causal", [1, 20, 33]), ("seg_causal", [9, 30, 31])])
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_split_and_carry_equals_whole(delta, impl, name, cuts, gate):
    """Causal specs, scalar gates ``[B, T, H]`` and per key dimension ``[B, T, H, D]``: calls
    chained through the carried state equal one call (outputs, state, every gradient)."""
    t, off = 50, 11
    spec = delta.specs(off + t + 8)[name]
    x = delta.Inputs(t, 8, vector=gate == "vector")
    leaves = [y.clone().requires_grad_() for y in (x.q, x.k, x.v, x.beta, x.log_gate,
                                                  x.initial_state)]

    def chained(bounds):
        outs, state = [], leaves[5]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            res = delta_attention(*(y[:, a:b] for y in leaves[:3]), spec,
                                  beta=leaves[3][:, a:b], log_gate=leaves[4][:, a:b],
                                  q_offset=off + a, k_offset=off + a, initial_state=state,
                                  return_final_state=True, impl=impl, chunk_size=8)
            outs.append(res.output)
            state = res.final_state
        out = torch.cat(outs, 1)
        loss = (out * x.do).sum() + (state * x.ds).sum()
        return [out, state, *torch.autograd.grad(loss, leaves)]

    whole, split = chained([0, t]), chained([0, *cuts, t])
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["full", "chunked", "prefix", "chunked_la", "causal"])
def test_documents_never_leak(delta, name):
    """Changing everything (q, k, v, beta, both gates) in one document leaves the outputs of the
    others unchanged, for every impl: nothing crosses a boundary in either direction."""
    t = 40
    ids = torch.tensor([0] * 13 + [1] * 14 + [2] * 13)
    spec = Segments(ids) & delta.specs(t)[name]
    x = delta.Inputs(t, 9)
    base = [y.double() for y in (x.q, x.k, x.v, x.beta, x.log_gate, x.reverse_log_gate)]
    doc = ids == 1
    alt = [y.clone() for y in base]
    for y in alt[:3]:
        y[:, doc] = torch.randn_like(y[:, doc])
    alt[1][:, doc] = torch.nn.functional.normalize(alt[1][:, doc], dim=-1)
    alt[3][:, doc] = 0.5 * alt[3][:, doc] + 0.05
    for y in alt[4:]:
        y[:, doc] = 0.5 * y[:, doc] - 0.1
    for impl in _serving(x):
        kw = dict(impl=impl, chunk_size=8)
        o1 = delta_attention(*base[:3], spec, beta=base[3], log_gate=base[4],
                             reverse_log_gate=base[5], **kw)
        o2 = delta_attention(*alt[:3], spec, beta=alt[3], log_gate=alt[4],
                             reverse_log_gate=alt[5], **kw)
        # unchanged up to fp64 rounding (the cumulative gates run through the other document);
        # a leak would move them by O(1)
        assert float((o1[:, ~doc] - o2[:, ~doc]).abs().max()) < 1e-10, impl
        assert float((o1[:, doc] - o2[:, doc]).abs().max()) > 1e-2, impl


def test_keys_past_the_last_query(delta):
    """``Tk > Tq``: the first Tq outputs of the call over all keys as queries."""
    x = delta.Inputs(30, 10)
    for spec in (Causal(), Full(), Chunked(4, lookahead=2), delta.specs(40)["seg_prefix"]):
        for impl in REGISTRY:
            kw = dict(beta=x.beta, log_gate=x.log_gate, reverse_log_gate=x.reverse_log_gate,
                      initial_state=x.initial_state, return_final_state=True, impl=impl,
                      q_offset=3, k_offset=3, chunk_size=8)
            whole = delta_attention(x.q, x.k, x.v, spec, **kw)
            part = delta_attention(x.q[:, :17], x.k, x.v, spec, **kw)
            torch.testing.assert_close(part.output, whole.output[:, :17], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(part.final_state, whole.final_state, rtol=0, atol=0)


def test_decode_steps_equal_parallel(delta):
    """One token at a time through the carried state (``recurrent_delta_attention``; ``auto``
    picks it for one token) equals the parallel call."""
    t, pre = 25, 9
    x = delta.Inputs(t, 11)
    par = delta_attention(x.q, x.k, x.v, Causal(), beta=x.beta, log_gate=x.log_gate,
                          impl="reference")
    out, state = recurrent_delta_attention(x.q[:, :pre], x.k[:, :pre], x.v[:, :pre], Causal(),
                                           beta=x.beta[:, :pre], log_gate=x.log_gate[:, :pre],
                                           return_final_state=True)
    outs = [out]
    for i in range(pre, t):
        sl = slice(i, i + 1)
        out, state = delta_attention(x.q[:, sl], x.k[:, sl], x.v[:, sl], Causal(),
                                     beta=x.beta[:, sl], log_gate=x.log_gate[:, sl],
                                     q_offset=i, k_offset=i, initial_state=state,
                                     return_final_state=True)
        assert state.dtype == torch.float32
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), par, rtol=1e-5, atol=1e-5)


def test_empty_call_keeps_the_state(delta):
    x = delta.Inputs(0, 12)
    out, state = delta_attention(x.q, x.k, x.v, Full(), beta=x.beta, log_gate=x.log_gate,
                                 initial_state=x.initial_state, return_final_state=True)
    assert out.shape == (delta.B, 0, delta.H, delta.DV)
    assert torch.equal(state, x.initial_state)
    assert isinstance(delta_attention(x.q, x.k, x.v, Causal(), beta=x.beta,
                                      return_final_state=True), LinearOutput)


# ------------------------------------------------------------------ NaN and bad input
@pytest.mark.parametrize("where", ["q", "k", "v", "beta", "log_gate"])
def test_nan_in_nan_out(delta, where):
    """A NaN anywhere reaches the outputs that read it, on every impl (never a silent 0)."""
    t, pos = 20, 9
    x = delta.Inputs(t, 13)
    bad = getattr(x, where).clone()
    bad[:, pos] = float("nan")
    setattr(x, where, bad)
    for impl in _serving(x):
        for spec in (Causal(), Full()):
            out = delta_attention(x.q, x.k, x.v, spec, beta=x.beta, log_gate=x.log_gate,
                                  impl=impl)
            assert torch.isnan(out[:, pos]).all(), (impl, spec)
            if where == "q":
                assert not torch.isnan(out[:, :pos]).any(), (impl, spec)


def _serving(x) -> list[str]:
    """The implementations that serve a plain call on these inputs (every one, once built)."""
    return [n for n, why in available_impls(x.q, x.k, x.v, Causal(), beta=x.beta).items()
            if why is None]


def _call(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(q=torch.randn(1, 8, 2, 4, generator=g), k=torch.randn(1, 8, 2, 4, generator=g),
              v=torch.randn(1, 8, 2, 3, generator=g), visibility=Causal(),
              beta=torch.full((1, 8, 2), 0.5))
    kw.update(over)
    return delta_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("visibility"), **kw)


@pytest.mark.parametrize("over,match", [
    (dict(beta=torch.zeros(1, 8, 2)), r"beta values must lie in \(0, 2\]"),
    (dict(beta=torch.full((1, 8, 2), -0.1)), r"beta values must lie in \(0, 2\]"),
    (dict(beta=torch.full((1, 8, 2), 2.5)), r"beta values must lie in \(0, 2\]"),
    (dict(beta=torch.full((1, 8, 1), 0.5)), r"beta must have shape \[B, Tk, H\] = \[1, 8, 2\]"),
    (dict(beta=torch.full((1, 8, 2), 0.5).double()), "beta must have dtype"),
    (dict(beta=torch.full((1, 8, 2), 0.5, device="meta")), "beta must be on q's device"),
    (dict(beta=0.5), "beta must be a"),
    (dict(beta=torch.ones(1, 8, 2, dtype=torch.int64)), "beta must be a floating"),
    (dict(log_gate=torch.full((1, 8, 2), 0.1)), "log_gate values must be <= 0"),
    (dict(log_gate=torch.full((1, 8, 2), -float("inf"))), "log_gate values must be <= 0 and "
                                                           "finite"),
    (dict(log_gate=-torch.ones(1, 5, 2)), r"log_gate must have shape \[B, Tk, H\]"),
    (dict(reverse_log_gate=-torch.ones(1, 8, 2)), "reverse_log_gate needs log_gate"),
    (dict(log_gate=-torch.ones(1, 8, 2), reverse_log_gate=torch.ones(1, 8, 2)),
     "reverse_log_gate values must be <= 0"),
    (dict(q=torch.randn(1, 8, 2)), "q must be 4-D"),
    (dict(k=torch.randn(1, 8, 2, 4).double()), "q, k, v must share one dtype"),
    (dict(v=torch.randn(1, 8, 2, 3, device="meta")), "q, k, v must be on one device"),
    (dict(v=torch.randn(1, 7, 2, 3)), "k and v must have the same length"),
    (dict(k=torch.randn(1, 8, 2, 5)), "q and k head dims differ"),
    (dict(q=torch.randn(1, 9, 2, 4)), "at least as long as q"),
    (dict(k=torch.randn(1, 8, 3, 4)), "form no served grouping"),
    (dict(q=[1.0]), "q must be a torch.Tensor"),
    (dict(q_offset=2, k_offset=1), "q_offset and k_offset must be equal"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), r"initial_state must have shape"),
    (dict(initial_state=torch.zeros(1, 2, 4, 3).double()), "initial_state must be"),
    (dict(return_final_state=1), "return_final_state must be a bool"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(impl="fast"), "impl must be one of"),
    (dict(visibility=Window(3)), r"delta attention does not support visibility Window"),
    (dict(visibility=Causal() | Chunked(2)), "delta attention does not support visibility"),
    (dict(visibility="causal"), "visibility must be a causalmix.visibility spec"),
])
def test_bad_input_raises_naming_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_available_impls_and_unsupported_spec():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g) for _ in range(3))
    beta = torch.full((1, 6, 2), 0.5)
    ok = available_impls(q, k, v, Full(), beta=beta)
    assert ok["reference"] is None and ok["recurrent"] is None
    bad = available_impls(q, k, v, Window(2), beta=beta)
    assert all("delta attention does not support" in why for why in bad.values())
    with pytest.raises(ValueError, match="Prefix"):  # the message lists the supported specs
        delta_attention(q, k, v, Window(2), beta=beta, impl="reference")
    assert_close(delta_attention(q, k, v, Prefix(3), beta=beta, impl="recurrent"),
                 delta_attention(q.double(), k.double(), v.double(), Prefix(3),
                                 beta=beta.double(), impl="reference"),
                 delta_attention(q, k, v, Prefix(3), beta=beta, impl="reference"))
