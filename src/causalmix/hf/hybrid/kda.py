"""Kimi Linear's Kimi Delta Attention layers (``KimiLinearDeltaAttention``) run through
:func:`causalmix.delta_attention` with per-channel gates.

The layer's own projections, convolution weights, gate parameters, norm and output projection;
causalmix's convolution (restarted per document, conv.py) and scan. In causalmix's names (``H``
heads of ``D`` for queries, keys and values alike)::

    q, k, v = split(silu(conv(cat(q_proj h, k_proj h, v_proj h))))     # [H, D] each
    q = l2norm(q) D^-1/2;  k = l2norm(k)                # x / sqrt(sum x^2 + 1e-6), fp32
    beta = sigmoid(b_proj h)                            # [H]
    g = -exp(A_log) softplus(f_b(f_a h) + dt_bias)      # [H, D]: one log-gate per key channel
    o = delta_attention(q, k, v, spec, beta=beta, log_gate=g)
    out = o_proj(o_norm(o, g_b(g_a h)))                 # the layer's sigmoid-gated RMSNorm

Padding is exact as for Gated DeltaNet: a padding position writes nothing (``k = 0``) and
decays nothing (log-gate 0), and the convolution skips it. Under ``Full()``, ``Prefix(n)``,
``Chunked`` the delta family adds its reverse part (the recurrence run backwards from the
query's last visible key, the same per-channel gates and beta); the convolution stays causal,
restarted at every document start. The cache is transformers' own: ``conv_states [B, 3 H D,
K]``, ``recurrent_states [B, H, D, D]`` (causalmix's layout as is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from causalmix.checks import compute_dtype
from causalmix.hf.hybrid.context import LayerCall, layer_call
from causalmix.hf.hybrid.conv import short_conv
from causalmix.hf.hybrid.scan import delta_scan

__all__ = ["KIND", "kda_forward"]

KIND = "a Kimi Delta Attention (KDA) layer"


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _scan_inputs(self, mixed: torch.Tensor, h: torch.Tensor, call: LayerCall):
    """``(q, k, v, beta, log_gate)`` of the delta scan, in the compute dtype."""
    bs, t, _ = mixed.shape
    cd = compute_dtype(mixed)
    shape = (bs, t, -1, self.head_dim)
    q, k, v = (x.reshape(shape).to(cd) for x in mixed.split([self.qkv_dim] * 3, dim=-1))
    q = _l2norm(q) * self.head_dim ** -0.5
    k = _l2norm(k)
    beta = self.b_proj(h).to(cd).sigmoid().clamp_min(torch.finfo(cd).tiny)
    fg = self.forget_gate
    gate = (fg.f_b_proj(fg.f_a_proj(h)).to(cd) + fg.dt_bias.to(cd)).reshape(shape)
    log_gate = -torch.exp(fg.A_log.to(cd)) * F.softplus(gate)
    if call.valid is not None:
        k = k * call.valid[..., None, None]
        log_gate = log_gate * call.valid[..., None, None]
    return q, k, v, beta, log_gate


def kda_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                **kwargs) -> torch.Tensor:
    """Instance ``forward`` of an attached model's KDA layer (``self``): the layer's math with
    causalmix's scan and convolution under the call's spec (module docstring)."""
    if kwargs.get("cache_params") is not None:  # transformers' deprecated name of `cache`
        cache = kwargs.pop("cache_params") if cache is None else cache
    kwargs.pop("cache_params", None)
    call = layer_call(self, hidden_states, cache, attention_mask, kwargs, kind=KIND)
    bs, t, _ = hidden_states.shape
    h = hidden_states
    mixed = torch.cat([self.q_proj(h), self.k_proj(h), self.v_proj(h)], dim=-1)
    conv = short_conv(mixed, self.conv1d.weight[:, 0], self.conv1d.bias, past=call.conv_state,
                      valid=call.valid, segments=call.segments)
    mixed = ACT2FN[self.activation](conv.output).to(h.dtype)
    inputs = _scan_inputs(self, mixed, h, call)
    out = delta_scan(self, call, cache, conv, inputs, t=t, dtype=mixed.dtype)
    gate = self.g_b_proj(self.g_a_proj(h)).reshape(bs, t, -1, self.head_dim)
    o = self.o_norm(out.to(h.dtype), gate)
    return self.o_proj(o.reshape(bs, t, -1))
