"""Non-causal specs on the hybrid layers == an explicit formula built here from the layer's
own functions: per document, the model's own convolution (causal, restarted at the document)
and the model's own chunked scan forward, plus the same scan over the flipped key range of
each query, then the layer's norm and output projection. Mamba-2 (linear family): the flipped
scan includes the query's own key, so its diagonal is counted once. Gated DeltaNet (delta
family): the reverse part is strict -- ``(exp(g_i) R_{i+1})^T q_i`` with ``R`` the delta
recurrence run from ``hi(i)`` down to ``i + 1`` -- so the flipped scan runs over keys
``hi(i) .. i + 1`` with each key read by the query just before it, scaled by its gate. Kimi
Linear's KDA (delta family, per-channel gates): the same, the gate of that query per key channel
so it scales the query (``(diag(exp(g_i)) R)^T q_i = R^T (exp(g_i) q_i)``).

For a query ``i`` with last visible key ``hi(i)`` (``Full``: the document's end; ``Prefix(n)``:
``n - 1`` for ``i < n``; ``Chunked(s, L)``: the end of chunk ``i // s + L``; all clipped to the
document), the reverse part is the scan run backwards from ``hi(i)`` to ``i`` -- for the queries
of one chunk (or of the whole document) one flipped scan over their common key range.
Tolerances: the comparisons of ``test_hybrid.py`` (the layer's scan is fp32 inside).
"""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import causalmix.hf as cmhf  # noqa: E402
from causalmix import Causal, Chunked, Full, Prefix, Segments  # noqa: E402

T = 23
DOCS = [[(0, 9), (9, 23)], [(0, 23)]]  # per row: documents [a, b)
IDS = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])


