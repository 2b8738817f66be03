"""``SequenceModel.generate``: the cached decode equals a loop over full recomputes (greedy and
sampled, with a fixed generator), rows with their own prompt lengths equal each row decoded
alone, every spec either equals a recompute at every step or is refused before generating, and
``ModelStream(model, visibility=...)`` streams a per-stream spec."""

from __future__ import annotations

import copy

import pytest
import torch

from causalmix.checks import ArgumentTypeError
from causalmix.nn import ModelConfig, SequenceModel
from causalmix.nn.generate import CACHE_RULE, Generation
from causalmix.ops.factor import factorise
from causalmix.stream import ModelStream
from causalmix.testing import assert_close
from causalmix.visibility import Causal, Chunked, Full, Prefix, Segments, Window

V = 13
KINDS = ("tiny-softmax", "tiny-gqa", "tiny-linear", "tiny-gated", "tiny-delta", "tiny-kda")


CAUSAL2 = (Causal(), Causal())


def _model(preset: str, vis=CAUSAL2, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(ModelConfig.from_name(preset, vocab_size=V, visibility=vis)).eval()


def _choose(logits, do_sample, temperature, top_k, generator):
    """The documented choice, written out: argmax, or temperature / top-k / one multinomial
    draw over every row."""
    if not do_sample:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None:
        x = x.masked_fill(x < x.topk(top_k, -1).values[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(x, -1), 1, generator=generator)[:, 0]


def recompute_loop(model, ids, lengths, vis, n, *, do_sample=False, temperature=1.0, top_k=None,
                   generator=None):
    """The definition: at each position, the logits of a forward over the whole sequence so far
    choose the next token; rows still in their (right-padded) prompt read it."""
    b = ids.shape[0]
    end = int(lengths.max()) + n
    seq = torch.zeros(b, end, dtype=torch.int64)
    seq[:, : ids.shape[1]] = ids
    out = torch.zeros(b, n, dtype=torch.int64)
    with torch.no_grad():
        for t in range(int(lengths.min()), end):
            logits = model(seq[:, :t], visibility=vis)[:, -1]
            tok = _choose(logits, do_sample, temperature, top_k, generator)
            for r in range(b):
                if t >= lengths[r]:
                    seq[r, t] = tok[r]
                    if t - lengths[r] < n:
                        out[r, t - lengths[r]] = tok[r]
    return out


def teacher_forced_logits(model, ids, lengths, tokens, vis):
    """The logits each generated token was chosen from, by definition: at position ``t``, a
    forward over the sequence so far (prompts, then ``tokens``), its last position."""
    b, n = tokens.shape
    end = int(lengths.max()) + n
    seq = torch.zeros(b, end, dtype=torch.int64)
    for r in range(b):
        seq[r, : lengths[r]] = ids[r, : lengths[r]]
        seq[r, lengths[r]: lengths[r] + n] = tokens[r]
    out = torch.zeros(b, n, V, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for t in range(int(lengths.min()), end):
            logits = model(seq[:, :t], visibility=vis)[:, -1]
            for r in range(b):
                if 0 <= t - lengths[r] < n:
                    out[r, t - lengths[r]] = logits[r]
    return out


@pytest.mark.parametrize("preset", KINDS)
def test_greedy_per_row_prompts_equal_full_recomputes(preset):
    """Rows with prompt lengths 1, 7 and 4 under Prefix(lengths) (a prefix-LM) and Causal():
    the tokens equal the recompute loop's and each row decoded alone; the logits equal fp64
    recomputes within a fp32 recompute's own error."""
    model = _model(preset)
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([1, 7, 4])
    vis = (Prefix(lengths), Causal())
    g = model.generate(ids, max_new_tokens=6, prompt_lengths=lengths, visibility=vis,
                       return_logits=True)
    assert isinstance(g, Generation) and g.tokens.shape == (3, 6) and g.logits.shape == (3, 6, V)
    assert torch.equal(g.lengths, torch.full((3,), 6))
    assert torch.equal(g.tokens, recompute_loop(model, ids, lengths, vis, 6))
    assert torch.equal(g.tokens, g.logits.argmax(-1))
    for r in range(3):  # batch invariance: the padding is never read
        n = int(lengths[r])
        alone = model.generate(ids[r:r + 1, :n], max_new_tokens=6,
                               visibility=(Prefix(n), Causal()))
        assert torch.equal(alone[0], g.tokens[r]), r
    base = teacher_forced_logits(model, ids, lengths, g.tokens, vis)
    ref = teacher_forced_logits(copy.deepcopy(model).double(), ids, lengths, g.tokens, vis)
    assert_close(g.logits, ref, base, name=f"{preset} cached step logits")
    assert torch.equal(g.tokens, model.generate(ids, max_new_tokens=6, prompt_lengths=lengths,
                                                visibility=vis, use_cache=False))


@pytest.mark.parametrize("preset", ("tiny-softmax", "tiny-gated"))
@pytest.mark.parametrize("top_k", [None, 4])
def test_sampling_equals_the_recompute_loop_with_a_fixed_generator(preset, top_k):
    model = _model(preset, (Causal(), Window(3) if preset == "tiny-softmax" else Causal()))
    ids = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([5, 2, 3, 5])
    kw = dict(do_sample=True, temperature=0.7, top_k=top_k)
    got = model.generate(ids, max_new_tokens=8, prompt_lengths=lengths,
                         generator=torch.Generator().manual_seed(3), **kw)
    want = recompute_loop(model, ids, lengths, None, 8,
                          generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, want)
    again = model.generate(ids, max_new_tokens=8, prompt_lengths=lengths,
                           generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, again)
    if top_k is not None:  # every sampled token is among the top-k of its logits
        g = model.generate(ids, max_new_tokens=8, prompt_lengths=lengths, return_logits=True,
                           generator=torch.Generator().manual_seed(3), **kw)
        kth = g.logits.topk(top_k, -1).values[..., -1]
        assert bool((g.logits.gather(-1, g.tokens[..., None])[..., 0] >= kth).all())


PROMPT = 6
SWEEP = [  # (spec, exact with a cache): issue 19's sweep
    (Causal(), True),
    (Prefix(3), True),            # shorter than the prompt
    (Prefix(PROMPT), True),       # equal to it
    (Prefix(PROMPT + 3), False),  # longer: positions before the prompt's end see later ones
    (Full(), False),
    (Chunked(4), False),
    (Chunked(1), True),
    (Chunked(4, lookahead=1), False),
    (Window(3), True),
    (Window(2, 2), False),        # right context
    (Segments(torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])) & Causal(), True),
    (Segments(torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])) & Full(), False),
    (Segments(torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5])) & Full(), True),  # docs of 1
    (Prefix(torch.tensor([2, 6])) & Window(4), True),
]


