"""A gated linear mixer (Mamba-2 / SSD style), causal or bidirectional (Hydra style).

Per head, the input sets the time step ``dt = softplus(W_dt x + b_dt)`` and a learned negative
rate ``A = -exp(A_log)`` turns it into a log-gate ``g = dt * A <= 0``; the mixer is
``linear_attention(q, k, v, visibility, log_gate=g, reverse_log_gate=g_rev)``, i.e. the
recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t S_t`` under a causal spec, plus
the same recurrence over the flipped sequence with its own time step (``g_rev``) wherever the
spec shows later keys (``Full()``, ``Prefix(n)``, ``Chunked(size, lookahead)``; with
``Segments`` nothing crosses a document boundary in either direction).

``q`` (Mamba's ``C``) and ``k`` (``B``) are L2-normalised per head (``feature_dim`` wide), ``v``
is the head's input (``head_dim`` wide); the mixed output is RMS-normalised per head and gated
by ``silu(z)`` before the output projection. No short convolution (the pointwise-in-time
layer contract of the streams then holds without a convolution state). Everything except the
mixer is pointwise in time, so the layer streams (:class:`causalmix.stream.ModelStream`): its
``qkv`` returns the gates as per-frame inputs by name, as the linear op and its stream's
``push`` take them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.nn.config import AttentionConfig
from causalmix.nn.mixing import MixingLayer

__all__ = ["GatedMixer"]


class GatedMixer(MixingLayer):
    """One gated linear layer: ``forward(x: [B, T, C], *, visibility, offset=0) -> [B, T, C]``
    (the mixing is ``linear_attention`` with the gates, so ``op == "linear"``).

    Its parts, as the streams use them: ``qkv(x [B, n, C], positions)`` -> ``{"q": [B, n, H, F],
    "k": [B, n, Hkv, F], "v": [B, n, Hkv, hd], "log_gate": [B, n, H],
    "reverse_log_gate": [B, n, H]}``;
    ``out(mixed [B, n, H, hd], x [B, n, C]) -> [B, n, C]``.
    """

    def __init__(self, cfg: AttentionConfig, *, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if cfg.mixer != "gated":
            raise ValueError(f"GatedMixer: mixer must be 'gated', got {cfg.mixer!r}")
        self.cfg = cfg
        self.op = "linear"
        h, hkv, hd, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.feature_dim
        self.q_proj = nn.Linear(cfg.d_model, h * f, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, hkv * f, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.z_proj = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.dt_proj = nn.Linear(cfg.d_model, 2 * h, bias=False)  # forward, reverse
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        # Mamba-2 initialisation: dt log-uniform in [dt_min, dt_max] through the bias, A in [1, 16]
        dt = torch.exp(torch.rand(2 * h) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, h)))
        self.norm_weight = nn.Parameter(torch.ones(hd))

    def mixer_kwargs(self) -> dict:
        return {}

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, n, C]`` -> forward and reverse log-gates ``[B, n, H]`` (fp32, ``<= 0``)."""
        h = self.cfg.n_heads
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt = F.softplus(self.dt_proj(x).to(cd) + self.dt_bias.to(cd))  # [B, n, 2H], >= 0
        rate = torch.exp(self.A_log.to(cd))  # -A > 0
        g = -(dt * torch.cat([rate, rate]))
        return g[..., :h], g[..., h:]

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b, n, _ = x.shape
        q = F.normalize(self.q_proj(x).view(b, n, cfg.n_heads, -1), dim=-1)
        k = F.normalize(self.k_proj(x).view(b, n, cfg.n_kv_heads, -1), dim=-1)
        v = self.v_proj(x).view(b, n, cfg.n_kv_heads, cfg.head_dim)
        g, g_rev = self.gates(x)
        return {"q": q, "k": k, "v": v, "log_gate": g, "reverse_log_gate": g_rev}

    def out(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``mixed: [B, n, H, hd]``, ``x: [B, n, C]`` (the normalised layer input, for the output
        gate) -> ``[B, n, C]``."""
        z = self.z_proj(x).view(*mixed.shape[:3], -1)
        return gated_norm_out(mixed, z, self.norm_weight, self.o_proj)


def gated_norm_out(mixed: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor,
                   o_proj: nn.Module) -> torch.Tensor:
    """The output of the gated layers: per-head RMSNorm of ``mixed: [B, n, H, hd]`` scaled by
    ``norm_weight``, times ``silu(z)`` (``z: [B, n, H, hd]``, the output gate), projected by
    ``o_proj`` -> ``[B, n, C]``."""
    b, n = mixed.shape[:2]
    y = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
    return o_proj((y * F.silu(z)).reshape(b, n, -1))
