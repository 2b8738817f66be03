"""A Gated DeltaNet mixer (Qwen3-Next / Gated DeltaNet style), causal or bidirectional.

Per layer, from the (normalised) input ``x: [B, T, C]``::

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))   # short causal conv
    q, k    = l2norm(q) / sqrt(F), l2norm(k)                            # per head, F wide
    beta    = sigmoid(W_b x)                                            # [B, T, H] in (0, 1)
    g       = -exp(A_log) * softplus(W_a x + dt_bias)                   # [B, T, H], <= 0
    o       = delta_attention(q, k, v, visibility, beta=beta, log_gate=g)
    y       = W_o (rmsnorm(o) * silu(W_z x))                            # per head norm, gate

Two options (keyword arguments of :class:`DeltaMixer`; the defaults are Gated DeltaNet's):
``qk_activation="identity"`` drops the SiLU of ``q`` and ``k`` (the L2 norm alone: SiLU keeps
each key near the positive orthant, where the keys of a narrow head are far from orthogonal),
and ``conv_init="identity"`` starts the convolution as the identity (newest tap 1, older taps
0) instead of a random kernel whose every tap is as strong as the newest (a blur of ``K``
frames at initialisation). Lab finding F7 (MQAR with re-written keys, one write per frame,
an 8 x 16 state per head) runs the layer with both: with the defaults it barely learned plain
MQAR with 8-wide keys (see F7's history).
Gates at initialisation as Mamba-2: ``dt`` log-uniform in ``[dt_min, dt_max]``, ``-A``
evenly in ``[1, 16]`` over the heads.

The delta-rule op (:mod:`causalmix.ops.delta`) gives the recurrence ``S_t = exp(g_t) (I -
beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t`` under a causal spec, plus
its reverse part wherever the spec shows later keys (``Full()``, ``Prefix(n)``,
``Chunked(size, lookahead)``; the reverse part uses the same gate). Heads: ``n_heads`` value
(and output) heads of ``head_dim``, ``n_kv_heads`` query / key heads of ``feature_dim``
(``n_heads % n_kv_heads == 0``: the value grouping of Gated DeltaNet, 16 key heads and 32
value heads in Qwen3-Next).

**The short convolution** (depthwise, kernel ``conv_size``, on the q, k and v channels) is
causal under *every* spec: output ``t`` reads the inputs ``t - K + 1 .. t``, never a later
one, also under ``Full()`` / ``Prefix`` / ``Chunked`` (the lookahead of a bidirectional
layer is the mixer's alone, so the layer streams with the spec's own latency). It
**restarts at every document start** of a ``Segments`` spec: a tap that would read a position
of another document reads zero (a ``where``: nothing of another document, not even a NaN,
reaches it), as if the document began the sequence. Positions before ``offset`` (a forward
call at ``offset > 0``) read zero, as at the start of a sequence; the model stream carries the
last ``K - 1`` inputs instead, and sequence parallel fetches them from the neighbouring rank
(:func:`causalmix.distributed.halos`), so both equal the whole-sequence run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.distributed.model import halos
from causalmix.nn.config import AttentionConfig
from causalmix.nn.mixing import MixingLayer, mix
from causalmix.ops.factor import factorise
from causalmix.visibility import Visibility

__all__ = ["CONV_INITS", "ConvState", "DeltaMixer", "QK_ACTIVATIONS", "causal_conv"]

#: How :class:`DeltaMixer` initialises its short convolution: ``"random"`` (``N(0, 1 / K)`` per
#: tap) or ``"identity"`` (newest tap 1, the others 0: q, k, v start as the frame's own).
CONV_INITS = ("random", "identity")
#: What :class:`DeltaMixer` applies to ``q`` and ``k`` before their L2 norm: ``"silu"`` (Gated
#: DeltaNet, Qwen3-Next) or ``"identity"`` (the norm alone: keys over the whole sphere).
QK_ACTIVATIONS = ("silu", "identity")


def _segment_ids(visibility: Visibility) -> torch.Tensor | None:
    """The spec's document ids ``[B', T]`` over absolute positions, or None without
    ``Segments``."""
    seg = factorise(visibility, mixer="the delta layer").segments
    if seg is None:
        return None
    return seg.ids if seg.ids.dim() == 2 else seg.ids[None]


def causal_conv(x: torch.Tensor, past: torch.Tensor, start: int, weight: torch.Tensor,
                ids: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution of one run ``x: [B, n, C]`` at absolute positions
    ``start + [0, n)``, ``past: [B, K - 1, C]`` the inputs at ``start - K + 1 .. start - 1``
    (zeros before position 0), ``weight: [C, K]`` (``weight[:, K - 1]`` on the newest input).
    ``ids``: ``[B', T]`` document ids of absolute positions or None: a tap reading another
    document than its output's reads zero. Returns ``[B, n, C]`` (no bias, no activation)."""
    n, k = x.shape[1], weight.shape[1]
    ext = torch.cat([past.to(x.dtype), x], 1)  # [B, K - 1 + n, C]
    pos = torch.arange(start, start + n, device=x.device)
    out = torch.zeros_like(x)
    for lag in range(k):
        tap = ext[:, k - 1 - lag:k - 1 - lag + n]
        src = pos - lag
        keep = (src >= 0)[None]
        if ids is not None:
            idx = ids.to(x.device)
            keep = keep & (idx[:, src.clamp_min(0)] == idx[:, pos])
        out = out + torch.where(keep[..., None], tap, 0.0) * weight[:, k - 1 - lag]
    return out


