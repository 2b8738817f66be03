"""Models on the meta device (sizing and deferred init, issue 27): built under
``torch.device("meta")``, the forward gives the logits' shape and dtype without computing;
``to_empty`` and a state dict make the same model as one built on the CPU."""

from __future__ import annotations

import pytest
import torch

from causalmix.nn import ModelConfig, SequenceModel
from causalmix.visibility import Causal, Chunked, Prefix

SPECS = {
    "tiny-softmax": (Prefix(3), Chunked(4, 1)),
    "tiny-linear": (Prefix(3), Chunked(4, 1)),
    "tiny-gated": (Prefix(3), Causal()),
    "tiny-delta": (Prefix(3), Causal()),
}


@pytest.mark.parametrize("preset", sorted(SPECS))
def test_model_builds_and_runs_on_meta_then_materialises(preset):
    cfg = ModelConfig.from_name(preset, vocab_size=11, visibility=SPECS[preset])
    with torch.device("meta"):
        meta = SequenceModel(cfg)
    assert all(p.is_meta for p in meta.parameters())
    out = meta(torch.zeros(2, 9, dtype=torch.int64, device="meta"))
    assert out.is_meta and out.shape == (2, 9, 11) and out.dtype == torch.float32
    out.sum().backward()  # the backward runs on meta too
    assert all(p.grad is not None and p.grad.is_meta for p in meta.parameters())

    torch.manual_seed(0)
    cpu = SequenceModel(cfg)
    meta.zero_grad(set_to_none=True)
    meta.to_empty(device="cpu")
    meta.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(meta(ids), cpu(ids))
