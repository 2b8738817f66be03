"""Head grouping in the linear family (issue 20 item 2): GQA (k, v with fewer heads than q) and
value grouping (q, k with fewer heads than v: Mamba-2, Gated DeltaNet, Qwen3-Next's 16 key heads
and 32 value heads), told apart by the shapes.

* the reference equals an explicit repeat-then-run construction (outputs, states, and every
  gradient, summed over the repeated heads);
* chunk and recurrent equal the reference for every spec, both groupings, a decay or gates,
  with every gradient, tolerances from the fp32 reference against the fp64 one;
* the fast paths never materialise repeated heads (no repeat / index op, no tensor as large
  as a repeated input).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from causalmix.ops.heads import Heads
from causalmix.ops.linear import linear_attention
from causalmix.testing import assert_all_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments

B, D, DV = 2, 4, 3

#: (q heads, k heads, v heads): output heads = max; GQA and value grouping, group 2 and 4
GROUPINGS = {"gqa": (4, 2, 2), "mqa": (4, 1, 1), "value": (2, 2, 4), "value1": (1, 1, 4)}


def _ids(total: int, seed: int, batch: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B if batch else 1):
        lens = torch.randint(1, 30, (total,), generator=g)
        rows.append(torch.repeat_interleave(torch.arange(total), lens)[:total])
    return torch.stack(rows) if batch else rows[0]


def _specs(total: int) -> dict:
    return {
        "causal": Causal(), "full": Full(), "prefix": Prefix(20),
        "prefix_batch": Prefix(torch.tensor([3, 50])), "chunked": Chunked(8),
        "chunked_la": Chunked(5, lookahead=2),
        "seg_causal": Segments(_ids(total, 1, False)) & Causal(),
        "seg_full": Segments(_ids(total, 2, True)),
        "seg_prefix": Segments(_ids(total, 3, False)) & Prefix(30),
        "seg_chunked": Chunked(6) & Segments(_ids(total, 4, True)),
        "seg_chunked_la": Segments(_ids(total, 5, False)) & Chunked(4, lookahead=1),
    }


def _inputs(t: int, grouping: str, seed: int) -> dict:
    hq, hk, hv = GROUPINGS[grouping]
    h = max(hq, hv)
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, t, hq, D, generator=g), "k": torch.randn(B, t, hk, D, generator=g),
            "v": torch.randn(B, t, hv, DV, generator=g),
            "decay": 0.5 + 0.5 * torch.rand(h, generator=g),
            "log_gate": -1.5 * torch.rand(B, t, h, generator=g),
            "reverse_log_gate": -1.5 * torch.rand(B, t, h, generator=g),
            "s0": torch.randn(B, h, D, DV, generator=g),
            "do": torch.randn(B, t, h, DV, generator=g),
            "ds": torch.randn(B, h, D, DV, generator=g)}


def _run(impl, x, spec, *, mode, off, dtype, chunk_size=5, repeat=False):
    """Output, final state and the gradients of q, k, v, decay or both gates, the initial state.
    ``repeat``: run on q, k, v repeated to the output heads (the explicit construction; the
    gradients of the repeats flow back to the grouped inputs, summed)."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {n: x[n].detach().to(dtype).requires_grad_() for n in "qkv"}
    h = x["s0"].shape[1]
    q, k, v = ((y.repeat_interleave(h // y.shape[2], 2) if repeat else y)
               for y in leaves.values())
    extra = {}
    if mode == "decay":
        extra = {"decay": x["decay"].detach().to(sd).requires_grad_()}
    elif mode == "gates":
        extra = {n: x[n].detach().to(sd).requires_grad_()
                 for n in ("log_gate", "reverse_log_gate")}
    s0 = x["s0"].detach().to(sd).requires_grad_()
    out, state = linear_attention(q, k, v, spec, q_offset=off, k_offset=off, initial_state=s0,
                                  return_final_state=True, impl=impl, chunk_size=chunk_size,
                                  **extra)
    loss = (out.to(sd) * x["do"].to(sd)).sum() + (state * x["ds"].to(sd)).sum()
    wrt = [*leaves.values(), *extra.values(), s0]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return [out.detach(), state.detach(), *grads]


def _names(mode: str) -> list[str]:
    return ["out", "state", "dq", "dk", "dv"] + {"none": [], "decay": ["ddecay"],
                                                 "gates": ["dg", "dr"]}[mode] + ["ds0"]


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("name", ["causal", "full", "prefix_batch", "chunked_la", "seg_full"])
def test_reference_equals_repeat_then_run(grouping, name):
    """The reference's grouping (indexing) is the explicit construction: repeat the inputs
    with fewer heads to the output heads and run."""
    t, off = 23, 4
    spec = _specs(off + t + 16)[name]
    x = _inputs(t, grouping, seed=3)
    for mode in ("decay", "gates"):
        got = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float64)
        want = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float64, repeat=True)
        for nm, a, r in zip(_names(mode), got, want, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12,
                                       msg=lambda m, nm=nm: f"{grouping} {name} {nm}: {m}")


