"""causalmix.nn configs: the tagged dict form of every spec type (round trip, JSON), configs that
refuse what their layers cannot run (specs a mixer cannot serve, the gated mixer in an adaptive
block, impl names outside the op family's registry), and the one model builder."""

from __future__ import annotations

import json

import pytest
import torch

from causalmix.checks import ArgumentTypeError
from causalmix.nn import (
    MIXERS,
    AttentionConfig,
    BlockConfig,
    ModelConfig,
    SequenceModel,
    impl_choices,
    spec_from_dict,
    spec_to_dict,
)
from causalmix.nn.adaptive import ADAPTIVE_MIXERS, AdaptiveConfig, AdaptiveModel
from causalmix.ops.linear import api as linear_api
from causalmix.ops.softmax import api as softmax_api
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

SPECS = {
    "causal": Causal(),
    "full": Full(),
    "prefix": Prefix(9),
    "prefix0": Prefix(0),
    "prefix_batch": Prefix(torch.tensor([3, 0, 7])),
    "chunked": Chunked(4),
    "chunked_la": Chunked(4, lookahead=2),
    "window": Window(3),
    "window_right": Window(3, 2),
    "segments": Segments(torch.tensor([0, 0, 1, 1, 1])),
    "segments_batch": Segments(torch.tensor([[0, 1, 1], [2, 2, 2]])),
    "valid_keys": ValidKeys(torch.tensor([[True, True, False], [False, True, True]])),
    "valid_keys_empty": ValidKeys(torch.zeros(2, 0, dtype=torch.bool)),
    "adaptive": AdaptiveLookahead(torch.tensor([[0, 2, 1], [1, 0, 0]])),
    "adaptive_1d": AdaptiveLookahead(torch.tensor([0, 3, 0, 1])),
    "and": Segments(torch.tensor([0, 0, 1])) & Causal(),
    "or": Causal() | Window(0, 2),
    "nested": (Causal() | Window(0, 2)) & (Prefix(torch.tensor([2, 1])) | Chunked(2, 1)),
    "strided": Strided(Causal() & Window(4), 1, 2, 0, 2),
}


@pytest.mark.parametrize("name", SPECS)
def test_spec_dict_round_trips_every_spec_type(name):
    spec = SPECS[name]
    d = spec_to_dict(spec)
    assert d["type"] == type(spec).__name__
    text = json.dumps(d)  # JSON-ready: tensors are lists, nested specs tagged dicts
    back = spec_from_dict(json.loads(text))
    assert type(back) is type(spec) and back == spec and hash(back) == hash(spec)
    n = 6 if spec.covered_length is None else spec.covered_length
    assert torch.equal(back.mask(n, n), spec.mask(n, n))
    assert spec_to_dict(back) == d


def test_spec_dict_tagged_form():
    assert spec_to_dict(Causal()) == {"type": "Causal"}
    assert spec_to_dict(Full()) == {"type": "Full"}  # the two are told apart (were both {})
    assert spec_to_dict(Prefix(9)) == {"type": "Prefix", "n": 9}
    assert spec_to_dict(Prefix(torch.tensor([3, 5]))) == {"type": "Prefix", "n": [3, 5]}
    assert spec_to_dict(Chunked(4, lookahead=1)) == {"type": "Chunked", "size": 4,
                                                     "lookahead": 1}
    assert spec_to_dict(Causal() | Window(0, 2)) == {
        "type": "Or", "a": {"type": "Causal"}, "b": {"type": "Window", "left": 0, "right": 2}}
    assert spec_to_dict(ValidKeys(torch.tensor([[1, 0]]))) == {"type": "ValidKeys",
                                                               "valid": [[True, False]]}
    back = spec_from_dict({"type": "Segments", "ids": [[0, 1]]})
    assert back.ids.dtype == torch.int64 and back.ids.shape == (1, 2)


def test_spec_dict_errors_and_own_types():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Dilated(Visibility):
        step: int

        def visible(self, b, i, j):
            return (j <= i) & ((i - j) % self.step == 0)

    d = spec_to_dict(Dilated(2))
    assert d == {"type": "Dilated", "step": 2}
    with pytest.raises(ValueError, match="unknown spec type 'Dilated'.*types="):
        spec_from_dict(d)
    assert spec_from_dict(d, types={"Dilated": Dilated}) == Dilated(2)
    assert spec_from_dict({"type": "And", "a": d, "b": {"type": "Causal"}},
                          types={"Dilated": Dilated}) == Dilated(2) & Causal()
    with pytest.raises(ArgumentTypeError, match="spec must be"):
        spec_to_dict("causal")
    with pytest.raises(ValueError, match="'type'"):
        spec_from_dict({"n": 3})
    with pytest.raises(ValueError, match="bad fields for spec type 'Prefix'"):
        spec_from_dict({"type": "Prefix", "m": 3})
    with pytest.raises(ValueError, match="ints or bools"):
        spec_from_dict({"type": "Segments", "ids": [0.5, 1.0]})
    with pytest.raises(ValueError, match="n must be >= 0"):  # the spec's own checks run
        spec_from_dict({"type": "Prefix", "n": -1})


