"""softmax_attention: every implementation against the reference (outputs, lse, and gradients of
q, k, v), tolerances from a same-precision eager baseline's own error."""


import pytest
import torch

from causalmix import (
    Causal,
    Chunked,
    Full,
    Prefix,
    Segments,
    Window,
    softmax_attention,
)
from causalmix.ops.softmax import available_impls
from causalmix.testing import check_softmax_impl as check_impl
from causalmix.testing import make_qkv, max_error

SEQ = 520  # Segments ids cover positions [0, SEQ)
_gen = torch.Generator().manual_seed(7)
DOCS = Segments(torch.sort(torch.randint(0, 5, (SEQ,), generator=_gen)).values)
BUCKETS = Segments(torch.randint(0, 3, (SEQ,), generator=_gen))  # non-contiguous ids

SPECS = {
    "causal": Causal(),
    "full": Full(),
    "prefix": Prefix(37),
    "prefix_batch": Prefix(torch.tensor([0, 200])),
    "chunked": Chunked(16, lookahead=1),
    "window": Window(40, 5),
    "docs_causal": DOCS & Causal(),
    "buckets": BUCKETS,
    "chunk_and_window": Chunked(32) & Window(48),
    "chunk_or_window": Chunked(24) | Window(9),
    "docs_or_prefix": (DOCS & Window(30)) | Prefix(11),
}


LENGTHS = [1, 7, 63, 113, 500]


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_blocks_matches_reference_self_attention(name, t):
    check_impl("blocks", SPECS[name], tq=t, tk=t)


@pytest.mark.parametrize(
    "tq,tk,q_offset,k_offset",
    [
        (1, 500, 499, 0),  # decode: one query at the end of a long cache
        (1, 113, 300, 190),  # decode at an offset
        (37, 150, 113, 0),  # chunked prefill: new queries after a cache
        (63, 7, 0, 30),  # keys after the queries: many rows see nothing under causal
        (113, 63, 200, 250),
    ],
)
@pytest.mark.parametrize("name", ["causal", "prefix", "chunked", "window", "docs_causal",
                                  "buckets", "chunk_or_window"])
def test_blocks_matches_reference_with_offsets(name, tq, tk, q_offset, k_offset):
    check_impl("blocks", SPECS[name], tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset)


@pytest.mark.parametrize("t", [7, 113, 500])
@pytest.mark.parametrize("name", ["causal", "prefix", "chunked", "window", "docs_causal",
                                  "buckets"])
def test_blocks_bf16(name, t):
    check_impl("blocks", SPECS[name], tq=t, tk=t, dtype=torch.bfloat16)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("name", ["causal", "window", "docs_causal"])
def test_blocks_gqa_and_mqa(name, hq, hkv):
    check_impl("blocks", SPECS[name], tq=113, tk=113, hq=hq, hkv=hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "spec,tq,tk,q_offset,k_offset",
    [
        (Causal(), 113, 113, 0, 0),
        (Causal(), 500, 500, 0, 0),
        (Causal(), 1, 500, 499, 0),
        (Causal(), 37, 150, 150, 0),  # queries after every key: full
        (Causal(), 63, 63, 40, 40),
        (Full(), 7, 113, 0, 0),
        (Full(), 63, 63, 5, 300),
    ],
)
def test_sdpa_matches_reference(spec, tq, tk, q_offset, k_offset, dtype):
    check_impl("sdpa", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, dtype=dtype,
               with_lse=False)


@pytest.mark.parametrize(
    "spec,tq,tk,q_offset,k_offset",
    [
        (Causal(), 113, 113, 0, 0),
        (Full(), 63, 113, 0, 0),
        (Window(40, 5), 113, 113, 0, 0),
        (DOCS & Causal(), 63, 63, 0, 0),
    ],
)
def test_auto_matches_reference(spec, tq, tk, q_offset, k_offset):
    check_impl("auto", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset)
    check_impl("auto", spec, tq=tq, tk=tk, q_offset=q_offset, k_offset=k_offset, with_lse=False)


def test_flex_matches_reference_inference():
    # One compiled shape in the default suite (each new mask compiles for ~20 s on CPU).
    with torch.no_grad():
        check_impl("flex", Chunked(16, 1) & Window(40), tq=113, tk=113, with_lse=False,
                   backward=False)


@pytest.mark.parametrize("name", ["causal", "prefix_batch", "docs_causal", "buckets", "window"])
def test_flex_matches_reference_more_specs(name):
    with torch.no_grad():
        check_impl("flex", SPECS[name], tq=63, tk=113, q_offset=50, with_lse=False,
                   backward=False)


def test_flex_refuses_what_it_cannot_do_on_cpu():
    q, k, v = make_qkv(1, 8, 8, hq=2, hkv=2, d=16, dv=16)
    with pytest.raises(ValueError, match="no backward on CPU.*can: \\['reference', 'blocks'\\]"):
        softmax_attention(q, k, v, Window(3), impl="flex")
    with torch.no_grad():
        with pytest.raises(ValueError, match="log-sum-exp"):
            softmax_attention(q, k, v, Window(3), impl="flex", return_lse=True)


