"""A gated linear attention mixer (GLA, Yang et al. 2023), causal or bidirectional.

Per head, the input sets a log-gate for every key dimension from a low-rank projection, as in
the GLA paper: ``alpha_t = sigmoid(x_t W1 W2 + b) ** (1 / tau)``, i.e. ``g_t = logsigmoid(x_t W1
W2 + b) / tau <= 0`` (rank ``gate_rank`` = 16, temperature ``tau`` = 16: the paper's values;
``b`` initialised so that gates start slow, ``alpha`` near ``sigmoid(4) ** (1/16) = 0.999``).
The forward and the reverse gate share ``W1`` (one bottleneck) and have their own ``W2, b``.
The mixer is ``linear_attention(q, k, v, visibility, log_gate=g, reverse_log_gate=g_rev)`` with
``g, g_rev: [B, T, H, F]``: ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t S_t`` under a
causal spec, plus the same recurrence over the flipped sequence with its own low-rank gate
(``g_rev``) wherever the spec shows later keys (``Full()``, ``Prefix(n)``, ``Chunked(size,
lookahead)``; with ``Segments`` nothing crosses a document boundary).

``q`` and ``k`` are ``feature_dim`` wide per head (``q`` scaled by ``feature_dim ** -0.5``),
``v`` is ``head_dim`` wide; the mixed output is RMS-normalised per head and gated by
``silu(x W_r)`` before the output projection (the paper's output gate). Everything except the
mixer is pointwise in time, so the layer streams (:class:`causalmix.stream.ModelStream`) and
shards like the gated layer: ``qkv`` returns the gates as per-frame inputs by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from causalmix.nn.config import AttentionConfig
from causalmix.nn.gated import gated_norm_out
from causalmix.nn.mixing import MixingLayer

__all__ = ["GLAMixer"]


class GLAMixer(MixingLayer):
    """One GLA layer: ``forward(x: [B, T, C], *, visibility, offset=0) -> [B, T, C]`` (the
    mixing is ``linear_attention`` with per key dimension gates, so ``op == "linear"``).

    Its parts, as the streams use them: ``qkv(x [B, n, C], positions)`` -> ``{"q": [B, n, H, F],
    "k": [B, n, Hkv, F], "v": [B, n, Hkv, hd], "log_gate": [B, n, H, F], "reverse_log_gate":
    [B, n, H, F]}``; ``out(mixed [B, n, H, hd], x [B, n, C]) -> [B, n, C]``.
    ``gate_rank`` and ``temperature``: the low-rank gate projection's rank and ``tau``.
    """

    def __init__(self, cfg: AttentionConfig, *, gate_rank: int = 16,
                 temperature: float = 16.0):
        super().__init__()
        if cfg.mixer != "gla":
            raise ValueError(f"GLAMixer: mixer must be 'gla', got {cfg.mixer!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ValueError(f"GLAMixer: temperature must be a positive number, got "
                             f"{temperature!r}")
        self.cfg, self.op, self.temperature = cfg, "linear", float(temperature)
        h, hkv, hd, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.feature_dim
        self.q_proj = nn.Linear(cfg.d_model, h * f, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, hkv * f, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.r_proj = nn.Linear(cfg.d_model, h * hd, bias=False)  # output gate
        # low-rank gates: x W1 (rank, shared) -> W2 (forward and reverse, 2 H F) + b
        self.gate_down = nn.Linear(cfg.d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, 2 * h * f)
        nn.init.constant_(self.gate_up.bias, 4.0)
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(hd))

    def mixer_kwargs(self) -> dict:
        return {}

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, n, C]`` -> forward and reverse log-gates ``[B, n, H, F]`` (fp32 or fp64,
        ``<= 0``): ``logsigmoid(x W1 W2 + b) / tau``."""
        cfg = self.cfg
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = F.logsigmoid(self.gate_up(self.gate_down(x)).to(cd)) / self.temperature
        g = g.view(*x.shape[:2], 2, cfg.n_heads, cfg.feature_dim)
        return g[:, :, 0], g[:, :, 1]

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, cfg.n_heads, -1) * cfg.feature_dim ** -0.5
        k = self.k_proj(x).view(b, n, cfg.n_kv_heads, -1)
        v = self.v_proj(x).view(b, n, cfg.n_kv_heads, cfg.head_dim)
        g, g_rev = self.gates(x)
        return {"q": q, "k": k, "v": v, "log_gate": g, "reverse_log_gate": g_rev}

    def out(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``mixed: [B, n, H, hd]``, ``x: [B, n, C]`` (the normalised layer input, for the output
        gate) -> ``[B, n, C]``."""
        r = self.r_proj(x).view(*mixed.shape[:3], -1)
        return gated_norm_out(mixed, r, self.norm_weight, self.o_proj)
