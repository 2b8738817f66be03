"""softmax_attention gives the same answer whichever implementation runs: NaN/inf inputs, scores
that overflow, scale <= 0, fp64 computed in fp64 (gradcheck), and what ``auto`` picks."""

import math

import pytest
import torch

from causalmix import Causal, Chunked, Full, Prefix, Segments, Window, softmax_attention
from causalmix.ops.softmax import available_impls
from causalmix.ops.softmax.impl import sdpa
from causalmix.testing import max_error

NAN = float("nan")
INF = float("inf")
DOCS = Segments(torch.tensor([0] * 30 + [1] * 50 + [2] * 33))


def _inputs(b=2, tq=113, tk=113, hq=4, hkv=2, d=16, dv=24, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, hq, d, generator=g, dtype=dtype),
            torch.randn(b, tk, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, tk, hkv, dv, generator=g, dtype=dtype))


def _poison(q, k, v):
    """NaN in a query row, inf in one key, NaN in one value entry, -inf in another value."""
    q, k, v = q.clone(), k.clone(), v.clone()
    q[0, 5, 1, 3] = NAN
    k[1, 20, 0, 2] = INF
    v[0, 40, 1, 7] = NAN
    v[1, 90, 1, 0] = -INF
    return q, k, v


def _expected(q, k, v, spec, q_offset=0, k_offset=0):
    """The rule, from the dense mask: (out NaN rows, lse NaN rows), each ``[B, Tq, Hq]``."""
    group = q.shape[2] // k.shape[2]
    m = spec.mask(q.shape[1], k.shape[1], q_offset=q_offset, k_offset=k_offset).float()
    bad_q = ~torch.isfinite(q).all(-1)
    bad_k = (~torch.isfinite(k).all(-1)).float().repeat_interleave(group, 2)
    bad_v = (~torch.isfinite(v).all(-1)).float().repeat_interleave(group, 2)
    seen_k = (m @ bad_k) > 0
    seen_kv = (m @ (bad_k + bad_v)) > 0
    return bad_q | seen_kv, bad_q | seen_k


def _check(o, lse, ref_o, ref_lse, nan_out, nan_lse):
    assert torch.equal(torch.isnan(o).any(-1), nan_out)
    assert torch.equal(torch.isnan(o).all(-1), nan_out)  # whole rows
    keep = ~nan_out
    assert max_error(o[keep], ref_o[keep]) <= 2e-5
    if lse is not None:
        assert torch.equal(torch.isnan(lse), nan_lse)
        assert max_error(lse[~nan_lse], ref_lse[~nan_lse]) <= 2e-5


SPECS = [Causal(), Window(9, 2), Chunked(16, lookahead=1), DOCS & Causal(), Prefix(37), Full()]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("impl", ["reference", "blocks", "auto"])
def test_nonfinite_inputs_follow_one_rule(spec, impl):
    q, k, v = _poison(*_inputs())
    nan_out, nan_lse = _expected(q, k, v, spec)
    assert nan_out.any() and (~nan_out).any() and not torch.equal(nan_out, nan_lse)
    ref_o, ref_lse = softmax_attention(q, k, v, spec, impl="reference", return_lse=True)
    _check(ref_o, ref_lse, ref_o, ref_lse, nan_out, nan_lse)
    clean = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (q, k, v)]
    ref_clean = softmax_attention(*clean, spec, impl="reference")
    assert max_error(ref_o[~nan_out], ref_clean[~nan_out]) == 0.0  # unseen bad values: no effect
    o, lse = softmax_attention(q, k, v, spec, impl=impl, return_lse=True)
    _check(o, lse, ref_o, ref_lse, nan_out, nan_lse)
    o = softmax_attention(q, k, v, spec, impl=impl)  # auto: sdpa for Causal() / Full()
    _check(o, None, ref_o, ref_lse, nan_out, nan_lse)


@pytest.mark.parametrize("spec", [Causal(), Full()], ids=repr)
def test_nonfinite_inputs_sdpa(spec):
    q, k, v = _poison(*_inputs())
    nan_out, nan_lse = _expected(q, k, v, spec)
    ref_o, ref_lse = softmax_attention(q, k, v, spec, impl="reference", return_lse=True)
    _check(softmax_attention(q, k, v, spec, impl="sdpa"), None, ref_o, ref_lse, nan_out, nan_lse)


