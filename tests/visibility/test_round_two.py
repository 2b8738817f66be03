"""Round-two reliability of the specs themselves (issue 19): spec arguments of any size never
overflow position arithmetic, tensor-holding specs survive copies, empty batches and empty key
ranges are served, and a spec modified in place is refused by every mixer."""

from __future__ import annotations

import copy
import io
import pickle
import sys

import pytest
import torch

from causalmix import linear_attention, softmax_attention
from causalmix.visibility import (
    MAX_POSITION,
    AdaptiveLookahead,
    Causal,
    Chunked,
    Full,
    Prefix,
    Segments,
    ValidKeys,
    Window,
)

BIG = [sys.maxsize, 2**62, 2**63 - 1, MAX_POSITION, MAX_POSITION + 1, 10**30]


def _oracle(rule, q_positions, k_positions) -> torch.Tensor:
    """The dense mask from a rule on Python ints (no overflow possible)."""
    return torch.tensor([[bool(rule(i, j)) for j in k_positions] for i in q_positions])


def _cases():
    for big in BIG:
        yield f"chunked3-{big}", Chunked(3, lookahead=big), lambda i, j: True
        yield f"chunked64-{big}", Chunked(64, lookahead=big), lambda i, j: True
        yield f"chunkedbig-{big}", Chunked(big, lookahead=big), lambda i, j: True
        yield f"chunksize-{big}", Chunked(big), lambda i, j: True  # one chunk holds everything
        yield f"window-{big}", Window(big, big), lambda i, j: True
        yield f"windowleft-{big}", Window(big), lambda i, j: j <= i
        yield f"windowright-{big}", Window(0, big), lambda i, j: j >= i
        yield f"prefix-{big}", Prefix(big), lambda i, j: True
    yield "prefix-tensor", Prefix(torch.tensor([2**62, 3])), None  # per row: checked below
    yield "adaptive", AdaptiveLookahead(torch.tensor([2**62, 0, 2**63 - 1, 1] * 8)), None


CASES = list(_cases())


@pytest.mark.parametrize("name,spec,rule", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("offset", [0, 5, MAX_POSITION - 40])
def test_huge_spec_arguments_give_the_exact_mask(name, spec, rule, offset):
    if spec.covered_length is not None and offset + 32 > spec.covered_length:
        offset = 0
    qp, kp = range(offset, offset + 32), range(offset, offset + 32)
    m = spec.mask(32, 32, q_offset=offset, k_offset=offset)
    if rule is None:  # per-row specs: build the oracle from their arguments
        if isinstance(spec, Prefix):
            ns = spec.n.tolist()
            want = torch.stack([_oracle(lambda i, j, n=n: j <= i or j < n, qp, kp) for n in ns])
        else:
            a = spec.a.tolist()
            want = _oracle(lambda i, j: j <= i + a[i], qp, kp)[None]
    else:
        want = _oracle(rule, qp, kp)[None]
    assert torch.equal(m, want.expand_as(m))
    # counts and block maps agree with the dense mask; the horizon never wraps negative
    counts = spec.tile_counts(32, 32, 8, q_offset=offset, k_offset=offset)
    dense = m.to(torch.int64).view(m.shape[0], 4, 8, 4, 8).sum((2, 4))
    assert torch.equal(counts, dense.expand_as(counts))
    kr = spec.key_range(torch.arange(offset, offset + 32))
    if kr is not None and kr.hi is not None:
        assert bool((kr.hi >= torch.arange(offset, offset + 32)).all())
    la = spec.lookahead_frames
    assert la is None or 0 <= la < MAX_POSITION


@pytest.mark.parametrize("spec", [Chunked(64, lookahead=sys.maxsize), Window(sys.maxsize,
                                  sys.maxsize), Chunked(3, lookahead=2**62),
                                  AdaptiveLookahead(torch.tensor([2**62, 0, 1, 0] * 10))],
                         ids=repr)
def test_huge_spec_arguments_blocks_equals_reference(spec):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 2, 8, generator=g) for _ in range(3))
    ref = softmax_attention(q, k, v, spec, impl="reference")
    out = softmax_attention(q, k, v, spec, impl="blocks")
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    full = softmax_attention(q, k, v, Full(), impl="reference")
    if not isinstance(spec, AdaptiveLookahead):  # every key visible: the same as Full()
        assert torch.allclose(ref, full, atol=1e-6)


# ------------------------------------------------------------------ copies of tensor specs
def _tensor_specs():
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    return [Segments(ids), Segments(torch.stack([ids, ids.flip(0)])),
            Prefix(torch.tensor([3, 5])), ValidKeys(torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1]] * 2)),
            AdaptiveLookahead(torch.tensor([1, 0, 2, 0, 0, 3, 0, 0])),
            Segments(ids) & Causal(), (Prefix(torch.tensor([2, 4])) & Segments(ids)) | Window(1)]


