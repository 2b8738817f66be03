"""Hybrid and state-space layers (the Mamba-2 family) run through causalmix after
``causalmix.hf.attach``: the model's own numbers where it is right, the right numbers where it
leaks (packed documents, padding), every spec the family serves, and refusals.

Precision: transformers' Mamba-2 scans compute in fp32 whatever the model's dtype, so the
model's own path is an oracle at fp32 precision only. Each comparison therefore checks two
things with the project's rule (``causalmix.testing.assert_close``): the fp64 causalmix run
agrees with the model's own fp64 run within what the model's own fp32 run errs, and the fp32
causalmix run errs against the fp64 causalmix run at most twice what the model's own fp32 run
errs.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix, Segments, Window  # noqa: E402
from causalmix.testing import assert_close  # noqa: E402

ARCHS = ["mamba2", "bamba", "granitemoehybrid", "nemotron_h", "zamba2", "falcon_h1",
         "falcon_h1_no_norm", "qwen3_next", "qwen3_5", "olmo_hybrid", "kimi_linear"]
LENGTHS = [5, 1, 9, 8]  # packed documents (23 tokens, chunk boundaries of the tiny configs at 8)


def _positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def _run(model, ids, *, grads: bool = True, weight_slice=slice(None), **kw):
    """``(logits, {parameter: gradient})`` of ``sum(logits * W)`` for a fixed random ``W``
    (``weight_slice``: the columns of ``W`` this call's positions take)."""
    model.zero_grad(set_to_none=True)
    out = model(ids, **kw).logits
    if not grads:
        return out.detach(), {}
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1, 64, out.shape[-1], generator=g, dtype=torch.float64)[:, weight_slice]
    (out * w[:, : out.shape[1]].to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _check(hybrid, name: str, ours, ours64, own, own64, *, row=None) -> None:
    """The two comparisons of the module docstring, for logits and every gradient. ``row``:
    ``(own fp32, causalmix fp64)`` on the whole row as one document, for packed documents --
    each document alone is a smaller problem than the packed row, so the model's own fp32 error
    on a row of the same length is a baseline too."""
    (o, g), (o64, g64), (w, gw), (w64, gw64) = ours, ours64, own, own64
    assert set(g) == set(gw) == set(g64) == set(gw64)
    pairs = [("logits", o, o64, w, w64)] + [(n, g[n], g64[n], gw[n], gw64[n]) for n in sorted(g)]
    close = hybrid.close
    for what, a, a64, b, b64 in pairs:
        extra = []
        if row is not None:
            (ro, rg), (ro64, rg64) = row
            extra = [(ro, ro64)] if what == "logits" else [(rg[what], rg64[what])]
        close(f"{name} {what}: own fp64 vs causalmix fp64", b64, a64, [(b, a64)] + extra)
        close(f"{name} {what}: causalmix fp32", a, a64, [(b, a64)] + extra)


def _pair(hybrid, arch, **kw):
    """(own fp32, own fp64, attached fp32, attached fp64): one set of weights."""
    own, own64 = hybrid.model(arch, **kw), hybrid.model(arch, torch.float64, **kw)
    return own, own64, cmhf.attach(copy.deepcopy(own)), cmhf.attach(copy.deepcopy(own64))


# ================================================================== the model's own numbers


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_logits_and_every_gradient_equal_the_models_own_path(arch, hybrid):
    own, own64, ours, ours64 = _pair(hybrid, arch)
    assert hybrid.mixers(ours) and all("forward" in m.__dict__ for m in hybrid.mixers(ours))
    ids = hybrid.ids(2, 23)
    _check(hybrid, arch, _run(ours, ids), _run(ours64, ids), _run(own, ids), _run(own64, ids))


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "qwen3_next", "olmo_hybrid", "kimi_linear"])
def test_left_padding_equals_the_models_own_path(arch, hybrid):
    """Left padding is where transformers' multiply-by-mask is exact: same numbers."""
    own, own64, ours, ours64 = _pair(hybrid, arch)
    ids, am = hybrid.ids(2, 17), torch.ones(2, 17, dtype=torch.long)
    am[1, :6] = 0
    kw = dict(attention_mask=am, grads=False)
    runs = [_run(m, ids, **kw) for m in (ours, ours64, own, own64)]
    valid = am.bool()
    _check(hybrid, arch, *[(o[valid], {}) for o, _ in runs])


# ================================================================== packed documents


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_each_document_alone(arch, hybrid):
    """Packed ``position_ids``: logits and gradients == each document alone through the
    model's own path; the model's own path on the packed row leaks (so this test fixes it)."""
    own, own64, ours, ours64 = _pair(hybrid, arch)
    ids, pos = hybrid.ids(1, sum(LENGTHS)), _positions(LENGTHS)

    def alone(model):
        outs, grads, at = [], {}, 0
        for n in LENGTHS:
            o, g = _run(model, ids[:, at:at + n], weight_slice=slice(at, at + n))
            outs.append(o)
            for k, v in g.items():
                grads[k] = grads.get(k, 0) + v
            at += n
        return torch.cat(outs, 1), grads

    _check(hybrid, arch, _run(ours, ids, position_ids=pos), _run(ours64, ids, position_ids=pos),
           alone(own), alone(own64), row=(_run(own, ids), _run(ours64, ids)))
    leaked = _run(own, ids, position_ids=pos, grads=False)[0]
    assert (leaked - alone(own)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["bamba", "qwen3_next", "kimi_linear"])