LENGTHS = {"chunk": ((1, 0), (7, 37), (63, 0)), "recurrent": ((1, 37), (7, 0), (30, 11))}
CASES = [(impl, t, off) for impl, lens in LENGTHS.items() for t, off in lens]


@pytest.mark.parametrize("impl,t,off", CASES)
@pytest.mark.parametrize("grouping", ["gqa", "value"])
@pytest.mark.parametrize("name", list(_specs(10)))
def test_grouped_heads_match_the_reference(impl, t, off, grouping, name):
    spec = _specs(off + t + 64)[name]
    x = _inputs(t, grouping, seed=t + off)
    for mode in ("decay", "gates"):
        truth = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float64)
        base = _run("reference", x, spec, mode=mode, off=off, dtype=torch.float32)
        got = _run(impl, x, spec, mode=mode, off=off, dtype=torch.float32)
        assert_all_close(_names(mode), got, truth, base,
                         label=f"{impl} {grouping} {name} {mode} T={t}")


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("grouping", ["mqa", "value1"])
@pytest.mark.parametrize("name", ["causal", "full", "seg_chunked_la", "prefix"])
def test_groups_of_four_match_the_reference(impl, grouping, name):
    t = 29
    spec = _specs(t + 8)[name]
    x = _inputs(t, grouping, seed=5)
    for mode in ("none", "gates"):
        truth = _run("reference", x, spec, mode=mode, off=0, dtype=torch.float64)
        base = _run("reference", x, spec, mode=mode, off=0, dtype=torch.float32)
        got = _run(impl, x, spec, mode=mode, off=0, dtype=torch.float32)
        assert_all_close(_names(mode), got, truth, base, label=f"{impl} {grouping} {name}")


@pytest.mark.parametrize("grouping", ["gqa", "value"])
def test_bf16_grouped_chunk_matches_the_reference(grouping):
    t = 63
    spec = _specs(t)["seg_chunked_la"]
    x = _inputs(t, grouping, seed=9)
    truth = _run("reference", x, spec, mode="gates", off=0, dtype=torch.float64, chunk_size=21)
    base = _run("reference", x, spec, mode="gates", off=0, dtype=torch.bfloat16, chunk_size=21)
    got = _run("chunk", x, spec, mode="gates", off=0, dtype=torch.bfloat16, chunk_size=21)
    assert_all_close(_names("gates"), got, truth, base, label=f"bf16 {grouping}")