def _modify(t: torch.Tensor) -> None:
    """Change a spec's tensor in place."""
    if t.dtype == torch.bool:
        t.logical_not_()
    else:
        t.add_(1)


def _torch_roundtrip(spec):
    buf = io.BytesIO()
    torch.save(spec, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("spec", _tensor_specs(), ids=repr)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch"])
def test_a_copy_of_a_tensor_spec_is_a_new_valid_spec(spec, how):
    spec.mask(8, 8)  # fill the instance caches first
    make = {"deepcopy": copy.deepcopy, "pickle": lambda s: pickle.loads(pickle.dumps(s)),
            "torch": _torch_roundtrip}[how]
    twin = make(spec)
    assert twin == spec and hash(twin) == hash(spec)
    assert torch.equal(twin.mask(8, 8), spec.mask(8, 8))
    q = torch.randn(2, 8, 2, 4)
    for impl in ("reference", "blocks"):
        assert torch.equal(softmax_attention(q, q, q, twin, impl=impl),
                           softmax_attention(q, q, q, spec, impl=impl))
    # the copy holds its own tensor: modifying it is refused there, the original still works
    leaf = twin if hasattr(twin, "_tensor") else twin.a
    while not hasattr(leaf, "_tensor"):
        leaf = leaf.a
    _modify(leaf._tensor())
    with pytest.raises(ValueError, match="modified in place"):
        softmax_attention(q, q, q, twin, impl="reference")
    softmax_attention(q, q, q, spec, impl="reference")


# ------------------------------------------------------------------ empty batches and ranges
@pytest.mark.parametrize("spec", [Prefix(torch.tensor([], dtype=torch.int64)),
                                  Segments(torch.zeros(0, 6, dtype=torch.int64)),
                                  ValidKeys(torch.zeros(0, 6, dtype=torch.bool)),
                                  AdaptiveLookahead(torch.zeros(0, 6, dtype=torch.int64)),
                                  Segments(torch.zeros(0, 6, dtype=torch.int64)) & Causal()],
                         ids=repr)
def test_specs_with_batch_zero(spec):
    assert spec.batch_size == 0
    assert spec.mask(4, 6).shape == (0, 4, 6)
    assert spec.tile_counts(4, 6, 2).shape == (0, 2, 3)
    assert spec.block_map(4, 6, 2).shape == (0, 2, 3)
    assert spec.count_visible(4, 6).shape == (0,)


@pytest.mark.parametrize("spec", [Causal(), Full(), Chunked(3, 1), Window(2, 1), Prefix(2),
                                  Segments(torch.tensor([0, 0, 1, 1])) & Causal(),
                                  Chunked(2) | Window(1)], ids=repr)
@pytest.mark.parametrize("q_len,k_len", [(4, 0), (0, 4), (0, 0)])
def test_empty_query_or_key_ranges(spec, q_len, k_len):
    nb = spec.batch_size or 1
    nq, nk = -(-q_len // 2), -(-k_len // 3)
    assert spec.mask(q_len, k_len).shape == (nb, q_len, k_len)
    assert torch.equal(spec.tile_counts(q_len, k_len, 2, 3), torch.zeros(nb, nq, nk,
                                                                          dtype=torch.int64))
    assert spec.block_map(q_len, k_len, 2, 3).shape == (nb, nq, nk)
    assert spec.count_visible(q_len, k_len).tolist() == [0] * nb


# ------------------------------------------------------------------ modified in place
@pytest.mark.parametrize("make", [
    lambda: Segments(torch.tensor([0, 0, 1, 1, 1, 1])) & Causal(),
    lambda: Prefix(torch.tensor([2, 3])),
    lambda: ValidKeys(torch.ones(2, 6, dtype=torch.bool)) & Causal(),
    lambda: AdaptiveLookahead(torch.tensor([0, 1, 0, 1, 0, 0])),
])
@pytest.mark.parametrize("op,impl", [("softmax", "reference"), ("softmax", "blocks"),
                                     ("softmax", "auto"), ("linear", "reference")])
def test_a_spec_modified_in_place_is_refused_at_the_boundary(make, op, impl):
    spec = make()
    x = torch.randn(2, 6, 2, 4)
    fn = softmax_attention if op == "softmax" else linear_attention
    fn(x, x, x, spec, impl=impl)
    leaf = spec if hasattr(spec, "_tensor") else spec.a
    _modify(leaf._tensor())
    with pytest.raises(ValueError, match="modified in place"):
        fn(x, x, x, spec, impl=impl)
