"""The visibility spec: the dense mask is the oracle; block maps, counts, lookahead, lookback and
horizons must agree with it exactly."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalmix.visibility import (
    EMPTY,
    FULL,
    PARTIAL,
    And,
    Causal,
    Chunked,
    Full,
    Prefix,
    Segments,
    Window,
)

L = 160  # every generated spec is defined on positions [0, L)


def brute_mask(spec, tq, tk, qo, ko):
    """visible(i, j) evaluated pair by pair from the table in the module docstring."""
    out = torch.zeros(spec.batch_size or 1, tq, tk, dtype=torch.bool)
    for b in range(out.shape[0]):
        for a in range(tq):
            for c in range(tk):
                out[b, a, c] = _visible(spec, b, qo + a, ko + c)
    return out


def _visible(spec, b, i, j):
    name = type(spec).__name__
    if name == "Causal":
        return j <= i
    if name == "Full":
        return True
    if name == "Prefix":
        n = int(spec.n[b]) if isinstance(spec.n, torch.Tensor) else spec.n
        return j <= i or j < n
    if name == "Chunked":
        return j // spec.size <= i // spec.size + spec.lookahead
    if name == "Window":
        return i - spec.left <= j <= i + spec.right
    if name == "Segments":
        ids = spec.ids if spec.ids.dim() == 2 else spec.ids[None].expand(b + 1, -1)
        return bool(ids[b, i] == ids[b, j])
    if name == "And":
        return _visible(spec.a, b, i, j) and _visible(spec.b, b, i, j)
    if name == "Or":
        return _visible(spec.a, b, i, j) or _visible(spec.b, b, i, j)
    raise AssertionError(name)


def leaf_specs(draw_ids):
    return st.one_of(
        st.just(Causal()),
        st.just(Full()),
        st.integers(0, 40).map(Prefix),
        st.builds(Chunked, st.integers(1, 24), st.integers(0, 2)),
        st.builds(Window, st.integers(0, 30), st.integers(0, 10)),
        draw_ids,
    )


@st.composite
def segment_specs(draw):
    contiguous = draw(st.booleans())
    n = draw(st.integers(1, 6))
    if contiguous:
        cuts = sorted(draw(st.lists(st.integers(1, L - 1), max_size=n)))
        ids = torch.zeros(L, dtype=torch.int64)
        for c in cuts:
            ids[c:] += 1
    else:
        seed = draw(st.integers(0, 10_000))
        ids = torch.randint(0, n, (L,), generator=torch.Generator().manual_seed(seed))
    return Segments(ids)


specs = st.recursive(
    leaf_specs(segment_specs()),
    lambda children: st.one_of(
        st.tuples(children, children).map(lambda t: t[0] & t[1]),
        st.tuples(children, children).map(lambda t: t[0] | t[1]),
    ),
    max_leaves=3,
)


@st.composite
def geometry(draw):
    tq = draw(st.integers(1, 70))
    tk = draw(st.integers(1, 70))
    qo = draw(st.integers(0, L - tq))
    ko = draw(st.integers(0, L - tk))
    bq = draw(st.integers(1, 33))
    bk = draw(st.integers(1, 33))
    return tq, tk, qo, ko, bq, bk


def tiles_of(mask, bq, bk):
    b, tq, tk = mask.shape
    nq, nk = -(-tq // bq), -(-tk // bk)
    for r in range(nq):
        for c in range(nk):
            yield r, c, mask[:, r * bq : (r + 1) * bq, c * bk : (c + 1) * bk]


@settings(max_examples=150, deadline=None)
@given(spec=specs, geo=geometry())
def test_block_map_classifies_every_tile_exactly(spec, geo):
    tq, tk, qo, ko, bq, bk = geo
    mask = spec.mask(tq, tk, q_offset=qo, k_offset=ko)
    kinds = spec.block_map(tq, tk, bq, bk, q_offset=qo, k_offset=ko)
    counts = spec.tile_counts(tq, tk, bq, bk, q_offset=qo, k_offset=ko)
    assert kinds.shape == (mask.shape[0], -(-tq // bq), -(-tk // bk))
    for r, c, tile in tiles_of(mask, bq, bk):
        for b in range(mask.shape[0]):
            t = tile[b]
            kind = int(kinds[b, r, c])
            assert int(counts[b, r, c]) == int(t.sum())
            if kind == EMPTY:
                assert not t.any()
            elif kind == FULL:
                assert t.all()
            else:
                assert kind == PARTIAL and t.any() and not t.all()


@settings(max_examples=60, deadline=None)
@given(spec=specs, geo=geometry())
def test_mask_matches_the_definition(spec, geo):
    tq, tk, qo, ko, _, _ = geo
    tq, tk = min(tq, 25), min(tk, 25)
    got = spec.mask(tq, tk, q_offset=qo, k_offset=ko)
    want = brute_mask(spec, tq, tk, qo, ko)
    assert torch.equal(got, want.expand_as(got))


def _max_offsets(spec, n=L):
    m = spec.mask(n, n)[0] if spec.batch_size is None else spec.mask(n, n).any(0)
    i, j = m.nonzero(as_tuple=True)
    return int((j - i).max()), int((i - j).max())


@pytest.mark.parametrize(
    "spec,lookahead,lookback",
    [
        (Causal(), 0, None),
        (Full(), None, None),
        (Prefix(5), 4, None),
        (Prefix(0), 0, None),
        (Prefix(torch.tensor([3, 9])), 8, None),
        (Chunked(8), 7, None),
        (Chunked(8, lookahead=2), 23, None),
        (Window(12, 3), 3, 12),
        (Window(0), 0, 0),
        (Chunked(16, 1) & Window(20), 0, 20),
        (Window(4, 6) | Window(9, 2), 6, 9),
        (Segments(torch.arange(L) // 10) & Causal(), 0, None),
    ],
)
def test_lookahead_and_lookback(spec, lookahead, lookback):
    assert spec.lookahead_frames == lookahead
    assert spec.lookback_frames == lookback
    ahead, back = _max_offsets(spec)
    if lookahead is not None:
        assert ahead <= lookahead
        if not isinstance(spec, And):
            assert ahead == lookahead  # exact for single specs and |; an upper bound for &
    if lookback is not None:
        assert back == lookback


@pytest.mark.parametrize(
    "spec",
    [Causal(), Prefix(7), Chunked(5, 1), Window(3, 4), Segments(torch.arange(L) // 13),
     Chunked(6) & Window(4, 2), Segments(torch.arange(L) // 13) & Chunked(4, 1)],
)
def test_horizon_is_the_last_visible_key(spec):
    pos = torch.arange(0, 120)
    m = spec.mask(120, L)
    last = torch.where(m, torch.arange(L), -1).amax(-1)  # [B', 120]
    assert torch.equal(spec.horizon(pos).expand_as(last), last)


def test_horizon_refuses_unbounded_and_non_interval():
    with pytest.raises(ValueError, match="unbounded"):
        Full().horizon(torch.arange(4))
    with pytest.raises(ValueError, match="range"):
        Segments(torch.tensor([0, 1, 0, 1])).horizon(torch.arange(4))


def test_count_visible():
    assert int(Causal().count_visible(100, 100)) == 100 * 101 // 2
    assert int(Full().count_visible(7, 9)) == 63
    assert int(Window(2).count_visible(10, 10)) == 10 + 9 + 8
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    assert (Segments(ids) & Causal()).count_visible(5, 5).tolist() == [3 + 6, 5]


def test_masks_use_absolute_positions():
    # Decode: one query at position 9 sees keys 0..9 of a 10-key cache.
    assert Causal().mask(1, 10, q_offset=9).all()
    # Top-left vs bottom-right ambiguity does not exist: offsets say where rows sit.
    m = Causal().mask(2, 4, q_offset=2)[0]
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert not Causal().mask(3, 3, q_offset=0, k_offset=5).any()


def test_value_semantics():
    assert Causal() == Causal() and hash(Causal()) == hash(Causal())
    assert Chunked(4, lookahead=1) == Chunked(4, 1) != Chunked(4)
    assert Window(3) == Window(3, 0)
    assert Prefix(3) == Prefix(torch.tensor(3))
    assert Prefix(torch.tensor([1, 2])) == Prefix(torch.tensor([1, 2], dtype=torch.int32))
    assert Prefix(torch.tensor([1, 2])) != Prefix(torch.tensor([1, 3]))
    ids = torch.tensor([0, 0, 1, 1])
    assert Segments(ids) == Segments(ids.clone().int())
    assert hash(Segments(ids)) == hash(Segments(ids.clone()))
    assert Segments(ids) != Segments(torch.tensor([0, 1, 1, 1]))
    assert (Causal() & Window(4)) == (Causal() & Window(4))
    docs = Segments(ids) & Causal()
    assert len({Causal(), Causal(), Full(), docs, Segments(ids) & Causal()}) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        Window(3).left = 5


def test_repr_is_readable():
    assert repr(Causal()) == "Causal()"
    assert repr(Chunked(64, lookahead=1)) == "Chunked(size=64, lookahead=1)"
    assert repr(Window(256) & Causal()) == "(Window(left=256, right=0) & Causal())"
    assert "4 runs" in repr(Segments(torch.tensor([0, 0, 1, 2, 3])))
    assert repr(Prefix(torch.tensor([2, 5]))) == "Prefix(n=[2, 5])"


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: Chunked(0), "size"),
        (lambda: Chunked(4, lookahead=-1), "lookahead"),
        (lambda: Chunked(2.5), "size"),
        (lambda: Window(-1), "left"),
        (lambda: Window(3, -2), "right"),
        (lambda: Window(True), "left"),
        (lambda: Prefix(-1), "n"),
        (lambda: Prefix(1.5), "n"),
        (lambda: Prefix(torch.tensor([1.0, 2.0])), "n"),
        (lambda: Prefix(torch.tensor([[1, 2]])), "n"),
        (lambda: Prefix(torch.tensor([1, -2])), "n"),
        (lambda: Segments([0, 0, 1]), "ids"),
        (lambda: Segments(torch.tensor([0.0, 1.0])), "ids"),
        (lambda: Segments(torch.zeros(2, 2, 2, dtype=torch.long)), "ids"),
        (lambda: Segments(torch.tensor([True, False])), "ids"),
    ],
)
def test_invalid_arguments_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_positions_and_batch_checks():
    seg = Segments(torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="positions"):
        seg.mask(3, 5)
    with pytest.raises(ValueError, match="q_offset"):
        Causal().mask(3, 3, q_offset=-1)
    with pytest.raises(ValueError, match="batch sizes"):
        Segments(torch.zeros(2, 8, dtype=torch.long)) & Prefix(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="block_q"):
        Causal().block_map(4, 4, 0)
    # A batch-free spec combines with a batched one.
    spec = Segments(torch.zeros(2, 8, dtype=torch.long)) & Prefix(3)
    assert spec.batch_size == 2 and spec.mask(8, 8).shape == (2, 8, 8)
