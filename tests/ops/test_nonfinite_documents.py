"""NaN in one packed document stays in it: for the linear and delta-rule families, on every
implementation, a non-finite q / k / v / beta or a NaN gate at one position turns NaN exactly
the outputs whose query sees that position (of the heads that read it) and the final state if
the last position sees it; every other output and state is what it is when that position holds
a finite value (:mod:`causalmix.ops.nonfinite`)."""

from __future__ import annotations

import pytest
import torch

from causalmix import Causal, Chunked, Full, Prefix, Segments
from causalmix.ops.delta import api as delta_api
from causalmix.ops.linear import api as linear_api

T, B, D, DV = 37, 2, 8, 5
IDS = torch.tensor([0] * 13 + [1] * 16 + [2] * 8)  # documents [0, 13), [13, 29), [29, 37)
SPECS = {"causal": Segments(IDS) & Causal(), "full": Segments(IDS) & Full(),
         "chunked": Segments(IDS) & Chunked(4, lookahead=1), "prefix": Segments(IDS) & Prefix(20),
         "one document, full": Full(), "one document, chunked": Chunked(5, lookahead=1)}


def _inputs(family: str, vector: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hq, hkv = (4, 2) if family == "linear" else (2, 2)
    x = {"q": torch.randn(B, T, hq, D, generator=g),
         "k": torch.nn.functional.normalize(torch.randn(B, T, hkv, D, generator=g), dim=-1),
         "v": torch.randn(B, T, hkv, DV, generator=g)}
    gate = (B, T, hq, D) if vector else (B, T, hq)
    x["log_gate"] = -0.5 * torch.rand(*gate, generator=g)
    x["reverse_log_gate"] = -0.5 * torch.rand(*gate, generator=g)
    x["initial_state"] = torch.randn(B, hq, D, DV, generator=g)
    if family == "delta":
        x["beta"] = 0.1 + 0.8 * torch.rand(B, T, hq, generator=g)
    return x


def _run(family: str, x: dict, spec, impl: str):
    x = dict(x)
    q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
    fn = linear_api.linear_attention if family == "linear" else delta_api.delta_attention
    return fn(q, k, v, spec, impl=impl, return_final_state=True, **x)


def _impls(family: str, x: dict, spec) -> list[str]:
    if family == "linear":
        why = linear_api.available_impls(x["q"], x["k"], x["v"], spec, return_final_state=True)
    else:
        why = delta_api.available_impls(x["q"], x["k"], x["v"], spec, beta=x["beta"],
                                        log_gate=x["log_gate"],
                                        reverse_log_gate=x["reverse_log_gate"],
                                        return_final_state=True)
    return [n for n, w in why.items() if w is None]


@pytest.mark.parametrize("family,vector", [("linear", False), ("linear", True),
                                           ("delta", False)])
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("pos", [13, 17, 31])  # a document's start, its middle, the last one
def test_nan_in_one_document_reaches_only_what_sees_it(family, vector, spec_name, pos):
    spec = SPECS[spec_name]
    x = _inputs(family, vector)
    wheres = ["q", "k", "v", "log_gate", "reverse_log_gate"] + (["beta"] if family == "delta"
                                                                else [])
    impls = _impls(family, x, spec)
    assert {"reference", "chunk", "recurrent"} <= set(impls), impls
    vis = spec.mask(T, T)[0]  # [Tq, Tk]
    hq = x["q"].shape[2]
    for where in wheres:
        bad, other = dict(x), dict(x)
        head = 0  # only head 0 of that input is bad
        bad[where] = x[where].clone()
        bad[where][:, pos, head] = float("nan")
        other[where] = x[where].clone()
        other[where][:, pos, head] = 0.3 if where != "log_gate" and where != \
            "reverse_log_gate" else -0.2
        # the output heads that read the bad head
        reads = torch.arange(hq) // (hq // x[where].shape[2]) == head
        i = torch.arange(T)
        if where == "q":
            rows = i == pos
        elif where == "log_gate":  # the weights of keys j < pos <= i hold it
            rows = (i >= pos) & vis[:, pos - 1]
        elif where == "reverse_log_gate":  # those of keys j > pos >= i
            rows = (i <= pos) & vis[:, pos + 1]
        else:
            rows = vis[:, pos].clone()
        sees = {"q": False, "log_gate": bool(vis[T - 1, pos - 1]), "reverse_log_gate": False}
        state_bad = sees.get(where, bool(vis[T - 1, pos])) & reads
        for impl in impls:
            out, state = _run(family, bad, spec, impl)
            ref, ref_state = _run(family, other, spec, impl)
            poisoned = rows[None, :, None] & reads[None, None, :]
            poisoned = poisoned.expand(B, T, hq)
            assert torch.isnan(out[poisoned]).all(), (where, impl)
            assert torch.isfinite(out[~poisoned]).all(), (where, impl)
            torch.testing.assert_close(out[~poisoned], ref[~poisoned], atol=2e-5, rtol=1e-4,
                                       msg=lambda m, w=where, i=impl: f"{w} {i}: {m}")
            assert torch.isnan(state[:, state_bad]).all(), (where, impl)
            torch.testing.assert_close(state[:, ~state_bad], ref_state[:, ~state_bad],
                                       atol=2e-5, rtol=1e-4)


def test_nan_gradients_stay_in_their_document():
    """Backward through the finite outputs only: a loss over the other documents' outputs has
    finite gradients, equal to those with the bad value replaced."""
    x = _inputs("delta", False)
    spec = SPECS["causal"]
    keep = IDS != 1
    for impl in ("reference", "chunk"):
        grads = []
        for fill in (float("nan"), 0.3):
            y = {n: t.clone().requires_grad_() for n, t in x.items()}
            with torch.no_grad():
                y["v"][:, 17] = fill
            out, _ = _run("delta", y, spec, impl)
            out[:, keep].sum().backward()
            grads.append(y["q"].grad)
        assert torch.isfinite(grads[0]).all(), impl
        torch.testing.assert_close(grads[0], grads[1], atol=2e-5, rtol=1e-4)


OFFSET_IDS = torch.tensor([0] * 19 + [1] * 16 + [2] * 8)  # IDS with 6 more positions first


@pytest.mark.parametrize("family,vector", [("linear", False), ("linear", True),
                                           ("delta", False)])
@pytest.mark.parametrize("spec_name,offset", [(n, 0) for n in SPECS] +
                         [("causal, offset 6", 6), ("full, offset 6", 6)])
def test_nonfinite_initial_state_reaches_only_its_readers(family, vector, spec_name, offset):
    """A NaN / inf in ``initial_state[:, h]`` makes NaN exactly the outputs of head ``h`` whose
    query sees the key the state is anchored at (``k_offset - 1``, or the first key), and the
    final state of ``h`` if the last position sees it: with packed documents, only the
    document the state continues. Everything else equals a run with a finite state there."""
    if offset:
        base = Causal() if spec_name.startswith("causal") else Full()
        spec = Segments(OFFSET_IDS) & base
    else:
        spec = SPECS[spec_name]
    x = _inputs(family, vector)
    x.update(q_offset=offset, k_offset=offset)
    hq = x["q"].shape[2]
    vis = spec.mask(T + offset, T + offset)[0][offset:, offset:]  # [Tq, Tk] of this call
    anchor = max(offset - 1, 0)
    reads_anchor = spec.mask(T + offset, T + offset)[0][offset:, anchor]  # [Tq]
    bad, other = dict(x), dict(x)
    bad["initial_state"] = x["initial_state"].clone()
    bad["initial_state"][0, 1, 0, 0] = float("nan")
    bad["initial_state"][1, 1, 2, 3] = float("inf")
    other["initial_state"] = x["initial_state"].clone()
    other["initial_state"][:, 1] = 2.0 * other["initial_state"][:, 1] + 0.5
    poisoned = torch.zeros(B, T, hq, dtype=torch.bool)
    poisoned[:, :, 1] = reads_anchor[None, :]
    state_bad = torch.zeros(B, hq, dtype=torch.bool)
    state_bad[:, 1] = bool(reads_anchor[-1])
    assert vis.shape == (T, T) and reads_anchor.any() and not reads_anchor.all() or \
        spec_name.startswith("one document")
    for impl in ("reference", "chunk", "recurrent"):
        out, state = _run(family, bad, spec, impl)
        ref, ref_state = _run(family, other, spec, impl)
        assert torch.isnan(out[poisoned]).all(), impl
        assert torch.isfinite(out[~poisoned]).all(), impl
        torch.testing.assert_close(out[~poisoned], ref[~poisoned], atol=2e-5, rtol=1e-4)
        assert torch.isnan(state[state_bad]).all(), impl
        torch.testing.assert_close(state[~state_bad], ref_state[~state_bad], atol=2e-5,
                                   rtol=1e-4)