def test_fully_masked_rows_give_zeros_never_nan():
    # Queries 0..9 at positions 0..9, keys at 20..39: causal rows see nothing.
    q, k, v = make_qkv(1, 10, 20, hq=2, hkv=2, d=8, dv=8)
    for impl in ["reference", "blocks"]:
        o, lse = softmax_attention(q, k, v, Causal(), k_offset=20, impl=impl, return_lse=True)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.isneginf(lse).all()
        gq, gk, gv = torch.autograd.grad(o.sum(), (q, k, v))
        for g in (gq, gk, gv):
            assert torch.equal(g, torch.zeros_like(g))
    with torch.no_grad():
        o = softmax_attention(q, k, v, Causal(), k_offset=20, impl="flex")
        assert torch.equal(o, torch.zeros_like(o))


def test_batch_invariance_with_per_example_specs():
    # The batched block plan is a union over examples; each example must still get exactly
    # what it gets alone.
    ids = torch.stack([torch.arange(200) // 50, torch.arange(200) % 3])
    spec = Segments(ids) & Causal()
    q, k, v = make_qkv(2, 200, 200, hq=2, hkv=2, d=16, dv=16)
    both = softmax_attention(q, k, v, spec, impl="blocks")
    for b in range(2):
        alone_spec = Segments(ids[b]) & Causal()
        alone = softmax_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], alone_spec,
                                  impl="blocks")
        ref = softmax_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], alone_spec,
                                impl="reference")
        assert max_error(both[b : b + 1], ref) <= 2e-6
        assert max_error(alone, ref) <= 2e-6


def test_zero_length_inputs():
    q, k, v = make_qkv(2, 0, 5, hq=2, hkv=2, d=8, dv=8)
    assert softmax_attention(q, k, v, Causal()).shape == (2, 0, 2, 8)
    q, k, v = make_qkv(2, 5, 0, hq=2, hkv=2, d=8, dv=8)
    o, lse = softmax_attention(q, k, v, Full(), return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()


def test_explicit_impl_that_cannot_serve_lists_those_that_can():
    q, k, v = make_qkv(1, 16, 16, hq=2, hkv=2, d=8, dv=8)
    with pytest.raises(ValueError, match="sdpa.*Window.*can: \\['reference', 'blocks'\\]"):
        softmax_attention(q, k, v, Window(4), impl="sdpa")
    with pytest.raises(ValueError, match="sdpa.*q_offset"):
        softmax_attention(q, k, v, Causal(), q_offset=3, impl="sdpa")
    with pytest.raises(ValueError, match="log-sum-exp"):
        softmax_attention(q, k, v, Causal(), impl="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        softmax_attention(q, k, v, Causal(), impl="triton")
    why = available_impls(q, k, v, Window(4))
    assert why["reference"] is None and why["blocks"] is None and why["sdpa"] is not None


def _qkv(b=2, tq=8, tk=8, hq=4, hkv=2, d=16, dv=16, dtype=torch.float32):
    return (torch.randn(b, tq, hq, d, dtype=dtype), torch.randn(b, tk, hkv, d, dtype=dtype),
            torch.randn(b, tk, hkv, dv, dtype=dtype))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
        (lambda q, k, v: (q, k[:1], v[:1]), "batch sizes differ"),
        (lambda q, k, v: (q, k, v[:, :5]), "same length"),
        (lambda q, k, v: (q, k, v[:, :, :1]), "same heads"),
        (lambda q, k, v: (q, k[..., :8], v), "head dims differ"),
        (lambda q, k, v: (q[:, :, :3], k, v), "multiple of k/v heads"),
        (lambda q, k, v: (q, k.bfloat16(), v), "one dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "floating"),
        (lambda q, k, v: (q, k.to("meta"), v), "one device"),
        (lambda q, k, v: (q.tolist(), k, v), "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises((ValueError, TypeError), match=match):
        softmax_attention(q, k, v, Causal())


def test_bad_visibility_and_positions():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="visibility must be"):
        softmax_attention(q, k, v, "causal")
    with pytest.raises(ValueError, match="defines positions \\[0, 6\\)"):
        softmax_attention(q, k, v, Segments(torch.tensor([0, 0, 0, 1, 1, 1])))
    with pytest.raises(ValueError, match="batch size 3"):
        softmax_attention(q, k, v, Segments(torch.zeros(3, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="q_offset"):
        softmax_attention(q, k, v, Causal(), q_offset=-2)
    with pytest.raises(ValueError, match="k_offset"):
        softmax_attention(q, k, v, Causal(), k_offset=1.0)
    with pytest.raises(ValueError, match="scale"):
        softmax_attention(q, k, v, Causal(), scale="big")


@pytest.mark.parametrize("impl", ["reference", "blocks"])
def test_works_under_torch_compile(impl):
    q, k, v = _qkv(tq=40, tk=40)
    spec = Chunked(8, 1) & Window(20)

    def f(q, k, v):
        return softmax_attention(q, k, v, spec, impl=impl) * 2

    compiled = torch.compile(f)
    ref = softmax_attention(q, k, v, spec, impl="reference") * 2
    assert max_error(compiled(q, k, v), ref) <= 1e-5
