"""The Gated DeltaNet layers of transformers (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-Hybrid)
run through :func:`causalmix.delta_attention`.

The layer's own projections, convolution weights, norm and output projection; causalmix's
convolution (restarted per document, conv.py) and scan. Per architecture only the input map
differs (``_INPUTS``); after it, in causalmix's names (value grouping: ``Hk`` key heads of
``Dk``, ``Hv`` value heads of ``Dv``)::

    q, k, v = split(act(conv(cat(q, k, v))))            # [Hk, Dk], [Hk, Dk], [Hv, Dv]
    q = l2norm(q) Dk^-1/2;  k = l2norm(k)               # x rsqrt(sum x^2 + 1e-6), fp32
    beta = sigmoid(b) (x 2 for OLMo-Hybrid's linear_allow_neg_eigval)
    g = -exp(A_log) softplus(a + dt_bias)
    o = delta_attention(q, k, v, spec, beta=beta, log_gate=g)
    out = out_proj(norm(o, z))                          # the layer's gated RMSNorm per head

Padding is exact: a padding position writes nothing (``k = 0``: the delta update ``k (beta (v -
S^T k))^T`` vanishes) and decays nothing (log-gate 0), and the convolution skips it. Under
``Full()``, ``Prefix(n)``, ``Chunked`` the delta family adds its reverse part (the recurrence
run backwards from the query's last visible key, the same gates and beta); the convolution
stays causal, restarted at every document start. The cache is transformers' own:
``conv_states [B, 2 Hk Dk + Hv Dv, K]``, ``recurrent_states [B, Hv, Dk, Dv]`` (causalmix's
layout as is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from causalmix.checks import compute_dtype
from causalmix.hf.hybrid.context import LayerCall, layer_call
from causalmix.hf.hybrid.conv import short_conv
from causalmix.hf.hybrid.scan import delta_scan

__all__ = ["KIND", "gated_deltanet_forward"]

KIND = "a Gated DeltaNet layer"


def _qwen3_next(self, h: torch.Tensor):
    """``(cat(q, k, v) [B, T, conv_dim], z [B, T, Hv, Dv], b [B, T, Hv], a [B, T, Hv])``."""
    q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(h), self.in_proj_ba(h))
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)], dim=-1)
    return mixed, z, b, a


def _qwen3_5(self, h: torch.Tensor):
    z = self.in_proj_z(h).reshape(h.shape[0], h.shape[1], -1, self.head_v_dim)
    return self.in_proj_qkv(h), z, self.in_proj_b(h), self.in_proj_a(h)


def _olmo_hybrid(self, h: torch.Tensor):
    mixed = torch.cat([self.q_proj(h), self.k_proj(h), self.v_proj(h)], dim=-1)
    z = self.g_proj(h).reshape(h.shape[0], h.shape[1], -1, self.head_v_dim)
    return mixed, z, self.b_proj(h), self.a_proj(h)


#: layer class name -> its input map.
_INPUTS = {"Qwen3NextGatedDeltaNet": _qwen3_next, "Qwen3_5GatedDeltaNet": _qwen3_5,
           "Qwen3_5MoeGatedDeltaNet": _qwen3_5, "OlmoHybridGatedDeltaNet": _olmo_hybrid}


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _scan_inputs(self, mixed: torch.Tensor, b: torch.Tensor, a: torch.Tensor, call: LayerCall):
    """``(q, k, v, beta, log_gate)`` of the delta scan, in the compute dtype."""
    bs, t, _ = mixed.shape
    cd = compute_dtype(mixed)
    q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
    q = _l2norm(q.reshape(bs, t, -1, self.head_k_dim).to(cd)) * self.head_k_dim ** -0.5
    k = _l2norm(k.reshape(bs, t, -1, self.head_k_dim).to(cd))
    v = v.reshape(bs, t, -1, self.head_v_dim).to(cd)
    beta = b.to(cd).sigmoid()
    if getattr(self, "allow_neg_eigval", False):
        beta = beta * 2.0
    beta = beta.clamp_min(torch.finfo(cd).tiny)  # sigmoid may underflow to 0: no write either way
    log_gate = -torch.exp(self.A_log.to(cd)) * F.softplus(a.to(cd) + self.dt_bias.to(cd))
    if call.valid is not None:
        k = k * call.valid[..., None, None]
        log_gate = log_gate * call.valid[..., None]
    return q, k, v, beta, log_gate


def gated_deltanet_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None,
                           **kwargs) -> torch.Tensor:
    """Instance ``forward`` of an attached model's Gated DeltaNet layer (``self``): the layer's
    math with causalmix's scan and convolution under the call's spec (module docstring)."""
    if kwargs.get("cache_params") is not None:  # transformers' deprecated name of `cache`
        cache = kwargs.pop("cache_params") if cache is None else cache
    kwargs.pop("cache_params", None)
    call = layer_call(self, hidden_states, cache, attention_mask, kwargs, kind=KIND)
    bs, t, _ = hidden_states.shape
    mixed, z, b, a = _INPUTS[type(self).__name__](self, hidden_states)
    conv = short_conv(mixed, self.conv1d.weight[:, 0], self.conv1d.bias, past=call.conv_state,
                      valid=call.valid, segments=call.segments)
    mixed = ACT2FN[self.activation](conv.output).to(hidden_states.dtype)
    inputs = _scan_inputs(self, mixed, b, a, call)
    out = delta_scan(self, call, cache, conv, inputs, t=t, dtype=mixed.dtype)
    norm = self.o_norm if hasattr(self, "o_norm") else self.norm
    proj = self.o_proj if hasattr(self, "o_proj") else self.out_proj
    o = norm(out.to(hidden_states.dtype).reshape(-1, self.head_v_dim),
             z.reshape(-1, self.head_v_dim))
    return proj(o.reshape(bs, t, -1))
