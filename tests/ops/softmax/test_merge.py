"""The log-sum-exp merge of partial softmax results (``causalmix.ops.softmax.merge_softmax``):
any split of the keys into two disjoint sets, merged, is softmax over all of them (outputs, lse
and every gradient, against the reference op on the whole set); empty sets and NaN / +inf."""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.softmax import merge_softmax, softmax_attention
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Full, Segments, Visibility, Window


def _split(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (t,), generator=g).bool()  # key j in set A iff side[j]


class _Part(Visibility):
    """``inner`` restricted to the keys of one side of a split (a user spec: the protocol)."""

    def __init__(self, inner, side):
        self.inner, self.side = inner, side

    def visible(self, b, i, j):
        return self.inner.visible(b, i, j) & self.side.to(j.device)[j]


@pytest.mark.parametrize("t", [1, 7, 63, 113])
@pytest.mark.parametrize("spec", [Causal(), Window(5, 2), Full()], ids=repr)
def test_merge_of_a_split_is_softmax_over_all_keys(t, spec):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, t, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    do = torch.randn(2, t, 3, 8, generator=g, dtype=torch.float64)
    dl = torch.randn(2, t, 3, generator=g, dtype=torch.float64)
    side = _split(t, t)
    parts = [_Part(spec, side), _Part(spec, ~side)]

    def run(dtype, merged):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        if merged:
            (oa, la), (ob, lb) = (softmax_attention(*xs, p, impl="reference", return_lse=True)
                                  for p in parts)
            out, lse = merge_softmax(oa, la, ob, lb)
        else:
            out, lse = softmax_attention(*xs, spec, impl="reference", return_lse=True)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (out * do.to(dtype)).sum() + (finite * dl.to(lse.dtype)).sum()
        return [out.detach(), lse.detach(), *torch.autograd.grad(loss, xs)]

    ref, base, got = run(torch.float64, False), run(torch.float32, False), run(torch.float32, True)
    for name, a, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base, strict=True):
        assert not torch.isnan(a).any(), name
        assert_close(a, r, b, name=name)


def test_empty_sets_nan_and_inf():
    o = torch.randn(1, 4, 2, 3)
    lse = torch.tensor([[[0.5, -float("inf")]] * 4])  # [1, 4, 2]: head 1 sees nothing
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, -float("inf"))
    # merging with an empty set changes nothing; empty with empty: output 0, lse -inf
    out, l2 = merge_softmax(o, lse, empty_o, empty_l)
    assert torch.allclose(out[..., 0, :], o[..., 0, :]) and torch.equal(l2, lse)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    # gradients of an all-empty merge are 0, not NaN
    xs = [x.clone().requires_grad_() for x in (o, lse, empty_o, empty_l)]
    out, l2 = merge_softmax(*xs)
    (out.sum() + torch.where(torch.isfinite(l2), l2, 0).sum()).backward()
    assert all(not torch.isnan(x.grad).any() for x in xs)
    # NaN or +inf in: NaN out
    for bad in (float("nan"), float("inf")):
        lb = lse.clone()
        lb[0, 0, 0] = bad
        out, l2 = merge_softmax(o, lb, o, lse)
        assert torch.isnan(out[0, 0, 0]).all() and torch.isnan(l2[0, 0, 0])
        assert not torch.isnan(out[0, 1:]).any()


def test_segments_split_by_position():
    """The ring's case: keys cut by position, each part a partial result with its k_offset."""
    t = 50
    spec = Segments(torch.arange(t) // 7) & Causal()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, t, 2, 4, generator=g) for _ in range(3))
    full = softmax_attention(q.double(), k.double(), v.double(), spec, impl="reference",
                             return_lse=True)
    base = softmax_attention(q, k, v, spec, impl="reference", return_lse=True)
    a = softmax_attention(q, k[:, :20], v[:, :20], spec, impl="reference", return_lse=True)
    b = softmax_attention(q, k[:, 20:], v[:, 20:], spec, k_offset=20, impl="reference",
                          return_lse=True)
    out, lse = merge_softmax(a.output, a.lse, b.output, b.lse)
    assert_close(out, full.output, base.output, name="out")
    assert_close(lse, full.lse, base.lse, name="lse")