def test_qwen3_next_layout_split_and_carry():
    """16 key heads and 32 value heads (Qwen3-Next's Gated DeltaNet layout), causal: two calls
    with the carried state equal one call."""
    t, cut = 40, 17
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, t, 16, 8, generator=g), torch.randn(1, t, 16, 8, generator=g)
    v = torch.randn(1, t, 32, 4, generator=g)
    lg = -torch.rand(1, t, 32, generator=g)
    whole = linear_attention(q, k, v, Causal(), log_gate=lg, return_final_state=True)
    a = linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], Causal(), log_gate=lg[:, :cut],
                         return_final_state=True)
    b = linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], Causal(), log_gate=lg[:, cut:],
                         q_offset=cut, k_offset=cut, initial_state=a.final_state,
                         return_final_state=True)
    assert whole.output.shape == (1, t, 32, 4) and whole.final_state.shape == (1, 32, 8, 4)
    torch.testing.assert_close(torch.cat([a.output, b.output], 1), whole.output)
    torch.testing.assert_close(b.final_state, whole.final_state)


REPEATS = {"repeat_interleave", "repeat", "index_select", "index", "gather", "tile"}


class _Recorder(TorchDispatchMode):
    """Records the largest tensor any op produces, and that of any repeat / index op (forward
    and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_repeat = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        repeat = func.overloadpacket.__name__ in REPEATS
        for y in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(y, torch.Tensor):
                self.largest = max(self.largest, y.numel())
                if repeat:
                    self.largest_repeat = max(self.largest_repeat, y.numel())
        return out


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("grouping", ["gqa", "value1"])
def test_fast_paths_never_materialise_repeated_heads(impl, grouping):
    """No repeat or index op in forward + backward makes a tensor as large as the smallest
    input (k: small indexing of position arrays is fine), and (value grouping, D > Dv) no op
    makes a tensor as large as q or k repeated to the output heads ``[B, T, Hv, D]``."""
    t = 256 if impl == "chunk" else 24
    hq, hk, hv = GROUPINGS[grouping]
    g = torch.Generator().manual_seed(1)
    d, dv = 16, 2
    q = torch.randn(B, t, hq, d, generator=g, requires_grad=True)
    k = torch.randn(B, t, hk, d, generator=g, requires_grad=True)
    v = torch.randn(B, t, hv, dv, generator=g, requires_grad=True)
    h = max(hq, hv)
    lg = (-torch.rand(B, t, h, generator=g)).requires_grad_()
    for spec in (Causal(), Full(), Chunked(8, lookahead=1)):
        with _Recorder() as rec:
            out = linear_attention(q, k, v, spec, log_gate=lg, impl=impl, chunk_size=16)
            torch.autograd.grad(out.sum(), [q, k, v, lg])
        assert rec.largest_repeat < k.numel(), (spec, rec.largest_repeat)
        if grouping == "value1":
            assert rec.largest < B * t * hv * d, (spec, rec.largest)


def test_heads_layout_of_a_call():
    from causalmix.ops.linear.call import validate

    x = _inputs(5, "value", 0)
    call = validate("t", x["q"], x["k"], x["v"], Causal(), log_gate=x["log_gate"])
    assert call.heads == Heads(out=4, q=2, k=2, v=4)
    x = _inputs(5, "gqa", 0)
    assert validate("t", x["q"], x["k"], x["v"], Causal()).heads == Heads(4, 4, 2, 2)
    with pytest.raises(ValueError, match=r"log_gate must have shape \[B, Tk, H\] or "
                                         r"\[B, Tk, H, D\] = \[2, 5, 4\] or \[2, 5, 4, 4\]"):
        linear_attention(x["q"], x["k"], x["v"], Causal(), log_gate=x["log_gate"][..., :2])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, D, Dv\] = "
                                         r"\[2, 4, 4, 3\]"):
        linear_attention(x["q"], x["k"], x["v"], Causal(), initial_state=x["s0"][:, :2])
    with pytest.raises(ValueError, match=r"decay must have shape \[H\] = \[4\]"):
        linear_attention(x["q"], x["k"], x["v"], Causal(), decay=torch.ones(2))