def test_nonfinite_inputs_flex():
    # The shape and spec of test_softmax's flex test: one compilation for both.
    spec = Chunked(16, 1) & Window(40)
    q, k, v = _poison(*_inputs())
    nan_out, nan_lse = _expected(q, k, v, spec)
    ref_o, ref_lse = softmax_attention(q, k, v, spec, impl="reference", return_lse=True)
    with torch.no_grad():
        o = softmax_attention(q, k, v, spec, impl="flex")
    _check(o, None, ref_o, ref_lse, nan_out, nan_lse)


def test_nonfinite_gradients_stay_finite_elsewhere():
    q, k, v = (x.requires_grad_() for x in _poison(*_inputs()))
    spec = Window(9, 2)
    nan_out, _ = _expected(q, k, v, spec)
    for impl in ["reference", "blocks"]:
        o = softmax_attention(q, k, v, spec, impl=impl)
        gq, gk, gv = torch.autograd.grad(o[~nan_out].sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (gq, gk, gv))


@pytest.mark.parametrize("impl", ["reference", "blocks", "auto"])
@pytest.mark.parametrize("spec", [Causal(), Window(9), DOCS & Causal()], ids=repr)
def test_overflowing_score_gives_nan_not_an_empty_row(spec, impl):
    q, k, v = _inputs()
    k = k.abs() + 0.1  # every score of a huge positive query row overflows to +inf
    q[1, 50, 2] = 3e38
    o, lse = softmax_attention(q, k, v, spec, impl=impl, return_lse=True)
    assert torch.isnan(o[1, 50, 2]).all() and torch.isnan(lse[1, 50, 2])
    o[1, 50, 2] = 0
    lse[1, 50, 2] = 0
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    o = softmax_attention(q, k, v, spec, impl=impl)
    assert torch.isnan(o[1, 50, 2]).all()


def test_sdpa_refuses_overflowing_scores_and_scale_not_positive():
    q, k, v = _inputs()
    q[0, 0, 0] = 3e38
    why = available_impls(q, k, v, Causal())
    assert "overflow" in why["sdpa"] and why["blocks"] is None
    for scale in [0.0, -0.5]:
        why = available_impls(q[:, :, :, :8], k[..., :8], v, Causal(), scale=scale)
        assert "scale > 0" in why["sdpa"] and "scale > 0" in why["flex"]
        with pytest.raises(ValueError, match="sdpa needs scale > 0"):
            softmax_attention(*_inputs(), Causal(), impl="sdpa", scale=scale)


@pytest.mark.parametrize("scale", [0.0, -0.7, 1e-30, 3.0])
@pytest.mark.parametrize("spec", [Causal(), Full(), Window(5)], ids=repr)
def test_every_scale_agrees_with_reference(spec, scale):
    q, k, v = _inputs()
    ref = softmax_attention(q, k, v, spec, impl="reference", scale=scale)
    for impl in ["auto", "blocks"]:
        o = softmax_attention(q, k, v, spec, impl=impl, scale=scale)
        assert max_error(o, ref) <= 2e-5, impl
    if scale == 0.0:  # uniform weights over the visible keys
        m = spec.mask(113, 113).float()[0]
        mean = torch.einsum("ij,bjhd->bihd", m / m.sum(-1, keepdim=True),
                            v.repeat_interleave(2, 2))
        assert max_error(ref, mean) <= 1e-5


@pytest.mark.parametrize("scale", [float("nan"), INF, "x", True])
def test_bad_scale_raises(scale):
    with pytest.raises(ValueError, match="scale"):
        softmax_attention(*_inputs(), Causal(), scale=scale)


def test_auto_picks_sdpa_for_causal(monkeypatch):
    calls = []
    real = sdpa.run

    def spy(call):
        calls.append(call.visibility)
        return real(call)

    monkeypatch.setattr(sdpa, "run", spy)
    q, k, v = _inputs(tq=300, tk=300)
    softmax_attention(q, k, v, Causal())
    softmax_attention(q, k, v, Full())
    softmax_attention(q, k, v, Window(4))
    softmax_attention(q, k, v, Causal(), return_lse=True)
    assert calls == [Causal(), Full()]