def test_cu_seq_lens_give_the_documents_too(arch, hybrid):
    """``cu_seq_lens_q`` / ``_k`` (as ``DataCollatorWithFlattening`` makes them) == packed
    ``position_ids``; transformers' own path drops them in Bamba's Mamba layers and Kimi's KDA
    layers and raises in Gated DeltaNet's torch rule (5.24)."""
    own, _, ours, _ = _pair(hybrid, arch)
    ids, pos = hybrid.ids(1, sum(LENGTHS)), _positions(LENGTHS)
    cu = torch.tensor([0, 5, 6, 15, 23], dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    by_pos = _run(ours, ids, position_ids=pos, grads=False)[0]
    assert_close(_run(ours, ids, grads=False, **kw)[0], by_pos, by_pos)
    with pytest.raises(ValueError, match="different documents"):
        ours(ids, position_ids=pos, cu_seq_lens_q=cu[[0, 4]], cu_seq_lens_k=cu[[0, 4]])
    if arch == "qwen3_next":
        with pytest.raises(ValueError, match="packed sequences"):
            own(ids, **kw)
    else:
        assert (_run(own, ids, grads=False, **kw)[0] - by_pos).abs().max() > 1e-2


def test_padding_anywhere_equals_the_row_without_it(hybrid):
    """Padding in the middle or at the right of a row (transformers' multiply-by-mask decays
    the state and fills the convolution window there): each row == its tokens alone, under
    Causal() and Full() (Mamba-2: no attention layer, so no position embedding moves)."""
    own, _, ours, ours64 = _pair(hybrid, "mamba2")
    ids = hybrid.ids(2, 15)
    am = torch.ones(2, 15, dtype=torch.long)
    am[0, 4:7] = 0  # a hole
    am[1, 11:] = 0  # right padding
    for spec in (Causal(), Full()):
        out = _run(ours, ids, attention_mask=am, visibility=spec, grads=False)[0]
        for r in range(2):
            keep = am[r].bool()
            ref = _run(ours64, ids[r:r + 1, keep], visibility=spec, grads=False)[0][0]
            base = _run(ours, ids[r:r + 1, keep], visibility=spec, grads=False)[0][0]
            assert_close(out[r, keep], ref, base, name=f"{spec!r} row {r}")
    leaked = _run(own, ids, attention_mask=am, grads=False)[0]
    alone = _run(own, ids[:1, am[0].bool()], grads=False)[0]
    assert (leaked[0, am[0].bool()] - alone[0]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["bamba", "qwen3_5", "kimi_linear"])
def test_padding_anywhere_in_a_hybrid_layer_equals_the_row_without_it(arch, hybrid):
    """The same at the hybrid layer of an attention hybrid (its attention layers move RoPE
    positions with a hole, so the layer is called directly)."""
    layers = [hybrid.mixers(cmhf.attach(hybrid.model(arch, dtype)))[0]
              for dtype in (torch.float32, torch.float64)]
    hidden = torch.randn(2, 15, 64, generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 15, dtype=torch.long)
    am[0, 4:7] = 0
    am[1, 11:] = 0
    for spec in (Causal(), Full()):
        out = layers[0](hidden, attention_mask=am, visibility=spec)
        for r in range(2):
            keep = am[r].bool()
            ref = layers[1](hidden[r:r + 1, keep].double(), visibility=spec)[0]
            base = layers[0](hidden[r:r + 1, keep], visibility=spec)[0]
            assert_close(out[r, keep], ref, base, name=f"{arch} {spec!r} row {r}")


# ================================================================== attach / detach


def test_detach_gives_the_models_own_outputs_and_other_models_are_untouched(hybrid):
    model, other = hybrid.model("bamba"), hybrid.model("bamba")
    ids, pos = hybrid.ids(1, 23), _positions(LENGTHS)
    before = model(ids).logits
    cmhf.attach(model, Full())
    bidir = model(ids).logits
    assert not torch.allclose(bidir, before, atol=1e-3)
    assert not any("forward" in m.__dict__ for m in hybrid.mixers(other))
    assert torch.equal(other(ids).logits, before)
    copied = copy.deepcopy(model)
    assert torch.equal(copied(ids).logits, bidir)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(ids).logits, bidir)
    cmhf.detach(model)
    assert not any("forward" in m.__dict__ for m in hybrid.mixers(model))
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(model(ids, position_ids=pos).logits, other(ids, position_ids=pos).logits)
    assert torch.equal(copied(ids).logits, bidir)  # the copy stays attached


def test_a_mixer_whose_forward_was_replaced_by_someone_else_is_refused(hybrid):
    model = hybrid.model("mamba2")
    mixer = hybrid.mixers(model)[0]
    mixer.forward = lambda *a, **k: None
    with pytest.raises(ValueError, match="already has its forward replaced"):
        cmhf.attach(model)


