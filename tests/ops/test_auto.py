"""``impl="auto"`` by cost in the linear and delta families: the dense reference up to
``AUTO_REFERENCE_MAX_T`` keys (the crossover measured by ``benchmarks/auto.py``), ``chunk``
beyond, ``recurrent`` for one token; the reference at every length where values cannot be read
(meta tensors); never a spec ``chunk`` cannot serve."""

from __future__ import annotations

import pytest
import torch

from causalmix.ops.delta import api as delta_api
from causalmix.ops.delta.call import validate as delta_validate
from causalmix.ops.linear import api as linear_api
from causalmix.ops.linear.call import validate as linear_validate
from causalmix.visibility import Causal, Full, Window

FAMILIES = {
    "linear": (linear_api, lambda q, spec: linear_validate("f", q, q, q, spec)),
    "delta": (delta_api, lambda q, spec: delta_validate(
        "f", q, q, q, spec, beta=torch.full(q.shape[:3], 0.5, device=q.device))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_picks_by_length(family):
    api, make = FAMILIES[family]
    limit = api.AUTO_REFERENCE_MAX_T
    for t, want in ((1, "recurrent"), (2, "reference"), (limit, "reference"),
                    (limit + 1, "chunk"), (4 * limit, "chunk")):
        call = make(torch.zeros(1, t, 2, 4), Full() if family == "linear" else Causal())
        assert api.REGISTRY.resolve("f", "auto", call) == want, t
    meta = make(torch.zeros(1, 4 * limit, 2, 4, device="meta"), Causal())
    assert api.REGISTRY.resolve("f", "auto", meta) == "reference"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_still_refuses_what_chunk_cannot_serve_at_short_lengths(family):
    api, make = FAMILIES[family]
    fn = linear_api.linear_attention if family == "linear" else delta_api.delta_attention
    q = torch.randn(1, 8, 2, 4)
    extra = {} if family == "linear" else {"beta": torch.full((1, 8, 2), 0.5)}
    with pytest.raises(ValueError, match="Window"):
        fn(q, q, q, Window(2), **extra)
    if family == "linear":  # the linear reference serves any spec: auto does not take it here
        assert fn(q, q, q, Window(2), impl="reference").shape == (1, 8, 2, 4)