class ConvState(NamedTuple):
    """A model stream's carry of one delta layer: its spec's document ids (or None) and the
    last ``K - 1`` convolution inputs ``[B, K - 1, C]`` (None before the first push)."""

    ids: torch.Tensor | None
    past: torch.Tensor | None


class DeltaMixer(MixingLayer):
    """One Gated DeltaNet layer: ``forward(x: [B, T, C], *, visibility, offset=0,
    sharding=None) -> [B, T, C]`` (``op == "delta"``; the maths and the convolution: the
    module docstring).

    Its parts, as the model stream uses them: ``stream_context(visibility)`` -> a
    :class:`ConvState`; ``stream_qkv(x [B, n, C], positions, context)`` -> (``{"q": [B, n, Hk,
    F], "k": [B, n, Hk, F], "v": [B, n, H, hd], "beta": [B, n, H], "log_gate": [B, n, H]}``,
    the next context); ``out(mixed [B, n, H, hd], x [B, n, C]) -> [B, n, C]``.
    """

    #: the ``AttentionConfig.mixer`` this class builds
    kind = "delta"

    def __init__(self, cfg: AttentionConfig, *, conv_size: int = 4, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, qk_activation: str = "silu", conv_init: str = "random"):
        super().__init__()
        if cfg.mixer != self.kind:
            raise ValueError(f"{type(self).__name__}: mixer must be {self.kind!r}, got "
                             f"{cfg.mixer!r}")
        if qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: qk_activation must be one of "
                             f"{list(QK_ACTIVATIONS)}, got {qk_activation!r}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"{type(self).__name__}: conv_init must be one of "
                             f"{list(CONV_INITS)}, got {conv_init!r}")
        self.cfg, self.op, self.conv_size = cfg, "delta", conv_size
        self.qk_activation = qk_activation
        h, hk, hd, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.feature_dim
        self.widths = (hk * f, hk * f, h * hd)  # q, k, v channels of the convolution
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        weight = torch.randn(sum(self.widths), conv_size) / math.sqrt(conv_size)
        if conv_init == "identity":  # q, k, v start as the frame's own projections
            weight = torch.zeros_like(weight)
            weight[:, -1] = 1.0
        self.conv_weight = nn.Parameter(weight)
        self.b_proj = nn.Linear(cfg.d_model, h, bias=False)
        self.a_proj = nn.Linear(cfg.d_model, h, bias=False)
        self.z_proj = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, h)))
        self.norm_weight = nn.Parameter(torch.ones(hd))

    def mixer_kwargs(self) -> dict:
        return {}

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, n, C]`` -> ``beta`` in (0, 1) and the log-gate ``<= 0``, each ``[B, n, H]``
        (fp32; fp64 for fp64)."""
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        beta = torch.sigmoid(self.b_proj(x).to(cd)).clamp_min(torch.finfo(cd).tiny)
        dt = F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
        return beta, -torch.exp(self.A_log.to(cd)) * dt

    def inputs(self, conv: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The op's per-frame inputs from the convolution's output ``conv [B, n, Cqkv]`` and the
        layer input ``x [B, n, C]``."""
        cfg = self.cfg
        b, n, _ = x.shape
        q, k, v = conv.split(self.widths, -1)
        if self.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(v)
        q = F.normalize(q.view(b, n, cfg.n_kv_heads, -1), dim=-1) / math.sqrt(cfg.feature_dim)
        k = F.normalize(k.view(b, n, cfg.n_kv_heads, -1), dim=-1)
        beta, g = self.gates(x)
        return {"q": q, "k": k, "v": v.reshape(b, n, cfg.n_heads, cfg.head_dim),
                "beta": beta.to(x.dtype), "log_gate": g.to(x.dtype)}

    def forward(self, x: torch.Tensor, *, visibility: Visibility, offset: int = 0,
                sharding=None) -> torch.Tensor:
        """``x: [B, T, C]`` (already normalised) at positions ``offset + [0, T)`` under
        ``visibility`` -> ``[B, T, C]``; with ``sharding`` (a
        :class:`causalmix.distributed.Sharding`), ``x`` is this rank's shard: each of its runs
        takes its convolution halo from the rank before it."""
        pre = self.qkv_proj(x)
        ids = _segment_ids(visibility)
        if sharding is None:
            past = pre.new_zeros(pre.shape[0], self.conv_size - 1, pre.shape[2])
            conv = causal_conv(pre, past, offset, self.conv_weight, ids)
        else:
            conv = torch.cat([
                causal_conv(pre[:, r.local:r.local + r.length], past, r.start,
                            self.conv_weight, ids)
                for r, past in halos(pre, sharding, self.conv_size - 1)], 1)
        mixed = mix(self.op, visibility=visibility, q_offset=offset, k_offset=offset,
                    sharding=sharding, impl=self.cfg.impl, **self.inputs(conv, x))
        return self.out(mixed, x)

    def stream_context(self, visibility: Visibility) -> ConvState:
        """A new stream's carry under ``visibility``."""
        return ConvState(_segment_ids(visibility), None)

    def stream_qkv(self, x: torch.Tensor, positions: torch.Tensor,
                   context: ConvState) -> tuple[dict[str, torch.Tensor], ConvState]:
        """The op's inputs of the next frames ``x [B, n, C]`` at ``positions`` (consecutive,
        continuing the stream) and the carry after them; ``context`` is left unchanged."""
        pre = self.qkv_proj(x)
        past = context.past
        if past is None:
            past = pre.new_zeros(pre.shape[0], self.conv_size - 1, pre.shape[2])
        conv = causal_conv(pre, past, int(positions[0]), self.conv_weight, context.ids)
        tail = torch.cat([past, pre], 1)[:, pre.shape[1]:]
        return self.inputs(conv, x), ConvState(context.ids, tail)

    def out(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``mixed: [B, n, H, hd]``, ``x: [B, n, C]`` -> ``[B, n, C]``: per-head RMSNorm, the
        output gate ``silu(W_z x)``, the output projection."""
        b, n = mixed.shape[:2]
        y = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        z = self.z_proj(x).view(b, n, self.cfg.n_heads, -1)
        return self.o_proj((y * F.silu(z)).reshape(b, n, -1))