# ================================================================== refusals


def test_what_the_family_cannot_serve_is_refused_naming_the_layer(hybrid):
    model = cmhf.attach(hybrid.model("bamba"))
    ids = hybrid.ids(1, 9)
    named = r"BambaMixer \(layer 0, layer type 'linear_attention'\), a Mamba-2 layer"
    with pytest.raises(ValueError, match=named + ".*Window"):
        model(ids, visibility=Window(2))
    with pytest.raises(ValueError, match="BambaMixer.*seq_idx"):
        model(ids, seq_idx=torch.zeros(1, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="BambaMixer.*cannot honour the keyword.*'mystery'"):
        model(ids, mystery=1)
    mamba = cmhf.attach(hybrid.model("mamba2"))
    with pytest.raises(ValueError, match="Mamba2Mixer.*Window"):
        mamba(ids, visibility=Window(3, 1))
    gdn = cmhf.attach(hybrid.model("qwen3_next"))
    with pytest.raises(ValueError, match="Qwen3NextGatedDeltaNet.*Gated DeltaNet layer.*Window"):
        gdn(ids, visibility=Window(3, 1))
    kda = cmhf.attach(hybrid.model("kimi_linear"))
    for spec in (Window(3, 1), Window(2)):
        with pytest.raises(ValueError, match="KimiLinearDeltaAttention.*KDA.*Window"):
            kda(ids, visibility=spec)
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention.*seq_idx"):
        kda(ids, seq_idx=torch.zeros(1, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="visibility must be a causalmix spec"):
        mamba(ids, visibility="full")


def test_layers_causalmix_does_not_run_are_named_and_keep_their_own_causal_path(hybrid,
                                                                                kda_refused):
    """A layer refused by name (``REFUSED``; Kimi's KDA made one here): attach works for the
    causal rule (the model's own numbers), a spec or packed documents are refused naming the
    layer class."""
    model = hybrid.model("kimi_linear")
    ids = torch.randint(1, 97, (1, 9))
    before = model(ids).logits
    cmhf.attach(model)
    assert "forward" not in hybrid.mixers(model)[0].__dict__
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention.*'linear_attention'"):
        model(ids, visibility=Prefix(4))
    with pytest.raises(ValueError, match="packed documents"):
        model(ids, position_ids=_positions([4, 5]))


def test_a_cache_written_by_the_models_own_path_is_accepted_under_causal_only(hybrid):
    own = hybrid.model("mamba2")
    ids = hybrid.ids(1, 8)
    with torch.no_grad():
        out = own(ids, use_cache=True)
    model = cmhf.attach(copy.deepcopy(own))
    nxt = hybrid.ids(1, 1, seed=3)
    step = model(nxt, cache=copy.deepcopy(out.cache), use_cache=True).logits
    assert_close(step, own(nxt, cache=copy.deepcopy(out.cache), use_cache=True).logits,
                 own(torch.cat([ids, nxt], 1)).logits[:, -1:])
    with pytest.raises(ValueError, match="did not write"):
        model(nxt, cache=copy.deepcopy(out.cache), use_cache=True, visibility=Prefix(8))


# ================================================================== the spec reaches every layer


@pytest.mark.parametrize("arch", ARCHS)
def test_a_spec_reaches_the_attention_and_the_hybrid_layers_alike(arch, hybrid):
    """Whether the first three tokens' logits depend on the fourth token, spec by spec."""
    model = cmhf.attach(hybrid.model(arch))
    ids = hybrid.ids(1, 12)
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] % 90) + 1
    for spec, sees in ((Causal(), False), (Full(), True), (Prefix(4), True), (Prefix(3), False),
                       (Chunked(4), True), (Chunked(2, 1), True), (Chunked(3), False),
                       (Segments(torch.tensor([0] * 3 + [1] * 9)), False)):
        a = model(ids, visibility=spec).logits[0, :3]
        b = model(changed, visibility=spec).logits[0, :3]
        assert bool((a - b).abs().max() > 1e-6) == sees, spec


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_recomputes_under_the_same_spec(arch, hybrid):
    """Checkpointed layers run again in the backward pass, after the model call has returned:
    the documents (and the spec) still reach them, so the gradients are those without
    checkpointing."""
    ours = cmhf.attach(hybrid.model(arch))
    ids, pos = hybrid.ids(1, sum(LENGTHS)), _positions(LENGTHS)
    ours.train()
    plain = _run(ours, ids, position_ids=pos, visibility=Prefix(7))
    ours.activation_checkpointing_enable()
    again = _run(ours, ids, position_ids=pos, visibility=Prefix(7))
    for name, g in plain[1].items():
        assert_close(again[1][name], g, g, name=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_errs_like_the_models_own_bf16_path(arch, hybrid):
    own = hybrid.model(arch, torch.bfloat16)
    ours = cmhf.attach(copy.deepcopy(own))
    ids = hybrid.ids(2, 19)
    ref = cmhf.attach(hybrid.model(arch, torch.float64))(ids).logits
    assert_close(ours(ids).logits.float(), ref, own(ids).logits.float(), name=arch,
                 dtype=torch.bfloat16)