def _regions(spec, a: int, b: int) -> list[tuple[int, int, int]]:
    """``(first query, end of queries, end of keys)`` of each flipped scan of document [a, b)."""
    if isinstance(spec, Causal):
        return []
    if isinstance(spec, (Full, Segments)):
        return [(a, b, b)]
    if isinstance(spec, Prefix):
        n = min(b, spec.n)
        return [(a, n, n)] if a < n else []
    size, ahead = spec.size, spec.lookahead
    out = []
    for c in range(a // size, (b - 1) // size + 1):
        qa, qb = max(a, c * size), min(b, (c + 1) * size)
        out.append((qa, qb, min(b, (c + ahead + 1) * size)))
    return out


def _document(mixer, xbc, dt, spec, a: int, b: int) -> torch.Tensor:
    """The scan output ``[1, b - a, H, P]`` (with ``D x``) of one document of one row."""
    mod = importlib.import_module(type(mixer).__module__)
    h, p, g, n = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    conv = mod.causal_conv1d_fn(xbc[:, a:b].transpose(1, 2), mixer.conv1d.weight.squeeze(1),
                                mixer.conv1d.bias, activation=mixer.activation).transpose(1, 2)
    x, bm, cm = conv.split([mixer.intermediate_size, g * n, g * n], dim=-1)
    x, bm, cm = x.reshape(1, b - a, h, p), bm.reshape(1, b - a, g, n), cm.reshape(1, b - a, g, n)
    d = dt[:, a:b]
    a_ = -torch.exp(mixer.A_log.float())

    def scan(sl, flip):
        f = (lambda z: z.flip(1)) if flip else (lambda z: z)
        y = mod.mamba2_chunk_scan(f(x[:, sl]), f(d[:, sl]), a_, f(bm[:, sl]), f(cm[:, sl]),
                                  chunk_size=mixer.chunk_size, dt_bias=mixer.dt_bias,
                                  dt_softplus=True, dt_limit=mixer.time_step_limit)
        return f(y)

    y = scan(slice(None), False)
    step = torch.nn.functional.softplus(d.float() + mixer.dt_bias.float())
    step = step.clamp(*mixer.time_step_limit)
    rep = h // g
    diag = (cm.repeat_interleave(rep, 2) * bm.repeat_interleave(rep, 2)).sum(-1).float()
    diag = diag[..., None] * x.float() * step[..., None]
    parts = [y]
    for qa, qb, kb in _regions(spec, a, b):
        rev = scan(slice(qa - a, kb - a), True)[:, : qb - qa] - diag[:, qa - a:qb - a]
        parts.append(torch.nn.functional.pad(rev, (0, 0, 0, 0, qa - a, b - qb)))
    return sum(parts) + mixer.D.float()[:, None] * x.float()


def _formula(mixer, hidden, spec) -> torch.Tensor:
    if hasattr(mixer, "forget_gate"):
        return _kda_formula(mixer, hidden, spec)
    if hasattr(mixer, "head_k_dim"):
        return _gdn_formula(mixer, hidden, spec)
    z, xbc, dt = mixer.in_proj(hidden).split(
        [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    rows = [torch.cat([_document(mixer, xbc[r:r + 1], dt[r:r + 1], spec, a, b)
                       for a, b in DOCS[r]], dim=1) for r in range(hidden.shape[0])]
    y = torch.cat(rows, 0).reshape(hidden.shape[0], hidden.shape[1], -1)
    return mixer.out_proj(mixer.norm(y, z).to(hidden.dtype))


def _gdn_inputs(mixer, h):
    """The layer's own projections: ``(cat(q, k, v), z, b, a)``."""
    name = type(mixer).__name__
    if name == "Qwen3NextGatedDeltaNet":
        q, k, v, z, b, a = mixer.fix_query_key_value_ordering(mixer.in_proj_qkvz(h),
                                                              mixer.in_proj_ba(h))
        return torch.cat([x.flatten(2) for x in (q, k, v)], -1), z, b, a
    if name == "Qwen3_5GatedDeltaNet":
        return (mixer.in_proj_qkv(h), mixer.in_proj_z(h).unflatten(-1, (-1, mixer.head_v_dim)),
                mixer.in_proj_b(h), mixer.in_proj_a(h))
    assert name == "OlmoHybridGatedDeltaNet", name
    qkv = torch.cat([mixer.q_proj(h), mixer.k_proj(h), mixer.v_proj(h)], -1)
    return (qkv, mixer.g_proj(h).unflatten(-1, (-1, mixer.head_v_dim)), mixer.b_proj(h),
            mixer.a_proj(h))


def _flip(x):
    return x.flip(1)


def _unit(x):
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _gdn_document(mixer, mixed, b_, a_, spec, a: int, b: int) -> torch.Tensor:
    """The delta scan output ``[1, b - a, Hv, Dv]`` of one document of one row."""
    mod = importlib.import_module(type(mixer).__module__)
    conv = mod.causal_conv1d_fn(mixed[:, a:b].transpose(1, 2), mixer.conv1d.weight.squeeze(1),
                                mixer.conv1d.bias, activation=mixer.activation).transpose(1, 2)
    q, k, v = conv.split([mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
    q, k = (x.unflatten(-1, (-1, mixer.head_k_dim)) for x in (q, k))
    v = v.unflatten(-1, (-1, mixer.head_v_dim))
    beta = b_[:, a:b].sigmoid() * (2.0 if getattr(mixer, "allow_neg_eigval", False) else 1.0)
    g = -mixer.A_log.float().exp() * torch.nn.functional.softplus(a_[:, a:b].float()
                                                                  + mixer.dt_bias)
    rule = mod.torch_chunk_gated_delta_rule
    y = rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]
    for qa, qb, kb in _regions(spec, a, b):
        last = min(qb, kb - 1)  # the last query that sees a later key
        if last <= qa:
            continue
        keys, reads = slice(qa + 1 - a, kb - a), slice(qa - a, kb - 1 - a)
        f = _flip
        rev = f(rule(f(_unit(q[:, reads])), f(_unit(k[:, keys])), f(v[:, keys]),
                     g=f(g[:, keys]), beta=f(beta[:, keys]))[0])
        rev = (rev * g[:, reads].exp()[..., None])[:, : last - qa]
        y = y + torch.nn.functional.pad(rev, (0, 0, 0, 0, qa - a, b - last)).to(y.dtype)
    return y


def _gdn_formula(mixer, hidden, spec) -> torch.Tensor:
    mixed, z, b_, a_ = _gdn_inputs(mixer, hidden)
    rows = [torch.cat([_gdn_document(mixer, mixed[r:r + 1], b_[r:r + 1], a_[r:r + 1], spec, a, b)
                       for a, b in DOCS[r]], dim=1) for r in range(hidden.shape[0])]
    y = torch.cat(rows, 0)
    norm = mixer.o_norm if hasattr(mixer, "o_norm") else mixer.norm
    proj = mixer.o_proj if hasattr(mixer, "o_proj") else mixer.out_proj
    o = norm(y.reshape(-1, mixer.head_v_dim), z.reshape(-1, mixer.head_v_dim))
    return proj(o.reshape(hidden.shape[0], hidden.shape[1], -1))


def _kda_unit(x):
    x = x.float()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _kda_document(mixer, mixed, beta, g, spec, a: int, b: int) -> torch.Tensor:
    """The KDA scan output ``[1, b - a, H, D]`` of one document of one row: as
    :func:`_gdn_document`, the gate of the query before each key now per channel, so it scales
    that query (``(diag(exp(g_i)) R)^T q_i = R^T (exp(g_i) q_i)``)."""
    mod = importlib.import_module(type(mixer).__module__)
    conv = mod.causal_conv1d_fn(mixed[:, a:b].transpose(1, 2), mixer.conv1d.weight.squeeze(1),
                                mixer.conv1d.bias, activation=mixer.activation).transpose(1, 2)
    q, k, v = (x.unflatten(-1, (-1, mixer.head_dim)) for x in conv.split([mixer.qkv_dim] * 3, -1))
    beta, g = beta[:, a:b], g[:, a:b]
    rule = mod.chunk_kimi_delta_attention
    y = rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]
    for qa, qb, kb in _regions(spec, a, b):
        last = min(qb, kb - 1)  # the last query that sees a later key
        if last <= qa:
            continue
        keys, reads = slice(qa + 1 - a, kb - a), slice(qa - a, kb - 1 - a)
        f = _flip
        rev = f(rule(f(_kda_unit(q[:, reads]) * g[:, reads].exp()), f(_kda_unit(k[:, keys])),
                     f(v[:, keys]), g=f(g[:, keys]), beta=f(beta[:, keys]))[0])
        rev = rev[:, : last - qa]
        y = y + torch.nn.functional.pad(rev, (0, 0, 0, 0, qa - a, b - last)).to(y.dtype)
    return y


def _kda_formula(mixer, hidden, spec) -> torch.Tensor:
    mixed = torch.cat([mixer.q_proj(hidden), mixer.k_proj(hidden), mixer.v_proj(hidden)], -1)
    beta, g = mixer.b_proj(hidden).sigmoid(), mixer.forget_gate(hidden)
    rows = [torch.cat([_kda_document(mixer, mixed[r:r + 1], beta[r:r + 1], g[r:r + 1], spec, a,
                                     b) for a, b in DOCS[r]], dim=1)
            for r in range(hidden.shape[0])]
    gate = mixer.g_b_proj(mixer.g_a_proj(hidden)).unflatten(-1, (-1, mixer.head_dim))
    o = mixer.o_norm(torch.cat(rows, 0), gate)
    return mixer.o_proj(o.reshape(hidden.shape[0], hidden.shape[1], -1))


def _outputs(fn, mixer, dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, T, 64, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    out = fn(hidden)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    params = [p for _, p in mixer.named_parameters()]
    grads = torch.autograd.grad((out * w).sum(), [hidden, *params])
    return [out.detach(), *grads]


SPECS = [Causal(), Full(), Segments(IDS), Prefix(6), Prefix(12), Chunked(4), Chunked(4, 1),
         Chunked(5, 2)]


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "qwen3_next", "qwen3_5", "olmo_hybrid",
                                  "kimi_linear"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_a_spec_on_a_hybrid_layer_equals_forward_plus_flipped_scans(arch, spec, hybrid):
    names = ["output", "d hidden"] + [f"d {n}" for n, _ in
                                      hybrid.mixers(hybrid.model(arch))[0].named_parameters()]
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = cmhf.attach(hybrid.model(arch, dtype))
        mixer = hybrid.mixers(model)[0]
        full = spec if isinstance(spec, Segments) else spec & Segments(IDS)
        ours = _outputs(lambda h, m=mixer, s=full: m(h, visibility=s), mixer, dtype)
        theirs = _outputs(lambda h, m=mixer: _formula(m, h, spec), mixer, dtype)
        results[dtype] = ours, theirs
    (ours, theirs), (ours64, theirs64) = results[torch.float32], results[torch.float64]
    for name, a, a64, b, b64 in zip(names, ours, ours64, theirs, theirs64, strict=True):
        hybrid.close(f"{arch} {spec!r} {name}: formula fp64", b64, a64, [(b, a64)])
        # Kimi's forget gate and KDA kernel cast to fp32 whatever the model's dtype, so its
        # formula "in fp64" is one more fp32 run of the model's own functions: a baseline too
        extra = [(b64, a64)] if arch == "kimi_linear" else []
        hybrid.close(f"{arch} {spec!r} {name}: causalmix fp32", a, a64, [(b, a64)] + extra)


@pytest.mark.parametrize("arch", ["mamba2", "qwen3_next", "kimi_linear"])
def test_the_reverse_part_is_really_there(arch, hybrid):
    """Full() differs from Causal() on every position but the last of each document."""
    mixer = hybrid.mixers(cmhf.attach(hybrid.model(arch)))[0]
    hidden = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(4))
    full = mixer(hidden, visibility=Full() & Segments(IDS))
    causal = mixer(hidden, visibility=Segments(IDS) & Causal())
    differs = (full - causal).abs().amax(-1) > 1e-4
    last = torch.zeros(2, T, dtype=torch.bool)
    last[0, [8, 22]] = last[1, 22] = True
    assert torch.equal(differs, ~last)