# ------------------------------------------------------------------ configs refuse early

LINEAR_OK = ["causal", "full", "prefix", "prefix_batch", "chunked", "chunked_la", "segments",
             "and"]
LINEAR_REFUSED = ["window", "window_right", "or", "nested", "valid_keys", "adaptive"]


@pytest.mark.parametrize("mixer", ["linear", "gated"])
@pytest.mark.parametrize("name", LINEAR_OK + LINEAR_REFUSED)
def test_model_config_refuses_specs_its_mixer_cannot_serve(mixer, name):
    spec = SPECS[name]
    vis = (Causal(), spec)
    if name in LINEAR_OK:
        cfg = ModelConfig(vocab_size=5, d_model=16, n_heads=2, mixer=mixer, feature_dim=4,
                          visibility=vis)
        assert cfg.blocks[1].visibility == spec
        if spec.batch_size in (None, 2) and spec.covered_length in (None, 5):
            SequenceModel(cfg)(torch.zeros(2, 5, dtype=torch.int64))  # and it runs
        return
    # the layer, the spec and the mixer are named, at construction
    with pytest.raises(ValueError, match=rf"visibility\[1\] \(layer 1\): mixer='{mixer}' does "
                                         rf"not support visibility"):
        ModelConfig(vocab_size=5, d_model=16, n_heads=2, mixer=mixer, feature_dim=4,
                    visibility=vis)
    with pytest.raises(ValueError, match=f"mixer='{mixer}' does not support visibility"):
        BlockConfig(AttentionConfig(d_model=16, n_heads=2, mixer=mixer), spec)


@pytest.mark.parametrize("name", SPECS)
def test_softmax_config_serves_every_spec(name):
    cfg = ModelConfig(vocab_size=5, d_model=16, n_heads=2, visibility=(SPECS[name],))
    assert cfg.blocks[0].visibility == SPECS[name]


def test_adaptive_config_refuses_the_gated_mixer():
    assert ADAPTIVE_MIXERS == ("softmax", "linear") and set(ADAPTIVE_MIXERS) < set(MIXERS)
    with pytest.raises(ValueError, match=r"model.mixer must be one of \['softmax', 'linear'\].*"
                                         r"got 'gated'"):
        AdaptiveConfig.of(vocab_size=5, mixer="gated", max_lookahead=(0, 2))
    with pytest.raises(ValueError, match="got 'gated'"):
        AdaptiveConfig.from_name("tiny-gated", vocab_size=5)
    for mixer in ADAPTIVE_MIXERS:  # the others build and run
        m = AdaptiveModel(AdaptiveConfig.of(vocab_size=5, d_model=16, n_heads=2, mixer=mixer,
                                            feature_dim=4, max_lookahead=(0, 2)))
        assert m(torch.zeros(1, 4, dtype=torch.int64)).output.shape == (1, 4, 5)


def test_impl_names_come_from_the_op_registries():
    assert impl_choices("softmax") == tuple(softmax_api.REGISTRY.choices)
    assert impl_choices("linear") == impl_choices("gated") == tuple(linear_api.REGISTRY.choices)
    for mixer in MIXERS:
        for impl in impl_choices(mixer):
            assert AttentionConfig(mixer=mixer, impl=impl).impl == impl
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'reference'.*for the "
                                         r"linear mixer, got 'sdpa'"):
        AttentionConfig(mixer="linear", impl="sdpa")
    with pytest.raises(ValueError, match="mixer must be one of"):
        impl_choices("conv")


# ------------------------------------------------------------------ one model builder


@pytest.mark.parametrize("mixer", ADAPTIVE_MIXERS)
def test_one_builder_for_sequence_and_adaptive_models(mixer):
    """With no adaptive layer, an AdaptiveModel is the SequenceModel of its ModelConfig: the same
    parameters from the same seed (one builder, one creation order) and the same outputs."""
    cfg = AdaptiveConfig.of(vocab_size=7, d_model=16, n_heads=2, mixer=mixer, feature_dim=4,
                            max_lookahead=(0, 0, 0))
    torch.manual_seed(3)
    ad = AdaptiveModel(cfg).eval()
    torch.manual_seed(3)
    seq = SequenceModel(cfg.model).eval()
    a = dict(ad.named_parameters())
    s = dict(seq.named_parameters())
    assert [k.replace(".block.", ".") for k in a] == list(s)
    assert all(torch.equal(a[k], s[k.replace(".block.", ".")]) for k in a)
    x = torch.randint(0, 7, (2, 11))
    assert torch.equal(ad(x).output, seq(x))
    for model in (ad, seq):
        with pytest.raises(ValueError, match=f"{type(model).__name__}: inputs must be int64"):
            model(torch.randn(2, 3))
    with pytest.raises(ArgumentTypeError, match="ModelConfig"):
        SequenceModel(cfg)
    with pytest.raises(ArgumentTypeError, match="AdaptiveConfig"):
        AdaptiveModel(cfg.model)