def _served(spec) -> bool:
    try:
        factorise(spec, mixer="linear")
    except ValueError:
        return False
    return True


SWEEP_CASES = [pytest.param(preset, spec, exact, id=f"{preset}-{spec!r}")
               for preset in ("tiny-softmax", "tiny-linear", "tiny-gated", "tiny-delta",
                              "tiny-kda")
               for spec, exact in SWEEP if preset == "tiny-softmax" or _served(spec)]


@pytest.mark.parametrize("preset,spec,exact", SWEEP_CASES)
def test_every_spec_equals_a_recompute_at_every_step_or_raises_before_generating(
        preset, spec, exact):
    model = _model(preset)
    ids = torch.randint(0, V, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    vis = (spec, spec)
    lengths = torch.full((2,), PROMPT)
    if not exact:
        with pytest.raises(ValueError, match="use_cache=False") as err:
            model.generate(ids, max_new_tokens=5, visibility=vis)
        assert CACHE_RULE in str(err.value) and repr(spec) in str(err.value)
        g = model.generate(ids, max_new_tokens=5, visibility=vis, use_cache=False,
                           return_logits=True)
    else:
        g = model.generate(ids, max_new_tokens=5, visibility=vis, return_logits=True)
    assert torch.equal(g.tokens, recompute_loop(model, ids, lengths, vis, 5))
    base = teacher_forced_logits(model, ids, lengths, g.tokens, vis)
    ref = teacher_forced_logits(copy.deepcopy(model).double(), ids, lengths, g.tokens, vis)
    assert_close(g.logits, ref, base, name=f"{spec!r} step logits")


def test_eos_stops_each_row_and_the_call():
    model = _model("tiny-softmax")
    ids = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(5))
    free = model.generate(ids, max_new_tokens=10)
    eos = int(free[0, 2])  # row 0 emits it at step <= 2
    first = [int((free[r] == eos).nonzero()[0]) if (free[r] == eos).any() else None
             for r in range(3)]
    g = model.generate(ids, max_new_tokens=10, eos_token_id=eos, return_logits=True)
    for r in range(3):
        k = first[r]
        if k is None:
            assert torch.equal(g.tokens[r], free[r]) and int(g.lengths[r]) == 10
        else:
            assert torch.equal(g.tokens[r, : k + 1], free[r, : k + 1])
            assert bool((g.tokens[r, k + 1:] == eos).all()) and int(g.lengths[r]) == k + 1
            assert bool((g.logits[r, k + 1:] == 0).all())
    # a batch that all stops early ends early: same tokens, and eos repeated
    one = model.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(one[0], g.tokens[0])


