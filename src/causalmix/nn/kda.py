"""A Kimi Delta Attention mixer (KDA, the mixer of Kimi Linear), causal or bidirectional.

KDA is Gated DeltaNet (:mod:`causalmix.nn.delta`) with a gate per key dimension: per layer,
from the (normalised) input ``x: [B, T, C]``::

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))   # short causal conv
    q, k    = l2norm(q) / sqrt(F), l2norm(k)                            # per head, F wide
    beta    = sigmoid(W_b x)                                            # [B, T, H] in (0, 1)
    g       = -exp(A_log) * softplus(W_up W_down x + dt_bias)           # [B, T, H, F], <= 0
    o       = delta_attention(q, k, v, visibility, beta=beta, log_gate=g)
    y       = W_o (rmsnorm(o) * silu(W_z x))                            # per head norm, gate

so the op runs ``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``
(and the reverse part with the same vector gate under ``Full()`` / ``Prefix(n)`` /
``Chunked(size, lookahead)``).

**The gate** follows the form of the Kimi Linear paper (Kimi Team, 2025, "Kimi Linear: An
Expressive, Efficient Attention Architecture"): the channel-wise forget gate comes from a
low-rank projection of the input, ``W_down: C -> r`` then ``W_up: r -> H * F`` (``r``:
``gate_rank``, default ``head_dim``, the value head width, as in that paper's layer), and is
turned into a log-decay ``<= 0`` the way Gated DeltaNet / Mamba-2 turn their scalar one:
``-exp(A_log[h]) * softplus(. + dt_bias[h, f])`` with one ``A_log`` per head and one
``dt_bias`` per head and key dimension (initialised as the Gated DeltaNet layer's, ``dt`` in
``[dt_min, dt_max]`` log-uniform). Choices of ours: the output gate and the norm are the Gated
DeltaNet layer's (full-rank ``W_z``, SiLU gate, per-head RMSNorm), where Kimi Linear uses a
low-rank sigmoid output gate; the short convolution, its document restarts, the stream carry
and the sequence-parallel halo are :class:`~causalmix.nn.delta.DeltaMixer`'s, unchanged.

Heads: ``n_heads`` value (and output) heads of ``head_dim``, ``n_kv_heads`` query / key heads
of ``feature_dim`` (value grouping); the gate has the output heads, ``[B, T, n_heads,
feature_dim]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.checks import check_int
from causalmix.nn.config import AttentionConfig
from causalmix.nn.delta import DeltaMixer

__all__ = ["KDAMixer"]


class KDAMixer(DeltaMixer):
    """One Kimi Delta Attention layer (``mixer="kda"``, ``op == "delta"``): a
    :class:`~causalmix.nn.delta.DeltaMixer` whose log-gate is ``[B, n, H, F]``, one per key
    dimension, from a rank-``gate_rank`` projection (the maths: the module docstring).
    ``stream_qkv`` gives ``log_gate: [B, n, H, F]``; everything else is the delta layer's."""

    kind = "kda"

    def __init__(self, cfg: AttentionConfig, *, conv_size: int = 4, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, gate_rank: int | None = None):
        super().__init__(cfg, conv_size=conv_size, dt_min=dt_min, dt_max=dt_max)
        h, f = cfg.n_heads, cfg.feature_dim
        rank = check_int("gate_rank", cfg.head_dim if gate_rank is None else gate_rank, 1)
        self.gate_rank = rank
        self.a_proj = nn.Sequential(nn.Linear(cfg.d_model, rank, bias=False),
                                    nn.Linear(rank, h * f, bias=False))
        dt = torch.exp(torch.rand(h * f) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, n, C]`` -> ``beta [B, n, H]`` in (0, 1) and the log-gate ``[B, n, H, F]``
        ``<= 0`` (fp32; fp64 for fp64)."""
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, n, _ = x.shape
        beta = torch.sigmoid(self.b_proj(x).to(cd)).clamp_min(torch.finfo(cd).tiny)
        dt = F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
        dt = dt.view(b, n, self.cfg.n_heads, self.cfg.feature_dim)
        return beta, -torch.exp(self.A_log.to(cd))[:, None] * dt
