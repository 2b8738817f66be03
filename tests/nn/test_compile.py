"""``torch.compile(model, fullgraph=True, dynamic=True)`` of the model kinds: zero graph breaks
(counted by ``torch._dynamo.explain``), one compilation for every length, outputs and gradients
equal to eager (within the eager fp32 model's own error against an fp64 copy).

The default suite traces with ``backend="eager"`` (dynamo's graph capture, the part that breaks
or not; seconds per model); the ``slow`` tests run the inductor backend (C++ codegen on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

from causalmix.nn import ModelConfig, SequenceModel
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Prefix

#: The model kinds, each with a spec per layer that its mixer serves (the delta kind: causal
#: specs only -- its reference loops over the reverse part's groups in Python).
KINDS = {
    "tiny-softmax": (Prefix(3), Causal()),
    "tiny-linear": (Prefix(3), Chunked(4, 1)),
    "tiny-gated": (Prefix(3), Causal()),
    "tiny-delta": (Causal(), Causal()),
}


def _model(preset: str) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig.from_name(preset, vocab_size=11, visibility=KINDS[preset]))


def _ids(t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 11, (2, t), generator=torch.Generator().manual_seed(seed))


def _check_against_eager(compiled, model: SequenceModel, ids: torch.Tensor) -> None:
    """Compiled logits and parameter gradients against an fp64 copy, within the eager fp32
    model's error."""
    ref64 = copy.deepcopy(model).double()
    results = []
    for fn, m in ((compiled, model), (model, model), (ref64, ref64)):
        m.zero_grad()
        out = fn(ids)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (out_c, g_c), (out_e, g_e), (out_r, g_r) = results
    assert_close(out_c, out_r.float(), out_e, name="logits")
    for n, (a, b, r) in enumerate(zip(g_c, g_e, g_r, strict=True)):
        assert_close(a, r.float(), b, name=f"grad {n}")


@pytest.mark.parametrize("preset", ["tiny-softmax", "tiny-linear", "tiny-gated"])
def test_model_compiles_fullgraph_without_breaks_or_recompiles(preset):
    model = _model(preset)
    dynamo.reset()
    explained = dynamo.explain(model)(_ids(7, 0))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for t, seed in ((7, 1), (13, 2)):
        _check_against_eager(compiled, model, _ids(t, seed))
    assert counter.frame_count == 1  # one graph for every length: no recompilation


@pytest.mark.slow
def test_delta_model_compiles_fullgraph_without_breaks():
    model = _model("tiny-delta")
    dynamo.reset()
    explained = dynamo.explain(model)(_ids(7, 0))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for t, seed in ((7, 1), (13, 2)):
        _check_against_eager(compiled, model, _ids(t, seed))
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(KINDS))
def test_model_compiles_with_inductor(preset):
    model = _model(preset)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for t, seed in ((7, 1), (13, 2)):
        _check_against_eager(compiled, model, _ids(t, seed))


def test_value_checks_still_refuse_in_eager_mode():
    """Skipped only where no host read is possible; eager keeps refusing bad tokens."""
    model = _model("tiny-softmax")
    with pytest.raises(ValueError, match="vocab_size=11"):
        model(torch.tensor([[1, 11]]))
