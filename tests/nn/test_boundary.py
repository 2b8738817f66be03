"""No silent wrong answers at the model boundary: models, blocks and configs refuse bad input
with a ``ValueError`` naming the argument."""

from __future__ import annotations

import pytest
import torch

from causalmix.nn import AttentionConfig, Block, BlockConfig, ModelConfig, SequenceModel
from causalmix.nn.config import head_decays
from causalmix.visibility import Causal


def _model(**kw):
    return SequenceModel(ModelConfig(vocab_size=11, d_model=16, n_heads=2, **kw))


def test_models_refuse_empty_wrong_rank_and_out_of_vocabulary_inputs():
    m = _model()
    for bad, what in [(torch.zeros(2, 0, dtype=torch.long), "T >= 1"),
                      (torch.zeros(0, 3, dtype=torch.long), "batch >= 1"),
                      (torch.zeros(3, dtype=torch.long), "int64 tokens"),
                      (torch.zeros(1, 2, 3, dtype=torch.long), "int64 tokens"),
                      (torch.tensor([[0, 11]]), "vocab_size=11"),
                      (torch.tensor([[-1, 2]]), "vocab_size=11")]:
        with pytest.raises(ValueError, match=what):
            m(bad)
    with pytest.raises(ValueError, match="offset"):
        m(torch.zeros(1, 3, dtype=torch.long), offset=-1)
    feat = SequenceModel(ModelConfig(input_dim=3, output_dim=2, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="T >= 1"):
        feat(torch.zeros(1, 0, 3))


def test_blocks_refuse_bad_activations():
    blk = Block(BlockConfig(AttentionConfig(d_model=16, n_heads=2)))
    for bad in (torch.zeros(1, 0, 16), torch.zeros(4, 16), torch.zeros(1, 3, 8),
                torch.zeros(1, 3, 16, dtype=torch.long)):
        with pytest.raises(ValueError, match="x must"):
            blk(bad)
    with pytest.raises(ValueError, match="visibility"):
        blk(torch.zeros(1, 3, 16), visibility="causal")


@pytest.mark.parametrize("kw, arg", [
    (dict(impl="bogus"), "impl"),
    (dict(mixer="linear", impl="sdpa"), "impl"),
    (dict(rope_base=0.0), "rope_base"),
    (dict(rope_base=-5.0), "rope_base"),
    (dict(rope_base=float("nan")), "rope_base"),
    (dict(rope_base="big"), "rope_base"),
    (dict(mixer="linear", decay="0.9"), "decay"),
    (dict(mixer="linear", decay=("a", "b")), "decay"),
    (dict(mixer="linear", decay=(0.5, 1.5)), "decay"),
    (dict(n_heads=0), "n_heads"),
])
def test_layer_configs_refuse_values_that_would_fail_later(kw, arg):
    with pytest.raises(ValueError, match=arg):
        AttentionConfig(**{"d_model": 16, "n_heads": 2, **kw})


@pytest.mark.parametrize("kw, arg", [(dict(impl="bogus"), "impl"),
                                     (dict(rope_base=0.0), "rope_base"),
                                     (dict(mixer="linear", decay="0.5"), "decay"),
                                     (dict(visibility=(Causal(), "x")), "visibility")])
def test_model_configs_refuse_bad_values(kw, arg):
    with pytest.raises(ValueError, match=arg):
        ModelConfig(vocab_size=5, d_model=16, n_heads=2, **kw)


@pytest.mark.parametrize("args, arg", [((0,), "n_heads"), ((2.5,), "n_heads"),
                                       ((4, 0.0), "fastest"), ((4, 1.0), "fastest"),
                                       ((4, -0.5), "fastest"), ((4, "x"), "fastest")])
def test_head_decays_refuses_out_of_range_arguments(args, arg):
    with pytest.raises(ValueError, match=arg):
        head_decays(*args)
    assert len(head_decays(4)) == 4 and head_decays(4)[-1] == 1.0