# ------------------------------------------------------------------ fp64 is computed in fp64


def _fp64_exact(q, k, v, spec, q_offset, k_offset, scale):
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    m = spec.mask(q.shape[1], k.shape[1], q_offset=q_offset, k_offset=k_offset)[:, None]
    p = torch.softmax(s.masked_fill(~m, -INF), -1)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


@pytest.mark.parametrize("impl", ["reference", "blocks"])
@pytest.mark.parametrize("spec", [Causal(), Window(40, 5), Chunked(16, 1), DOCS & Causal()],
                         ids=repr)
def test_fp64_is_computed_in_fp64(impl, spec):
    q, k, v = _inputs(dtype=torch.float64)
    o, lse = softmax_attention(q, k, v, spec, impl=impl, return_lse=True)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    assert max_error(o, _fp64_exact(q, k, v, spec, 0, 0, 0.25)) <= 1e-12


@pytest.mark.parametrize("impl", ["reference", "blocks"])
@pytest.mark.parametrize(
    "spec,tq,tk,q_offset,k_offset",
    [
        (Causal(), 9, 9, 0, 0),
        (Window(3, 1), 11, 11, 0, 0),
        (Chunked(4, lookahead=1), 10, 10, 0, 0),
        (Segments(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])) & Causal(), 9, 9, 0, 0),
        (Causal(), 5, 12, 7, 0),  # queries after a cache
        (Prefix(3), 6, 8, 2, 0),
    ],
    ids=str,
)
def test_fp64_gradcheck(impl, spec, tq, tk, q_offset, k_offset):
    q, k, v = (x.requires_grad_() for x in _inputs(1, tq, tk, 4, 2, 5, 3, torch.float64))

    def f(q, k, v):
        o, lse = softmax_attention(q, k, v, spec, impl=impl, q_offset=q_offset,
                                   k_offset=k_offset, return_lse=True, scale=0.6)
        return o, lse

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8)


def test_fp64_offsets_keep_positions_exact():
    # Huge but allowed offsets: positions stay exact, the answer matches the aligned one.
    q, k, v = _inputs(1, 20, 20, 2, 2, 8, 8, torch.float64)
    base = softmax_attention(q, k, v, Window(5), impl="blocks")
    off = 2**52
    far = softmax_attention(q, k, v, Window(5), impl="blocks", q_offset=off, k_offset=off)
    assert max_error(far, base) == 0.0
    assert math.isfinite(float(far.abs().max()))


# ------------------------------------------------- blocks' worker threads (torch threads > 1)


@pytest.mark.parametrize(
    "spec,b,hq,hkv",
    [
        (Window(40, 5), 2, 4, 2),
        (Segments(torch.stack([torch.arange(113) // 40, torch.arange(113) % 3])) & Causal(), 2,
         4, 2),  # per-example masks: each worker stays within one example
        (Chunked(16, lookahead=1), 1, 3, 1),  # one kv head: nothing to split
        (Prefix(torch.tensor([0, 50, 7])), 3, 2, 2),
    ],
    ids=str,
)
def test_blocks_in_worker_threads_matches_reference(spec, b, hq, hkv):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (x.requires_grad_() for x in _inputs(b, 113, 113, hq, hkv, 16, 24))
        o, lse = softmax_attention(q, k, v, spec, impl="blocks", return_lse=True)
        assert torch.get_num_threads() == 2
        ref_o, ref_lse = softmax_attention(q, k, v, spec, impl="reference", return_lse=True)
        assert max_error(o, ref_o) <= 2e-6 and max_error(lse, ref_lse) <= 2e-6
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        g = torch.autograd.grad((o * w).sum(), (q, k, v))
        g_ref = torch.autograd.grad((ref_o * w).sum(), (q, k, v))
        for a, r in zip(g, g_ref, strict=True):
            assert max_error(a, r) <= 1e-5
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
