"""No silent wrong answers at the spec boundary: tensor specs snapshot their tensor, positions
are validated, bad arguments raise ``ValueError`` naming the argument, names mean one thing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from causalmix import linear_attention, softmax_attention
from causalmix.visibility import (
    MAX_POSITION,
    AdaptiveLookahead,
    And,
    Causal,
    Chunked,
    Or,
    Prefix,
    Segments,
    Window,
    check_int,
)


def _qkv(t, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, t, h, d, generator=g) for _ in range(3))


def _dense(q, k, v, mask):
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v.double()).to(q.dtype)


# ------------------------------------------------------------------ 1. aliasing
@pytest.mark.parametrize("impl", ["reference", "blocks", "auto"])
@pytest.mark.parametrize("kind", ["segments", "segments2d", "prefix"])
def test_refilling_the_callers_buffer_changes_nothing(impl, kind):
    t = 37
    q, k, v = _qkv(t)
    if kind == "segments":
        buf = torch.arange(t) // 9
        spec = Segments(buf) & Causal()
    elif kind == "segments2d":
        buf = torch.stack([torch.arange(t) // 9, torch.arange(t) // 5])
        spec = Segments(buf)
    else:
        buf = torch.tensor([5, 20])
        spec = Prefix(buf)
    first = softmax_attention(q, k, v, spec, impl=impl)
    before = spec.mask(t, t).clone()
    buf.fill_(0)  # the caller reuses its buffer
    again = softmax_attention(q, k, v, spec, impl=impl)
    assert torch.equal(spec.mask(t, t), before)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again, _dense(q, k, v, before.expand(2, t, t)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: Segments(torch.arange(20) // 4),
    lambda: Prefix(torch.tensor([3, 9])),
    lambda: AdaptiveLookahead(torch.ones(2, 20, dtype=torch.int64)),
])
def test_modifying_the_specs_own_tensor_in_place_is_refused(make):
    spec = make()
    q, k, v = _qkv(20)
    softmax_attention(q, k, v, spec, impl="blocks")  # caches plans and hashes
    for f in dataclasses.fields(spec):
        t = getattr(spec, f.name)
        if isinstance(t, torch.Tensor):
            t.add_(1)
    for call in (lambda: spec.mask(20, 20), lambda: hash(spec),
                 lambda: softmax_attention(q, k, v, spec, impl="blocks"),
                 lambda: spec.block_map(20, 20, 4)):
        with pytest.raises(ValueError, match="modified in place"):
            call()


def test_integer_tensors_of_other_dtypes_are_copied_too():
    ids = torch.arange(12, dtype=torch.int64) // 3
    spec = Segments(ids)
    assert spec.ids.data_ptr() != ids.data_ptr()
    n = torch.tensor([4, 6], dtype=torch.int64)
    assert Prefix(n).n.data_ptr() != n.data_ptr()


# ------------------------------------------------------------------ 5. positions
@pytest.mark.parametrize("offset", [2**53, 2**60 - 5, 2**60, 2**62, 2**63, 2**64, -1])
@pytest.mark.parametrize("which", ["q_offset", "k_offset"])
def test_huge_or_negative_offsets_raise_at_the_boundary(offset, which):
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match=which.split("_")[0] + "_offset"):
        softmax_attention(q, k, v, Causal(), **{which: offset})
    with pytest.raises(ValueError, match=which.split("_")[0] + "_offset"):
        linear_attention(q, k, v, Causal(), **{which: offset})
    with pytest.raises(ValueError, match="offset"):
        Causal().mask(4, 4, **{which: offset})


def test_offsets_just_below_the_bound_are_exact():
    q, k, v = _qkv(5)
    off = MAX_POSITION - 5
    for spec in (Causal(), Window(2, 1), Chunked(4, 1)):
        ref = softmax_attention(q, k, v, spec, impl="reference")
        # Chunk boundaries depend on the absolute position: compare with the mask's own formula
        mask = spec.mask(5, 5, q_offset=off, k_offset=off)
        out = softmax_attention(q, k, v, spec, q_offset=off, k_offset=off, impl="blocks")
        torch.testing.assert_close(out, _dense(q, k, v, mask.expand(2, 5, 5)), rtol=1e-5,
                                   atol=1e-5)
        if isinstance(spec, (Causal, Window)):  # translation invariant
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [[0, 1, 2], (0, 1), torch.tensor([0.0, 1.5]),
                                 torch.tensor([-3, 1]), torch.tensor([True, False]),
                                 torch.zeros(2, 3, dtype=torch.int64), 5])
def test_horizon_refuses_bad_positions(bad):
    with pytest.raises(ValueError, match="positions"):
        Causal().horizon(bad)


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("make, arg", [
    (lambda: And(Causal(), "x"), "b"),
    (lambda: And("x", Causal()), "a"),
    (lambda: Or(Causal(), 3), "b"),
    (lambda: Chunked(0), "size"),
    (lambda: Chunked(4, lookahead=-1), "lookahead"),
    (lambda: Chunked(4.0), "size"),
    (lambda: Window(True), "left"),
    (lambda: Window(2, 1.5), "right"),
    (lambda: Prefix(2.5), "n"),
    (lambda: Prefix(torch.tensor([1.0])), "n"),
    (lambda: Segments([0, 0, 1]), "ids"),
    (lambda: Segments(torch.zeros(2, 2, 2, dtype=torch.int64)), "ids"),
])
def test_spec_arguments_raise_valueerror_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_check_int_accepts_integer_kinds_only():
    assert check_int("x", 3, 0) == 3 and check_int("x", torch.tensor(4), 0) == 4
    for bad in (True, 2.0, "3", None, torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="x must be an int"):
            check_int("x", bad, 0)


# ------------------------------------------------------------------ names mean one thing
def test_chunked_arguments_are_its_attributes():
    c = Chunked(4, lookahead=1)
    assert c.size == 4 and c.lookahead == 1 and c.lookahead_frames == 7
    assert repr(c) == "Chunked(size=4, lookahead=1)"
    r = dataclasses.replace(c, size=8)
    assert r == Chunked(8, lookahead=1) and r.lookahead_frames == 15
    assert dataclasses.replace(c, lookahead=0) == Chunked(4)
    assert eval(repr(c), {"Chunked": Chunked}) == c
    for spec in (Window(3, 2), Prefix(5), Causal(), Segments(torch.zeros(4, dtype=torch.long))):
        assert isinstance(spec.lookahead_frames, (int, type(None)))
    assert Window(3, 2).lookahead_frames == 2 and Window(3, 2).lookback_frames == 3


# ------------------------------------------------------------------ packed documents
def test_segments_from_lengths_cu_seqlens_and_position_ids_agree():
    lengths = [3, 1, 4, 2]
    a = Segments.from_lengths(lengths)
    b = Segments.from_lengths(torch.tensor(lengths))
    c = Segments.from_cu_seqlens(torch.tensor([0, 3, 4, 8, 10]))
    d = Segments.from_cu_seqlens([0, 3, 4, 8, 10])
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 0, 1])
    e = Segments.from_position_ids(pos)
    assert a == b == c == d == e
    assert a.ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    # [B, T]; restarts need not be at 0: any break of +1 starts a document
    p2 = torch.stack([pos, torch.tensor([5, 6, 7, 8, 9, 0, 1, 2, 3, 4])])
    s2 = Segments.from_position_ids(p2)
    assert s2.ids.shape == (2, 10) and s2.ids[1].tolist() == [0] * 5 + [1] * 5
    m = (s2 & Causal()).mask(10, 10)
    assert not bool(m[1, 5, 4]) and bool(m[1, 4, 0])


@pytest.mark.parametrize("make, arg", [
    (lambda: Segments.from_lengths([2, -1]), "lengths"),
    (lambda: Segments.from_lengths([2.0, 1]), "lengths"),
    (lambda: Segments.from_lengths("ab"), "lengths"),
    (lambda: Segments.from_cu_seqlens([1, 3]), "cu_seqlens"),
    (lambda: Segments.from_cu_seqlens([0, 3, 2]), "cu_seqlens"),
    (lambda: Segments.from_position_ids(torch.zeros(2, 2, 2, dtype=torch.long)),
     "position_ids"),
    (lambda: Segments.from_position_ids(torch.zeros(4)), "position_ids"),
])
def test_packed_constructors_refuse_bad_input(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()