def test_model_stream_takes_a_per_stream_spec():
    """A model built causal streams a prefix-LM batch with per-row prefix lengths: equal to the
    parallel model under the same spec; the layers keep their own spec."""
    model = _model("tiny-linear")
    tokens = torch.randint(0, V, (3, 11))
    vis = (Prefix(torch.tensor([2, 9, 5])), Causal())
    with torch.no_grad():
        base = model(tokens, visibility=vis)
        ref = copy.deepcopy(model).double()(tokens, visibility=vis)
    m = ModelStream(model, visibility=vis)
    out = torch.cat([m.push(tokens[:, :4]), m.push(tokens[:, 4:]), m.flush()], 1)
    assert_close(out, ref, base, name="per-stream spec")
    assert f"softmax {vis[0]!r}" not in repr(m) and f"linear {vis[0]!r}" in repr(m)
    assert all(b.visibility == Causal() for b in model.blocks)
    with pytest.raises(ValueError, match="one spec per layer"):
        ModelStream(model, visibility=(Causal(),))
    with pytest.raises(ArgumentTypeError, match="visibility"):
        ModelStream(model, visibility=Causal())
    with pytest.raises(ArgumentTypeError, match=r"visibility\[1\]"):
        ModelStream(model, visibility=(Causal(), "causal"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, prompt_lengths=[1, 9]), r"prompt_lengths must lie in \[1, 5\]"),
    (dict(max_new_tokens=2, prompt_lengths=[0, 3]), "prompt_lengths"),
    (dict(max_new_tokens=2, prompt_lengths=[1, 2, 3]), "one length per row"),
    (dict(max_new_tokens=2, prompt_lengths=torch.tensor([1.0, 2.0])), "ints"),
    (dict(max_new_tokens=2, prompt_lengths="3"), "prompt_lengths"),
    (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature"),
    (dict(max_new_tokens=2, do_sample=True, top_k=0), "top_k"),
    (dict(max_new_tokens=2, do_sample=True, generator=3), "generator"),
    (dict(max_new_tokens=2, temperature=0.5), "do_sample=True"),
    (dict(max_new_tokens=2, top_k=3), "do_sample=True"),
    (dict(max_new_tokens=2, do_sample=1), "do_sample"),
    (dict(max_new_tokens=2, eos_token_id=V), "eos_token_id"),
    (dict(max_new_tokens=2, visibility=Causal()), "one spec per layer"),
    (dict(max_new_tokens=2, visibility=(Causal(),)), "one spec per layer"),
    (dict(max_new_tokens=2, visibility=(Prefix(torch.tensor([1, 2, 3])), Causal())),
     "batch size"),
    (dict(max_new_tokens=9, visibility=(Segments(torch.zeros(8, dtype=torch.int64)), Causal())),
     "max_new_tokens=9"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    model = _model("tiny-softmax")
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(0, V, (2, 5)), **kwargs)


def test_bad_inputs_and_models():
    model = _model("tiny-softmax")
    with pytest.raises(ValueError, match="int64 tokens"):
        model.generate(torch.randn(2, 5), max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids in"):
        model.generate(torch.full((2, 5), V), max_new_tokens=2)
    with pytest.raises(ValueError, match="length T >= 1"):
        model.generate(torch.zeros(2, 0, dtype=torch.int64), max_new_tokens=2)
    feats = SequenceModel(ModelConfig(input_dim=3, output_dim=4))
    with pytest.raises(ValueError, match="only a token model"):
        feats.generate(torch.randn(1, 2, 3), max_new_tokens=1)
    assert model.generate(torch.zeros(2, 3, dtype=torch.int64), max_new_tokens=0).shape == (2, 0)
