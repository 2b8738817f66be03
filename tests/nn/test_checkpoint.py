"""Configs round-trip through JSON (``ModelConfig.to_dict`` / ``from_dict``) for every preset
and every spec type, and checkpoints (``save_pretrained`` / ``from_pretrained``) load with
``torch.load(weights_only=True)`` into a model with identical logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from causalmix.checks import ArgumentTypeError
from causalmix.nn import PRESETS, ModelConfig, SequenceModel
from causalmix.nn.config import SPEC_TYPES
from causalmix.ops.factor import factorise
from causalmix.visibility import (
    AdaptiveLookahead,
    Causal,
    Chunked,
    Full,
    Prefix,
    Segments,
    Strided,
    ValidKeys,
    Visibility,
    Window,
)

T = 12
SPECS = {  # every type spec_from_dict knows, tensor-holding ones included
    "causal": Causal(),
    "full": Full(),
    "prefix": Prefix(5),
    "prefix-rows": Prefix(torch.tensor([3, 7])),
    "chunked": Chunked(4, lookahead=1),
    "window": Window(3, 1),
    "segments": Segments(torch.tensor([0] * 5 + [1] * 7)),
    "segments-rows-and-causal": Segments(torch.tensor([[0] * 6 + [1] * 6, [0] * 12])) & Causal(),
    "valid-keys": ValidKeys(torch.tensor([[1] * 12, [1] * 9 + [0] * 3])) & Causal(),
    "adaptive": AdaptiveLookahead(torch.tensor([0, 2, 1] * 4)),
    "or": Causal() | Window(0, 2),
    "strided": Strided(Causal() & Window(4), 0, 1, 0, 1),
}


def _served(mixer: str, spec: Visibility) -> bool:
    if mixer == "softmax":
        return True
    try:
        factorise(spec, mixer=mixer)
    except ValueError:
        return False
    return True


def test_the_sweep_covers_every_spec_type():
    seen = set()

    def walk(s):
        seen.add(type(s).__name__)
        for f in dataclasses.fields(s):
            if isinstance(getattr(s, f.name), Visibility):
                walk(getattr(s, f.name))

    for spec in SPECS.values():
        walk(spec)
    assert seen >= set(SPEC_TYPES), set(SPEC_TYPES) - seen


CASES = [pytest.param(p, s, id=f"{p}-{s}") for p in PRESETS for s in SPECS
         if _served(PRESETS[p]["mixer"], SPECS[s])]


@pytest.mark.parametrize("preset,spec", CASES)
def test_config_round_trips_through_json(preset, spec):
    cfg = ModelConfig.from_name(preset, vocab_size=11, visibility=(SPECS[spec], Causal()))
    d = cfg.to_dict()
    back = ModelConfig.from_dict(json.loads(json.dumps(d)))  # JSON-ready
    assert back == cfg and back.blocks == cfg.blocks
    assert back.to_dict() == d
    mask = SPECS[spec].mask(T, T)
    assert torch.equal(back.visibility[0].mask(T, T), mask)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_round_trips_with_its_own_specs_and_features(preset):
    for cfg in (ModelConfig.from_name(preset, vocab_size=7),
                ModelConfig.from_name(preset, input_dim=3, output_dim=5),
                ModelConfig.from_name(preset, vocab_size=7, output_dim=2, mlp_ratio=3)):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_to_dict_is_tagged_and_from_dict_refuses_bad_forms():
    d = ModelConfig(vocab_size=8, visibility=(Prefix(3), Full())).to_dict()
    assert d["visibility"] == [{"type": "Prefix", "n": 3}, {"type": "Full"}]
    assert "blocks" not in d and d["n_kv_heads"] is None and d["output_dim"] == 8
    with pytest.raises(ValueError, match=r"unknown keys \['blocks'\]"):
        ModelConfig.from_dict({**d, "blocks": []})
    with pytest.raises(ValueError, match="list of tagged specs"):
        ModelConfig.from_dict({**d, "visibility": {"type": "Causal"}})
    with pytest.raises(ValueError, match="unknown spec type"):
        ModelConfig.from_dict({**d, "visibility": [{"type": "Nope"}]})
    with pytest.raises(ArgumentTypeError, match="mapping"):
        ModelConfig.from_dict([("d_model", 8)])
    with pytest.raises(ValueError, match="does not support"):  # a linear mixer refuses Window
        ModelConfig.from_dict({**d, "mixer": "linear", "visibility": [{"type": "Window",
                                                                      "left": 2, "right": 0}]})


@pytest.mark.parametrize("preset", PRESETS)
def test_checkpoint_loads_with_weights_only_and_gives_identical_logits(preset, tmp_path):
    torch.manual_seed(0)
    vis = (Prefix(torch.tensor([2, 5])), Causal())
    model = SequenceModel(ModelConfig.from_name(preset, vocab_size=11, visibility=vis))
    with torch.no_grad():  # weights that are not the initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "ckpt")
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert json.loads((folder / "config.json").read_text())["config"] == model.cfg.to_dict()
    back = SequenceModel.from_pretrained(folder)
    assert back.cfg == model.cfg
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert all(p.requires_grad for p in back.parameters())
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])


def test_checkpoint_keeps_the_saved_dtype_and_refuses_what_is_not_one(tmp_path):
    model = SequenceModel(ModelConfig.from_name("tiny-linear", vocab_size=5)).to(torch.float64)
    model.save_pretrained(tmp_path)
    back = SequenceModel.from_pretrained(tmp_path)
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    x = torch.randint(0, 5, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    with pytest.raises(ValueError, match="does not exist"):
        SequenceModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        SequenceModel.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a causalmix.nn.SequenceModel"):
        SequenceModel.from_pretrained(tmp_path / "bad")
    other = SequenceModel(ModelConfig.from_name("tiny-linear", vocab_size=6))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="do not fit"):
        SequenceModel.from_pretrained(tmp_path / "other")
    with pytest.raises(ArgumentTypeError, match="path"):
        model.save_pretrained(3)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        model.save_pretrained(tmp_path / "file")
